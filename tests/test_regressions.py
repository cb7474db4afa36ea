"""Regression tests for the fuzzing report (issue 12, items 1-10 and 14): each
reproduces a silent wrong answer or a crash and checks the fixed behaviour against a
definition computed the slow way."""
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import assert_close

# the `small` model: 2 layers, 5 heads, d_model 30, vocab 97, n_ctx 40
V, C, H, L = 97, 30, 5, 2


@pytest.fixture(scope="module")
def model(small):
    return small[2]


@pytest.fixture(scope="module")
def abc():
    rng = np.random.default_rng(12)
    return tuple(rng.integers(0, V, (2, 7)) for _ in range(3))


# ------------------------------------------------------------ 1. nested Sources

def test_nested_sources_match_step_by_step(ms, model, abc):
    """The issue's reproduction: a Source patched from inside another Source and from
    the run itself, next to a third Source."""
    a, b, c = abc
    s1 = ms.Source(b)
    s2 = ms.Source(a, interventions=[ms.Patch("blocks.0.hook_resid_post", s1)])
    got = model.run(a, interventions=[ms.Patch("hook_embed", s1), ms.Patch("blocks.1.hook_resid_pre", s2),
                                      ms.Patch("blocks.1.hook_mlp_out", ms.Source(c))]).logits
    c1 = model.run(b, cache=["hook_embed", "blocks.0.hook_resid_post"]).cache
    c2 = model.run(a, interventions=[ms.Patch("blocks.0.hook_resid_post", c1)], cache="blocks.1.hook_resid_pre").cache
    c3 = model.run(c, cache="blocks.1.hook_mlp_out").cache
    want = model.run(a, interventions=[ms.Patch("hook_embed", c1), ms.Patch("blocks.1.hook_resid_pre", c2),
                                       ms.Patch("blocks.1.hook_mlp_out", c3)]).logits
    assert_close(got, want, atol=1e-5)


def test_source_used_only_inside_a_source(ms, model, abc):
    """Depth 3: Y(a, M(b, N(c))) with positions, against three explicit runs."""
    a, b, c = abc
    inner = ms.Source(c, interventions=[ms.Zero("blocks.0.attn.hook_z", head=1)])
    middle = ms.Source(b, interventions=[ms.Patch("blocks.0.hook_mlp_out", inner, pos=[2, 5])])
    got = model.run(a, interventions=[ms.Patch("blocks.1.hook_resid_mid", middle, pos=[3, 4, 6])]).logits
    ci = model.run(c, interventions=[ms.Zero("blocks.0.attn.hook_z", head=1)], cache="blocks.0.hook_mlp_out").cache
    cm = model.run(b, interventions=[ms.Patch("blocks.0.hook_mlp_out", ci, pos=[2, 5])],
                   cache="blocks.1.hook_resid_mid").cache
    want = model.run(a, interventions=[ms.Patch("blocks.1.hook_resid_mid", cm, pos=[3, 4, 6])]).logits
    assert_close(got, want, atol=1e-5)
    assert np.abs(got - model.run(a).logits).max() > 1e-3


def test_batch_one_source_over_a_per_row_source(ms, model, abc):
    """A batch-1 Source that patches from a per-row Source runs once per row."""
    a, b, _ = abc
    outer = ms.Source(b[:1], interventions=[ms.Patch("blocks.0.hook_resid_post", ms.Source(a), pos=2),
                                            ms.Scale("blocks.1.hook_resid_pre", 0.5, row=0)])
    got = model.run(a, interventions=[ms.Patch("blocks.1.hook_mlp_out", outer)]).logits
    ca = model.run(a, cache="blocks.0.hook_resid_post").cache
    co = model.run(np.repeat(b[:1], 2, axis=0), cache="blocks.1.hook_mlp_out",
                   interventions=[ms.Patch("blocks.0.hook_resid_post", ca, pos=2),
                                  ms.Scale("blocks.1.hook_resid_pre", 0.5)]).cache
    want = model.run(a, interventions=[ms.Patch("blocks.1.hook_mlp_out", co)]).logits
    assert_close(got, want, atol=1e-5)


def test_nested_sources_in_metrics_and_cycles_refused(ms, model, abc):
    a, b, c = abc
    metric = ms.metrics.LogitDiff(3, 4)
    nested = [ms.Patch("blocks.1.hook_attn_out", ms.Source(b, interventions=[
        ms.Patch("blocks.0.hook_attn_out", ms.Source(c))]))]
    logits = model.run(a, interventions=nested, logits="last").logits
    assert_close(metric.per_row(model, a, interventions=nested), logits[:, 3] - logits[:, 4], atol=1e-4)
    loop = ms.Source(b)
    loop.interventions.append(ms.Patch("blocks.0.hook_resid_pre", ms.Source(c, interventions=[
        ms.Patch("blocks.0.hook_resid_pre", loop)])))
    with pytest.raises(ValueError, match="itself"):
        model.run(a, interventions=[ms.Patch("blocks.1.hook_resid_pre", loop)])


