"""Known answers for the observational estimators: data simulated from structural
causal models (Z -> A, Z -> M, Z -> Y, A -> M -> Y) whose natural effects are known
analytically; statsmodels' Mediation as the reference on linear models."""
import math

import numpy as np
import pytest

from mechscope import mediation as med

# the linear SCM: Z ~ N(0, 1); A = 1[Z + u > 0]; M = m0 + alpha A + delta Z + e;
# Y = 1 + theta A + beta M + eta Z + e (all noises N(0, 1))
LIN = dict(m0=0.5, alpha=1.0, delta=1.0, theta=0.5, beta=0.8, eta=1.0, xi=0.0, quad=0.0)
# the non-linear one adds an A x M interaction and a bounded non-linear term in Z,
# tanh(2 Z), to M and Y (bounded, so that no few examples dominate the fit)
NONLIN = dict(m0=0.5, alpha=1.0, delta=1.0, theta=0.5, beta=0.8, eta=1.0, xi=0.6, quad=0.7)


def simulate(p, n, seed, link="probit"):
    """link "logit": A = 1[Z + logistic noise > 0], so that P(A=1 | Z) and, with Gaussian
    M, P(A=1 | M, Z) are exactly logistic (in [M, Z], or [M, Z, tanh(2 Z)] for NONLIN)."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal(n)
    A = (Z + (rng.logistic(size=n) if link == "logit" else rng.standard_normal(n)) > 0).astype(float)
    q = p["quad"] * np.tanh(2 * Z)
    M = p["m0"] + p["alpha"] * A + p["delta"] * Z + q + rng.standard_normal(n)
    Y = 1 + p["theta"] * A + p["beta"] * M + p["xi"] * A * M + p["eta"] * Z + q + rng.standard_normal(n)
    return A, M, Y, Z


def truth(p):
    """Natural effects of the SCM (E[Z] = 0, E[tanh(2 Z)] = 0)."""
    m0 = p["m0"]
    return {"nie": p["beta"] * p["alpha"], "nie_total": (p["beta"] + p["xi"]) * p["alpha"],
            "nde": p["theta"] + p["xi"] * m0, "nde_total": p["theta"] + p["xi"] * (m0 + p["alpha"]),
            "te": p["theta"] + p["xi"] * m0 + (p["beta"] + p["xi"]) * p["alpha"]}


def unadjusted_population(p):
    """What the unadjusted linear regressions converge to on the linear SCM: the
    omitted Z is projected onto the regressors (E[Z | A = 1] = 1/sqrt(pi))."""
    c = 1 / math.sqrt(math.pi)
    var_a, cov_az = 0.25, c / 2
    alpha_u = p["alpha"] + p["delta"] * cov_az / var_a
    cov_am = p["alpha"] * var_a + p["delta"] * cov_az
    var_m = p["alpha"] ** 2 * var_a + p["delta"] ** 2 + 2 * p["alpha"] * p["delta"] * cov_az + 1
    cov_mz = p["alpha"] * cov_az + p["delta"]
    kappa = np.linalg.solve([[var_a, cov_am], [cov_am, var_m]], [cov_az, cov_mz])
    theta_u, beta_u = p["theta"] + p["eta"] * kappa[0], p["beta"] + p["eta"] * kappa[1]
    return {"nie": alpha_u * beta_u, "nde": theta_u}


def test_unadjusted_estimates_are_biased_by_the_expected_amount():
    A, M, Y, Z = simulate(LIN, 200_000, 0)
    unadj = med.product_of_coefficients(A, M, Y, n_boot=20, method="percentile")
    adj = med.product_of_coefficients(A, M, Y, Z, n_boot=20, method="percentile")
    expected, true = unadjusted_population(LIN), truth(LIN)
    for kind in ("nie", "nde"):
        assert abs(expected[kind] - true[kind]) > 0.25         # the confounding is large
        assert abs(unadj[kind].estimate[0] - expected[kind]) < 0.03, kind
        assert abs(adj[kind].estimate[0] - true[kind]) < 0.03, kind


@pytest.mark.parametrize("scm", ["linear", "nonlinear"])
def test_adjusted_intervals_cover_the_truth(scm):
    """95% bootstrap (BCa) intervals of the adjusted estimator cover the true effects in
    at least 90 of 100 seeded replications; the unadjusted ones rarely do."""
    p = LIN if scm == "linear" else NONLIN
    true = truth(p)
    interaction = scm == "nonlinear"
    kinds = ("nie", "nde", "nie_total", "nde_total", "te")
    covered = {(est, k): 0 for est in ("adjusted", "balanced", "unadjusted") for k in kinds}
    for seed in range(100):
        # the interaction model's intervals need more examples to reach their level
        A, M, Y, Z = simulate(p, 300 if scm == "linear" else 600, 1000 + seed)
        cov = np.column_stack([Z, np.tanh(2 * Z)]) if scm == "nonlinear" else Z
        bal = med.entropy_balance(Z, A, "ATE", moments=2)
        runs = {"adjusted": med.product_of_coefficients(A, M, Y, cov, interaction=interaction, n_boot=400,
                                                        seed=seed, method="bca"),
                # the balancing weights held fixed over the resamples (weights=bal re-solves them
                # on every resample: slower, and measured to cover in >= 90 of 100 here too)
                "balanced": med.product_of_coefficients(A, M, Y, cov, weights=bal.weights, interaction=interaction,
                                                        n_boot=400, seed=seed, method="percentile"),
                "unadjusted": med.product_of_coefficients(A, M, Y, interaction=interaction, n_boot=400,
                                                          seed=seed, method="percentile")}
        for est, res in runs.items():
            for k in kinds:
                covered[est, k] += res[k].low[0] <= true[k] <= res[k].high[0]
    for k in kinds:
        assert covered["adjusted", k] >= 90, (k, covered)
        # fixed weights leave the balancing's own uncertainty out: slightly narrow intervals
        assert covered["balanced", k] >= 85, (k, covered)
    print(covered)
    # the unadjusted NIE is biased far beyond its interval; its NDE by less (0.27 at n = 300)
    assert covered["unadjusted", "nie"] < 30 and covered["unadjusted", "nde"] < 80, covered


def test_regression_estimator_agrees_with_statsmodels_mediation():
    import pandas as pd
    import statsmodels.api as sm
    from statsmodels.stats.mediation import Mediation

    A, M, Y, Z = simulate(LIN, 800, 7)
    data = pd.DataFrame(dict(a=A, m=M, y=Y, z=Z))
    outcome = sm.OLS.from_formula("y ~ a + m + z", data)
    mediator = sm.OLS.from_formula("m ~ a + z", data)
    n_rep = 500
    ref = Mediation(outcome, mediator, "a", "m").fit(n_rep=n_rep, rng=0)
    ours = med.product_of_coefficients(A, M, Y, Z, n_boot=200)
    ikt = med.imai_keele_tingley(A, M, Y, Z, n_sims=n_rep, seed=0)
    # statsmodels keeps [examples, replications]; an effect per replication is the mean over examples
    for kind, sims in (("nie", ref.indirect_effects[0].mean(0)), ("nie_total", ref.indirect_effects[1].mean(0)),
                       ("nde", ref.direct_effects[0].mean(0)), ("nde_total", ref.direct_effects[1].mean(0))):
        mc_error = sims.std() / math.sqrt(n_rep)
        assert abs(ours[kind].estimate[0] - sims.mean()) < 4 * mc_error, kind
        assert abs(ikt[kind][0] - sims.mean()) < 6 * mc_error, kind
        # the simulation intervals agree too (their own Monte-Carlo error is larger)
        lo, hi = np.quantile(sims, [0.025, 0.975])
        assert abs(ikt[kind][1] - lo) < 0.15 * (hi - lo) and abs(ikt[kind][2] - hi) < 0.15 * (hi - lo), kind
        # and the bootstrap standard error is the spread of the simulation
        assert abs(ours[kind].se[0] / sims.std() - 1) < 0.25, kind


def test_many_mediator_columns_equal_one_at_a_time():
    A, M, Y, Z = simulate(NONLIN, 200, 3)
    rng = np.random.default_rng(0)
    Ms = np.column_stack([M, M + rng.standard_normal(200), rng.standard_normal(200)])
    w = rng.uniform(0.5, 2, 200)
    together = med.product_of_coefficients(A, Ms, Y, Z, weights=w, interaction=True, n_boot=50, seed=1)
    for u in range(3):
        alone = med.product_of_coefficients(A, Ms[:, u], Y, Z, weights=w, interaction=True, n_boot=50, seed=1)
        for kind in med.observational.OBS_KINDS:
            np.testing.assert_allclose(together[kind].estimate[u], alone[kind].estimate[0], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(together[kind].low[u], alone[kind].low[0], rtol=1e-9, atol=1e-12)
    # the point estimate is weighted least squares as statsmodels computes it
    import statsmodels.api as sm
    Xm = sm.add_constant(np.column_stack([A, Z]))
    a1 = sm.WLS(Ms[:, 1], Xm, weights=w).fit().params[1]
    Xy = sm.add_constant(np.column_stack([A, Ms[:, 1], A * Ms[:, 1], Z]))
    b = sm.WLS(Y, Xy, weights=w).fit().params
    np.testing.assert_allclose(together["nie"].estimate[1], b[2] * a1, rtol=1e-8)
    np.testing.assert_allclose(together["nie_total"].estimate[1], (b[2] + b[3]) * a1, rtol=1e-8)


def test_bootstrap_intervals_of_a_mean():
    rng = np.random.default_rng(0)
    hits = {"percentile": 0, "bca": 0}
    for seed in range(100):
        x = rng.exponential(1.0, 60)
        for method in hits:
            r = med.weighted_mean_ci(x, n_boot=500, seed=seed, method=method)
            hits[method] += r["low"][0] <= 1.0 <= r["high"][0]
            assert r["estimate"][0] == pytest.approx(x.mean())
    assert hits["bca"] >= 88 and hits["percentile"] >= 85, hits
    # seeded: the same call gives the same interval
    a = med.weighted_mean_ci(x, n_boot=300, seed=5)
    b = med.weighted_mean_ci(x, n_boot=300, seed=5)
    assert a["low"] == b["low"] and a["high"] == b["high"]


# ---------------------------------------------------------------- Huber's weighting

@pytest.mark.parametrize("scm", ["linear", "nonlinear"])
def test_ipw_is_close_to_the_truth_at_large_n(scm):
    """With correctly specified (logistic) propensities and no trimming, the adjusted
    IPW estimates are within 0.06 of the true effects at n = 200k (their bootstrap
    s.e. there is about 0.01-0.03)."""
    p = LIN if scm == "linear" else NONLIN
    A, M, Y, Z = simulate(p, 200_000, 0, link="logit")
    cov = np.column_stack([Z, np.tanh(2 * Z)]) if scm == "nonlinear" else Z
    res = med.ipw_mediation(A, M, Y, cov, trim=0, n_boot=10, method="percentile")
    for kind, value in truth(p).items():
        assert abs(res[kind].estimate[0] - value) < 0.06, (kind, res[kind].estimate[0], value)


def test_unadjusted_ipw_is_biased_by_the_expected_amount():
    """Without Z, the weighting estimator targets the same confounded quantity as the
    unadjusted regression (omitted-variable values, far from the truth); its logistic
    model of A on M alone is only approximately right here, hence 0.15. Its TE is
    exactly the difference of the group means."""
    A, M, Y, Z = simulate(LIN, 200_000, 0)
    unadj = med.ipw_mediation(A, M, Y, trim=0, n_boot=10, method="percentile")
    expected, true = unadjusted_population(LIN), truth(LIN)
    for kind in ("nie", "nde"):
        assert abs(expected[kind] - true[kind]) > 0.25
        assert abs(unadj[kind].estimate[0] - expected[kind]) < 0.15, (kind, unadj[kind].estimate[0])
    diff = Y[A == 1].mean() - Y[A == 0].mean()
    np.testing.assert_allclose(unadj["te"].estimate[0], diff, rtol=1e-10)


def _ipw_slow(A, M, Y, Z, trim):
    """Huber's estimator one mediator at a time with explicit loops over examples:
    the propensities from the package's plain IRLS fit on the raw columns."""
    from mechscope.mediation.balancing import _logistic
    n = len(A)
    bz, Dz = _logistic(Z, A)
    pz = [1 / (1 + math.exp(-float(Dz[i] @ bz))) for i in range(n)]
    out = []
    for u in range(M.shape[1]):
        bm, Dm = _logistic(np.column_stack([M[:, u], Z]), A)
        pm = [1 / (1 + math.exp(-float(Dm[i] @ bm))) for i in range(n)]
        sums = {key: [0.0, 0.0] for key in ("11", "00", "10", "01")}
        for i in range(n):
            if not trim <= pm[i] <= 1 - trim:
                continue
            if A[i] == 1:
                parts = {"11": 1 / pz[i], "10": (1 - pm[i]) / (pm[i] * (1 - pz[i]))}
            else:
                parts = {"00": 1 / (1 - pz[i]), "01": pm[i] / ((1 - pm[i]) * pz[i])}
            for key, w in parts.items():
                sums[key][0] += w * Y[i]
                sums[key][1] += w
        y = {key: s / t for key, (s, t) in sums.items()}
        out.append({"nie": y["01"] - y["00"], "nde": y["10"] - y["00"], "nie_total": y["11"] - y["10"],
                    "nde_total": y["11"] - y["01"], "te": y["11"] - y["00"]})
    return out


