"""The report: observational data read from one forward pass, the truth beside the
estimates, tables and the plot."""
import numpy as np
import pytest

import mechscope as ms
from mechscope import mediation as med


@pytest.fixture(scope="module")
def model():
    return ms.Model.from_config(dict(n_embd=24, n_head=3, n_layer=2, vocab_size=41, n_positions=10,
                                     initializer_range=0.3), seed=2)


def test_observe_reads_the_units_and_the_metric(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 41, (12, 6))
    A = np.arange(12) % 2
    metric = ms.metrics.LogitDiff(rng.integers(0, 41, 12), rng.integers(0, 41, 12))
    units = med.neurons(model, 1, pos=5)[:4] + [med.Unit("blocks.0.attn.hook_z", head=1, pos=5, label="h")]
    M, Y = med.observe(model, tokens, units, metric, treatment=A)
    cache = model.run(tokens, cache=["blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"]).cache
    np.testing.assert_allclose(M[:, :4], cache["blocks.1.mlp.hook_post"][:, 5, :4], atol=1e-6)
    z = cache["blocks.0.attn.hook_z"][:, 5, 1].astype(np.float64)
    d = z[A == 1].mean(0) - z[A == 0].mean(0)
    np.testing.assert_allclose(M[:, 4], z @ (d / np.linalg.norm(d)), atol=1e-5)
    np.testing.assert_allclose(Y, metric.per_row(model, tokens), atol=1e-6)


def test_study_puts_the_truth_beside_the_estimates(model):
    rng = np.random.default_rng(1)
    n = 40
    treated = rng.integers(0, 41, (n, 6))
    control = treated.copy()
    control[:, 2] = (treated[:, 2] + 3) % 41
    Z = rng.standard_normal(n)
    A = (Z + rng.standard_normal(n) > 0).astype(int)
    metric = ms.metrics.LogitDiff(rng.integers(0, 41, n), rng.integers(0, 41, n))
    units = med.heads(model, pos=5)
    st = med.study(model, treated, control, A, units, metric, Z, n_boot=100)
    eff = med.natural_effects(model, treated, control, units, metric)
    np.testing.assert_allclose(st.truth.estimate, eff.nie.mean(1), atol=1e-6)
    observed = np.where(A[:, None] == 1, treated, control)
    M, Y = med.observe(model, observed, units, metric, treatment=A)
    direct = med.product_of_coefficients(A, M, Y, Z, n_boot=100, units=eff.units)["nie"]
    np.testing.assert_allclose(st.estimates["adjusted"].estimate, direct.estimate, atol=1e-9)
    assert set(st.estimates) == {"unadjusted", "adjusted", "balanced"}
    rows = st.table.to_pandas()
    assert list(rows["unit"]) == eff.units and "covers (adjusted)" in rows
    summary = st.summary.to_pandas().set_index("estimator")
    assert summary.loc["intervention", "rank_corr"] == 1.0
    assert np.isfinite(summary["effective_units"]).all()
    fig = st.plot(top=4)
    assert len(fig.axes[0].patches) == 4 * 4  # 4 units x (truth + 3 estimators)
    assert "Study" in repr(st) and "L0H1" in repr(st.truth)
