"""Attribution patching (ms.attribution) against its definition computed the slow way
(PyTorch autograd gradients x differences, summed over each patched box, one index at
a time), against the exact sweeps where the metric is linear in the site, and the
quality of the estimates on the demo model's IOI task."""
import numpy as np
import pytest
import torch

from _torch_grad import TorchGrad
from conftest import make_hf_model, save_hf

# the model, prompts and function list of the exact sweeps' tests: every grid has its estimate
from test_patching import B, CONFIG, CORRECT, FUNCTIONS, T, WRONG  # noqa: E402
SINGLE = [n for n in FUNCTIONS if not n.endswith("_every")]
QK = ["attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_q_by_pos", "attn_head_k_by_pos"]


@pytest.fixture(scope="module")
def setup(ms, tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=21)
    model = ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("attr") / "m"))
    rng = np.random.default_rng(5)
    clean = rng.integers(0, CONFIG["vocab_size"], (B, T))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 17) % CONFIG["vocab_size"]
    corrupted[:, 4] = (clean[:, 4] + 29) % CONFIG["vocab_size"]
    cache = model.run(clean, cache=model.site_names).cache
    return model, TorchGrad(hf, model), clean, corrupted, cache


# ------------------------------------------------------------ the slow definition

_LAYER_POS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
              "mlp_out": "hook_mlp_out"}
