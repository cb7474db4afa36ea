"""Observational mediation estimators: from one forward pass per prompt, no patching.

Data per example: treatment A (0/1), mediator values M ([n] or [n, units]: one
column per unit), outcome Y, covariates Z. Two linear models, fitted by (weighted)
least squares for every unit at once:

    mediator  M_u = a0 + a1 A + a2' Z
    outcome   Y   = b0 + theta A + beta M_u (+ xi A M_u) + eta' Z

give (VanderWeele's formulas; xi = 0 without the interaction)

    NIE (pure)  = beta a1            NIE_total = (beta + xi) a1
    NDE (pure)  = theta + xi E[M(0)] NDE_total = theta + xi E[M(1)]
    TE          = NDE + NIE_total

Unadjusted: no Z. Adjusted: Z in both models and/or balancing weights (weighting).
imai_keele_tingley() gives the same quantities by Imai, Keele & Tingley's (2010)
quasi-Bayesian simulation, as statsmodels' Mediation does.
"""
import numpy as np

from .balancing import Balance, check_covariates, check_treatment, rebalance
from .bootstrap import bootstrap, check_weights

__all__ = ["product_of_coefficients", "imai_keele_tingley", "observe", "OBS_KINDS"]

OBS_KINDS = ("nie", "nde", "nie_total", "nde_total", "te")


def _check_data(A, M, Y, Z):
    a = check_treatment(A)
    n = a.size
    M = np.asarray(M, np.float64)
    if M.ndim == 1:
        M = M[:, None]
    if M.ndim != 2 or M.shape[0] != n:
        raise ValueError(f"M: expected [n] or [n, units] mediator values with n = {n}, got shape {list(M.shape)}")
    Y = np.asarray(Y, np.float64)
    if Y.shape != (n,):
        raise ValueError(f"Y: expected one outcome per example ({n}), got shape {list(Y.shape)}")
    for name, v in (("M", M), ("Y", Y)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name}: has NaN or infinite values")
    if Z is not None:
        Z, _ = check_covariates(Z, n)
    else:
        Z = np.zeros((n, 0))
    return a.astype(np.float64), M, Y, Z


def _solve(G, r):
    """Batched least-squares solve of the normal equations G x = r (pseudo-inverse
    where a resample leaves a column without variation)."""
    try:
        return np.linalg.solve(G, r)
    except np.linalg.LinAlgError:
        return np.einsum("...ij,...j->...i", np.linalg.pinv(G), r)


def _poc_statistic(A, M, Y, Z, interaction):
    """statistic(W [k, n]) -> [k, 5, units]: the five effects under example weights W."""
    n, U = M.shape
    S = np.column_stack([np.ones(n), A, Z])                          # shared columns
    V = np.stack([M, A[:, None] * M], axis=2) if interaction else M[:, :, None]  # [n, U, q]
    q = V.shape[2]

    def stat(W):
        k = W.shape[0]
        WS = W[:, :, None] * S[None]                                 # [k, n, ps]
        Gss = WS.transpose(0, 2, 1) @ S                              # [k, ps, ps]
        # mediator model: shared design S, one column of M per unit
        coef_m = _solve(Gss, WS.transpose(0, 2, 1) @ M)              # [k, ps, U]
        a0, a1, a2 = coef_m[:, 0], coef_m[:, 1], coef_m[:, 2:]
        zbar = (W @ Z) / W.sum(1, keepdims=True)                     # [k, nz]
        m0 = a0 + np.einsum("kz,kzu->ku", zbar, a2)                  # E[M(0)] over the weighted sample
        m1 = m0 + a1
        # outcome model: [S, V_u] per unit, assembled from blocks
        Gsv = (WS.transpose(0, 2, 1) @ V.reshape(n, U * q)).reshape(k, -1, U, q)
        Gvv = np.einsum("kn,nuv,nuw->kuvw", W, V, V)
        ps = S.shape[1]
        G = np.zeros((k, U, ps + q, ps + q))
        G[:, :, :ps, :ps] = Gss[:, None]
        G[:, :, :ps, ps:] = Gsv.transpose(0, 2, 1, 3)
        G[:, :, ps:, :ps] = Gsv.transpose(0, 2, 3, 1)
        G[:, :, ps:, ps:] = Gvv
        r = np.zeros((k, U, ps + q))
        r[:, :, :ps] = (WS.transpose(0, 2, 1) @ Y)[:, None]
        r[:, :, ps:] = np.einsum("kn,nuv->kuv", W * Y[None], V)
        coef_y = _solve(G, r)                                        # [k, U, ps + q]
        theta, beta = coef_y[:, :, 1], coef_y[:, :, ps]
        xi = coef_y[:, :, ps + 1] if interaction else np.zeros_like(beta)
        nie, nie_t = beta * a1, (beta + xi) * a1
        nde, nde_t = theta + xi * m0, theta + xi * m1
        return np.stack([nie, nde, nie_t, nde_t, nde + nie_t], axis=1)

    return stat