def test_ipw_equals_its_formula_computed_the_slow_way():
    from mechscope.mediation.bootstrap import _counts
    A, M, Y, Z = simulate(NONLIN, 60, 5)
    rng = np.random.default_rng(1)
    Ms = np.column_stack([M, 0.5 * M + rng.standard_normal(60)])
    Zs = np.column_stack([Z, rng.uniform(size=60)])
    res = med.ipw_mediation(A, Ms, Y, Zs, trim=0.05, n_boot=5, seed=3, method="percentile")
    slow = _ipw_slow(A, Ms, Y, Zs, 0.05)
    for u in range(2):
        for kind in med.observational.OBS_KINDS:
            np.testing.assert_allclose(res[kind].estimate[u], slow[u][kind], rtol=0, atol=1e-10)
    # a bootstrap replicate is the same estimator on the resampled (repeated) examples:
    # the propensity models are re-fitted on each resample
    counts = _counts(60, 5, 3)
    for b in (0, 4):
        idx = np.repeat(np.arange(60), counts[b].astype(int))
        slow_b = _ipw_slow(A[idx], Ms[idx], Y[idx], Zs[idx], 0.05)
        for u in range(2):
            for j, kind in enumerate(med.observational.OBS_KINDS):
                np.testing.assert_allclose(res[kind].replicates[b, u], slow_b[u][kind], rtol=0, atol=1e-10)