_HEADS = {"out": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def boxes(name, n_heads, T):
    """name -> (site suffix, grid shape after the layer, index -> the box of the site's
    full value [batch, ...] the exact patch writes, every row)."""
    every = slice(None)
    if name in _LAYER_POS:
        return _LAYER_POS[name], (T,), lambda p: (every, p, every)
    kind = name.split("_")[2]
    if kind in _HEADS and name.endswith("_by_pos"):
        return _HEADS[kind], (T, n_heads), lambda p, h: (every, p, h, every)
    if kind in _HEADS:
        return _HEADS[kind], (n_heads,), lambda h: (every, every, h, every)
    if name == "attn_head_pattern_all_pos":
        return "attn.hook_pattern", (n_heads,), lambda h: (every, h, every, every)
    if name == "attn_head_pattern_by_pos":
        return "attn.hook_pattern", (n_heads, T), lambda h, d: (every, h, d, every)
    return "attn.hook_pattern", (n_heads, T, T), lambda h, d, s: (every, h, d, s)


def slow(ms, ref, model, tokens, cache, metric, name, qk_fix=True, mask=None, graddrop=False):
    """The estimate by its definition, one index at a time, gradients from PyTorch."""
    if name == "block_every":
        return np.stack([slow(ms, ref, model, tokens, cache, metric, n, qk_fix, mask, graddrop)
                         for n in ("resid_pre", "attn_out", "mlp_out")])
    if name.endswith("_every"):
        how = "all_pos" if "all_pos" in name else "by_pos"
        parts = [slow(ms, ref, model, tokens, cache, metric, f"attn_head_{k}_{how}", qk_fix, mask, graddrop)
                 for k in ("out", "q", "k", "v", "pattern")]
        if how == "by_pos":
            parts[-1] = parts[-1].transpose(0, 2, 1)
        return np.stack(parts)
    L, H = model.n_layers, model.n_heads
    kind = name.split("_")[2] if name.startswith("attn_head_") else None
    suffix, shape, box = boxes(name, model.n_kv_heads if kind in ("k", "v") else H, tokens.shape[1])
    exact_softmax = qk_fix and suffix in ("attn.hook_q", "attn.hook_k")
    wanted = [f"blocks.{l}.{s}" for l in range(L) for s in
              (["attn.hook_pattern"] if exact_softmax else [suffix])]
    values = ref.forward(tokens, mask)[2]  # the corrupted run's
    runs = []  # (interventions of the backward pass, the layer whose outputs are held)
    if graddrop:
        held = values
        for layer in range(L):
            runs.append(([ms.Set(f"blocks.{layer}.{s}", held[f"blocks.{layer}.{s}"].numpy())
                          for s in ("hook_attn_out", "hook_mlp_out")], layer))
    else:
        runs.append(([], None))
    total = np.zeros((L,) + shape)
    for interventions, dropped in runs:
        g = ref(tokens, metric, sites=wanted, interventions=interventions, attention_mask=mask)
        base = np.asarray(g.metric, np.float64)
        out = np.zeros((L,) + shape)
        for layer in range(L):
            name_l = f"blocks.{layer}.{suffix}"
            for index in np.ndindex(*shape):
                where = box(*index)
                if dropped == layer and suffix not in ("hook_resid_pre", "hook_resid_mid"):
                    change = np.zeros(len(tokens))  # its only way out is held constant
                elif exact_softmax:
                    pattern = f"blocks.{layer}.attn.hook_pattern"
                    clean = torch.as_tensor(np.asarray(cache[name_l]))

                    def patch(x, where=where, clean=clean):
                        x = x.clone()
                        x[where] = clean[where]
                        return x
                    new = ref.forward(tokens, mask, replace={name_l: patch})[2][pattern].numpy()
                    change = ((new.astype(np.float64) - g.activations[pattern]) * g[pattern]).reshape(len(tokens), -1).sum(1)
                else:
                    diff = (np.asarray(cache[name_l], np.float64) - values[name_l].numpy()) * g[name_l]
                    change = diff[where].reshape(len(tokens), -1).sum(1)
                if graddrop:
                    # Kramar et al. 2024: per prompt pair |I_AtP+GD_l|, averaged over the pairs; in
                    # the reported units (the metric's own; Recovery divides by clean - corrupted)
                    unit = float(metric.reduce(np.ones((1, len(tokens))))[0] - metric.reduce(np.zeros((1, len(tokens))))[0])
                    out[(layer,) + index] = np.mean([abs(c) for c in change]) * abs(unit)
                else:
                    out[(layer,) + index] = float(metric.reduce((base + change)[None])[0])
        total += out
    if not graddrop:
        return total
    # 1/(L-1) inside a block (its own layer's term is 0); L terms on the residual stream
    return total / ((L - 1) if suffix not in ("hook_resid_pre", "hook_resid_mid") else L)


# ------------------------------------------------------------ (b) the definition, (c) shapes

@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_as_slow_definition_and_shape_of_the_sweep(ms, name, setup):
    model, ref, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    exact = getattr(ms.patching, name)(model, corrupted, cache, metric)
    # the stacked functions share the per-site code: the exact softmax is enough there
    for qk_fix in ([True, False] if any(k in name for k in ("_q_", "_k_")) else [True]):
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric, qk_fix=qk_fix)
        assert ours.shape == exact.shape and ours.dtype == np.float32, name
        want = slow(ms, ref, model, corrupted, cache, metric, name, qk_fix)
        np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0, err_msg=f"{name} qk_fix={qk_fix}")
        # not a constant grid: the estimates move where the patches do
        assert np.ptp(ours) > 1e-3


@pytest.mark.parametrize("name", ["resid_pre", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_k_all_pos",
                                  "attn_head_pattern_dest_src_pos", "attn_head_v_by_pos"])