# ------------------------------------------ 2. attention writes at future keys

def test_future_key_writes_leave_the_run_unchanged(ms, model, abc):
    """The causal mask holds at both attention sites: writes above the diagonal do
    nothing, and caches show -inf / 0 there."""
    a = abc[0]
    plain = model.run(a, cache=["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"])
    for site, op in [("blocks.0.attn.hook_pattern", lambda s: ms.Add(s, 0.3, pos=2, key_pos=[3, 6])),
                     ("blocks.0.attn.hook_attn_scores", lambda s: ms.Set(s, 5.0, pos=[0, 1], key_pos=[4, 5])),
                     ("blocks.0.attn.hook_pattern", lambda s: ms.Noise(s, 0.2, seed=1, pos=0, key_pos=[1, 2]))]:
        out = model.run(a, interventions=[op(site)], cache=[site])
        assert_close(out.logits, plain.logits, atol=0, what=site)
        assert_close(out.cache[site], plain.cache[site], atol=0, what=site)

    def hook(value, site):
        value += 1.0  # every entry, the masked ones too
    hooked = model.run(a, hooks={"blocks.0.attn.hook_pattern": hook}, cache="blocks.0.attn.hook_pattern")
    upper = np.triu(np.ones((7, 7), bool), 1)
    assert (hooked.cache["blocks.0.attn.hook_pattern"][:, :, upper] == 0).all()
    assert np.abs(hooked.logits - plain.logits).max() > 1e-3  # the visible entries did change


@pytest.mark.parametrize("base", [
    lambda ms: [ms.Add("blocks.0.attn.hook_pattern", 0.1)],
    lambda ms: [ms.Noise("blocks.1.attn.hook_pattern", 0.05, seed=3)],
    lambda ms: [ms.Set("blocks.0.attn.hook_attn_scores", 2.0, head=[0, 3], key_pos=[1, 5])],
    lambda ms: [ms.Scale("blocks.1.attn.hook_pattern", 1.5, pos=[1, 4]), ms.Add("blocks.0.hook_resid_mid", 0.2)],
])
def test_sweep_with_pattern_writes_equals_explicit_runs(ms, model, abc, base):
    a, b, _ = abc
    cache = model.run(b, cache=model.site_names).cache
    metric = ms.metrics.LogProb([5, 6])
    patches = [ms.Patch(f"blocks.{l}.hook_resid_pre", cache, pos=p) for l in range(L) for p in range(7)]
    patches += [ms.Patch("blocks.1.attn.hook_z", cache, head=h, pos=p) for h in range(H) for p in (2, 5)]
    got = ms.patching.sweep(model, a, patches, metric, interventions=base(ms), per_row=True)
    for i, patch in enumerate(patches):
        assert_close(got[i], metric.per_row(model, a, interventions=base(ms) + [patch]), what=repr(patch))


# ------------------------------------------------ 3. concurrent mutation

def test_inputs_changed_by_another_thread_do_not_crash(ms, model):
    """int32 tokens, masks and answers rewritten with garbage while runs use them (the
    arrays pass Python's checks, then change while the core runs without the GIL):
    every call returns or refuses; the process survives."""
    rng = np.random.default_rng(0)
    valid_tokens = rng.integers(0, V, (8, 40)).astype(np.int32)
    tokens, answers, mask = valid_tokens.copy(), np.arange(8, dtype=np.int32), np.ones((8, 40), np.int32)
    cache = model.run(valid_tokens, cache="blocks.0.hook_resid_pre").cache
    armed, stop = threading.Event(), threading.Event()

    def scribble():
        garbage = np.random.default_rng(1).integers(-2**31, 2**31 - 1, 4096).astype(np.int32)
        i = 0
        while not stop.is_set():
            if armed.is_set():
                tokens.flat[i % tokens.size] = garbage[i % 4096]
                answers[i % 8] = garbage[(i + 7) % 4096]
                mask.flat[i % mask.size] = garbage[(i + 3) % 4096]
                i += 1
            else:
                armed.wait(0.01)
    t = threading.Thread(target=scribble)
    t.start()
    done = 0
    try:
        for i in range(90):
            tokens[:], answers[:], mask[:] = valid_tokens, np.arange(8), 1
            armed.set()
            try:
                if i % 3 == 0:
                    model.run(tokens, attention_mask=mask, logits="last")
                elif i % 3 == 1:
                    ms.metrics.LogitDiff(answers, 0).per_row(model, tokens, attention_mask=mask)
                else:
                    ms.patching.sweep(model, tokens, [ms.Patch("blocks.0.hook_resid_pre", cache, pos=3)],
                                      ms.metrics.LogitDiff(answers, 0))
            except ValueError:
                pass
            armed.clear()
            done += 1
    finally:
        stop.set()
        armed.set()
        t.join()
    assert done == 90


