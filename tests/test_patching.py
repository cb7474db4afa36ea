"""Patching sweeps against TransformerLens's patching module and against the slow
path (one explicit intervened run per patch)."""
import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from conftest import assert_close, make_hf_model, save_hf, tl_model_from_hf

# 3 layers, 4 heads of 7: odd sizes, small enough for TransformerLens's one run per patch
CONFIG = dict(n_embd=28, n_head=4, n_layer=3, vocab_size=61, n_positions=16, activation_function="gelu_new")
B, T = 3, 6
CORRECT, WRONG = np.array([5, 9, 11]), np.array([7, 3, 2])

FUNCTIONS = [
    "resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every",
    "attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos",
    "attn_head_pattern_all_pos", "attn_head_all_pos_every",
    "attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos",
    "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos", "attn_head_by_pos_every",
]


@pytest.fixture(scope="module")
def models(ms, tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=21)
    model = ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("patch") / "m"))
    return model, tl_model_from_hf(hf)


@pytest.fixture(scope="module")
def prompts():
    """Clean and corrupted prompts that differ at two positions (as in IOI-style
    datasets): patches before the first difference change nothing."""
    rng = np.random.default_rng(5)
    clean = rng.integers(0, CONFIG["vocab_size"], (B, T))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 17) % CONFIG["vocab_size"]
    corrupted[:, 4] = (clean[:, 4] + 29) % CONFIG["vocab_size"]
    return clean, corrupted


@pytest.fixture(scope="module")
def caches(models, prompts):
    model, tl = models
    clean, corrupted = prompts
    ms_cache = model.run(clean, cache=model.site_names).cache
    _, tl_cache = tl.run_with_cache(torch.as_tensor(clean))
    return ms_cache, tl_cache


def tl_logit_diff(logits):
    rows = torch.arange(B)
    return (logits[rows, -1, CORRECT] - logits[rows, -1, WRONG]).mean()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_values_as_transformer_lens(ms, name, models, prompts, caches):
    model, tl = models
    _, corrupted = prompts
    ms_cache, tl_cache = caches
    ours = getattr(ms.patching, name)(model, corrupted, ms_cache, ms.metrics.LogitDiff(CORRECT, WRONG))
    theirs = getattr(tl_patching, "get_act_patch_" + name)(tl, torch.as_tensor(corrupted), tl_cache,
                                                          tl_logit_diff).numpy()
    assert ours.dtype == np.float32
    assert_close(ours, theirs, what=name)  # shape and values
    # and the sweep did something: not every patch leaves the metric where it was
    assert np.ptp(ours) > 1e-3


def test_tl_cache_accepted(ms, models, prompts, caches):
    """A TransformerLens ActivationCache (torch tensors) serves as the clean cache."""
    model, _ = models
    _, corrupted = prompts
    ms_cache, tl_cache = caches
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    assert_close(ms.patching.resid_pre(model, corrupted, tl_cache, metric),
                 ms.patching.resid_pre(model, corrupted, ms_cache, metric))


def tl_metric(kind, clean_logits):
    rows = torch.arange(B)

    def logprobs(logits):
        return torch.log_softmax(logits[:, -1].double(), dim=-1)

    if kind == "logprob":
        return lambda logits: logprobs(logits)[rows, CORRECT].mean()
    if kind == "prob":
        return lambda logits: logprobs(logits)[rows, CORRECT].exp().mean()
    if kind == "accuracy":
        top = torch.as_tensor(clean_logits).argmax(-1)  # the clean run's answers
        return lambda logits: (logits[:, -1].argmax(-1) == top).double().mean()
    ref = torch.log_softmax(torch.as_tensor(clean_logits).double(), dim=-1)
    return lambda logits: (ref.exp() * (ref - logprobs(logits))).sum(-1).mean()


@pytest.mark.parametrize("kind", ["logprob", "prob", "kl", "accuracy"])
def test_other_metrics_as_transformer_lens(ms, kind, models, prompts, caches):
    model, tl = models
    clean, corrupted = prompts
    ms_cache, tl_cache = caches
    clean_last = model.run(clean, logits="last").logits
    metric = {"logprob": ms.metrics.LogProb(CORRECT), "prob": ms.metrics.Prob(CORRECT),
              "kl": ms.metrics.KL(clean_last), "accuracy": ms.metrics.Accuracy(clean_last.argmax(-1))}[kind]
    ours = ms.patching.attn_head_out_by_pos(model, corrupted, ms_cache, metric)
    theirs = tl_patching.get_act_patch_attn_head_out_by_pos(
        tl, torch.as_tensor(corrupted), tl_cache, tl_metric(kind, clean_last)).numpy()
    if kind == "accuracy":
        # a share of rows; two engines' roundings may order two nearly equal logits differently
        assert np.isin(ours * B, np.arange(B + 1)).all() and 0 < ours.mean() < 1
        assert np.mean(ours == theirs) > 0.99 and np.abs(ours - theirs).max() <= 1 / B
        return
    assert_close(ours, theirs, what=kind)