def test_padding_and_recovery_same_as_slow_definition(ms, name, setup):
    """Left- and right-padded rows; Recovery normalises like the exact sweep; entries
    at padding (which the exact sweep leaves alone) are the corrupted run's value."""
    model, ref, _, _, _ = setup
    rng = np.random.default_rng(8)
    clean = rng.integers(0, CONFIG["vocab_size"], (3, 5))
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 1) % CONFIG["vocab_size"]
    corrupted[:, 1] = (clean[:, 1] + 7) % CONFIG["vocab_size"]
    mask = np.ones((3, 5), np.int64)
    mask[1, :2] = 0
    mask[2, 4:] = 0
    cache = model.run(clean, attention_mask=mask, cache=model.site_names).cache
    diff = ms.metrics.LogProb(CORRECT)
    recovery = ms.metrics.Recovery.from_runs(diff, model, clean, corrupted, attention_mask=mask)
    for metric in (diff, recovery):
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric, attention_mask=mask)
        want = slow(ms, ref, model, corrupted, cache, metric, name, mask=mask)
        np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0, err_msg=name)
        exact = getattr(ms.patching, name)(model, corrupted, cache, metric, attention_mask=mask)
        assert ours.shape == exact.shape
    if name == "resid_pre":  # no clean value differs before position 1: the corrupted run's value
        np.testing.assert_allclose(ours[:, 0], 0.0, atol=1e-5)


@pytest.mark.parametrize("name", ["resid_pre", "mlp_out", "attn_head_out_all_pos", "attn_head_k_all_pos",
                                  "attn_head_pattern_by_pos"])
def test_graddrop_same_as_slow_definition(ms, name, setup):
    """GradDrop (Kramar et al. 2024): one backward pass per layer with that layer's
    outputs held constant; per prompt the magnitude of each layer's estimate, summed over
    the layers, divided by L - 1 (L on the residual stream), averaged over the prompts."""
    model, ref, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    ours = getattr(ms.attribution, name)(model, corrupted, cache, metric, graddrop=True)
    want = slow(ms, ref, model, corrupted, cache, metric, name, graddrop=True)
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0, err_msg=name)
    assert (ours >= 0).all() and np.ptp(ours) > 1e-3
    # it differs from the plain estimate's magnitude (some paths cancel when all are kept)
    plain = getattr(ms.attribution, name)(model, corrupted, cache, metric)
    assert np.abs(ours - np.abs(plain - metric.evaluate(model, corrupted))).max() > 1e-3


def test_graddrop_takes_magnitudes_per_prompt_and_normalises_recovery(ms, setup):
    """The magnitude is taken per prompt before the batch mean (estimates of opposite
    sign in two prompts add up, they do not cancel), and Recovery divides by
    |clean - corrupted|."""
    model, ref, clean, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    recovery = ms.metrics.Recovery.from_runs(metric, model, clean, corrupted)
    for name in ("resid_pre", "attn_head_q_by_pos"):
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric, graddrop=True)
        rows = [getattr(ms.attribution, name)(
            model, corrupted[i:i + 1], {k: np.asarray(v)[i:i + 1] for k, v in cache.items()},
            ms.metrics.LogitDiff(np.asarray(CORRECT)[i:i + 1], np.asarray(WRONG)[i:i + 1]), graddrop=True)
            for i in range(len(corrupted))]
        np.testing.assert_allclose(ours, np.mean(rows, axis=0), atol=2e-5, rtol=1e-5, err_msg=name)
        rec = getattr(ms.attribution, name)(model, corrupted, cache, recovery, graddrop=True)
        np.testing.assert_allclose(rec, ours / abs(recovery.clean - recovery.corrupted), rtol=1e-5, atol=1e-6)
    want = slow(ms, ref, model, corrupted, cache, recovery, "attn_head_out_all_pos", graddrop=True)
    np.testing.assert_allclose(ms.attribution.attn_head_out_all_pos(model, corrupted, cache, recovery, graddrop=True),
                               want, atol=1e-4, rtol=0)


def test_graddrop_is_exactly_zero_where_the_patch_writes_the_value_already_there(ms, setup):
    """A magnitude has no base value added that would hide rounding: key patches whose
    clean key is the corrupted one (layer 0 away from the corrupted tokens 2 and 4,
    every layer before position 2) are exactly 0, as the exact sweep's effect is."""
    model, _, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    for name in ("attn_head_k_by_pos", "attn_head_q_by_pos", "attn_head_v_by_pos", "resid_pre"):
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric, graddrop=True)
        assert (ours[:, :2] == 0).all(), name
        assert (ours[0, [0, 1, 3] + list(range(5, T))] == 0).all(), name
        assert (ours[:, 2] > 0).any(), name


