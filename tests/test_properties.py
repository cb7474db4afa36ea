"""Property-based tests of the engine (hypothesis): random small models, batches,
padding, interventions and sweeps, each checked against a slower way to compute the
same thing with mechscope itself.

- a padded batch gives each row what the row gives alone;
- a sweep gives, for every patch, what one explicit intervened run gives;
- interventions give what the same changes written as Python hooks give;
- a Source run patched from in the same pass gives what two passes give.

The CI profile (tests/conftest.py) runs a bounded, derandomized number of examples;
HYPOTHESIS_PROFILE=campaign runs a long random campaign (see README). Failing
examples are kept in tests/hypothesis-db.

Known open bugs of issue 12 are kept out of the strategies, each marked where it is
(they are fixed on another branch): item 1 (nested Source runs: a Source inside a
Source), item 2 (sweeps under base interventions that write hook_pattern above the
diagonal), item 7 (repeated indices apply repeatedly). test_properties_engine.py
covers items 1 and 2 since they were fixed.
"""
import numpy as np
from hypothesis import assume, given, note
from hypothesis import strategies as st

import mechscope as ms

# every call into the engine made here, reported at the end of the session (conftest)
CALLS = {"runs": 0, "sweeps": 0}

TOKEN_SITES = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
               "attn.hook_v", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale",
               "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
GLOBAL_SITES = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
ATTENTION_SITES = ["attn.hook_attn_scores", "attn.hook_pattern"]
HEADED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")


class Arrays(dict):
    """A cache passed to a strategy: a short repr keeps hypothesis's reports readable."""

    def __repr__(self):
        return f"<{len(self)} cached sites>"


def run(model, *args, **kw):
    CALLS["runs"] += 1
    return model.run(*args, **kw)


def close(actual, expected, what=""):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=2e-5, err_msg=what)


# ---------------------------------------------------------------- strategies

@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 3))
    return dict(n_layer=draw(st.integers(1, 3)), n_head=n_head, n_embd=n_head * draw(st.integers(1, 6)),
                vocab_size=draw(st.integers(3, 40)), n_positions=draw(st.integers(6, 12)),
                n_inner=draw(st.one_of(st.none(), st.integers(1, 20))),
                activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu", "silu", "tanh"])),
                scale_attn_by_inverse_layer_idx=draw(st.booleans()),
                tie_word_embeddings=draw(st.booleans()),
                layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])))


@st.composite
def models(draw):
    cfg = draw(configs())
    note(f"config {cfg}")
    model = ms.Model.from_config(cfg, seed=draw(st.integers(0, 2**16)))
    # weights of O(1) scale: HF's 0.02 makes attention uniform and hides mistakes
    return ms.Model.from_arrays(cfg, {k: v * 25 if k.endswith(("wte.weight", "wpe.weight")) or
                                      k.endswith("attn.c_attn.weight") else v
                                      for k, v in model._weights.items()})


