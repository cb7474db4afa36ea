"""A PyTorch-autograd reference for model.grad (test-only).

GPT-2 written out in torch with the HuggingFace model's weights, its sites named and
shaped as TransformerLens's, so that any site's gradient of a mechscope metric comes
from autograd. It follows the gradient API of issue 10 (model.grad(tokens, metric,
sites=..., interventions=..., attention_mask=...) -> value, metric [batch], sites,
activations) for GPT-2 models and full-site Set interventions (values held constant:
no gradient flows through them); `replace` also lets a test patch any part of a site
in the forward (the slow definitions of the tests)."""
import numpy as np
import torch
from transformers.activations import ACT2FN


class Gradients:
    def __init__(self, value, metric, sites, activations):
        self.value, self.metric, self.sites, self.activations = value, metric, sites, activations

    def __getitem__(self, name):
        return self.sites[name]


class TorchGrad:
    """grad = TorchGrad(hf_model, ms_model); grad(tokens, metric, sites=[...])."""

    def __init__(self, hf_model, ms_model):
        self.hf, self.ms = hf_model, ms_model
        self.cfg = hf_model.config
        self.p = {k: v.detach().clone().float() for k, v in hf_model.state_dict().items()}

    def _metric_rows(self, metric, logits, mask):
        B, T, _ = logits.shape
        args = metric.core_args(self.ms, B, T, None if mask is None else mask.astype(np.int32))
        rows = torch.arange(B)
        last = logits[rows, torch.as_tensor(args["pos"], dtype=torch.long)].double()
        kind = args["metric"]
        if kind == 1:
            c, w = (torch.as_tensor(args[k], dtype=torch.long) for k in ("correct", "wrong"))
            return last[rows, c] - last[rows, w]
        logp = torch.log_softmax(last, -1)
        if kind in (2, 3):
            v = logp[rows, torch.as_tensor(args["correct"], dtype=torch.long)]
            return v if kind == 2 else v.exp()
        ref = torch.as_tensor(args["ref_logprob"], dtype=torch.float64)
        return (ref.exp() * (ref - logp)).sum(-1)

    def forward(self, tokens, mask=None, sites=(), interventions=None, replace=None):
        """-> (logits [B, T, V], {site: tensor in the graph}, {site: detached value})."""
        replace = dict(replace or {})
        for iv in interventions or []:
            if type(iv).__name__ not in ("Set", "Zero") or any(getattr(iv, a) is not None for a in
                                                                ("pos", "head", "index", "key_pos", "row")):
                raise NotImplementedError(f"the torch reference takes full-site Set interventions, not {iv!r}")
            value = torch.as_tensor(np.asarray(iv.value if type(iv).__name__ == "Set" else 0.0, np.float32))
            replace[iv.site] = (lambda v: (lambda x: v.expand_as(x).clone()))(value)
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        B, T = tokens.shape
        m = np.ones((B, T), np.int64) if mask is None else np.asarray(mask, np.int64)
        positions = torch.as_tensor(np.clip(np.cumsum(m, -1) - 1, 0, None), dtype=torch.long)
        real = torch.as_tensor(m.astype(bool))
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & real[:, None, :] & real[:, :, None]
        wanted, graph, values = set(sites), {}, {}

        def site(name, x):
            if name in replace:
                x = replace[name](x.detach())
            if name in wanted:
                z = torch.zeros_like(x, requires_grad=True)  # d/dz of (x + z) = d/dx after the replacement
                x = x + z
                graph[name] = z
            values[name] = x.detach()
            return x

        p, c = self.p, self.cfg
        H = c.n_head
        dh = c.n_embd // H
        eps = c.layer_norm_epsilon
        act = ACT2FN[c.activation_function]

        def ln(x, prefix):
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + eps) * p[prefix + ".weight"] + p[prefix + ".bias"]

        embed = site("hook_embed", p["transformer.wte.weight"][tokens])
        pos = site("hook_pos_embed", p["transformer.wpe.weight"][positions])
        x = embed + pos
        for layer in range(c.n_layer):
            pre = f"transformer.h.{layer}."
            blk = f"blocks.{layer}."
            x = site(blk + "hook_resid_pre", x)
            qkv = ln(x, pre + "ln_1") @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]
            q, k, v = (t.reshape(B, T, H, dh) for t in qkv.split(c.n_embd, -1))
            q, k, v = site(blk + "attn.hook_q", q), site(blk + "attn.hook_k", k), site(blk + "attn.hook_v", v)
            scale = (1 / dh ** 0.5 if c.scale_attn_weights else 1.0)
            if c.scale_attn_by_inverse_layer_idx:
                scale /= layer + 1
            scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
            scores = site(blk + "attn.hook_attn_scores", scores)
            filled = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
            pattern = torch.softmax(filled, -1) * allowed[:, None].any(-1, keepdim=True)
            pattern = site(blk + "attn.hook_pattern", pattern)
            z = site(blk + "attn.hook_z", torch.einsum("bhij,bjhd->bihd", pattern, v))
            attn_out = z.reshape(B, T, -1) @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
            attn_out = site(blk + "hook_attn_out", attn_out)
            x = site(blk + "hook_resid_mid", x + attn_out)
            h = site(blk + "mlp.hook_pre", ln(x, pre + "ln_2") @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
            h = site(blk + "mlp.hook_post", act(h))
            mlp_out = site(blk + "hook_mlp_out", h @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"])
            x = site(blk + "hook_resid_post", x + mlp_out)
        unembed = p.get("lm_head.weight", p["transformer.wte.weight"])
        logits = ln(x, "transformer.ln_f") @ unembed.T
        for name in list(values):  # as mechscope caches them: masked scores are -inf
            if name.endswith("hook_attn_scores"):
                values[name] = values[name].masked_fill(~allowed[:, None], -np.inf)
        return logits, graph, values

    def __call__(self, tokens, metric, *, sites=(), weights=False, interventions=None, attention_mask=None,
                 progress=None):
        if weights:
            raise NotImplementedError("the torch reference gives site gradients only")
        if hasattr(metric, "metric") and hasattr(metric, "clean_rows"):  # Recovery: its raw metric
            metric = metric.metric
        tokens = np.asarray(tokens)
        if attention_mask is None:
            attention_mask = getattr(tokens, "attention_mask", None)
        names = list(sites) if not isinstance(sites, str) else [sites]
        with torch.enable_grad():
            logits, graph, values = self.forward(tokens, attention_mask, names, interventions)
            missing = [n for n in names if n not in graph]
            if missing:
                raise NotImplementedError(f"the torch reference has no site {missing[0]!r}")
            rows = self._metric_rows(metric, logits, None if attention_mask is None else np.asarray(attention_mask))
            total = rows.sum()
            grads = torch.autograd.grad(total, [graph[n] for n in names], allow_unused=True)
        out = {n: (np.zeros(tuple(graph[n].shape), np.float32) if g is None else g.numpy().astype(np.float32))
               for n, g in zip(names, grads)}
        return Gradients(float(total), rows.detach().numpy().astype(np.float32), out,
                         {n: values[n].numpy() for n in names})
