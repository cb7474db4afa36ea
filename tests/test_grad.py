"""Gradients from the C core's backward pass against PyTorch autograd on the same
HuggingFace model: every site's gradient (through hooks that add a zero tensor at the
site, whose gradient is the site's) and every weight's, within 1e-4 relative
(max |a - b| / max |b|), on padded batches and length 1, with interventions."""
import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import make_hf_model, positions_from_mask

RTOL = 1e-4

CFG = dict(n_embd=24, n_head=3, n_layer=2, vocab_size=61, n_positions=24, activation_function="gelu_new")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return np.abs(a - b).max() / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module")
def gpt2():
    hf = make_hf_model(CFG, seed=3)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    return hf, model


def batch(rng, vocab, lengths, T, side):
    tokens = rng.integers(0, vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    return tokens, mask


# ---- the reference: autograd on the HF model, sites reached by adding zero tensors --------

SITE_MODULES = {  # site suffix -> (module path under the block, output or input)
    "ln1.hook_normalized": ("ln_1", "out"), "attn.hook_pattern": ("attn.attn_dropout", "out"),
    "attn.hook_z": ("attn.c_proj", "in"), "hook_attn_out": ("attn.c_proj", "out"),
    "hook_resid_mid": ("ln_2", "in"), "ln2.hook_normalized": ("ln_2", "out"),
    "mlp.hook_pre": ("mlp.c_fc", "out"), "mlp.hook_post": ("mlp.c_proj", "in"),
    "hook_mlp_out": ("mlp", "out"), "hook_resid_pre": ("", "in"), "hook_resid_post": ("", "out"),
    "attn.qkv": ("attn.c_attn", "out"),
}


def _module(root, path):
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


def hf_gradients(hf, tokens, mask, scalar_fn, site_names, edits=()):
    """(scalar, {site: grad as mechscope shapes}, {param name: grad}); scalar_fn(logits)
    -> the scalar; edits: (site, fn(value) -> new value) applied by hooks."""
    deltas, handles = {}, []
    H = hf.config.n_head

    def attach(name, module, where, edit=None):
        def add(value):
            if edit is not None:
                value = edit(value)
            d = torch.zeros_like(value, requires_grad=True)
            deltas[name] = d
            return value + d

        if where == "out":
            def hook(mod, args, out):
                if isinstance(out, tuple):
                    return (add(out[0]),) + out[1:]
                return add(out)
            handles.append(module.register_forward_hook(hook))
        else:
            def pre(mod, args, kwargs):
                if args:
                    return (add(args[0]),) + args[1:], kwargs
                key = "hidden_states"
                kwargs[key] = add(kwargs[key])
                return args, kwargs
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    edit_of = dict(edits)
    wanted = set(site_names) | set(edit_of)
    wanted |= {n.replace("hook_resid_mid", "hook_resid_post") for n in wanted if n.endswith("hook_resid_mid")}
    for name in wanted:
        if name == "hook_embed":
            attach(name, hf.transformer.wte, "out", edit_of.get(name))
        elif name == "hook_pos_embed":
            attach(name, hf.transformer.wpe, "out", edit_of.get(name))
        elif name == "ln_final.hook_normalized":
            attach(name, hf.transformer.ln_f, "out", edit_of.get(name))
        else:
            _, layer, suffix = name.split(".", 2)
            key = "attn.qkv" if suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v") else suffix
            path, where = SITE_MODULES[key]
            tag = f"blocks.{layer}.{key}"
            if tag in deltas or any(h for h in () if h):
                continue
            attach(tag if key == "attn.qkv" else name, _module(hf.transformer.h[int(layer)], path), where,
                   edit_of.get(name))
    hf.zero_grad()
    try:
        with torch.enable_grad():
            ids = torch.tensor(tokens)
            m = torch.tensor(mask) if mask is not None else None
            full = np.ones(tokens.shape, np.int32) if mask is None else mask
            pos = torch.tensor(positions_from_mask(full))  # one row per row (hook_pos_embed per row)
            logits = hf(ids, attention_mask=m, position_ids=pos).logits
            value = scalar_fn(logits)
            value.backward()
    finally:
        for h in handles:
            h.remove()
    B, T = tokens.shape
    C = hf.config.n_embd
    for d in deltas.values():  # a site the scalar does not depend on (e.g. after every seed's site)
        if d.grad is None:
            d.grad = torch.zeros_like(d)
    out = {}
    for name in site_names:
        if name.endswith(("hook_q", "hook_k", "hook_v")):
            layer = name.split(".")[1]
            g = deltas[f"blocks.{layer}.attn.qkv"].grad.numpy()
            i = {"q": 0, "k": 1, "v": 2}[name[-1]]
            out[name] = g[..., i * C:(i + 1) * C].reshape(B, T, H, C // H)
        elif name.endswith("hook_z"):
            out[name] = deltas[name].grad.numpy().reshape(B, T, H, C // H)
        elif name.endswith("hook_resid_mid"):
            # the hook reaches ln_2's input; the residual adds resid_post's gradient
            layer = name.split(".")[1]
            out[name] = deltas[name].grad.numpy() + deltas[f"blocks.{layer}.hook_resid_post"].grad.numpy()
        else:
            out[name] = deltas[name].grad.numpy()
    params = {n[len("transformer."):] if n.startswith("transformer.") else n: p.grad.numpy().copy()
              for n, p in hf.named_parameters() if p.grad is not None}
    return float(value), out, params


def torch_metric(metric, mask):
    """The scalar mechscope differentiates, written in torch: sum over rows."""
    def fn(logits):
        B, T, _ = logits.shape
        pos = ms.metrics.last_positions(mask, B, T) if metric.pos is None else np.broadcast_to(metric.pos, (B,))
        y = logits[torch.arange(B), torch.tensor(pos)]
        lp = torch.log_softmax(y, -1)
        if isinstance(metric, ms.metrics.LogitDiff):
            c, w = np.broadcast_to(metric.correct, (B,)), np.broadcast_to(metric.wrong, (B,))
            return (y[torch.arange(B), torch.tensor(c)] - y[torch.arange(B), torch.tensor(w)]).sum()
        if isinstance(metric, ms.metrics.KL):
            ref = torch.tensor(metric.ref_logprob)
            return (ref.exp() * (ref - lp)).sum()
        c = torch.tensor(np.broadcast_to(metric.correct, (B,)).copy())
        chosen = lp[torch.arange(B), c]
        return chosen.exp().sum() if isinstance(metric, ms.metrics.Prob) else chosen.sum()
    return fn


def torch_cross_entropy(tokens, mask):
    """HF's loss with labels -100 wherever the token or the one before it is padding."""
    labels = torch.tensor(tokens).clone()
    if mask is not None:
        m = torch.tensor(mask).bool()
        keep = m.clone()
        keep[:, 1:] &= m[:, :-1]
        keep[:, 0] = False
        labels[~keep] = -100

    def fn(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    return fn


SITES = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized",
         "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern",
         "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
         "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
         "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern",
         "blocks.1.hook_resid_post", "ln_final.hook_normalized"]


def check(g, ref_sites, ref_params, mask, weights=True):
    for name, b in ref_sites.items():
        a = g[name]
        if name.endswith("hook_pattern"):  # keys after the query are never written: a constant 0
            T = a.shape[-1]
            b = b * np.tril(np.ones((T, T)))
        if mask is not None:  # mechscope: 0 at padding (HF's values there are not a token's)
            if name.endswith("hook_pattern"):
                real = mask[:, None, :, None] * mask[:, None, None, :]
            else:
                real = mask.reshape(mask.shape + (1,) * (a.ndim - 2))
            assert np.all(a[np.broadcast_to(real == 0, a.shape)] == 0), name
            b = b * real
        assert rel(a, b) < RTOL, (name, rel(a, b))
    if weights:
        assert set(g.weights) == set(ref_params)
        for name, b in ref_params.items():
            assert g.weights[name].shape == b.shape, name
            if np.abs(b).max() < 1e-7:  # 0 but for rounding (a key bias without rotary moves
                # every score of a row alike, which the softmax ignores): no relative error
                assert np.abs(g.weights[name]).max() < 1e-6, name
                continue
            assert rel(g.weights[name], b) < RTOL, (name, rel(g.weights[name], b))


@pytest.mark.parametrize("side", ["left", "right", None])
def test_cross_entropy_sites_and_weights(gpt2, side):
    hf, model = gpt2
    rng = np.random.default_rng(1)
    if side is None:
        tokens, mask = rng.integers(0, 61, (2, 7)), None
    else:
        tokens, mask = batch(rng, 61, [7, 4, 1], 7, side)
    value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, torch_cross_entropy(tokens, mask), SITES)
    g = model.grad(tokens, "cross_entropy", sites=SITES, weights=True, attention_mask=mask)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    # the activations are the run's cache
    run = model.run(tokens, attention_mask=mask, cache=SITES, logits=None)
    for name in SITES:
        np.testing.assert_array_equal(g.activations[name], run.cache[name])


METRICS = {
    "logit_diff": lambda B, V: ms.metrics.LogitDiff(np.arange(B) % V, (np.arange(B) + 5) % V),
    "logprob": lambda B, V: ms.metrics.LogProb(np.arange(B) + 3),
    "prob": lambda B, V: ms.metrics.Prob(7),
    "kl": lambda B, V: ms.metrics.KL(np.random.default_rng(5).normal(size=(B, V))),
}


@pytest.mark.parametrize("kind", sorted(METRICS))
def test_metrics_padded(gpt2, kind):
    hf, model = gpt2
    rng = np.random.default_rng(2)
    tokens, mask = batch(rng, 61, [6, 3, 5], 6, "left" if kind in ("prob", "kl") else "right")
    metric = METRICS[kind](3, 61)
    value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, torch_metric(metric, mask), SITES)
    g = model.grad(tokens, metric, sites=SITES, weights=True, attention_mask=mask)
    np.testing.assert_allclose(g.metric, metric.per_row(model, tokens, attention_mask=mask), rtol=1e-5, atol=1e-5)
    assert abs(g.value - value) < 1e-4 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)