# ------------------------------------------------------------------ 4. KL

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_kl_refuses_non_finite_reference(ms, model, abc, bad):
    ref = model.run(abc[0], logits="last").logits
    ref[1, 7] = bad
    with pytest.raises(ValueError, match="reference_logits"):
        ms.metrics.KL(ref).evaluate(model, abc[0])
    ref[1, 7] = -np.inf  # a token of probability 0 is a distribution
    value = ms.metrics.KL(ref).per_row(model, abc[0])
    assert np.isfinite(value).all() and value[0] == pytest.approx(0, abs=1e-5) and value[1] > 0


# ------------------------------------------------------------- 5. SubspacePatch

def test_subspace_patch_source_checks_and_source_runs(ms, model, abc):
    a, b, _ = abc
    Q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(C, 3)))
    site = "blocks.1.hook_resid_pre"
    full = model.run(b, cache=site).cache[site]
    for wrong in (full[:, :5], full[:, :, :20], full[:1], full[None]):
        with pytest.raises(ValueError, match="source"):
            model.run(a, interventions=[ms.SubspacePatch(site, Q, wrong, pos=[1, 2])])
    with pytest.raises(ValueError, match="rank 0"):
        model.run(a, interventions=[ms.SubspacePatch(site, np.zeros((C, 0)), full)])
    from_cache = model.run(a, interventions=[ms.SubspacePatch(site, Q, full, pos=[1, 4])]).logits
    from_source = model.run(a, interventions=[ms.SubspacePatch(site, Q, ms.Source(b), pos=[1, 4])]).logits
    assert_close(from_source, from_cache, atol=1e-5)
    assert np.abs(from_cache - model.run(a).logits).max() > 1e-3


# ---------------------------------------------------------------- 6. Recovery

def test_recovery_per_row_is_normalised_per_row(ms, model, abc):
    a, b, _ = abc
    cache = model.run(b, cache="blocks.*.hook_resid_pre").cache
    diff = ms.metrics.LogitDiff([3, 8], [4, 9])
    rec = ms.metrics.Recovery.from_runs(diff, model, b, a)
    patches = [ms.Patch("blocks.0.hook_resid_pre", cache, pos=p) for p in range(7)]
    raw = ms.patching.sweep(model, a, patches, diff, per_row=True)
    got = ms.patching.sweep(model, a, patches, rec, per_row=True)
    clean, corrupted = diff.per_row(model, b), diff.per_row(model, a)
    assert_close(got, (raw - corrupted) / (clean - corrupted), atol=1e-4, rtol=1e-4)
    assert_close(ms.patching.sweep(model, a, patches, rec), rec.reduce(raw), atol=1e-6)
    assert_close(rec.per_row(model, b), [1.0, 1.0], atol=1e-4)


# ---------------------------------------------------------- 7. repeated indices

@pytest.mark.parametrize("make", [
    lambda ms: ms.Scale("blocks.0.hook_resid_pre", 2.0, pos=[2, 2]),
    lambda ms: ms.Add("blocks.0.hook_resid_pre", 1.0, index=[1, 1]),
    lambda ms: ms.Zero("blocks.0.attn.hook_z", head=[-1, 4]),
    lambda ms: ms.Add("blocks.0.attn.hook_pattern", 0.1, key_pos=[0, -7]),
])
def test_repeated_indices_are_refused(ms, model, abc, make):
    with pytest.raises(ValueError, match="repeated"):
        model.run(abc[0], interventions=[make(ms)])


# ---------------------------------------------------------- 8. site spellings

def test_non_canonical_site_names_refused_everywhere(ms, model, abc):
    name = "blocks.01.hook_resid_pre"
    for call in (lambda: model.run(abc[0], interventions=[ms.Zero(name)]),
                 lambda: model.run(abc[0], cache=name),
                 lambda: model.run(abc[0], hooks={name: lambda v, s: None}),
                 lambda: model.run(abc[0], cache="blocks.\u0661.hook_resid_pre")):
        with pytest.raises(ValueError, match="site"):
            call()


# ------------------------------------------------- 9. padding and NaN isolation

def test_logits_at_padding_refused(ms, model, abc):
    mask = np.ones((2, 7), int)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match="padding"):
        model.run(abc[0], attention_mask=mask, logits=[2, 6])
    assert model.run(abc[0], attention_mask=mask, logits=[0, 4]).logits.shape == (2, 2, V)