@st.composite
def batches(draw, model, max_batch=3):
    """tokens [B, T] and a mask with left or right padding per row (None if none)."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, min(8, model.n_ctx)))
    tokens = np.array(draw(st.lists(st.integers(0, model.d_vocab - 1), min_size=B * T, max_size=B * T)),
                      np.int64).reshape(B, T)
    mask = np.ones((B, T), np.int64)
    for b in range(B):
        n = draw(st.integers(1, T))
        if draw(st.booleans()):
            mask[b, :T - n] = 0  # left padding
        else:
            mask[b, n:] = 0
    return tokens, (None if mask.all() else mask)


def indices(draw, limit, max_size=3):
    """None (everything) or a sorted list of distinct indices (issue 12 item 7:
    repeated indices apply repeatedly, so they are not drawn)."""
    if draw(st.booleans()):
        return None
    return sorted(draw(st.sets(st.integers(0, limit - 1), min_size=1, max_size=max_size)))


def site_name(draw, model, allow_attention=True):
    pool = TOKEN_SITES + GLOBAL_SITES + (ATTENTION_SITES if allow_attention else [])
    suffix = draw(st.sampled_from(pool))
    if suffix in GLOBAL_SITES:
        return suffix, suffix
    return f"blocks.{draw(st.integers(0, model.n_layers - 1))}.{suffix}", suffix


def where(draw, model, suffix, T, B):
    """pos / head / index / key_pos / row arguments for a site."""
    kw = {"pos": indices(draw, T), "row": draw(st.one_of(st.none(), st.integers(0, B - 1)))}
    if suffix in ATTENTION_SITES:
        kw["head"] = indices(draw, model.n_heads)
        kw["key_pos"] = indices(draw, T)
    elif suffix in HEADED:
        kw["head"] = indices(draw, model.n_heads)
        kw["index"] = indices(draw, model.d_head)
    else:
        kw["index"] = indices(draw, ms.sites.shape(suffix, model._shape_cfg, 1, 1)[-1])
    return kw


def as_list(x, limit):
    return list(range(limit)) if x is None else list(x)


def box(model, suffix, kw, B, T):
    """The numpy index of the box in the full site value, and the box's shape as the
    interventions see it [rows, ...]."""
    rows = list(range(B)) if kw["row"] is None else [kw["row"]]
    pos = as_list(kw["pos"], T)
    if suffix in ATTENTION_SITES:
        heads, keys = as_list(kw["head"], model.n_heads), as_list(kw["key_pos"], T)
        return np.ix_(rows, heads, pos, keys), (len(rows), len(heads), len(pos), len(keys))
    if suffix in HEADED:
        heads, dims = as_list(kw["head"], model.n_heads), as_list(kw["index"], model.d_head)
        return np.ix_(rows, pos, heads, dims), (len(rows), len(pos), len(heads), len(dims))
    width = ms.sites.shape(suffix, model._shape_cfg, 1, 1)[-1]
    cols = as_list(kw["index"], width)
    return np.ix_(rows, pos, cols), (len(rows), len(pos), len(cols))


def floats(draw, shape, lo=-3.0, hi=3.0):
    n = int(np.prod(shape))
    return np.array(draw(st.lists(st.floats(lo, hi, width=32), min_size=n, max_size=n)), np.float32).reshape(shape)


@st.composite
def intervention(draw, model, shape, cache):
    """One random intervention of any kind and the same change as a function on the
    full site value (what a Python hook does)."""
    B, T = shape
    name, suffix = site_name(draw, model)
    kw = where(draw, model, suffix, T, B)
    ix, shape = box(model, suffix, kw, B, T)
    kinds = ["set", "zero", "add", "scale", "noise", "patch", "mean"]
    if suffix not in ATTENTION_SITES:
        kinds.append("subspace")
    kind = draw(st.sampled_from(kinds))
    if kind == "set":
        value = floats(draw, shape) if draw(st.booleans()) else np.float32(draw(st.floats(-3, 3, width=32)))
        iv = ms.Set(name, value, **kw)

        def apply(v):
            v[ix] = value
    elif kind == "zero":
        iv = ms.Zero(name, **kw)

        def apply(v):
            v[ix] = 0.0
    elif kind == "add":
        vector, scale = floats(draw, shape[-1:]), draw(st.floats(-2, 2, width=32))
        iv = ms.Add(name, vector, scale=scale, **kw)

        def apply(v):
            v[ix] += vector * np.float32(scale)
    elif kind == "scale":
        factor = draw(st.floats(-2, 2, width=32))
        iv = ms.Scale(name, factor, **kw)

        def apply(v):
            v[ix] *= np.float32(factor)
    elif kind == "noise":
        std, seed = draw(st.floats(0, 2)), draw(st.integers(0, 100))
        iv = ms.Noise(name, std, seed=seed, **kw)

        def apply(v):
            v[ix] += (np.random.RandomState(seed).randn(*shape) * std).astype(np.float32)
    elif kind == "patch":
        source = cache[name]
        iv = ms.Patch(name, source, **kw)

        def apply(v):
            v[ix] = source[ix]
    elif kind == "mean":
        reference = cache[name]
        iv = ms.MeanAblate(name, reference, **kw)
        mean = np.asarray(reference, np.float32).mean(axis=0, keepdims=True)
        full_mean = np.broadcast_to(mean, (B,) + mean.shape[1:])

        def apply(v):
            v[ix] = full_mean[ix]
    else:
        width = shape[-1] * (shape[-2] if suffix in HEADED else 1)
        rank = draw(st.integers(1, width))
        q, _ = np.linalg.qr(floats(draw, (width, rank), 0.125, 1.0) + np.eye(width, rank, dtype=np.float32))
        basis = q.astype(np.float32)
        source = cache[name]
        iv = ms.SubspacePatch(name, basis, source, **{k: v for k, v in kw.items() if k != "key_pos"})

        def apply(v):
            x = v[ix].astype(np.float64)
            s = source[ix].astype(np.float64)
            flat_x, flat_s = x.reshape(x.shape[:2] + (-1,)), s.reshape(s.shape[:2] + (-1,))
            Q = basis.astype(np.float64)
            flat_x = flat_x + (flat_s - flat_x) @ Q @ Q.T
            v[ix] = flat_x.reshape(x.shape).astype(np.float32)
    return name, iv, apply


# ---------------------------------------------------------------- properties

@given(st.data())
def test_padded_rows_equal_rows_alone(data):
    model = data.draw(models())
    tokens, mask = data.draw(batches(model, max_batch=4))
    sites = data.draw(st.lists(st.sampled_from(model.site_names), max_size=3, unique=True))
    out = run(model, tokens, attention_mask=mask, cache=sites, logits="all")
    for b in range(tokens.shape[0]):
        real = np.flatnonzero(mask[b]) if mask is not None else np.arange(tokens.shape[1])
        alone = run(model, tokens[b:b + 1, real], cache=sites, logits="all")
        close(out.logits[b, real], alone.logits[0], f"row {b} logits")
        for s in sites:
            got = out.cache[s][b]
            if s.endswith(("hook_attn_scores", "hook_pattern")):
                got = got[:, real][:, :, real]
            else:
                got = got[real]
            close(got, alone.cache[s][0], f"row {b} {s}")


@given(st.data())
def test_interventions_equal_python_hooks(data):
    model = data.draw(models())
    tokens, mask = data.draw(batches(model))
    other = np.random.default_rng(0).integers(0, model.d_vocab, tokens.shape)
    cache = Arrays(run(model, other, attention_mask=mask, cache=model.site_names, logits=None).cache)
    ivs = data.draw(st.lists(intervention(model, tokens.shape, cache), min_size=1, max_size=4))
    hooks = {}
    for name, _, apply in ivs:
        hooks.setdefault(name, []).append(apply)

    def hook_for(fns):
        def hook(value, name):
            for fn in fns:
                fn(value)
        return hook
    got = run(model, tokens, attention_mask=mask, interventions=[iv for _, iv, _ in ivs]).logits
    want = run(model, tokens, attention_mask=mask, hooks={n: hook_for(f) for n, f in hooks.items()}).logits
    assume(np.isfinite(want).all())  # a pattern scaled into overflow is not the point here
    close(got, want, repr([iv for _, iv, _ in ivs]))


@st.composite
def base_intervention(draw, model, T):
    """Interventions a sweep's base run takes: Set, Zero, Add, Scale, Noise at any
    site. At attention sites only on or below the diagonal (issue 12 item 2: a base
    write above the diagonal of hook_pattern breaks the sweep's causal shortcut)."""
    name, suffix = site_name(draw, model)
    kw = where(draw, model, suffix, T, 1)
    kw["row"] = None
    if suffix in ATTENTION_SITES:
        kw["pos"] = sorted(draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=3)))
        kw["key_pos"] = sorted(draw(st.sets(st.integers(0, kw["pos"][0]), min_size=1, max_size=3)))
    # (a zeroed hook_scale makes values non-finite: this suite found a sweep giving
    # finite values where the explicit run gives NaN, fixed with issue 12 item 9)
    kind = draw(st.sampled_from(["zero", "add", "scale", "noise"]))
    if kind == "zero":
        return ms.Zero(name, **kw)
    if kind == "add":
        return ms.Add(name, draw(st.floats(-2, 2, width=32)), **kw)
    if kind == "scale":
        return ms.Scale(name, draw(st.floats(-2, 2, width=32)), **kw)
    return ms.Noise(name, draw(st.floats(0, 1)), seed=draw(st.integers(0, 50)), **kw)