def test_length_one(gpt2):
    hf, model = gpt2
    tokens = np.array([[5], [9]])
    metric = ms.metrics.LogProb([1, 2])
    value, ref_sites, ref_params = hf_gradients(hf, tokens, None, torch_metric(metric, None), SITES)
    g = model.grad(tokens, metric, sites=SITES, weights=True)
    check(g, ref_sites, ref_params, None)
    assert g["blocks.0.hook_resid_pre"].shape == (2, 1, 24)


def test_weight_subset_and_scores(gpt2):
    """A list of weights gives those; the scores' gradient is the softmax's backward of the pattern's."""
    hf, model = gpt2
    tokens = np.random.default_rng(3).integers(0, 61, (2, 5))
    metric = ms.metrics.LogitDiff(3, 4)
    g = model.grad(tokens, metric, sites=["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"],
                   weights=["h.1.mlp.c_fc.weight", "transformer.wte.weight"])
    assert sorted(g.weights) == ["h.1.mlp.c_fc.weight", "transformer.wte.weight"]  # as asked
    full = model.grad(tokens, metric, weights=True)
    np.testing.assert_array_equal(g.weights["transformer.wte.weight"], full.weights["wte.weight"])
    P = g.activations["blocks.1.attn.hook_pattern"]
    dP = g["blocks.1.attn.hook_pattern"]
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))
    assert rel(g["blocks.1.attn.hook_attn_scores"], dS) < RTOL


# ---- interventions: the gradient of the intervened run ------------------------------------

def _set_at(pos, value):
    def edit(x):
        x = x.clone()
        x[:, pos] = value
        return x
    return edit


def test_interventions_match_hooked_autograd(gpt2):
    """Zero, Set, Patch (constants), Add (identity), Scale, and a pattern Set, against
    the same changes made by torch hooks."""
    hf, model = gpt2
    rng = np.random.default_rng(4)
    tokens, mask = batch(rng, 61, [6, 4], 6, "right")
    vec = rng.normal(size=24).astype(np.float32)
    patch_src = rng.normal(size=(2, 6, 24)).astype(np.float32)
    interventions = [
        ms.Zero("blocks.0.hook_attn_out", pos=[1, 2]),
        ms.Add("blocks.1.hook_resid_pre", vec, scale=0.5),
        ms.Scale("blocks.0.mlp.hook_post", 0.5, index=[0, 3, 7]),
        ms.Set("blocks.1.attn.hook_pattern", 0.3, head=0, pos=3, key_pos=1),
        ms.Patch("blocks.0.hook_resid_post", patch_src, pos=2, index=[1, 2, 3]),
    ]

    def scale_edit(x):
        x = x.clone()
        x[..., [0, 3, 7]] = x[..., [0, 3, 7]] * 0.5
        return x

    def pattern_edit(x):
        x = x.clone()
        x[:, 0, 3, 1] = 0.3
        return x

    def patch_edit(x):
        x = x.clone()
        x[:, 2, 1:4] = torch.tensor(patch_src[:, 2, 1:4])
        return x

    edits = [("blocks.0.hook_attn_out", _set_at([1, 2], 0.0)),
             ("blocks.1.hook_resid_pre", lambda x: x + 0.5 * torch.tensor(vec)),
             ("blocks.0.mlp.hook_post", scale_edit), ("blocks.1.attn.hook_pattern", pattern_edit),
             ("blocks.0.hook_resid_post", patch_edit)]
    # (not hook_resid_mid: the reference reaches it through resid_post, which the patch writes)
    sites = [n for n in SITES if n != "blocks.0.hook_resid_mid"] + ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    metric = ms.metrics.LogProb([3, 8])
    value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, torch_metric(metric, mask), sites, edits)
    g = model.grad(tokens, metric, sites=sites, weights=True, attention_mask=mask, interventions=interventions)
    assert abs(g.value - value) < 1e-4 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    # the written entries are constants: their gradient before the write is 0, after it is not
    assert np.all(g["blocks.0.hook_attn_out"][:, [1, 2]] != 0)
    run = model.run(tokens, attention_mask=mask, cache=sites, logits=None, interventions=interventions)
    for name in sites:
        np.testing.assert_array_equal(g.activations[name], run.cache[name])


def _basis(rng, n, k):
    return np.linalg.qr(rng.normal(size=(n, k)))[0].astype(np.float32)


def test_subspace_patch_from_array(gpt2):
    hf, model = gpt2
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 61, (2, 5))
    Q = _basis(rng, 24, 3)
    s = rng.normal(size=(2, 5, 24)).astype(np.float32)
    iv = ms.SubspacePatch("blocks.0.hook_resid_post", Q, s, pos=3)
    Qt, st = torch.tensor(Q), torch.tensor(s[:, 3])

    def edit(x):
        x = x.clone()
        x[:, 3] = x[:, 3] + (st - x[:, 3]) @ Qt @ Qt.T
        return x

    metric = ms.metrics.LogitDiff([1, 2], [4, 5])
    sites = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    value, ref_sites, ref_params = hf_gradients(hf, tokens, None, torch_metric(metric, None), sites,
                                                [("blocks.0.hook_resid_post", edit)])
    g = model.grad(tokens, metric, sites=sites, weights=True, interventions=[iv])
    check(g, ref_sites, ref_params, None)


