"""Property-based tests of the engine (hypothesis): nested Sources to depth 3 against
their step-by-step definition, sweeps under base interventions at the attention sites
(writes above the diagonal included) against one explicit run per patch, and inputs
changed by another thread during runs. Examples are bounded so the file stays fast."""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mechscope as ms
from conftest import assert_close

V, C, H, L = 97, 30, 5, 2  # the `small` model
TOKEN_SITES = ["hook_embed", "blocks.{l}.hook_resid_pre", "blocks.{l}.attn.hook_z", "blocks.{l}.attn.hook_v",
               "blocks.{l}.hook_attn_out", "blocks.{l}.hook_resid_mid", "blocks.{l}.mlp.hook_post",
               "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_resid_post", "ln_final.hook_normalized"]
ATTENTION_SITES = ["blocks.{l}.attn.hook_attn_scores", "blocks.{l}.attn.hook_pattern"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def model(small):
    return small[2]


def positions(draw, T, min_size=1, max_size=3):
    return sorted(draw(st.sets(st.integers(0, T - 1), min_size=min_size, max_size=max_size)))


# ------------------------------------------------------------- nested Sources

def step_by_step(model, tokens, interventions, batch, cache=None, logits="all"):
    """The definition: every Source is its own run (at the batch of the run that reads
    it), cached, and patched from the cache."""
    resolved = []
    for iv in interventions:
        src = getattr(iv, "source", None)
        if isinstance(src, ms.Source):
            src_tokens = np.asarray(src.tokens)
            if src_tokens.shape[0] != batch:
                src_tokens = np.repeat(src_tokens, batch, axis=0)
            values = step_by_step(model, src_tokens, src.interventions, batch, cache=iv.site, logits=None).cache
            if isinstance(iv, ms.SubspacePatch):
                iv = ms.SubspacePatch(iv.site, iv.basis, values, pos=iv.pos, index=iv.index)
            else:
                iv = ms.Patch(iv.site, values, pos=iv.pos, head=iv.head, key_pos=iv.key_pos)
        resolved.append(iv)
    return model.run(tokens, interventions=resolved, cache=cache, logits=logits)


@st.composite
def nested_plans(draw):
    B, T = draw(st.integers(1, 2)), draw(st.integers(3, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    made = []

    def site(attention_ok=True):
        layer = draw(st.integers(0, L - 1))
        pool = TOKEN_SITES + (ATTENTION_SITES if attention_ok else [])
        return draw(st.sampled_from(pool)).format(l=layer)

    def patch(source):
        name = site()
        if "attn_scores" in name or "pattern" in name:
            return ms.Patch(name, source, head=positions(draw, H, max_size=2), pos=positions(draw, T),
                            key_pos=positions(draw, T))
        if draw(st.booleans()) and "attn" not in name:
            width = C if "mlp.hook_post" not in name else 4 * C
            dims = positions(draw, width, min_size=2, max_size=4)
            Q, _ = np.linalg.qr(rng.normal(size=(len(dims), draw(st.integers(1, len(dims))))))
            return ms.SubspacePatch(name, Q, source, pos=positions(draw, T), index=dims)
        return ms.Patch(name, source, pos=positions(draw, T))

    def source(depth):
        tokens = rng.integers(0, V, (draw(st.sampled_from([1, B])), T))
        ivs = []
        for _ in range(draw(st.integers(0, 2))):
            if depth > 1 and draw(st.booleans()):
                ivs.append(patch(new_or_shared(depth - 1)))
            else:
                ivs.append(ms.Scale(site(), draw(st.sampled_from([0.0, 0.5, 2.0])), pos=positions(draw, T)))
        s = ms.Source(tokens, interventions=ivs)
        made.append(s)
        return s

    def new_or_shared(depth):
        if made and draw(st.integers(0, 3)) == 0:
            return draw(st.sampled_from(made))  # one Source read from two places
        return source(depth)

    depth = draw(st.integers(1, 3))
    top = [patch(source(depth))] + [patch(new_or_shared(draw(st.integers(1, depth))))
                                    for _ in range(draw(st.integers(0, 2)))]
    return rng.integers(0, V, (B, T)), top


@settings(max_examples=40, **SETTINGS)
@given(plan=nested_plans())
def test_nested_sources_equal_step_by_step(model, plan):
    tokens, interventions = plan
    got = model.run(tokens, interventions=interventions).logits
    want = step_by_step(model, tokens, interventions, tokens.shape[0]).logits
    assert_close(got, want, atol=2e-5, what=repr(interventions))


# ----------------------------------------- sweeps under attention interventions

@st.composite
def attention_sweeps(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask = np.ones((B, T), np.int64)
    for b in range(B):  # mostly full rows, some left or right padded
        pad = draw(st.integers(0, T - 1)) if draw(st.integers(0, 2)) == 0 else 0
        if draw(st.booleans()):
            mask[b, :pad] = 0
        else:
            mask[b, T - pad:] = 0
    base = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(ATTENTION_SITES + ATTENTION_SITES[1:])).format(l=draw(st.integers(0, L - 1)))
        box = dict(head=positions(draw, H, max_size=3), pos=positions(draw, T, max_size=4),
                   key_pos=positions(draw, T, max_size=5))  # keys after the query included
        kind = draw(st.sampled_from(["add", "add", "noise", "noise", "set", "scale"]))
        if kind == "add":
            base.append(ms.Add(name, draw(st.sampled_from([-0.3, 0.2, 0.5])), **box))
        elif kind == "noise":
            base.append(ms.Noise(name, 0.2, seed=draw(st.integers(0, 99)), **box))
        elif kind == "set":
            values = [0.0, 0.4, 0.9] if "pattern" in name else [-2.0, 1.0, 3.0]
            base.append(ms.Set(name, draw(st.sampled_from(values)), **box))
        else:
            base.append(ms.Scale(name, draw(st.sampled_from([0.0, 0.5, 1.7])), **box))
    clean = rng.integers(0, V, (B, T))
    corrupted = clean.copy()
    flip = rng.random((B, T)) < 0.5
    corrupted[flip] = (clean[flip] + 11) % V
    return clean, corrupted, mask, base, rng


@settings(max_examples=25, **SETTINGS)
@given(case=attention_sweeps(), data=st.data())
def test_sweeps_under_attention_interventions_equal_explicit_runs(model, case, data):
    clean, corrupted, mask, base, rng = case
    B, T = clean.shape
    cache = model.run(clean, attention_mask=mask, cache=model.site_names).cache
    patches = []
    for _ in range(8):
        l = data.draw(st.integers(0, L - 1))
        kind = data.draw(st.sampled_from(["resid", "resid", "resid", "z", "pattern", "scores"]))
        if kind == "resid":
            patches.append(ms.Patch(f"blocks.{l}.hook_resid_pre", cache, pos=positions(data.draw, T)))
        elif kind == "z":
            patches.append(ms.Patch(f"blocks.{l}.attn.hook_z", cache, head=data.draw(st.integers(0, H - 1)),
                                    pos=positions(data.draw, T)))
        else:
            site = f"blocks.{l}.attn.hook_{'pattern' if kind == 'pattern' else 'attn_scores'}"
            patches.append(ms.Patch(site, cache, head=data.draw(st.integers(0, H - 1)),
                                    pos=positions(data.draw, T), key_pos=positions(data.draw, T)))
    metric = ms.metrics.LogProb(rng.integers(0, V, B))
    got = ms.patching.sweep(model, corrupted, patches, metric, attention_mask=mask, interventions=base,
                            per_row=True)
    for i, patch in enumerate(patches):
        want = metric.per_row(model, corrupted, mask, interventions=base + [patch])
        assert_close(got[i], want, atol=2e-5, what=f"{base} + {patch}")


# ------------------------------------------------------ inputs changed meanwhile

@settings(max_examples=12, **SETTINGS)
@given(call=st.sampled_from(["run", "metric", "sweep", "source"]), seed=st.integers(0, 2**31),
       target=st.sampled_from(["tokens", "mask", "answers", "all"]))
def test_inputs_changed_during_runs(model, call, seed, target):
    """Another thread writes garbage into the int32 inputs while calls use them: each
    call returns or raises ValueError, and the model then gives its usual answer."""
    rng = np.random.default_rng(seed)
    valid = rng.integers(0, V, (6, 24)).astype(np.int32)
    tokens, mask, answers = valid.copy(), np.ones((6, 24), np.int32), np.arange(6, dtype=np.int32)
    reference = model.run(valid, logits="last").logits
    cache = model.run(valid, cache="blocks.1.hook_resid_pre").cache
    arrays = {"tokens": [tokens], "mask": [mask], "answers": [answers], "all": [tokens, mask, answers]}[target]
    armed, stop = threading.Event(), threading.Event()

    def scribble():
        garbage = np.random.default_rng(seed + 1).integers(-2**31, 2**31 - 1, 1024).astype(np.int32)
        i = 0
        while not stop.is_set():
            if not armed.wait(0.01):
                continue
            for a in arrays:
                a.flat[i % a.size] = garbage[i % 1024]
            i += 1
    t = threading.Thread(target=scribble)
    t.start()
    try:
        for _ in range(8):
            tokens[:], mask[:], answers[:] = valid, 1, np.arange(6)
            armed.set()
            try:
                if call == "run":
                    model.run(tokens, attention_mask=mask, logits="last")
                elif call == "metric":
                    ms.metrics.LogitDiff(answers, 0).per_row(model, tokens, attention_mask=mask)
                elif call == "sweep":
                    ms.patching.sweep(model, tokens, [ms.Patch("blocks.1.hook_resid_pre", cache, pos=2)],
                                      ms.metrics.LogProb(answers), attention_mask=mask)
                else:
                    model.run(valid, interventions=[ms.Patch("blocks.0.hook_resid_post",
                                                             ms.Source(tokens, attention_mask=mask))])
            except ValueError:
                pass
            armed.clear()
    finally:
        stop.set()
        armed.set()
        t.join()
    assert_close(model.run(valid, logits="last").logits, reference, atol=0)
