"""Bad input to mechscope.mediation gets a clear error naming the argument, before any
forward pass runs."""
import numpy as np
import pytest

import mechscope as ms
from mechscope import mediation as med


@pytest.fixture(scope="module")
def model():
    return ms.Model.from_config(dict(n_embd=16, n_head=2, n_layer=2, vocab_size=31, n_positions=12), seed=0)


class NoWork:
    """Stands in for the core: any forward pass or sweep fails the test."""

    def __init__(self, core):
        self.core = core

    def __getattr__(self, name):
        if name in ("run", "sweep"):
            raise AssertionError(f"the core's {name} ran before the input was checked")
        return getattr(self.core, name)


@pytest.fixture
def guarded(model, monkeypatch):
    monkeypatch.setattr(model, "_core", NoWork(model._core))
    return model


def data(B=4, T=6):
    rng = np.random.default_rng(0)
    t = rng.integers(0, 31, (B, T))
    return t, (t + 1) % 31, ms.metrics.LogitDiff(np.arange(B), np.arange(B) + 5)


def test_pairs_of_different_shapes_or_lengths(guarded):
    t, c, metric = data()
    units = med.neurons(guarded, 0, pos=2)
    with pytest.raises(ValueError, match="treated, control: the pairs must have one shape"):
        med.natural_effects(guarded, t, c[:, :5], units, metric)
    with pytest.raises(ValueError, match="treated, control: the pairs must have one shape"):
        med.natural_effects(guarded, t, c[:3], units, metric)
    mt, mc = np.ones((4, 6), int), np.ones((4, 6), int)
    mc[2, 4:] = 0
    with pytest.raises(ValueError, match="pair 2 has prompts of different lengths"):
        med.controlled_direct_effect(guarded, t, c, units, metric, attention_mask=(mt, mc))
    with pytest.raises(ValueError, match="units: .*pos='last' needs every row"):
        med.natural_effects(guarded, t, c, med.neurons(guarded, 0, pos="last"), metric, attention_mask=mc)


def test_units_that_do_not_exist(guarded):
    t, c, metric = data()
    cases = [
        (med.Unit("blocks.5.mlp.hook_post", index=0), r"units\[0\].*layer 5 out of range"),
        (med.Unit("blocks.0.mlp.hook_post", index=64), r"units\[0\].*index out of range"),
        (med.Unit("blocks.0.hook_resid_post", head=1), r"units\[0\].*has no heads"),
        (med.Unit("blocks.0.attn.hook_z", head=2), r"units\[0\].*head: index out of range"),
        (med.Unit("blocks.0.hook_mlp_outt"), r"units\[0\].*unknown site name"),
        (med.Unit("blocks.0.hook_resid_post", pos=9), r"units\[0\].*pos: index out of range"),
        (med.Unit("blocks.0.hook_resid_post", pos=1, basis=np.ones((16, 2))), r"units\[0\].*orthonormal"),
        (med.Unit("blocks.0.hook_resid_post", pos=1, basis=np.eye(8)), r"units\[0\].*basis must be \[16, k\]"),
    ]
    for unit, message in cases:
        with pytest.raises(ValueError, match=message):
            med.natural_effects(guarded, t, c, [unit], metric)
    with pytest.raises(TypeError, match=r"units\[1\]: expected a mediation.Unit"):
        med.natural_effects(guarded, t, c, [med.Unit("blocks.0.hook_resid_post"), "blocks.0.hook_resid_post"], metric)
    with pytest.raises(ValueError, match="units: empty"):
        med.natural_effects(guarded, t, c, [], metric)
    with pytest.raises(ValueError, match="layer 7 out of range"):
        med.neurons(guarded, 7)
    with pytest.raises(TypeError, match="metric"):
        med.natural_effects(guarded, t, c, med.neurons(guarded, 0, pos=1), "logit diff")


def test_treatment_covariates_and_weights():
    rng = np.random.default_rng(0)
    A = rng.integers(0, 2, 50)
    Z = rng.standard_normal((50, 2))
    M, Y = rng.standard_normal(50), rng.standard_normal(50)
    with pytest.raises(ValueError, match="treatment: only one group is present"):
        med.entropy_balance(Z, np.ones(50), "ATT")
    with pytest.raises(ValueError, match="treatment: only one group is present"):
        med.product_of_coefficients(np.zeros(50), M, Y, Z)
    with pytest.raises(ValueError, match="treatment: expected 0/1"):
        med.inverse_propensity_weights(Z, A * 2)
    bad = Z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"covariate 'Z\[1\]' has NaN"):
        med.product_of_coefficients(A, M, Y, bad)
    with pytest.raises(ValueError, match="covariate 'topic' has NaN"):
        med.entropy_balance(bad, A, names=["size", "topic"])
    const = Z.copy()
    const[:, 0] = 2.0
    with pytest.raises(ValueError, match=r"covariate 'Z\[0\]' is constant"):
        med.entropy_balance(const, A)
    with pytest.raises(ValueError, match=r"covariate 'Z\[0\]' is constant"):
        med.product_of_coefficients(A, M, Y, const)
    with pytest.raises(ValueError, match="weights: weights must sum to a positive number"):
        med.product_of_coefficients(A, M, Y, Z, weights=np.zeros(50))
    with pytest.raises(ValueError, match="weights: weights must be finite and non-negative"):
        med.weighted_mean_ci(M, weights=-np.ones(50))
    with pytest.raises(ValueError, match="base_weights: weights must sum to a positive number"):
        med.entropy_balance(Z, A, base_weights=np.zeros(50))
    with pytest.raises(ValueError, match=r"weights: expected one weight per example \(50\)"):
        med.weighted_mean_ci(M, weights=np.ones(49))
    with pytest.raises(ValueError, match="Y: expected one outcome per example"):
        med.product_of_coefficients(A, M, Y[:-1], Z)
    with pytest.raises(ValueError, match="M: has NaN"):
        med.product_of_coefficients(A, np.r_[np.nan, M[1:]], Y, Z)
    with pytest.raises(ValueError, match="estimand: expected 'ATT' or 'ATE'"):
        med.entropy_balance(Z, A, "ATC")
    with pytest.raises(ValueError, match="moments: expected an int >= 1"):
        med.entropy_balance(Z, A, moments=0)
    with pytest.raises(ValueError, match="method: expected 'percentile' or 'bca'"):
        med.weighted_mean_ci(M, method="normal")


def test_effects_summary_weights(model):
    t, c, metric = data()
    eff = med.natural_effects(model, t, c, med.neurons(model, 0, pos=3)[:3], metric, progress=False)
    with pytest.raises(ValueError, match="weights: weights must sum to a positive number"):
        eff.summary(weights=np.zeros(4))
    with pytest.raises(ValueError, match="kind: expected one of"):
        eff.effect("ate")
    with pytest.raises(ValueError, match="value: shape"):
        med.controlled_direct_effect(model, t, c, med.neurons(model, 0, pos=3)[:1], metric, np.ones(3))