def test_recovery(ms, models, prompts, caches):
    """(patched - corrupted) / (clean - corrupted): 1 where a patch restores the clean
    run (resid_pre at the last position of the first layer), 0 where nothing changes."""
    model, _ = models
    clean, corrupted = prompts
    ms_cache, _ = caches
    diff = ms.metrics.LogitDiff(CORRECT, WRONG)
    recovery = ms.metrics.Recovery.from_runs(diff, model, clean, corrupted)
    grid = ms.patching.resid_pre(model, corrupted, ms_cache, recovery)
    raw = ms.patching.resid_pre(model, corrupted, ms_cache, diff)
    assert_close(grid, (raw - recovery.corrupted) / (recovery.clean - recovery.corrupted), atol=1e-5)
    assert_close(grid[:, :2], np.zeros((3, 2)), atol=1e-6)  # before the first corrupted token
    # patching every position's residual stream at layer 0 is the clean run
    everything = ms.Patch("blocks.0.hook_resid_pre", ms_cache)
    assert_close(ms.patching.sweep(model, corrupted, [everything], recovery), [1.0], atol=1e-5)


# ------------------------------------------------------------ against the slow path

def slow_grid(ms, model, tokens, mask, metric, make_patch, shape, interventions=()):
    """One explicit intervened run per index."""
    out = np.zeros(shape, np.float32)
    for index in np.ndindex(*shape):
        out[index] = metric.evaluate(model, tokens, mask, interventions=list(interventions) + make_patch(*index))
    return out


def slow_patches(ms, name, cache, n_heads, T):
    """name -> (function of the index giving the Patch list, grid shape without layers)."""
    def site(layer, suffix):
        return f"blocks.{layer}.{suffix}"
    layer_pos = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
                 "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
    heads = {"out": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}
    if name in layer_pos:
        return lambda l, p: [ms.Patch(site(l, layer_pos[name]), cache, pos=p)], (T,)
    kind = name.split("_")[2]
    if name.endswith("_by_pos") and kind in heads:
        return lambda l, p, h: [ms.Patch(site(l, heads[kind]), cache, pos=p, head=h)], (T, n_heads)
    if name.endswith("_all_pos") and kind in heads:
        return lambda l, h: [ms.Patch(site(l, heads[kind]), cache, head=h)], (n_heads,)
    if name == "attn_head_pattern_all_pos":
        return lambda l, h: [ms.Patch(site(l, "attn.hook_pattern"), cache, head=h)], (n_heads,)
    if name == "attn_head_pattern_by_pos":
        return lambda l, h, d: [ms.Patch(site(l, "attn.hook_pattern"), cache, head=h, pos=d)], (n_heads, T)
    if name == "attn_head_pattern_dest_src_pos":
        return (lambda l, h, d, s: [ms.Patch(site(l, "attn.hook_pattern"), cache, head=h, pos=d, key_pos=s)],
                (n_heads, T, T))
    raise KeyError(name)


SINGLE = [n for n in FUNCTIONS if not n.endswith("_every")]


@pytest.mark.parametrize("name", SINGLE)
def test_same_values_as_slow_path_with_padding(ms, name, models):
    """Left-padded batch (TransformerLens has no masks): every sweep equals one
    explicit intervened run per patch. Entries at padding are left alone by both."""
    model, _ = models
    rng = np.random.default_rng(8)
    T = 5
    clean = rng.integers(0, CONFIG["vocab_size"], (2, T))
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 1) % CONFIG["vocab_size"]
    mask = np.ones((2, T), np.int64)
    mask[1, :2] = 0
    cache = model.run(clean, attention_mask=mask, cache=model.site_names).cache
    metric = ms.metrics.LogProb(CORRECT[:2])

    make, shape = slow_patches(ms, name, cache, model.n_heads, T)
    ours = getattr(ms.patching, name)(model, corrupted, cache, metric, attention_mask=mask)
    expected = slow_grid(ms, model, corrupted, mask, metric, make, (model.n_layers,) + shape)
    assert_close(ours, expected, what=name)


def test_noising_direction(ms, models, prompts, caches):
    """Corrupted activations into the clean run: the same function, roles swapped."""
    model, _ = models
    clean, corrupted = prompts
    corrupted_cache = model.run(corrupted, cache="blocks.*.hook_resid_mid").cache
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    ours = ms.patching.resid_mid(model, clean, corrupted_cache, metric)
    make, shape = slow_patches(ms, "resid_mid", corrupted_cache, model.n_heads, T)
    assert_close(ours, slow_grid(ms, model, clean, None, metric, make, (model.n_layers,) + shape))
    # noising changes the clean run at the corrupted positions, not before them
    clean_value = metric.evaluate(model, clean)
    assert abs(ours[0, 2] - clean_value) > 1e-3
    assert_close(ours[:, :2], np.full((3, 2), clean_value), atol=1e-6)


