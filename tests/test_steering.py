"""ms.steering: steering vectors against means of one run per prompt, and the steering
sweep against one run with ms.Add per site and scale (padding, positions, base
interventions, a per-head site)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mechscope as ms  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return ms.Model.from_config(dict(n_embd=32, n_head=4, n_layer=3, vocab_size=40, n_positions=24), seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    positive = [rng.integers(0, 40, size=n) for n in (5, 9, 7)]
    negative = [rng.integers(0, 40, size=n) for n in (6, 4)]
    return positive, negative


def slow_mean(model, prompts, site, positions):
    rows = []
    for p in prompts:
        value = model.run(p, cache=[site], logits=None).cache[site][0]
        rows += [value[-1]] if positions == "last" else list(value)
    return np.mean(np.asarray(rows, np.float64), axis=0)


def test_vector_is_the_difference_of_means(model, prompts):
    positive, negative = prompts
    for positions in ("last", "all"):
        for site in ("blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"):
            got = ms.steering.vector(model, positive, negative, site, positions=positions, batch_size=2)
            want = slow_mean(model, positive, site, positions) - slow_mean(model, negative, site, positions)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{site} {positions}")
    several = ms.steering.vector(model, positive, negative, "blocks.*.hook_resid_post")
    assert list(several) == [f"blocks.{layer}.hook_resid_post" for layer in range(3)]
    listed = ms.steering.vector(model, positive, negative, ["blocks.0.hook_mlp_out"])
    assert list(listed) == ["blocks.0.hook_mlp_out"]
    np.testing.assert_allclose(
        several["blocks.2.hook_resid_post"],
        slow_mean(model, positive, "blocks.2.hook_resid_post", "last")
        - slow_mean(model, negative, "blocks.2.hook_resid_post", "last"), atol=1e-5)


def test_sweep_equals_one_run_with_add_per_site_and_scale(model, prompts):
    positive, negative = prompts
    vectors = ms.steering.vector(model, positive, negative, "blocks.*.hook_resid_pre")
    vectors["blocks.1.attn.hook_z"] = ms.steering.vector(model, positive, negative, "blocks.1.attn.hook_z")
    # three rows padded on the left, read at their last token
    tokens = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int32)
    for b, n in enumerate((9, 6, 4)):
        tokens[b, 9 - n:] = np.random.default_rng(b).integers(0, 40, size=n)
        mask[b, 9 - n:] = 1
    metric = ms.metrics.LogitDiff([1, 2, 3], [4, 5, 6])
    scales = [-3.0, 0.5, 2.0]
    base_ivs = [ms.Zero("blocks.0.attn.hook_z", head=1)]
    for pos, interventions in ((None, None), ([8], None), (None, base_ivs)):
        result = ms.steering.sweep(model, tokens, vectors, metric, scales, pos=pos, attention_mask=mask,
                                   interventions=interventions, per_row=True)
        assert result.sites == list(vectors) and result.effects.shape == (4, 3, 3)
        base = metric.per_row(model, tokens, mask, interventions)
        np.testing.assert_allclose(result.base, base, atol=1e-6)
        for i, (site, v) in enumerate(vectors.items()):
            for j, s in enumerate(scales):
                steered = metric.per_row(model, tokens, mask, (interventions or []) + [ms.Add(site, v, scale=s, pos=pos)])
                np.testing.assert_allclose(result.effects[i, j], steered - base, atol=2e-5,
                                           err_msg=f"{site} scale {s} pos {pos} interventions {interventions}")
        mean = ms.steering.sweep(model, tokens, vectors, metric, scales, pos=pos, attention_mask=mask,
                                 interventions=interventions)
        np.testing.assert_allclose(mean.effects, result.effects.mean(-1), atol=1e-5)
    assert np.abs(result.effects).max() > 0.01  # the steering moves the metric
    fig = mean.plot()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(vectors)


def test_bad_input(model, prompts):
    positive, negative = prompts
    tokens = np.arange(6)[None]
    metric = ms.metrics.LogProb(3)
    v = np.ones(32, np.float32)
    with pytest.raises(TypeError, match="positive: expected a list of prompts"):
        ms.steering.vector(model, "a text", negative, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="vectors: empty"):
        ms.steering.sweep(model, tokens, {}, metric)
    with pytest.raises(ValueError, match=r"takes vectors of shape \[32\], got \[31\]"):
        ms.steering.sweep(model, tokens, {"blocks.0.hook_resid_pre": v[:31]}, metric)
    with pytest.raises(ValueError, match="not finite"):
        ms.steering.sweep(model, tokens, {"blocks.0.hook_resid_pre": v * np.nan}, metric)
    with pytest.raises(ValueError, match="attention site"):
        ms.steering.sweep(model, tokens, {"blocks.0.attn.hook_pattern": v}, metric)
    with pytest.raises(ValueError, match="scales: expected"):
        ms.steering.sweep(model, tokens, {"blocks.0.hook_resid_pre": v}, metric, scales=[1, np.inf])
    with pytest.raises(TypeError, match="metric: expected a mechscope metric"):
        ms.steering.sweep(model, tokens, {"blocks.0.hook_resid_pre": v}, lambda logits: 0.0)
    with pytest.raises(TypeError, match="vectors: expected"):
        ms.steering.sweep(model, tokens, [v], metric)
    with pytest.raises(ValueError, match="a site is given twice"):
        ms.steering.sweep(model, tokens, [("blocks.0.hook_resid_pre", v), ("blocks.0.hook_resid_pre", v)], metric)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        ms.steering.sweep(model, tokens, {"blocks.9.hook_resid_pre": v}, metric)