def test_subspace_patch_from_source_rows(gpt2):
    """DAS's interchange: base and source rows in one run; the source's part is a
    constant, the base's value after the interchange gets the gradient."""
    hf, model = gpt2
    rng = np.random.default_rng(7)
    base, source = rng.integers(0, 61, (3, 6)), rng.integers(0, 61, (3, 6))
    Q = _basis(rng, 24, 2)
    iv = ms.SubspacePatch("blocks.1.hook_resid_pre", Q, ms.Source(source), pos=[2, 5])
    with torch.no_grad():
        hs = hf(torch.tensor(source), output_hidden_states=True).hidden_states[1]
    Qt = torch.tensor(Q)

    def edit(x):
        x = x.clone()
        x[:, [2, 5]] = x[:, [2, 5]] + (hs[:, [2, 5]] - x[:, [2, 5]]) @ Qt @ Qt.T
        return x

    metric = ms.metrics.LogProb([1, 2, 3])
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"]
    value, ref_sites, ref_params = hf_gradients(hf, base, None, torch_metric(metric, None), sites,
                                                [("blocks.1.hook_resid_pre", edit)])
    g = model.grad(base, metric, sites=sites, weights=True, interventions=[iv])
    assert g.metric.shape == (3,) and g["blocks.1.hook_resid_pre"].shape == (3, 6, 24)
    np.testing.assert_allclose(g.metric, metric.per_row(model, base, interventions=[iv]), rtol=1e-5, atol=1e-5)
    check(g, ref_sites, ref_params, None)


def test_hooks_refused(gpt2):
    _, model = gpt2
    with pytest.raises(ValueError, match="hooks"):
        model.grad(np.array([[1, 2, 3]]), "cross_entropy", hooks={"blocks.0.hook_resid_pre": lambda x, n: x})


# ---- Llama, Mistral, Qwen2, GPT-NeoX ---------------------------------------------------------

from test_architectures import CONFIGS as ARCH_CONFIGS, make_hf as make_arch_hf  # noqa: E402

# site suffix -> (module path under the layer, in/out), per family
_LLAMA = {"hook_attn_out": ("self_attn", "out"), "attn.hook_z": ("self_attn.o_proj", "in"),
          "attn.hook_q": ("self_attn.q_proj", "out"), "attn.hook_k": ("self_attn.k_proj", "out"),
          "attn.hook_v": ("self_attn.v_proj", "out"), "mlp.hook_pre": ("mlp.gate_proj", "out"),
          "mlp.hook_pre_linear": ("mlp.up_proj", "out"), "mlp.hook_post": ("mlp.down_proj", "in"),
          "hook_mlp_out": ("mlp", "out"), "ln1.hook_normalized": ("input_layernorm", "out"),
          "ln2.hook_normalized": ("post_attention_layernorm", "out"), "hook_resid_pre": ("", "in"),
          "hook_resid_post": ("", "out")}
# Gemma 2 and 3: the outputs' sites are after their norms; the MLP's input norm has another name
_GEMMA2 = dict(_LLAMA, hook_attn_out=("post_attention_layernorm", "out"),
               hook_mlp_out=("post_feedforward_layernorm", "out"),
               **{"ln2.hook_normalized": ("pre_feedforward_layernorm", "out"),
                  "ln1_post.hook_normalized": ("post_attention_layernorm", "out"),
                  "ln2_post.hook_normalized": ("post_feedforward_layernorm", "out")})
# Phi-3: q|k|v and gate|up are one product each; the sites are their parts
_PHI3 = dict(_LLAMA, **{"attn.qkv": ("self_attn.qkv_proj", "out"), "mlp.gate_up": ("mlp.gate_up_proj", "out")})
# Phi: one norm, whose output both ln1's and ln2's sites are (their gradients add up to
# its output's: see test_architectures_match_autograd)
_PHI = {"hook_attn_out": ("self_attn", "out"), "attn.hook_z": ("self_attn.dense", "in"),
        "attn.hook_q": ("self_attn.q_proj", "out"), "attn.hook_k": ("self_attn.k_proj", "out"),
        "attn.hook_v": ("self_attn.v_proj", "out"), "mlp.hook_pre": ("mlp.fc1", "out"),
        "mlp.hook_post": ("mlp.fc2", "in"), "hook_mlp_out": ("mlp", "out"),
        "ln1.hook_normalized": ("input_layernorm", "out"), "hook_resid_pre": ("", "in"), "hook_resid_post": ("", "out")}
# OLMo 2: Gemma 2's output sites, no input norms
_OLMO2 = {k: v for k, v in _GEMMA2.items() if k not in ("ln1.hook_normalized", "ln2.hook_normalized")}
_GPTJ = {"hook_attn_out": ("attn", "out"), "attn.hook_z": ("attn.out_proj", "in"),
         "attn.hook_q": ("attn.q_proj", "out"), "attn.hook_k": ("attn.k_proj", "out"),
         "attn.hook_v": ("attn.v_proj", "out"), "mlp.hook_pre": ("mlp.fc_in", "out"), "mlp.hook_post": ("mlp.fc_out", "in"),
         "hook_mlp_out": ("mlp", "out"), "ln1.hook_normalized": ("ln_1", "out"), "hook_resid_pre": ("", "in"),
         "hook_resid_post": ("", "out")}
# OPT: GPT-2's sites under nn.Linear names, the MLP's output fc2's (no module around the MLP)
_OPT = {"hook_attn_out": ("self_attn", "out"), "attn.hook_z": ("self_attn.out_proj", "in"),
        "attn.hook_q": ("self_attn.q_proj", "out"), "attn.hook_k": ("self_attn.k_proj", "out"),
        "attn.hook_v": ("self_attn.v_proj", "out"), "mlp.hook_pre": ("fc1", "out"), "mlp.hook_post": ("fc2", "in"),
        "hook_mlp_out": ("fc2", "out"), "ln1.hook_normalized": ("self_attn_layer_norm", "out"),
        "ln2.hook_normalized": ("final_layer_norm", "out"), "hook_resid_pre": ("", "in"),
        "hook_resid_post": ("", "out")}
# GPT-Neo: GPT-2's module names, q, k and v separate under attn.attention
_NEO = {"hook_attn_out": ("attn", "out"), "attn.hook_z": ("attn.attention.out_proj", "in"),
        "attn.hook_q": ("attn.attention.q_proj", "out"), "attn.hook_k": ("attn.attention.k_proj", "out"),
        "attn.hook_v": ("attn.attention.v_proj", "out"), "mlp.hook_pre": ("mlp.c_fc", "out"),
        "mlp.hook_post": ("mlp.c_proj", "in"), "hook_mlp_out": ("mlp", "out"), "ln1.hook_normalized": ("ln_1", "out"),
        "ln2.hook_normalized": ("ln_2", "out"), "hook_resid_pre": ("", "in"), "hook_resid_post": ("", "out")}
# GPT-BigCode: GPT-2's names, q|k|v one product (c_attn) whose k and v are one head each
_BIGCODE = dict(_NEO, **{"attn.qkv": ("attn.c_attn", "out"), "attn.hook_z": ("attn.c_proj", "in")})
# StarCoder 2: Llama's attention, GPT-2's MLP under nn.Linear names
_STARCODER2 = dict({k: v for k, v in _LLAMA.items() if k != "mlp.hook_pre_linear"},
                   **{"mlp.hook_pre": ("mlp.c_fc", "out"), "mlp.hook_post": ("mlp.c_proj", "in")})
