"""PyTorch references for the DAS tests: the HF GPT-2 with a mechscope model's weights and
the DAS loss of an interchange, differentiated by autograd."""
import numpy as np
import torch
import transformers

_HF = {}


def hf_model(model, dtype=torch.float64):
    """transformers' GPT2LMHeadModel (eager) holding the mechscope model's weights."""
    key = (id(model), dtype)
    if key not in _HF:
        cfg = {k: v for k, v in model.config.items() if k in transformers.GPT2Config().to_dict()}
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**dict(cfg, attn_implementation="eager")))
        state = {("" if k.startswith("lm_head") else "transformer.") + k: torch.as_tensor(v)
                 for k, v in model._weights.items()}
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        hf.load_state_dict(state, strict=False)
        _HF[key] = hf.to(dtype).eval()
    return _HF[key]


def _resid_layer(site, n_layers):
    """blocks.L.hook_resid_pre -> L; blocks.L.hook_resid_post -> L + 1 (n_layers: ln_f's input)."""
    _, layer, name = site.split(".", 2)
    if name == "hook_resid_pre":
        return int(layer)
    if name == "hook_resid_post":
        return int(layer) + 1
    raise ValueError(f"the torch reference handles resid_pre/resid_post sites, not {site!r}")


def run_with_edit(hf, tokens, site, edit):
    """Logits [B, T, V] of the HF model with edit(h) -> h' applied to the site's value
    (the residual stream entering block L, or ln_f for the last resid_post)."""
    L = _resid_layer(site, hf.config.n_layer)
    module = hf.transformer.h[L] if L < hf.config.n_layer else hf.transformer.ln_f

    def pre_hook(mod, args, kwargs):
        if args:
            return (edit(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = edit(kwargs["hidden_states"])
        return args, kwargs

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return hf(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    finally:
        handle.remove()


def site_values(hf, tokens, site):
    seen = {}

    def keep(h):
        seen["h"] = h.detach()
        return h
    with torch.no_grad():
        run_with_edit(hf, tokens, site, keep)
    return seen["h"]


def das_loss(model, site, Q, base, source, labels, pos, mask=None, dtype=torch.float64):
    """-mean log p(label) at each base row's last token of the run whose site, at positions
    pos, is h_b + Q diag(mask) Q^T (h_s - h_b); Q (and mask) torch tensors (autograd)."""
    hf = hf_model(model, dtype)
    hs = site_values(hf, source, site)

    def edit(h):
        D = hs[:, pos] - h[:, pos]
        coords = D @ Q
        if mask is not None:
            coords = coords * mask
        h = h.clone()
        h[:, pos] = h[:, pos] + coords @ Q.T
        return h

    logits = run_with_edit(hf, base, site, edit)[:, -1]
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[torch.arange(len(labels)), torch.as_tensor(np.asarray(labels))].mean()