def test_sweep_under_base_interventions(ms, models, prompts, caches):
    """Interventions that hold in every run (noise on some embeddings, an ablated head,
    a steering vector) are applied again wherever a patched row recomputes."""
    model, _ = models
    _, corrupted = prompts
    ms_cache, _ = caches
    base = [ms.Noise("hook_embed", std=0.5, seed=3, pos=[1, 2]),
            ms.Zero("blocks.1.attn.hook_z", head=2),
            ms.Add("blocks.2.hook_resid_pre", vector=np.linspace(-1, 1, 28), pos=[3, 5]),
            ms.Scale("blocks.0.attn.hook_pattern", 0.5, head=1, pos=4)]
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    for name in ["resid_pre", "attn_head_out_by_pos", "attn_head_pattern_by_pos"]:
        make, shape = slow_patches(ms, name, ms_cache, model.n_heads, T)
        ours = getattr(ms.patching, name)(model, corrupted, ms_cache, metric, interventions=base)
        assert_close(ours, slow_grid(ms, model, corrupted, None, metric, make, (model.n_layers,) + shape,
                                     interventions=base), what=name)


def test_general_sweep_groups_and_index_lists(ms, models, prompts, caches):
    """ms.patching.sweep: patches of several writes, non-contiguous indices, per-row values."""
    model, _ = models
    _, corrupted = prompts
    ms_cache, _ = caches
    metric = ms.metrics.Prob(CORRECT)
    patches = [
        ms.Patch("blocks.1.hook_mlp_out", ms_cache, pos=[1, 3, 4]),
        [ms.Patch("blocks.0.attn.hook_z", ms_cache, head=[0, 2], pos=[2, 5]),
         ms.Patch("blocks.2.hook_attn_out", ms_cache, pos=4, index=[0, 5, 6, 7])],
        [ms.Patch("blocks.2.mlp.hook_post", ms_cache, pos=5),
         ms.Patch("blocks.0.hook_resid_post", ms_cache, pos=[4, 5])],  # later write first
        ms.Patch("hook_embed", ms_cache, pos=2),
        ms.Patch("ln_final.hook_normalized", ms_cache, pos=5),
        ms.Patch("blocks.1.attn.hook_attn_scores", ms_cache, head=3, pos=[4, 5], key_pos=[0, 2]),
    ]
    per_row = ms.patching.sweep(model, corrupted, patches, metric, per_row=True)
    assert per_row.shape == (len(patches), B)
    for i, p in enumerate(patches):
        group = p if isinstance(p, list) else [p]
        assert_close(per_row[i], metric.per_row(model, corrupted, interventions=group), what=str(i))
    assert_close(ms.patching.sweep(model, corrupted, patches, metric), per_row.mean(1), atol=1e-6)


def test_python_metric_same_as_builtin(ms, models, prompts, caches):
    model, _ = models
    _, corrupted = prompts
    ms_cache, _ = caches

    def logit_diff(logits):
        return (logits[np.arange(B), -1, CORRECT] - logits[np.arange(B), -1, WRONG]).mean()
    assert_close(ms.patching.attn_head_v_by_pos(model, corrupted, ms_cache, logit_diff),
                 ms.patching.attn_head_v_by_pos(model, corrupted, ms_cache, ms.metrics.LogitDiff(CORRECT, WRONG)))


def test_small_chunks_same_values(ms, models, prompts, caches):
    """A memory budget that forces many small chunks changes nothing but rounding: a
    chunk of at most 16 rows goes through the few-row products (AVX-512), which sum in
    another order than the BLAS does for the large chunks (a few float32 ulps)."""
    model, _ = models
    _, corrupted = prompts
    ms_cache, _ = caches
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    want = ms.patching.attn_head_out_by_pos(model, corrupted, ms_cache, metric)
    ms.set_memory_budget(1 << 18)  # chunks of 64 KiB: a few rows each
    try:
        got = ms.patching.attn_head_out_by_pos(model, corrupted, ms_cache, metric)
    finally:
        ms.set_memory_budget(None)
    assert_close(got, want, atol=1e-6, rtol=2e-6)


# ------------------------------------------------------------------ bad input