SHARED_NORM = ("phi", "gptj")  # one norm read by the attention and the MLP: ln1's and ln2's sites are its output
_NEOX = {"hook_attn_out": ("attention", "out"), "attn.hook_z": ("attention.dense", "in"),
         "attn.qkv": ("attention.query_key_value", "out"), "mlp.hook_pre": ("mlp.dense_h_to_4h", "out"),
         "mlp.hook_post": ("mlp.dense_4h_to_h", "in"), "hook_mlp_out": ("mlp", "out"),
         "ln1.hook_normalized": ("input_layernorm", "out"), "ln2.hook_normalized": ("post_attention_layernorm", "out"),
         "hook_resid_pre": ("", "in"), "hook_resid_post": ("", "out")}


def arch_gradients(hf, family, tokens, mask, scalar_fn, site_names):
    """As hf_gradients, for the Llama family, GPT-NeoX, Phi, GPT-J, OPT and GPT-Neo."""
    neox = family == "gpt_neox"
    gpt2_like = ("gptj", "gpt_neo", "gpt_bigcode")
    base = (hf.gpt_neox if neox else hf.transformer if family in gpt2_like else hf.model.decoder
            if family == "opt" else hf.model)
    table = {"opt": _OPT, "gpt_neo": _NEO, "gpt_bigcode": _BIGCODE, "gpt_neox": _NEOX, "gemma2": _GEMMA2,
             "gemma3_text": _GEMMA2, "phi3": _PHI3, "phi": _PHI, "gptj": _GPTJ,
             "starcoder2": _STARCODER2}.get(family)
    table = table or (_OLMO2 if family in ("olmo2", "olmo3", "exaone4") else _LLAMA)
    layers = base.h if family in gpt2_like else base.layers
    fused = {"attn.hook_q": "attn.qkv", "attn.hook_k": "attn.qkv", "attn.hook_v": "attn.qkv"}
    if family == "phi3":
        fused.update({"mlp.hook_pre": "mlp.gate_up", "mlp.hook_pre_linear": "mlp.gate_up"})
    elif not neox and family != "gpt_bigcode":
        fused = {}
    deltas, handles = {}, []

    def attach(tag, module, where):
        def add(value):
            d = torch.zeros_like(value, requires_grad=True)
            deltas[tag] = d
            return value + d
        if where == "out":
            handles.append(module.register_forward_hook(
                lambda mod, args, out: (add(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else add(out)))
        else:
            def pre(mod, args, kwargs):
                if args:
                    return (add(args[0]),) + args[1:], kwargs
                kwargs["hidden_states"] = add(kwargs["hidden_states"])
                return args, kwargs
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    for name in site_names:
        if name == "hook_embed":
            attach(name, base.embed_in if neox else base.wte if family in gpt2_like else base.embed_tokens, "out")
        elif name == "ln_final.hook_normalized":
            final = {"gpt_neox": "final_layer_norm", "phi": "final_layernorm", "gptj": "ln_f",
                     "opt": "final_layer_norm", "gpt_neo": "ln_f", "gpt_bigcode": "ln_f"}.get(family, "norm")
            attach(name, getattr(base, final), "out")
        else:
            _, layer, suffix = name.split(".", 2)
            key = fused.get(suffix, suffix)
            tag = f"blocks.{layer}.{key}"
            if tag not in deltas:
                attach(tag, _module(layers[int(layer)], table[key][0]), table[key][1])
    hf.zero_grad()
    try:
        with torch.enable_grad():
            m = np.ones(tokens.shape, np.int64) if mask is None else mask
            logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(m),
                        position_ids=torch.tensor(positions_from_mask(m))).logits
            value = scalar_fn(logits)
            value.backward()
    finally:
        for h in handles:
            h.remove()
    cfg = hf.config
    H, C = cfg.num_attention_heads, cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or C // H
    out = {}
    for name in site_names:
        suffix = name.split(".", 2)[-1]
        if name == "hook_embed" and family in ("gemma", "gemma2"):
            # HF multiplies embed_tokens' output by sqrt(d_model); hook_embed is the product
            # (Gemma 3's embed_tokens multiplies it itself)
            out[name] = deltas[name].grad.numpy() / np.float32(C ** 0.5)
            continue
        if neox and suffix in fused:
            g = deltas[f"blocks.{name.split('.')[1]}.attn.qkv"].grad.numpy()
            g = g.reshape(g.shape[0], g.shape[1], H, 3, dh)
            out[name] = g[:, :, :, "qkv".index(suffix[-1])]
            continue
        if suffix in fused:  # Phi-3's: [q | k | v] and [gate | up] along the last axis
            g = deltas[f"blocks.{name.split('.')[1]}.{fused[suffix]}"].grad.numpy()
            if fused[suffix] == "attn.qkv":
                QD, KD = H * dh, (1 if family == "gpt_bigcode" else cfg.num_key_value_heads) * dh
                g = np.split(g, [QD, QD + KD], axis=-1)["qkv".index(suffix[-1])]
                out[name] = g.reshape(g.shape[0], g.shape[1], -1, dh)
            else:
                out[name] = np.split(g, 2, axis=-1)[suffix == "mlp.hook_pre_linear"]
            continue
        g = deltas[name].grad.numpy()
        if g.ndim == 2:  # OPT's MLP runs on [batch * pos, width]
            g = g.reshape(np.shape(tokens) + (-1,))
        if suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"):
            g = g.reshape(g.shape[0], g.shape[1], -1, dh)
        layer_norm = ("gpt_neox", "opt", "gpt_neo", "gpt_bigcode", "stablelm", "olmo", "starcoder2") + SHARED_NORM
        if family not in layer_norm and name.endswith("hook_normalized"):
            # (a LayerNorm's site is after its weight and bias, as TransformerLens's)
            # RMSNorm's site is before its weight: d site = d output * w
            norm = base.norm if name.startswith("ln_final") else _module(
                layers[int(name.split(".")[1])], table[name.split(".", 2)[-1]][0])
            g = g * (family.startswith("gemma") + norm.weight.detach().numpy())  # Gemma's: 1 + w
        out[name] = g
    params = {}
    prefix = ("gpt_neox." if neox else "transformer." if family in gpt2_like
              else "model.decoder." if family == "opt" else "model.")
    for n, p in hf.named_parameters():
        if p.grad is not None:
            params[n[len(prefix):] if n.startswith(prefix) else n] = p.grad.numpy().copy()
    return float(value), out, params


ARCH_SITES = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q",
              "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out",
              "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
              "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
              "ln_final.hook_normalized"]


@pytest.mark.parametrize("name", sorted(ARCH_CONFIGS))
def test_architectures_match_autograd(name):
    family = ARCH_CONFIGS[name][0]
    hf = make_arch_hf(name)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(8)
    left = sorted(ARCH_CONFIGS).index(name) % 2 == 0
    tokens, mask = batch(rng, model.d_vocab, [6, 3, 1], 6, "left" if left else "right")
    sites = ARCH_SITES + (["blocks.0.mlp.hook_pre_linear"] if model.arch["gated_mlp"] else [])
    if family in SHARED_NORM:
        sites.remove("blocks.0.ln2.hook_normalized")
    if family in ("olmo2", "olmo3", "exaone4"):  # its norms: after the attention and the MLP
        sites = [s for s in sites if ".ln1." not in s and ".ln2." not in s] + [
            "blocks.0.ln1_post.hook_normalized", "blocks.0.ln2_post.hook_normalized"]

    def grad(scalar, sites):
        g = model.grad(tokens, scalar, sites=sites + ["blocks.0.ln2.hook_normalized"] * (family in SHARED_NORM),
                       weights=True, attention_mask=mask)
        if family in SHARED_NORM:  # one norm: its output's gradient is ln1's site's plus ln2's
            g.sites["blocks.0.ln1.hook_normalized"] = (g["blocks.0.ln1.hook_normalized"] +
                                                       g.sites.pop("blocks.0.ln2.hook_normalized"))
        return g
    value, ref_sites, ref_params = arch_gradients(hf, family, tokens, mask, torch_cross_entropy(tokens, mask), sites)
    g = grad("cross_entropy", sites)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    # a metric too (LogProb at each row's last real token)
    metric = ms.metrics.LogProb([1, 2, 3])
    value, ref_sites, ref_params = arch_gradients(hf, family, tokens, mask, torch_metric(metric, mask), sites[:3])
    check(grad(metric, sites[:3]), ref_sites, ref_params, mask)