@st.composite
def patch(draw, model, caches, T):
    name, suffix = site_name(draw, model)
    kw = where(draw, model, suffix, T, 1)
    kw["row"] = None  # a sweep patches every row
    return ms.Patch(name, draw(st.sampled_from(caches)), **kw)


@given(st.data())
def test_sweep_equals_one_run_per_patch(data):
    model = data.draw(models())
    corrupted, mask = data.draw(batches(model))
    B, T = corrupted.shape
    clean = corrupted.copy()
    flip = np.array(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    clean[flip] = (clean[flip] + 1) % model.d_vocab
    cache = Arrays(run(model, clean, attention_mask=mask, cache=model.site_names, logits=None).cache)
    base = data.draw(st.lists(base_intervention(model, T), max_size=2))
    # writes of the base run's own values too (as path patching holds heads): no-ops
    # before the first position another write changes, restoring values after it
    held = Arrays(run(model, corrupted, attention_mask=mask, cache=model.site_names, logits=None,
                      interventions=base).cache)
    patches = data.draw(st.lists(st.lists(patch(model, [cache, held], T), min_size=1, max_size=3),
                                 min_size=1, max_size=5))
    metric = data.draw(st.sampled_from([
        ms.metrics.LogitDiff(data.draw(st.integers(0, model.d_vocab - 1)), data.draw(st.integers(0, model.d_vocab - 1))),
        ms.metrics.LogProb(data.draw(st.integers(0, model.d_vocab - 1))),
        ms.metrics.Prob(data.draw(st.integers(0, model.d_vocab - 1)))]))
    CALLS["sweeps"] += 1
    got = ms.patching.sweep(model, corrupted, patches, metric, attention_mask=mask, interventions=base,
                            per_row=True, progress=False)
    for i, group in enumerate(patches):
        CALLS["runs"] += 1
        want = metric.per_row(model, corrupted, mask, interventions=base + group)
        close(got[i], want, f"patch {i}: {group} under {base}")


@st.composite
def source_run(draw, model, B, T):
    """A Source run: its own tokens (a batch of B, or 1 for every row), padding and
    non-Source interventions (a Source inside a Source is issue 12 item 1)."""
    rows = draw(st.sampled_from([1, B]))
    tokens = np.array(draw(st.lists(st.integers(0, model.d_vocab - 1), min_size=rows * T, max_size=rows * T)),
                      np.int64).reshape(rows, T)
    mask = None
    if draw(st.booleans()):
        mask = np.ones((rows, T), np.int64)
        for r in range(rows):
            n = draw(st.integers(1, T))
            if draw(st.booleans()):
                mask[r, :T - n] = 0
            else:
                mask[r, n:] = 0
    return ms.Source(tokens, attention_mask=mask, interventions=draw(st.lists(base_intervention(model, T), max_size=2)))


@given(st.data())
def test_source_runs_equal_two_passes(data):
    model = data.draw(models())
    tokens, mask = data.draw(batches(model))
    B, T = tokens.shape
    sources = [data.draw(source_run(model, B, T)) for _ in range(data.draw(st.integers(1, 2)))]
    plan = []
    for _ in range(data.draw(st.integers(1, 3))):
        src = data.draw(st.sampled_from(sources))
        name, suffix = site_name(data.draw, model)
        plan.append((name, suffix, src, where(data.draw, model, suffix, T, B)))
    got = run(model, tokens, attention_mask=mask, interventions=[ms.Patch(n, s, **kw) for n, _, s, kw in plan]).logits

    # pass 1: each source run alone, cached (a one-row source serves every row)
    caches = {}
    for src in sources:
        c = run(model, src.tokens, attention_mask=src.attention_mask, interventions=src.interventions,
                cache=model.site_names, logits=None).cache
        caches[id(src)] = {k: np.broadcast_to(v, (B,) + v.shape[1:]).copy() for k, v in c.items()}
    # pass 2: the same patches from the caches, row by row, at the positions (and
    # keys) that are real tokens of the source row: a copy from a source row's
    # padding leaves the value alone
    explicit = []
    for name, suffix, src, kw in plan:
        smask = np.ones((B, T), bool) if src.attention_mask is None else \
            np.broadcast_to(np.asarray(src.attention_mask, bool), (B, T))
        for b in (range(B) if kw["row"] is None else [kw["row"]]):
            one = dict(kw, row=b)
            one["pos"] = [p for p in as_list(kw["pos"], T) if smask[b, p]]
            if suffix in ATTENTION_SITES:
                one["key_pos"] = [k for k in as_list(kw["key_pos"], T) if smask[b, k]]
                if not one["key_pos"]:
                    continue
            if one["pos"]:
                explicit.append(ms.Patch(name, caches[id(src)], **one))
    want = run(model, tokens, attention_mask=mask, interventions=explicit).logits
    close(got, want, repr(plan))