def test_bootstrap_leaves_out_replicates_it_cannot_compute():
    """A statistic that is NaN on some resamples: intervals from the finite ones."""
    x = np.random.default_rng(0).exponential(1.0, 50)

    def mean_or_nan(W):
        m = (W @ x) / W.sum(1)
        return np.where(W[:, 0] > 0, m, np.nan)[:, None]           # NaN when example 0 is left out

    from mechscope.mediation.bootstrap import _counts
    r = med.bootstrap(mean_or_nan, 50, n_boot=400, seed=2, method="percentile")
    counts = _counts(50, 400, 2)
    finite = ((counts * np.full(50, 1 / 50)) @ x / (counts / 50).sum(1))[counts[:, 0] > 0]
    assert 0 < finite.size < 400
    np.testing.assert_allclose([r["low"][0], r["high"][0]], np.quantile(finite, [0.025, 0.975]), rtol=1e-12)
    np.testing.assert_allclose(r["se"][0], finite.std(ddof=1), rtol=1e-12)


def test_ipw_bad_input():
    A, M, Y, Z = simulate(LIN, 200, 0)
    with pytest.raises(ValueError, match="treatment"):
        med.ipw_mediation(np.where(A == 1, 2.0, 0.0), M, Y, Z)
    with pytest.raises(ValueError, match="treatment"):
        med.ipw_mediation(np.ones(200), M, Y, Z)
    # a mediator that separates the groups perfectly: P(A=1 | M, Z) is 0 or 1
    sep = A + 0.1 * np.random.default_rng(0).uniform(size=200)
    with pytest.raises(ValueError, match=r"M: P\(A=1 \| M, Z\) is 0 or 1 .*'M\[1\]'"):
        med.ipw_mediation(A, np.column_stack([M, sep]), Y, Z)
    with pytest.raises(ValueError, match=r"Z: P\(A=1 \| Z\) is 0 or 1"):
        med.ipw_mediation(A, M, Y, np.column_stack([Z, A]))
    with pytest.raises(ValueError, match="trim"):
        med.ipw_mediation(A, M, Y, Z, trim=0.5)