@pytest.mark.parametrize("metric", [ms.metrics.LogitDiff([1, 2, 3], [4, 2, 0]), ms.metrics.Prob([1, 2, 3])],
                         ids=["logit_diff", "prob"])
def test_unembedding_bias_in_the_metrics_matches_autograd(metric):
    """Phi's logits have a bias: the logit difference's two rows (and the row whose
    difference is 0 whatever the input) and the full rows' metrics, value and every
    gradient"""
    hf = make_arch_hf("phi_parallel", seed=5)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens, mask = batch(np.random.default_rng(2), model.d_vocab, [7, 5, 2], 7, "right")
    sites = ["blocks.1.hook_resid_post", "ln_final.hook_normalized"]
    value, ref_sites, ref_params = arch_gradients(hf, "phi", tokens, mask, torch_metric(metric, mask), sites)
    g = model.grad(tokens, metric, sites=sites, weights=True, attention_mask=mask)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    assert np.abs(g.weights["lm_head.bias"]).max() > 1e-3


def test_gemma2_output_norms_and_soft_caps_match_autograd():
    """Gemma 2: the outputs' norms' sites, and a logit difference through the capped
    logits (each logit has its own slope), against autograd; a run whose forward visits
    the scores and the pattern (the other attention path, which keeps the capped scores
    before the scores' actions) gives the same gradients"""
    hf = make_arch_hf("gemma2_softcap", seed=3)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens, mask = batch(np.random.default_rng(5), model.d_vocab, [7, 4], 7, "right")
    sites = ["blocks.0.ln1_post.hook_normalized", "blocks.0.hook_attn_out", "blocks.1.ln2_post.hook_normalized",
             "blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"]
    metric = ms.metrics.LogitDiff([1, 2], [4, 2])  # the second row's difference is 0 whatever the input
    value, ref_sites, ref_params = arch_gradients(hf, "gemma2", tokens, mask, torch_metric(metric, mask), sites)
    g = model.grad(tokens, metric, sites=sites, weights=True, attention_mask=mask)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    logits = model.run(tokens, attention_mask=mask, logits="last").logits
    assert np.abs(logits).max() > 0.5 * 5.0  # the cap of 5 bends these logits
    visited = model.grad(tokens, "cross_entropy", sites=sites[-1:] + ["blocks.0.attn.hook_pattern",
                                                                       "blocks.1.attn.hook_attn_scores"],
                         weights=True, attention_mask=mask)
    plain = model.grad(tokens, "cross_entropy", sites=sites[-1:], weights=True, attention_mask=mask)
    np.testing.assert_allclose(visited[sites[-1]], plain[sites[-1]], rtol=0, atol=1e-6)
    for name, w in plain.weights.items():
        np.testing.assert_allclose(visited.weights[name], w, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["mistral_gqa2", "gemma2_softcap", "gemma3_local_rope", "phi3_partial_tied"])
def test_sliding_windows_past_the_window_match_autograd(name):
    """Windows of 37 keys over prompts of up to 80 (the backward's blocks of 32 queries
    then skip the keys before the block's first window), left padded: every site and
    weight against autograd; the path that visits the scores and the pattern gives the
    same gradients, and the pattern's gradient is 0 before each query's window"""
    family, kw = ARCH_CONFIGS[name]
    hf = make_arch_hf(None, seed=2, spec=(family, dict(kw, sliding_window=37, max_position_embeddings=128,
                                                       original_max_position_embeddings=128)))
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens, mask = batch(np.random.default_rng(4), model.d_vocab, [80, 70, 40], 80, "left")
    sites = ARCH_SITES + ["blocks.0.mlp.hook_pre_linear"]
    value, ref_sites, ref_params = arch_gradients(hf, family, tokens, mask, torch_cross_entropy(tokens, mask), sites)
    g = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    attention = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"]
    visited = model.grad(tokens, "cross_entropy", sites=sites[:2] + attention, weights=True, attention_mask=mask)
    for site in sites[:2]:
        np.testing.assert_allclose(visited[site], g[site], rtol=0, atol=1e-6, err_msg=site)
    for w, want in g.weights.items():
        np.testing.assert_allclose(visited.weights[w], want, rtol=0, atol=1e-6, err_msg=w)
    row = 0  # unpadded: query i sees keys i - 36 .. i
    gap = np.arange(80)[:, None] - np.arange(80)[None, :]
    for site in attention:
        grad = visited[site][row]
        assert np.all(grad[:, gap >= 37] == 0) and np.abs(grad[:, (gap >= 0) & (gap < 37)]).max() > 0, site
    # pattern entries set before a query's window stay masked, in the backward too (keys
    # 29 and 33 are in the products of the block of queries 64-79, before query 70's
    # window); set in the window, they count
    def with_set(keys):
        return model.grad(tokens, "cross_entropy", sites=sites[:2], weights=True, attention_mask=mask,
                          interventions=[ms.Set("blocks.0.attn.hook_pattern", 0.25, row=0, pos=70, key_pos=keys)])
    outside, inside = with_set([29, 33]), with_set([34, 60])
    for w, want in g.weights.items():
        np.testing.assert_allclose(outside.weights[w], want, rtol=0, atol=1e-6, err_msg=w)
    assert max(np.abs(inside.weights[w] - want).max() for w, want in g.weights.items()) > 1e-4


