"""Entropy balancing against its definition and an independent solver (scipy.optimize
on the dual); inverse propensity weights against scikit-learn's logistic regression;
standardisation over strata against the stratum-by-stratum formula."""
import numpy as np
import pytest

from mechscope import mediation as med


def problem(seed, n=300, k=3):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, k)) * rng.uniform(0.5, 2, k) + rng.uniform(-1, 1, k)
    Z[:, 0] = (Z[:, 0] > 0.3).astype(float)  # one binary column
    logit = Z @ rng.uniform(-0.6, 0.6, k)
    A = rng.uniform(size=n) < 1 / (1 + np.exp(-logit))
    return Z, A


def scipy_weights(C, target, q):
    """Weights from scipy's BFGS on the dual log sum q exp(C lam) - lam . target,
    written independently of mechscope's solver."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp, softmax

    sd = C.std(0)
    Cs = (C - target) / sd

    def f(lam):
        return logsumexp(Cs @ lam, b=q)

    def grad(lam):
        return softmax(Cs @ lam + np.log(q)) @ Cs

    res = minimize(f, np.zeros(C.shape[1]), jac=grad, method="BFGS", options=dict(gtol=1e-13, maxiter=10_000))
    return softmax(Cs @ res.x + np.log(q))


def moments(Z, order):
    cols = []
    for j in range(Z.shape[1]):
        binary = np.unique(Z[:, j]).size == 2
        cols += [Z[:, j] ** p for p in range(1, (1 if binary else order) + 1)]
    return np.stack(cols, 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("estimand", ["ATT", "ATE"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_entropy_balance_meets_constraints_and_matches_scipy(seed, estimand, order):
    Z, A = problem(seed)
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 1.5, A.size) if seed % 2 else None
    bal = med.entropy_balance(Z, A, estimand, moments=order, base_weights=base)
    w = bal.weights
    C = moments(Z, order)
    q = np.ones(A.size) if base is None else base
    target = (q[A] @ C[A]) / q[A].sum() if estimand == "ATT" else q @ C / q.sum()
    groups = [~A] if estimand == "ATT" else [A, ~A]
    for grp in groups:
        assert w[grp].sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(w[grp] @ C[grp], target, atol=1e-8)   # constraints met to 1e-8
        ref = scipy_weights(C[grp], target, q[grp] / q[grp].sum())
        np.testing.assert_allclose(w[grp], ref, atol=1e-6)
        assert (w[grp] > 0).all()
    if estimand == "ATT":
        np.testing.assert_allclose(w[A], q[A] / q[A].sum())
    before, after = bal.smd()
    assert np.abs(after).max() < 1e-6 < np.abs(before).max()
    assert len(bal.table()) == C.shape[1]


def test_infeasible_balance_names_the_covariate():
    rng = np.random.default_rng(0)
    n = 200
    A = np.arange(n) < 100
    age = np.where(A, rng.uniform(5, 6, n), rng.uniform(0, 4, n))  # no control reaches the treated mean
    other = rng.standard_normal(n)
    with pytest.raises(ValueError, match="infeasible for 'age'"):
        med.entropy_balance(np.column_stack([other, age]), A, "ATT", names=["other", "age"])
    # jointly infeasible although each column alone is within range: the controls lie on
    # the line y = x, the treated mean does not
    x = rng.uniform(-1, 1, n)
    y = np.where(A, -x + rng.uniform(0.5, 1, n), x)
    with pytest.raises(ValueError, match=r"balance is infeasible for '(x|y)'"):
        med.entropy_balance(np.column_stack([x, y]), A, "ATT", names=["x", "y"])


def test_inverse_propensity_weights_match_sklearn():
    from sklearn.linear_model import LogisticRegression
    Z, A = problem(3)
    e = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(Z, A).predict_proba(Z)[:, 1]
    for estimand, expected in (("ATE", np.where(A, 1 / e, 1 / (1 - e))), ("ATT", np.where(A, 1, e / (1 - e)))):
        w = med.inverse_propensity_weights(Z, A, estimand).weights
        for grp in (A, ~A):
            np.testing.assert_allclose(w[grp], expected[grp] / expected[grp].sum(), rtol=1e-5)


def test_stratified_weights_standardise_over_strata():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, 400)
    A = rng.uniform(size=400) < np.array([0.2, 0.5, 0.7, 0.9])[s]
    y = s * 1.5 + A * (1 + s) + rng.standard_normal(400)
    for estimand in ("ATE", "ATT"):
        w = med.stratified_weights(s, A, estimand).weights
        diff = w[A] @ y[A] - w[~A] @ y[~A]
        target = A if estimand == "ATT" else np.ones(400, bool)
        expected = sum((target & (s == k)).sum() / target.sum() * (y[A & (s == k)].mean() - y[~A & (s == k)].mean())
                       for k in range(4))
        assert diff == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="stratum 3 has no control"):
        med.stratified_weights(np.r_[s, 3, 3], np.r_[A | (s == 3), True, True], "ATE")


def test_localization_summaries():
    loc = med.localization([4.0, 0.0, 0.0, 0.0])
    assert loc["effective_units"] == pytest.approx(1.0) and loc["top_share"][1] == 1.0
    loc = med.localization(np.ones(8), total=16.0, k=(2, 8))
    assert loc["effective_units"] == pytest.approx(8.0)
    assert loc["top_share"] == {2: 0.125, 8: 0.5}
    loc = med.localization([1.0, -3.0, 2.0])
    assert list(loc["order"]) == [1, 2, 0]


@pytest.mark.parametrize("estimand", ["ATT", "ATE"])
def test_rebalancing_inside_the_bootstrap(estimand):
    """The batched re-solve used on bootstrap resamples gives the same weights as a
    solve of each resample on its own."""
    from mechscope.mediation.balancing import rebalance
    Z, A = problem(0, n=300)
    bal = med.entropy_balance(Z, A, estimand, moments=2)
    np.testing.assert_allclose(rebalance(bal, np.full((1, A.size), 1.0 / A.size))[0], bal.weights, atol=1e-8)
    counts = np.random.default_rng(0).multinomial(A.size, np.full(A.size, 1 / A.size), size=3).astype(float)
    W = rebalance(bal, counts)
    for b in range(3):
        alone = med.entropy_balance(Z, A, estimand, moments=2, base_weights=counts[b]).weights
        np.testing.assert_allclose(W[b], alone, atol=1e-7)