NAN_SCRIPT = """
import sys, numpy as np, mechscope as ms
model = ms.Model.from_pretrained(sys.argv[1])
tokens = np.random.default_rng(5).integers(0, 97, (2, 13))
for cache in (None, "blocks.1.attn.hook_pattern"):  # the fused and the stored-pattern paths
    plain = model.run(tokens, cache=cache).logits
    for p in range(13):
        for site in ("blocks.0.hook_resid_post", "blocks.0.attn.hook_v"):
            out = model.run(tokens, cache=cache, interventions=[ms.Set(site, np.nan, pos=p)]).logits
            assert np.isnan(out[:, p]).all(), (site, p)
            assert (out[:, :p] == plain[:, :p]).all(), (site, p, cache)
print("ok", ms.show_config.__module__)
"""


@pytest.mark.parametrize("generic", ["0", "1"])
def test_nan_at_one_position_stays_there(small, generic):
    """A NaN written at position p reaches positions >= p only, for every p mod 4, with
    the AVX-512 and the generic attention kernels."""
    env = dict(os.environ, MECHSCOPE_GENERIC_KERNELS=generic)
    res = subprocess.run([sys.executable, "-c", NAN_SCRIPT, small[1]], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ------------------------------------------------------- 10. tokens carry the mask

def test_to_tokens_carries_its_padding(ms):
    model = ms.demo.load_model()
    texts = ["Mary Clark lives in", "When Mary"]
    tokens = model.to_tokens(texts)
    assert isinstance(tokens, ms.Tokens) and tokens.attention_mask.tolist()[1] == [1, 1, 1, 0, 0]
    last = model.run(tokens, logits="last").logits
    for i, text in enumerate(texts):
        assert_close(last[i], model.run(model.to_tokens(text), logits="last").logits[0], atol=1e-5)
    # metrics, sweeps and slices use it too
    metric = ms.metrics.LogProb(int(last[0].argmax()))
    alone = [metric.per_row(model, model.to_tokens(t))[0] for t in texts]
    assert_close(metric.per_row(model, tokens), alone, atol=1e-5)
    assert_close(metric.per_row(model, tokens[1:]), alone[1:], atol=1e-5)
    cache = model.run(tokens, cache="blocks.0.hook_resid_pre").cache
    swept = ms.patching.sweep(model, tokens, [ms.Patch("blocks.0.hook_resid_pre", cache, pos=1)], metric,
                              per_row=True)
    assert_close(swept[0], alone, atol=1e-5)
    # equal lengths: no mask, an ordinary array's behaviour
    assert model.to_tokens(["Mary", "John"]).attention_mask is None


# -------------------------------------------------------------- 14. messages

def test_python_metric_returning_an_array(ms, model, abc):
    cache = model.run(abc[1], cache="blocks.0.hook_resid_pre").cache
    with pytest.raises(TypeError, match="one number"):
        ms.patching.sweep(model, abc[0], [ms.Patch("blocks.0.hook_resid_pre", cache, pos=1)],
                          lambda logits: logits[:, -1, 0])


def test_budget_messages_and_numpy_integers(ms, model, abc):
    saved_budget, saved_threads = ms.get_memory_budget(), ms.get_num_threads()
    try:
        ms.set_num_threads(np.int64(1))
        assert ms.get_num_threads() == 1
        ms.set_memory_budget(np.int32(5000))
        assert ms.get_memory_budget() == 5000
        with pytest.raises(ValueError, match=r"over the memory budget of 4\.9 KiB") as e:
            model.run(abc[0])
        assert "0.0 MiB" not in str(e.value)
        with pytest.raises(TypeError, match="nbytes"):
            ms.set_memory_budget(5000.0)
    finally:
        ms.set_memory_budget(saved_budget)
        ms.set_num_threads(saved_threads)


def write_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry, match", [
    ([1, 2], "not a JSON object"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": [2**70, 2**70], "data_offsets": [0, 8]}, "bytes"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.5, 8]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": None}, "data_offsets"),
])
def test_malformed_safetensors_headers(ms, tmp_path, entry, match):
    from mechscope.checkpoint import read_safetensors
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": entry}, b"\0" * 8)
    with pytest.raises(ValueError, match=match):
        read_safetensors(str(path))


@pytest.mark.parametrize("index", [
    {"weight_map": ["a.safetensors"]},
    {"weight_map": {"w": 3}},
    {"weight_map": {"w": "../elsewhere.safetensors"}},
    {"weight_map": {"w": "/abs/model.safetensors"}},
    {"nothing": 1},
    [1, 2],
])
def test_malformed_shard_index(ms, tmp_path, index):
    from mechscope.checkpoint import read_folder
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index"):
        read_folder(str(tmp_path))