# ---- runs that start at a block (DAS's repeated base runs) ----------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_gqa3", "neox_parallel"])
def test_start_at_a_block_is_the_same_run(gpt2, name):
    """A gradient run given the residual stream entering block l computes only blocks l..:
    its site gradients, activations and metric equal those of the whole run (left and right
    padding, an intervention at the start block itself)."""
    from mechscope.gradients import grad

    if name == "gpt2":
        model = gpt2[1]
    else:
        hf = make_arch_hf(name)
        model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(11)
    tokens, mask = batch(rng, model.d_vocab, [7, 4, 1, 6], 7, "left")
    mask[3] = mask[3][::-1]  # one right-padded row
    layer = model.n_layers - 1
    resid = f"blocks.{layer}.hook_resid_pre"
    before = model.run(tokens, attention_mask=mask, cache=resid, logits=None).cache[resid]
    sites = [resid, f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_resid_post", "ln_final.hook_normalized"]
    add = ms.Add(resid, rng.normal(size=(4, 1, model.d_model)).astype(np.float32), pos=[5])
    metric = ms.metrics.LogProb([1, 2, 3, 4])
    whole = grad(model, tokens, metric, sites=sites, interventions=[add], attention_mask=mask)
    part = grad(model, tokens, metric, sites=sites, interventions=[add], attention_mask=mask, _start=(layer, before))
    np.testing.assert_allclose(part.metric, whole.metric, rtol=1e-6, atol=1e-6)
    for site in sites:
        assert rel(part[site], whole[site]) < 1e-6, site
        assert rel(part.activations[site], whole.activations[site]) < 1e-6, site
    ce = grad(model, tokens, "cross_entropy", sites=sites[1:2], attention_mask=mask, _start=(layer, before))
    assert ce.value == pytest.approx(model.grad(tokens, "cross_entropy", attention_mask=mask).value, rel=1e-6)
    # what such a run cannot give, refused by name
    with pytest.raises(ValueError, match=f"starts at block {layer} has no gradient .* for a site before it"):
        grad(model, tokens, metric, sites=[f"blocks.{layer - 1}.hook_resid_post"], attention_mask=mask,
             _start=(layer, before))
    with pytest.raises(ValueError, match="no gradient for the weights"):
        grad(model, tokens, metric, sites=[resid], weights=True, attention_mask=mask, _start=(layer, before))
    with pytest.raises(ValueError, match=r"start_resid: expected shape \[4, 7, "):
        grad(model, tokens, metric, sites=[resid], attention_mask=mask, _start=(layer, before[:, 1:]))
    with pytest.raises(ValueError, match="start_block: 9 out of range"):
        grad(model, tokens, metric, sites=[resid], attention_mask=mask, _start=(9, before))
    with pytest.raises(ValueError, match="_start: a run that starts at a block cannot read Source rows"):
        grad(model, tokens, metric, sites=[resid], attention_mask=mask, _start=(layer, before),
             interventions=[ms.Patch(resid, ms.Source(tokens, attention_mask=mask))])


# ---- big products and reused arrays ----------------------------------------------------------

# big enough that with 2 threads the matrix products are cut into grids of tiles, and
# that the unembedding's input gradient (a product over the vocabulary, K >= 8192) is
# summed in parts of the vocabulary; rows long enough for the attention's backward to
# go in causal blocks of queries (256 and 100 tokens: 8 and 4 blocks, the last one short)
WIDE = dict(n_embd=256, n_head=4, n_layer=1, vocab_size=8500, n_positions=256, activation_function="gelu_new")


@pytest.mark.parametrize("pattern_site", [False, True], ids=["attention_in_one_pass", "pattern_site_between_steps"])
def test_tiled_products_and_vocabulary_parts(pattern_site):
    hf = make_hf_model(WIDE, seed=5)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens, mask = batch(np.random.default_rng(6), 8500, [256, 256, 100], 256, "right")
    sites = ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"]
    if pattern_site:  # the attention's backward then stops to store it
        sites += ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_q"]
    value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, torch_cross_entropy(tokens, mask), sites)
    old = ms.get_num_threads()
    try:
        for n in (1, 2):
            ms.set_num_threads(n)
            g = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
            assert abs(g.value - value) < 1e-5 * max(1, abs(value))
            check(g, ref_sites, ref_params, mask)
    finally:
        ms.set_num_threads(old)


@pytest.mark.parametrize("arch", ["gpt2", "neox_parallel", "neox_tied"])
def test_out_reuses_the_arrays(gpt2, arch):
    """out= overwrites an earlier result's arrays (no accumulation from the last call,
    whatever they hold: they are filled with NaN in between) and gives what a fresh call
    gives; a different request is refused. A tied GPT-NeoX unembedding has a gradient
    array of its own that the core never adds to, only zeroes."""
    if arch == "gpt2":
        model = gpt2[1]
    else:
        family, kw = ARCH_CONFIGS["neox_parallel"]
        spec = (family, dict(kw, tie_word_embeddings=True)) if arch == "neox_tied" else None
        hf = make_arch_hf("neox_parallel", spec=spec)
        model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(12)
    V = model.d_vocab
    tokens, mask = batch(rng, V, [7, 4], 7, "left")
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    first = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
    arrays = {**first.weights, **first.sites}
    for _ in range(2):
        tokens = rng.integers(0, V, tokens.shape)
        for a in first._buffers["core"].values():
            a.fill(np.nan)
        again = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask, out=first)
        assert again is first
        fresh = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
        assert again.value == fresh.value
        for name, a in {**again.weights, **again.sites}.items():
            assert a is arrays[name] or np.shares_memory(a, arrays[name]), name
        for name in fresh.weights:
            np.testing.assert_array_equal(again.weights[name], fresh.weights[name], err_msg=name)
        for name in sites:
            np.testing.assert_array_equal(again[name], fresh[name], err_msg=name)
            np.testing.assert_array_equal(again.activations[name], fresh.activations[name], err_msg=name)
    with pytest.raises(ValueError, match="out: .*different request"):
        model.grad(tokens, "cross_entropy", sites=sites[:1], weights=True, attention_mask=mask, out=first)
    with pytest.raises(ValueError, match="out: .*different request"):
        model.grad(tokens[:1], "cross_entropy", sites=sites, weights=True, attention_mask=mask[:1], out=first)
    with pytest.raises(TypeError, match="out: expected the Gradients"):
        model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask, out={})


# ---- bad input -------------------------------------------------------------------------------