def product_of_coefficients(A, M, Y, Z=None, weights=None, interaction=False, n_boot=1000, seed=0,
                            level=0.95, method="bca", units=None, label="regression"):
    """Regression-based NIE/NDE for every mediator column (see the module's docstring),
    with a seeded bootstrap over examples (the weights carried along).

    A: 0/1 treatment [n]; M: [n] or [n, units]; Y: [n]; Z: covariates [n, k] or None
    (unadjusted); weights: example weights [n], or None, or a Balance (from
    entropy_balance and the like): its weights, re-solved on every bootstrap resample
    so that the intervals include the balancing's own uncertainty.
    Returns a report.Estimates per effect kind: a dict kind -> Estimates."""
    from .report import Estimates
    A, M, Y, Z = _check_data(A, M, Y, Z)
    n, U = M.shape
    labels = list(units) if units is not None else [f"M[{u}]" for u in range(U)]
    if len(labels) != U:
        raise ValueError(f"units: {len(labels)} labels for {U} mediator columns")
    stat = _poc_statistic(A, M, Y, Z, interaction)
    if isinstance(weights, Balance):
        balance = weights
        if balance.weights.shape != (n,) or not np.array_equal(balance.treatment, A.astype(bool)):
            raise ValueError("weights: the Balance was computed for another treatment vector")
        weights = balance.base

        def stat(W, inner=stat):
            return inner(rebalance(balance, W))
    check_weights(weights, n)
    # many units: bootstrap chunks sized to keep [chunk, units, p, p] small
    chunk = max(1, int(4e6 // max(U * (4 + Z.shape[1]) ** 2 + n * 8, 1)))
    res = bootstrap(stat, n, weights, n_boot=n_boot, seed=seed, level=level, method=method, chunk=chunk)
    return {kind: Estimates(labels, kind, label=label, **{key: (v[:, j] if key == "replicates" else v[j])
                                                          for key, v in res.items()})
            for j, kind in enumerate(OBS_KINDS)}


def _ols(X, y):
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = max(X.shape[0] - X.shape[1], 1)
    sigma2 = resid @ resid / dof
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    return coef, cov, np.sqrt(sigma2)


def imai_keele_tingley(A, M, Y, Z=None, interaction=False, n_sims=1000, seed=0, level=0.95):
    """Imai, Keele & Tingley's simulation estimator (their "quasi-Bayesian" algorithm,
    as statsmodels' Mediation with method="parametric") for one mediator M [n].

    Draws both models' coefficients from their estimated normal sampling
    distributions; per draw, simulates each example's mediator under treatment and
    control (with the residual noise) and predicts its outcomes under each
    combination; the effects are averages over examples. Returns a dict kind ->
    (estimate = mean over draws, low, high percentile interval)."""
    A, M, Y, Z = _check_data(A, M, Y, Z)
    if M.shape[1] != 1:
        raise ValueError("M: imai_keele_tingley takes one mediator column")
    m = M[:, 0]
    n = A.size
    rng = np.random.default_rng(seed)

    def design_m(a):
        return np.column_stack([np.ones(n), np.full(n, a), Z])

    def design_y(a, mv):
        cols = [np.ones(n), np.full(n, a), mv] + ([a * mv] if interaction else []) + [Z]
        return np.column_stack(cols)

    Xm = np.column_stack([np.ones(n), A, Z])
    Xy = np.column_stack([np.ones(n), A, m] + ([A * m] if interaction else []) + [Z])
    cm, Vm, sm = _ols(Xm, m)
    cy, Vy, _ = _ols(Xy, Y)
    draws_m = rng.multivariate_normal(cm, Vm, size=n_sims)           # [S, pm]
    draws_y = rng.multivariate_normal(cy, Vy, size=n_sims)           # [S, py]
    noise = rng.standard_normal((n_sims, n)) * sm
    med = {a: draws_m @ design_m(a).T + noise for a in (0.0, 1.0)}   # [S, n] simulated M(a)
    # E[Y(a, M(a'))] per draw: the outcome model is linear in its columns, so the
    # prediction is the draw's coefficients against each column's value
    b0, th, be = draws_y[:, 0], draws_y[:, 1], draws_y[:, 2]
    xi = draws_y[:, 3] if interaction else np.zeros(n_sims)
    rest = draws_y[:, 4 if interaction else 3:] @ Z.T if Z.shape[1] else 0.0

    def y(a, ma):
        mv = med[ma]
        return (b0[:, None] + th[:, None] * a + be[:, None] * mv + xi[:, None] * a * mv + rest).mean(1)

    sims = {"nie": y(0, 1) - y(0, 0), "nde": y(1, 0) - y(0, 0), "nie_total": y(1, 1) - y(1, 0),
            "nde_total": y(1, 1) - y(0, 1), "te": y(1, 1) - y(0, 0)}
    alpha = (1 - level) / 2
    return {k: (float(v.mean()), float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)), v)
            for k, v in sims.items()}