def test_bad_input(ms, models, prompts, caches):
    model, _ = models
    clean, corrupted = prompts
    ms_cache, _ = caches
    metric = ms.metrics.LogitDiff(CORRECT, WRONG)
    with pytest.raises(ValueError, match="clean_cache.*blocks.0.hook_resid_mid"):
        ms.patching.resid_mid(model, corrupted, {"blocks.0.hook_resid_pre": 0}, metric)
    with pytest.raises(ValueError, match="clean_cache.*shape"):
        ms.patching.resid_pre(model, corrupted[:2], ms_cache, ms.metrics.LogitDiff(CORRECT[:2], WRONG[:2]))
    with pytest.raises(ValueError, match="clean_cache.*shape"):
        ms.patching.resid_pre(model, corrupted[:, :4], ms_cache, metric)
    with pytest.raises(ValueError, match="correct"):
        ms.patching.resid_pre(model, corrupted, ms_cache, ms.metrics.LogitDiff([5, 9, 61], WRONG))
    with pytest.raises(ValueError, match="correct"):
        ms.patching.resid_pre(model, corrupted, ms_cache, ms.metrics.LogitDiff([5, 9], [1, 2]))
    with pytest.raises(ValueError, match="pos"):
        ms.patching.sweep(model, corrupted, [ms.Patch("blocks.0.hook_resid_pre", ms_cache, pos=T)], metric)
    with pytest.raises(ValueError, match="head"):
        ms.patching.sweep(model, corrupted, [ms.Patch("blocks.0.attn.hook_z", ms_cache, head=4)], metric)
    with pytest.raises(ValueError, match="layer"):
        ms.patching.sweep(model, corrupted, [ms.Patch("blocks.3.hook_resid_pre", ms_cache)], metric)
    with pytest.raises(TypeError, match="metric"):
        ms.patching.resid_pre(model, corrupted, ms_cache, "logit_diff")
    with pytest.raises(ValueError, match="Source"):
        ms.patching.sweep(model, corrupted, [ms.Patch("blocks.0.hook_resid_pre", ms.Source(clean))], metric)
    ms.set_memory_budget(1 << 16)
    try:
        with pytest.raises(ValueError, match="memory budget"):
            ms.patching.attn_head_out_by_pos(model, corrupted, ms_cache, metric)
    finally:
        ms.set_memory_budget(None)
    # and the model still works
    assert np.isfinite(metric.evaluate(model, corrupted))


def test_random_sweeps_against_slow_path(ms, models):
    """Random patches (any site, ranges, several writes, layers in any order) on random
    padded batches, under random base interventions: each equals its explicit run."""
    model, _ = models
    rng = np.random.default_rng(99)
    token_sites = ["hook_embed", "hook_pos_embed", "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q",
                   "attn.hook_k", "attn.hook_v", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                   "ln2.hook_scale", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
                   "ln_final.hook_normalized"]
    attention_sites = ["attn.hook_attn_scores", "attn.hook_pattern"]
    for trial in range(12):
        batch, length = int(rng.integers(1, 4)), int(rng.integers(2, 9))
        clean = rng.integers(0, CONFIG["vocab_size"], (batch, length))
        corrupted = clean.copy()
        flip = rng.random((batch, length)) < 0.4
        corrupted[flip] = (clean[flip] + 5) % CONFIG["vocab_size"]
        mask = np.ones((batch, length), np.int64)
        for b in range(batch):  # left or right padding, at least one real token
            pad = int(rng.integers(0, length))
            if rng.random() < 0.5:
                mask[b, :pad] = 0
            else:
                mask[b, length - pad:] = 0
        cache = model.run(clean, attention_mask=mask, cache=model.site_names).cache
        base = [ms.Add("blocks.1.hook_resid_pre", rng.normal(size=28).astype(np.float32) * 0.3,
                       pos=int(rng.integers(0, length)))] if rng.random() < 0.5 else []

        def random_patch():
            layer = int(rng.integers(0, 3))
            if rng.random() < 0.25:
                site = f"blocks.{layer}.{rng.choice(attention_sites)}"
                return ms.Patch(site, cache, head=sorted(set(rng.integers(0, 4, 2).tolist())),
                                pos=sorted(set(rng.integers(0, length, 2).tolist())),
                                key_pos=sorted(set(rng.integers(0, length, 3).tolist())))
            name = str(rng.choice(token_sites))
            site = name if name.startswith(("hook_embed", "hook_pos", "ln_final")) else f"blocks.{layer}.{name}"
            return ms.Patch(site, cache, pos=sorted(set(rng.integers(0, length, 2).tolist())))
        patches = [[random_patch() for _ in range(int(rng.integers(1, 4)))] for _ in range(6)]
        metric = ms.metrics.LogProb(rng.integers(0, CONFIG["vocab_size"], batch))
        got = ms.patching.sweep(model, corrupted, patches, metric, attention_mask=mask, interventions=base,
                                per_row=True)
        for i, group in enumerate(patches):
            want = metric.per_row(model, corrupted, mask, interventions=base + group)
            assert_close(got[i], want, what=f"trial {trial} patch {i}: {group}")