def test_bad_input(gpt2):
    _, model = gpt2
    tokens = np.array([[1, 2, 3, 4]])
    metric = ms.metrics.LogitDiff(1, 2)
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre.*cannot change the metric"):
        model.grad(tokens, metric, sites=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"],
                   interventions=[ms.Zero("blocks.0.hook_resid_post")])
    # at or after the overwritten site, or a partial overwrite: fine
    g = model.grad(tokens, metric, sites=["blocks.0.hook_resid_post"], interventions=[ms.Zero("blocks.0.hook_resid_post")])
    assert np.abs(g["blocks.0.hook_resid_post"]).max() > 0
    model.grad(tokens, metric, sites=["blocks.0.hook_resid_pre"], interventions=[ms.Zero("blocks.0.hook_resid_post", pos=1)])
    # a block's pattern overwritten whole: its queries and keys cannot matter, its values can
    with pytest.raises(ValueError, match="blocks.1.attn.hook_q"):
        model.grad(tokens, metric, sites=["blocks.1.attn.hook_v", "blocks.1.attn.hook_q"],
                   interventions=[ms.Zero("blocks.1.attn.hook_pattern")])
    model.grad(tokens, metric, sites=["blocks.1.attn.hook_v", "blocks.0.attn.hook_q"],
               interventions=[ms.Zero("blocks.1.attn.hook_pattern")])
    with pytest.raises(ValueError, match="blocks.0.ln2.hook_normalized"):
        model.grad(tokens, metric, sites=["blocks.0.ln2.hook_normalized"],
                   interventions=[ms.Set("blocks.0.hook_mlp_out", 1.0)])
    with pytest.raises(ValueError, match="blocks.7.hook_resid_pre"):
        model.grad(tokens, metric, sites=["blocks.7.hook_resid_pre"])
    with pytest.raises(ValueError, match="no_such_site"):
        model.grad(tokens, metric, sites=["blocks.0.no_such_site"])
    with pytest.raises(ValueError, match="Accuracy .0 or 1. has no gradient"):
        model.grad(tokens, ms.metrics.Accuracy(1), sites=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="Accuracy .0 or 1. has no gradient"):
        ms.attribution.resid_pre(model, tokens, model.run(tokens, cache="blocks.*.hook_resid_pre").cache,
                                 ms.metrics.Accuracy(1))
    with pytest.raises(ValueError, match="h.9.mlp.c_fc.weight"):
        model.grad(tokens, metric, weights=["h.9.mlp.c_fc.weight"])
    with pytest.raises(TypeError, match="weights"):
        model.grad(tokens, metric, weights=3)
    with pytest.raises(ValueError, match="cross_entropy"):
        model.grad(tokens, "crossentropy")
    with pytest.raises(TypeError, match="metric"):
        model.grad(tokens, lambda logits: logits.sum())
    with pytest.raises(TypeError, match="Recovery"):
        model.grad(tokens, ms.metrics.Recovery(metric, 1.0, 0.0))
    with pytest.raises(ValueError, match="two real tokens"):
        model.grad(np.array([[1], [2]]), "cross_entropy")
    with pytest.raises(ValueError, match="padding"):
        model.grad(tokens, ms.metrics.LogProb(1, pos=0), attention_mask=np.array([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="hooks"):
        model.grad(tokens, metric, hooks={"blocks.0.hook_resid_pre": lambda x, n: None})


def test_memory_checked_before_work(gpt2):
    _, model = gpt2
    old = ms.get_memory_budget()
    try:
        ms.set_memory_budget(10_000)
        with pytest.raises(ValueError, match="memory budget"):
            model.grad(np.array([[1, 2, 3, 4]]), "cross_entropy", weights=True)
    finally:
        ms.set_memory_budget(old)


@pytest.mark.parametrize("name", ["odd21_gelu_invscale", "relu_inner_untied", "deep4_eps"])
def test_gpt2_configurations(name):
    """Exact GELU and ReLU, inverse-layer scaling, n_inner, an untied unembedding, epsilon."""
    from conftest import CONFIGS
    hf = make_hf_model(CONFIGS[name], seed=1)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(9)
    tokens, mask = batch(rng, model.d_vocab, [5, 2], 5, "left")
    sites = ["hook_embed", "blocks.0.mlp.hook_pre", "blocks.0.attn.hook_pattern", "ln_final.hook_normalized"]
    value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, torch_cross_entropy(tokens, mask), sites)
    g = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
    check(g, ref_sites, ref_params, mask)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scale_sites_by_finite_differences(gpt2, arch):
    """What the torch hooks cannot reach, the LayerNorm / RMSNorm divisors and
    interventions on them, and the scores, against central differences of the metric
    (float32 runs: tolerance 2e-3)."""
    if arch == "gpt2":
        _, model = gpt2
    else:
        hf = make_arch_hf("llama_gqa3")
        model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(10)
    tokens = rng.integers(0, model.d_vocab, (2, 5))
    metric = ms.metrics.LogProb([1, 2])
    fixed = [ms.Set("blocks.0.ln1.hook_scale", 2.0, pos=2), ms.Scale("blocks.1.ln2.hook_scale", 1.5, pos=[1, 3])]
    sites = ["blocks.0.hook_resid_pre", "blocks.1.ln1.hook_scale", "blocks.0.attn.hook_attn_scores"]
    g = model.grad(tokens, metric, sites=sites, interventions=fixed)

    def derivative(site, v):
        """d metric / d t of Add(site, t v) at 0: central differences, Richardson-extrapolated"""
        def central(eps):
            f = [metric.per_row(model, tokens, interventions=[ms.Add(site, s * eps * v)] + fixed)
                 .astype(np.float64).sum() for s in (1, -1)]
            return (f[0] - f[1]) / (2 * eps)
        return (4 * central(1e-3) - central(2e-3)) / 3

    T = 5
    for site, shape in (("blocks.0.hook_resid_pre", (2, T, model.d_model)), ("blocks.1.ln1.hook_scale", (2, T, 1)),
                        ("blocks.0.attn.hook_attn_scores", (2, model.n_heads, T, T))):
        v = rng.normal(size=shape).astype(np.float32)
        if site.endswith("scores"):
            v *= np.tril(np.ones((T, T), np.float32))  # entries a query sees
        exact = float((g[site].astype(np.float64) * v).sum())
        fd = derivative(site, v)
        assert abs(fd - exact) < 2e-3 * max(1.0, abs(exact)), (site, fd, exact)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa3", "neox_parallel"])
def test_watching_a_site_leaves_the_weight_gradients_alone(gpt2, arch):
    """The backward takes shortcuts where no site is watched or changed: a norm's divisor
    gradient and its input gradient in one pass, a block output's gradient read from the
    stream's without a copy. Watching those sites (and leaving no action there) must give
    the same weight gradients to the bit, padded rows included."""
    if arch == "gpt2":
        _, model = gpt2
    else:
        hf = make_arch_hf(arch)
        model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(13)
    tokens, mask = batch(rng, model.d_vocab, [6, 3, 5], 6, "left")
    watched = [f"blocks.{l}.{s}" for l in range(model.n_layers)
               for s in ("ln1.hook_scale", "ln2.hook_scale", "hook_attn_out", "hook_mlp_out")]
    watched.append("ln_final.hook_scale")
    plain = model.grad(tokens, "cross_entropy", weights=True, attention_mask=mask)
    seen = model.grad(tokens, "cross_entropy", sites=watched, weights=True, attention_mask=mask)
    assert plain.value == seen.value
    for name in plain.weights:
        np.testing.assert_array_equal(plain.weights[name], seen.weights[name], err_msg=name)
    assert all(np.abs(seen[s]).max() > 0 for s in watched)


# ---- seeds: the gradient of a linear read-out of a site --------------------------------------

def _readout(captured, seeds, mask):
    """sum over real tokens of seed * the captured site values (torch)"""
    real = torch.tensor(np.ones(next(iter(seeds.values())).shape[:2]) if mask is None else mask, dtype=torch.float64)
    total = 0.0
    for name, seed in seeds.items():
        x = captured[name].double().reshape(seed.shape[0], seed.shape[1], -1)
        total = total + (x * torch.tensor(seed, dtype=torch.float64).reshape(x.shape) * real[..., None]).sum()
    return total


def _capture(captured, name, then=None):
    """an edit of hf_gradients that keeps the site's value (after `then`, another edit)"""
    def edit(value):
        if then is not None:
            value = then(value)
        captured[name] = value
        return value
    return edit


@pytest.mark.parametrize("with_metric", [False, True])
def test_seeds_match_autograd(gpt2, with_metric):
    """seeds= alone (or added to a metric): d (sum of seed . site) / d every earlier site
    (and every weight, with a metric) by autograd through HF's GPT-2, on a left-padded
    batch, with an intervention upstream; at a seed's own site the gradient also holds
    the seed itself"""
    hf, model = gpt2
    rng = np.random.default_rng(21)
    tokens, mask = batch(rng, model.d_vocab, [6, 4, 2], 6, "left")
    B, T, C, F = 3, 6, model.d_model, model.d_mlp
    seeds = {"blocks.1.hook_resid_pre": rng.normal(size=(B, T, C)).astype(np.float32),
             "blocks.0.mlp.hook_post": rng.normal(size=(B, T, F)).astype(np.float32),
             "blocks.0.hook_attn_out": rng.normal(size=(B, T, C)).astype(np.float32)}
    sites = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q",
             "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.mlp.hook_pre",
             "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    metric = ms.metrics.LogitDiff([3, 7, 9], [1, 1, 2]) if with_metric else None
    for interventions, edits in (([], []),
                                 ([ms.Scale("blocks.0.hook_attn_out", 0.5)], [("blocks.0.hook_attn_out",
                                                                               lambda v: v * 0.5)])):
        captured = {}
        edits = dict(edits)
        for name in seeds:  # the read-out sees the value after the site's edit
            edits[name] = _capture(captured, name, edits.get(name))
        edits = list(edits.items())

        def scalar(logits):
            read = _readout(captured, seeds, mask)
            return read + torch_metric(metric, mask)(logits).double() if metric is not None else read

        value, ref_sites, ref_params = hf_gradients(hf, tokens, mask, scalar, sites, edits)
        for name, seed in seeds.items():  # d (seed . x) / d x at the site itself
            ref_sites[name] = ref_sites[name] + seed * mask[:, :, None]
        g = model.grad(tokens, metric, seeds=seeds, sites=sites, attention_mask=mask, interventions=interventions,
                       weights=with_metric)
        assert abs(g.value - value) < 1e-5 * max(1.0, abs(value))
        read = float(_readout(captured, seeds, mask))
        assert abs(g.seeds.sum() - read) < 1e-5 * max(1.0, abs(read))
        assert (g.metric is None) == (metric is None)
        check(g, ref_sites, ref_params, mask, weights=with_metric)
        assert np.abs(g["blocks.0.hook_resid_pre"]).max() > 1e-3  # not all zero


def test_seeds_on_a_grouped_query_llama_match_autograd():
    """a seed at the first block's output alone: the gradients of every site before it and
    of the first block's and the embedding's weights (the later weights get 0)"""
    hf = make_arch_hf("llama_gqa3")
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(22)
    tokens, mask = batch(rng, model.d_vocab, [5, 3], 5, "right")
    seed = rng.normal(size=(2, 5, model.d_model)).astype(np.float32)
    captured = {}
    handle = hf.model.layers[0].register_forward_hook(
        lambda mod, args, out: captured.update({"blocks.0.hook_resid_post": out[0] if isinstance(out, tuple) else out}))
    sites = [s for s in ARCH_SITES if s.startswith("blocks.0.") and not s.endswith("hook_resid_post")]
    sites = ["hook_embed"] + sites + ["blocks.0.mlp.hook_pre_linear"]
    try:
        value, ref_sites, ref_params = arch_gradients(
            hf, "llama", tokens, mask, lambda logits: _readout(captured, {"blocks.0.hook_resid_post": seed}, mask),
            sites)
    finally:
        handle.remove()
    g = model.grad(tokens, seeds={"blocks.0.hook_resid_post": seed}, sites=sites, attention_mask=mask, weights=True)
    assert abs(g.value - value) < 1e-5 * max(1.0, abs(value))
    check(g, ref_sites, {}, mask, weights=False)
    for name, w in g.weights.items():
        want = ref_params.get(name)
        if want is None:  # after the seed: no path to it
            assert not np.any(w), name
        else:
            assert rel(w, want) < RTOL, (name, rel(w, want))
    assert {"embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight"} <= set(
        ref_params)


def test_seeds_alone_stop_at_their_block():
    """seeds alone run the blocks up to the last seed's only (nothing after it can change
    their read-out): on a 4-block model, with interventions after the seeds that must
    not matter, the gradients of seeds alone equal those of seeds plus a metric minus
    those of the metric alone (two runs through every block), sites and weights (the
    weights of later blocks and of the final norm exactly 0), and the seeds' read-outs
    equal those of a full run's cache"""
    hf = make_hf_model(dict(CFG, n_layer=4), seed=9)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(24)
    tokens, mask = batch(rng, model.d_vocab, [6, 3], 6, "left")
    seeds = {"blocks.1.hook_resid_mid": rng.normal(size=(2, 6, model.d_model)).astype(np.float32),
             "blocks.0.mlp.hook_post": rng.normal(size=(2, 6, model.d_mlp)).astype(np.float32)}
    sites = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out"]
    later = [ms.Scale("blocks.2.hook_resid_pre", 3.0), ms.Zero("blocks.3.mlp.hook_post")]
    metric = ms.metrics.LogitDiff([3, 7], [1, 2])
    alone = model.grad(tokens, seeds=seeds, sites=sites, attention_mask=mask, interventions=later, weights=True)
    both = model.grad(tokens, metric, seeds=seeds, sites=sites, attention_mask=mask, interventions=later,
                      weights=True)
    only = model.grad(tokens, metric, sites=sites, attention_mask=mask, interventions=later, weights=True)
    for name in sites:
        want = both[name] - only[name]
        assert rel(alone[name], want) < 1e-4, (name, rel(alone[name], want))
        assert np.array_equal(alone.activations[name], both.activations[name]), name
    for name, w in alone.weights.items():
        if name.startswith(("transformer.h.2.", "transformer.h.3.", "transformer.ln_f.")):
            assert not np.any(w), name
        else:
            want = both.weights[name] - only.weights[name]
            assert np.abs(alone.weights[name] - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-3), name
    cache = model.run(tokens, cache=list(seeds), attention_mask=mask, logits=None).cache
    for r in range(2):
        read = sum(float(np.sum(cache[n][r].astype(np.float64) * seeds[n][r] * mask[r].reshape(-1, 1))) for n in seeds)
        assert abs(alone.seeds[r] - read) < 1e-5 * max(1.0, abs(read))
    assert np.all(alone.seeds == both.seeds)
    assert np.abs(alone["hook_embed"]).max() > 1e-3


def test_a_seed_at_a_norms_scale_by_finite_differences(gpt2):
    """a seed at ln2.hook_scale (a site the backward visits only when asked): the
    directional derivative of seed . scale along a random direction at the block's input,
    against central differences of the runs"""
    _, model = gpt2
    rng = np.random.default_rng(23)
    tokens = rng.integers(0, model.d_vocab, (2, 5))
    site, at = "blocks.0.ln2.hook_scale", "blocks.0.hook_resid_pre"
    seed = rng.normal(size=(2, 5, 1)).astype(np.float32)
    g = model.grad(tokens, seeds={site: seed}, sites=[at])
    direction = rng.normal(size=(2, 5, model.d_model)).astype(np.float32)

    def read(eps):
        scale = model.run(tokens, cache=[site], logits=None, interventions=[ms.Add(at, eps * direction)]).cache[site]
        return float(np.sum(scale.astype(np.float64) * seed))

    eps = 1e-2
    numeric = (read(eps) - read(-eps)) / (2 * eps)
    analytic = float(np.sum(g[at].astype(np.float64) * direction))
    assert abs(g.value - read(0.0)) < 1e-5 * abs(g.value)
    assert abs(analytic - numeric) < 1e-2 * abs(numeric) and abs(numeric) > 1e-3, (analytic, numeric)


def test_seeds_bad_input(gpt2):
    _, model = gpt2
    tokens = np.array([[1, 2, 3, 4]])
    good = np.ones((1, 4, model.d_model), np.float32)
    with pytest.raises(ValueError, match="metric: give a metric, 'cross_entropy', or seeds="):
        model.grad(tokens, sites=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="seeds\\['blocks.1.hook_resid_pre'\\]: expected shape \\[1, 4, 24\\]"):
        model.grad(tokens, seeds={"blocks.1.hook_resid_pre": good[:, :3]}, sites=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="contains NaN"):
        model.grad(tokens, seeds={"blocks.1.hook_resid_pre": good * np.nan}, sites=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="'blocks.0.attn.hook_pattern' is an attention pattern"):
        model.grad(tokens, seeds={"blocks.0.attn.hook_pattern": np.ones((1, 3, 4, 4))}, sites=["hook_embed"])
    with pytest.raises(ValueError, match="sites: 'blocks.1.hook_resid_post' comes after every seed's site"):
        model.grad(tokens, seeds={"blocks.1.hook_resid_pre": good}, sites=["blocks.1.hook_resid_post"])
    with pytest.raises(TypeError, match="seeds: expected a dict"):
        model.grad(tokens, seeds=[good], sites=["hook_embed"])
    with pytest.raises(ValueError, match="unknown site name"):
        model.grad(tokens, seeds={"blocks.1.resid": good}, sites=["hook_embed"])
    # with a metric, a later site is fine (the metric depends on it)
    g = model.grad(tokens, ms.metrics.LogProb([2]), seeds={"blocks.0.hook_resid_pre": good},
                   sites=["blocks.1.hook_resid_post"])
    assert np.any(g["blocks.1.hook_resid_post"])