def observe(model, tokens, units, metric, attention_mask=None, projection="mean_difference", treatment=None):
    """The observational data of a study from one forward pass over the prompts:
    (M [n, units], Y [n]). A unit of one value (a neuron at one position) is that
    value; a larger unit is projected to one number: projection "mean_difference"
    (onto the unit-normalised difference of its mean under treatment and control,
    which needs treatment) or "norm"; a subspace unit uses its first basis vector."""
    from .. import metrics as _metrics
    from .units import check_units
    t, mask = model._check_tokens(tokens, attention_mask)
    B, T = t.shape
    units, parts = check_units(model, units, B, T, mask)
    names = sorted({p[0].site for ps in parts for p in ps})
    run = model.run(t, attention_mask=mask, cache=names, logits=None if isinstance(metric, _metrics.Metric) else "all")
    if isinstance(metric, _metrics.Metric):
        Y = np.asarray(metric.per_row(model, t, mask), np.float64)
    else:
        Y = np.asarray(metric(run.logits), np.float64)
        if Y.shape != (B,):
            raise ValueError(f"metric: expected one value per example ({B}), got shape {list(Y.shape)}")
    a = None if treatment is None else check_treatment(treatment, B)
    M = np.empty((B, len(units)))
    for u, ps in enumerate(parts):
        vals = []
        for patch, Q, suffix, (_, _, ia, ib, ic) in ps:
            full = np.asarray(run.cache[patch.site], np.float64)
            box = full[:, ia][:, :, ib][:, :, :, ic] if ic is not None else full.reshape(B, T, -1)[:, ia][:, :, ib]
            if Q is not None:
                box = box @ Q[:, :1]
            vals.append(box.reshape(B, -1))
        v = np.concatenate(vals, axis=1)
        if v.shape[1] == 1:
            M[:, u] = v[:, 0]
        elif projection == "norm":
            M[:, u] = np.linalg.norm(v, axis=1)
        elif projection == "mean_difference":
            if a is None:
                raise ValueError("treatment: projecting a unit of several values onto the mean difference "
                                 "needs the treatment")
            d = v[a].mean(0) - v[~a].mean(0)
            M[:, u] = v @ (d / max(np.linalg.norm(d), 1e-30))
        else:
            raise ValueError(f"projection: expected 'mean_difference' or 'norm', got {projection!r}")
    return M, Y