@pytest.mark.parametrize("name", ["attn_head_all_pos_every", "attn_head_by_pos_every"])
def test_exact_softmax_in_chunks_equals_all_at_once(ms, name, setup, monkeypatch):
    """The query/key recompute runs over blocks of (prompt, key/value head), the other
    sites' products over blocks of prompts; one plane or prompt per step gives the
    result of everything at once."""
    model, _, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    whole = getattr(ms.attribution, name)(model, corrupted, cache, metric)
    calls = []
    real = ms.attribution._qk_fix
    monkeypatch.setattr(ms.attribution, "_qk_fix", lambda *a: calls.append(a[2].shape) or real(*a))
    monkeypatch.setattr(ms.attribution, "_CHUNK_BYTES", 1)
    chunked = getattr(ms.attribution, name)(model, corrupted, cache, metric)
    # one call per prompt and head, for q and k, in every layer
    assert len(calls) == 2 * model.n_layers * len(corrupted) * model.n_kv_heads
    assert all(shape[0] == 1 and shape[2] == model.n_heads // model.n_kv_heads for shape in calls)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=1e-6)
    unit = ms.attribution._qk_unit_bytes(model.n_heads // model.n_kv_heads, T)
    monkeypatch.setattr(ms.attribution, "_CHUNK_BYTES", 2 * unit * model.n_kv_heads)
    np.testing.assert_allclose(getattr(ms.attribution, name)(model, corrupted, cache, metric), whole, atol=1e-6, rtol=1e-6)


def test_whole_width_norms_in_blocks_of_prompts_equal_all_at_once(ms, tmp_path, monkeypatch):
    """OLMo 2's exact softmax needs every head of a prompt at once: it runs in blocks of
    prompts, one prompt per step at the smallest, with the result of everything at once"""
    from test_architectures import make_hf
    model = ms.Model.from_pretrained(save_hf(make_hf("olmo2_post_norms"), tmp_path / "olmo2"))
    rng = np.random.default_rng(6)
    clean = rng.integers(0, model.d_vocab, (3, 6))
    corrupted = (clean + 7) % model.d_vocab
    cache = model.run(clean, cache=model.site_names).cache
    metric = ms.metrics.LogitDiff(np.array([1, 2, 5]), np.array([3, 4, 0]))
    whole = {n: getattr(ms.attribution, n)(model, corrupted, cache, metric) for n in QK}
    calls = []
    real = ms.attribution._qk_fix_whole
    monkeypatch.setattr(ms.attribution, "_qk_fix_whole", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    monkeypatch.setattr(ms.attribution, "_CHUNK_BYTES", 1)
    for n in QK:
        np.testing.assert_allclose(getattr(ms.attribution, n)(model, corrupted, cache, metric), whole[n],
                                   atol=1e-6, rtol=1e-6, err_msg=n)
    assert calls == [1] * (3 * model.n_layers * len(QK))


def test_exact_softmax_over_the_memory_budget_is_refused_before_work(ms, setup):
    model, _, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    unit = ms.attribution._qk_unit_bytes(model.n_heads // model.n_kv_heads, corrupted.shape[1])
    ms.set_memory_budget(unit - 1)
    try:
        with pytest.raises(ValueError, match="qk_fix.*memory budget"):
            ms.attribution.attn_head_k_by_pos(model, corrupted, cache, metric)
    finally:
        ms.set_memory_budget(None)


# ------------------------------------------------------------ (a) exact where the metric is linear

@pytest.fixture(scope="module")
def linear_tail(ms, tmp_path_factory):
    """A 2-layer GPT-2 whose last MLP writes nothing (c_proj zero, so its output is 0
    in every run) and whose LayerNorms are linear to ~1e-7 (epsilon 1e8 >> the
    variance, weights x1e4 to keep the scale): the logit difference is then linear
    in the last layer's attention output,
    head outputs, values, pattern and residual after the attention, but not in its
    queries and keys (the softmax) nor in anything before."""
    cfg = dict(n_embd=24, n_head=4, n_layer=2, vocab_size=50, n_positions=16, activation_function="gelu_new",
               layer_norm_epsilon=1e8)
    hf = make_hf_model(cfg, seed=3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.mul_(1e4)
            if name.startswith("transformer.h.1.mlp.c_proj"):
                p.zero_()
    model = ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("lin") / "m"))
    rng = np.random.default_rng(2)
    clean = rng.integers(0, 50, (3, 6))
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 11) % 50
    corrupted[:, 3] = (clean[:, 3] + 23) % 50
    return model, clean, corrupted, model.run(clean, cache=model.site_names).cache


LINEAR_IN_LAST_LAYER = ["resid_mid", "attn_out", "attn_head_out_by_pos", "attn_head_out_all_pos",
                        "attn_head_v_by_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos",
                        "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos"]


def test_equals_exact_sweep_where_the_metric_is_linear(ms, linear_tail):
    model, _, corrupted, cache = linear_tail
    metric = ms.metrics.LogitDiff(np.array([3, 8, 13]), np.array([4, 9, 2]))
    for name in LINEAR_IN_LAST_LAYER:
        exact = getattr(ms.patching, name)(model, corrupted, cache, metric)
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric)
        scale = np.abs(exact[-1] - metric.evaluate(model, corrupted)).max()
        assert scale > 1e-2, name  # the patches do something
        np.testing.assert_allclose(ours[-1], exact[-1], atol=1e-4 * max(1.0, scale), rtol=0, err_msg=name)
    # earlier layers reach the metric through softmaxes and an MLP: only approximately
    exact = ms.patching.resid_pre(model, corrupted, cache, metric)
    ours = ms.attribution.resid_pre(model, corrupted, cache, metric)
    assert np.abs(ours - exact).max() > 1e-2


def test_exact_softmax_makes_query_key_patches_exact(ms, linear_tail):
    """In the last layer only the softmax is nonlinear for query and key patches:
    recomputing it (qk_fix=True, AtP*) gives the exact sweep; linearising it does not."""
    model, _, corrupted, cache = linear_tail
    metric = ms.metrics.LogitDiff(np.array([3, 8, 13]), np.array([4, 9, 2]))
    for name in QK:
        exact = getattr(ms.patching, name)(model, corrupted, cache, metric)[-1]
        fixed = getattr(ms.attribution, name)(model, corrupted, cache, metric)[-1]
        linear = getattr(ms.attribution, name)(model, corrupted, cache, metric, qk_fix=False)[-1]
        scale = np.abs(exact - metric.evaluate(model, corrupted)).max()
        np.testing.assert_allclose(fixed, exact, atol=1e-4 * max(1.0, scale), rtol=0, err_msg=name)
        assert np.abs(linear - exact).max() > 1e-3, name


def test_first_order_agreement_with_the_sweep(ms, setup):
    """For clean values a small step eps from the corrupted ones, (exact - corrupted) / eps
    tends to the attribution estimate: the same first-order change, for every function."""
    model, _, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    base = metric.evaluate(model, corrupted)
    run = model.run(corrupted, cache=model.site_names).cache
    eps = 1e-2
    near = {k: run[k] + eps * (cache[k] - run[k]) for k in cache if np.isfinite(cache[k]).all()}
    for name in FUNCTIONS:
        exact = (getattr(ms.patching, name)(model, corrupted, near, metric) - base) / eps
        ours = (getattr(ms.attribution, name)(model, corrupted, near, metric) - base) / eps
        scale = np.abs(ours).max()
        assert np.abs(exact - ours).max() < 0.1 * scale, name


# ------------------------------------------------------------ quality on the demo model

@pytest.fixture(scope="module")
def demo(ms):
    model = ms.demo.load_model()
    ioi = ms.demo.ioi_prompts(model, n=8)
    return model, ioi, model.run(ioi["clean"], cache=["blocks.*.attn.hook_q", "blocks.*.attn.hook_k"]).cache


def test_exact_softmax_ranks_query_key_patches_better_on_demo_ioi(ms, demo):
    """AtP* (qk_fix) against plain AtP on the demo model's IOI task: the Spearman
    correlation with the exact sweep is higher for every query and key function."""
    from scipy.stats import spearmanr
    model, ioi, cache = demo
    metric = ms.metrics.LogitDiff(ioi["io"], ioi["s"])
    for name in QK:
        exact = getattr(ms.patching, name)(model, ioi["corrupted"], cache, metric).ravel()
        fixed = getattr(ms.attribution, name)(model, ioi["corrupted"], cache, metric).ravel()
        linear = getattr(ms.attribution, name)(model, ioi["corrupted"], cache, metric, qk_fix=False).ravel()
        rho_fixed, rho_linear = spearmanr(exact, fixed)[0], spearmanr(exact, linear)[0]
        assert rho_fixed > rho_linear, (name, rho_fixed, rho_linear)
        assert rho_fixed > 0.5, (name, rho_fixed)


# ------------------------------------------------------------ plots, bad input

def test_plots_take_the_grids(ms, setup):
    import matplotlib  # in the test extra: a missing install fails here, never skips
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model, _, _, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    tokens = [str(t) for t in corrupted[0]]
    for name, layout in [("resid_pre", "layer pos"), ("attn_head_out_by_pos", "layer pos head"),
                         ("attn_head_pattern_by_pos", "layer head pos"), ("block_every", "type layer pos"),
                         ("attn_head_all_pos_every", "type layer head"),
                         ("attn_head_by_pos_every", "type layer pos head")]:
        grid = getattr(ms.attribution, name)(model, corrupted, cache, metric)
        fig = ms.plot.heatmap(grid, tokens=tokens, layout=layout)
        assert len(fig.axes) > 1
        plt.close(fig)


def test_bad_input(ms, setup, tmp_path):
    model, _, clean, corrupted, cache = setup
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    with pytest.raises(TypeError, match="metric"):
        ms.attribution.resid_pre(model, corrupted, cache, lambda logits: logits[:, -1, 0].mean())
    with pytest.raises(TypeError, match="qk_fix"):
        ms.attribution.attn_head_q_by_pos(model, corrupted, cache, metric, qk_fix="yes")
    with pytest.raises(TypeError, match="graddrop"):
        ms.attribution.resid_pre(model, corrupted, cache, metric, graddrop=1)
    with pytest.raises(ValueError, match="clean_cache.*blocks.0.hook_resid_mid"):
        ms.attribution.resid_mid(model, corrupted, {"blocks.0.hook_resid_pre": 0}, metric)
    with pytest.raises(ValueError, match="clean_cache.*shape"):
        ms.attribution.resid_pre(model, corrupted[:, :4], cache, metric)
    with pytest.raises(ValueError, match="correct"):
        ms.attribution.resid_pre(model, corrupted, cache, ms.metrics.LogitDiff([5, 9, 61], WRONG))
    with pytest.raises(ValueError, match="interventions.*qk_fix=False"):
        ms.attribution.attn_head_k_by_pos(model, corrupted, cache, metric,
                                          interventions=[ms.Scale("blocks.1.attn.hook_pattern", 0.5)])
    with pytest.raises(ValueError, match="Source"):
        ms.attribution.resid_pre(model, corrupted, cache, metric,
                                 interventions=[ms.Patch("blocks.0.hook_resid_pre", ms.Source(clean))])
    one_layer = make_hf_model(dict(n_embd=8, n_head=2, n_layer=1, vocab_size=61, n_positions=8), seed=1)
    small = ms.Model.from_pretrained(save_hf(one_layer, tmp_path / "one"))
    small_cache = small.run(clean, cache="blocks.*.hook_resid_pre").cache
    with pytest.raises(ValueError, match="graddrop.*2 layers"):
        ms.attribution.resid_pre(small, corrupted, small_cache, metric, graddrop=True)


# ------------------------------------------------------------ rotary, grouped keys, parallel blocks

def engine_slow(ms, model, tokens, cache, metric, name):
    """The definition with mechscope's own gradients and, for query and key patches,
    the pattern of an explicit patched run (rotary and grouped keys as the engine
    computes them)."""
    L = model.n_layers
    kind = name.split("_")[2] if name.startswith("attn_head_") else None
    suffix, shape, box = boxes(name, model.n_kv_heads if kind in ("k", "v") else model.n_heads, tokens.shape[1])
    qk = suffix in ("attn.hook_q", "attn.hook_k")
    wanted = [f"blocks.{l}.{'attn.hook_pattern' if qk else suffix}" for l in range(L)]
    g = model.grad(tokens, metric, sites=wanted)
    base = np.asarray(g.metric, np.float64)
    out = np.zeros((L,) + shape)
    for layer in range(L):
        site = f"blocks.{layer}.{suffix}"
        pattern = f"blocks.{layer}.attn.hook_pattern"
        for index in np.ndindex(*shape):
            if qk:
                h = index[-1]
                pos = index[0] if name.endswith("_by_pos") else None
                new = model.run(tokens, logits=None, cache=pattern,
                                interventions=[ms.Patch(site, cache, pos=pos, head=h)]).cache[pattern]
                change = ((new.astype(np.float64) - g.activations[pattern]) * g[pattern]).reshape(len(tokens), -1).sum(1)
            else:
                diff = (np.asarray(cache[site], np.float64) - g.activations[site]) * g[site]
                change = diff[box(*index)].reshape(len(tokens), -1).sum(1)
            out[(layer,) + index] = metric.reduce((base + change)[None])[0]
    return out


@pytest.mark.parametrize("config", ["llama_gqa3", "llama3_rope_tied", "gemma_gqa", "gemma2_softcap",
                                    "gemma3_local_rope", "phi3_partial_tied", "phi_parallel", "gptj_adjacent",
                                    "olmo2_post_norms", "olmo3_windows_yarn", "neox_parallel", "olmoe", "opt_relu",
                                    "qwen2_moe", "neo_local", "bigcode_mq", "stablelm_partial"])
def test_rotary_grouped_and_parallel_models(ms, config, tmp_path):
    """and OLMoE (a mixture of experts, its query and key norms over all heads) and
    Qwen2-MoE (a shared expert beside the routed ones)"""
    from test_architectures import CONFIGS as ARCHS
    from test_architectures import make_hf
    from test_experts import OLMOE, QWEN2_MOE
    spec = {"olmoe": OLMOE, "qwen2_moe": QWEN2_MOE}.get(config) or ARCHS[config]
    hf = make_hf(None, spec=spec)
    model = ms.Model.from_pretrained(save_hf(hf, tmp_path / config))
    vocab = spec[1]["vocab_size"]
    rng = np.random.default_rng(4)
    clean = rng.integers(0, vocab, (2, 6))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 5) % vocab
    corrupted[:, 4] = (clean[:, 4] + 9) % vocab
    cache = model.run(clean, cache=model.site_names).cache
    metric = ms.metrics.LogitDiff(np.array([1, 2]), np.array([3, 4]))
    for name in ["resid_pre", "attn_head_out_by_pos", "attn_head_v_all_pos"] + QK:
        ours = getattr(ms.attribution, name)(model, corrupted, cache, metric)
        assert ours.shape == getattr(ms.patching, name)(model, corrupted, cache, metric).shape, name
        np.testing.assert_allclose(ours, engine_slow(ms, model, corrupted, cache, metric, name), atol=1e-4,
                                   rtol=0, err_msg=f"{config} {name}")
