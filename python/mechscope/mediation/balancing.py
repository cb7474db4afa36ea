"""Confounder adjustment by weighting: entropy balancing, inverse propensity weights,
and standardisation over strata.

Every function takes covariates Z [n, k] (or [n]) and a 0/1 treatment [n] and returns
a Balance: weights [n] that sum to 1 within the treated and within the control group,
so that weighted group means compare like with like, and balance diagnostics.

estimand "ATT": the control group is reweighted to the treated group's covariates
(treated weights stay uniform); "ATE": both groups are reweighted to the pooled
sample's covariates.
"""
import numpy as np

__all__ = ["Balance", "entropy_balance", "inverse_propensity_weights", "stratified_weights",
           "check_covariates", "check_treatment"]


# ---------------------------------------------------------------- checks

def check_treatment(treatment, n=None):
    """0/1 (or bool) treatment [n] with both groups present -> bool array."""
    a = np.asarray(treatment)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"treatment: expected shape [{n if n is not None else 'n'}], got {list(a.shape)}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError("treatment: expected 0/1 values (or booleans)")
        a = a.astype(bool)
    if a.all() or not a.any():
        raise ValueError(f"treatment: only one group is present ({'all treated' if a.all() else 'all control'}); "
                         "an effect needs treated and control examples")
    return a


def check_covariates(Z, n, names=None):
    """Z [n] or [n, k] numbers -> (float64 [n, k], column names). Refuses NaN/inf and
    constant columns, naming the column."""
    Z = np.asarray(Z)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.ndim != 2 or Z.shape[0] != n:
        raise ValueError(f"Z: expected [n] or [n, k] covariates with n = {n}, got shape {list(Z.shape)}")
    if Z.dtype == bool:
        Z = Z.astype(np.float64)
    if not np.issubdtype(Z.dtype, np.number):
        raise TypeError("Z: expected numbers (one-hot encode categories, e.g. with mediation.one_hot)")
    Z = Z.astype(np.float64)
    names = [f"Z[{j}]" for j in range(Z.shape[1])] if names is None else [str(s) for s in names]
    if len(names) != Z.shape[1]:
        raise ValueError(f"names: {len(names)} names for {Z.shape[1]} covariate columns")
    for j, name in enumerate(names):
        if not np.isfinite(Z[:, j]).all():
            raise ValueError(f"Z: covariate {name!r} has NaN or infinite values")
        if np.ptp(Z[:, j]) == 0:
            raise ValueError(f"Z: covariate {name!r} is constant; it cannot be balanced or adjusted for")
    return Z, names


def one_hot(categories, drop_first=True):
    """Category labels [n] -> (0/1 columns [n, k], names): one column per category
    (but the first, by default, which the others determine)."""
    cats = np.asarray(categories)
    levels = np.unique(cats)
    if levels.size < 2:
        raise ValueError("categories: a single category; nothing to adjust for")
    keep = levels[1:] if drop_first else levels
    return np.stack([(cats == lv).astype(np.float64) for lv in keep], axis=1), [str(lv) for lv in keep]


# ---------------------------------------------------------------- diagnostics

class Balance:
    """Weights and how well they balance. weights [n] (each group sums to 1);
    table(): standardised mean difference of each moment before and after, and each
    group's effective sample size."""

    def __init__(self, weights, treatment, features, names, estimand, method, iterations=0, base=None):
        self.weights, self.treatment, self.base = weights, treatment, base
        self.features, self.names = features, names
        self.estimand, self.method, self.iterations = estimand, method, iterations

    def __repr__(self):
        smd = np.abs(self.smd()[1]).max()
        return (f"Balance({self.method}, {self.estimand}, max |SMD| after {smd:.2g}, effective n "
                f"treated {self.effective_n(True):.1f} / control {self.effective_n(False):.1f})")

    def effective_n(self, treated):
        w = self.weights[self.treatment == treated]
        return float(w.sum() ** 2 / (w ** 2).sum())

    def smd(self):
        """Standardised mean differences (treated - control, over the pooled sd) of
        each balanced moment: (before, after) [k]."""
        X, a = self.features, self.treatment
        sd = X.std(0)
        sd[sd == 0] = 1
        before = (X[a].mean(0) - X[~a].mean(0)) / sd
        w = self.weights
        after = ((w[a] @ X[a]) / w[a].sum() - (w[~a] @ X[~a]) / w[~a].sum()) / sd
        return before, after

    def table(self):
        """Rows (moment, SMD before, SMD after) as a report.Table."""
        from .report import Table
        before, after = self.smd()
        return Table({"moment": self.names, "smd_before": before, "smd_after": after})


def _moments(Z, names, order):
    """Columns Z^1..Z^order (powers of binary columns are the column itself: skipped),
    standardised for the solver, and their names."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"moments: expected an int >= 1, got {order!r}")
    cols, out_names = [], []
    for j, name in enumerate(names):
        binary = np.unique(Z[:, j]).size == 2
        for p in range(1, (1 if binary else order) + 1):
            cols.append(Z[:, j] ** p)
            out_names.append(name if p == 1 else f"{name}^{p}")
    return np.stack(cols, axis=1), out_names


# ---------------------------------------------------------------- entropy balancing

def _dual(C, q, lam):
    """The dual objective log sum q exp(C lam) (C centred at the target), its
    gradient and Hessian, and the weights."""
    s = C @ lam
    m = s.max()
    e = q * np.exp(s - m)
    total = e.sum()
    w = e / total
    g = w @ C
    H = (C * w[:, None]).T @ C - np.outer(g, g)
    return np.log(total) + m, g, H, w


def solve_entropy_weights(C, target, base=None, max_iter=200, tol=1e-10, names=None):
    """Weights w (sum 1) over the rows of C [n, k] of least KL divergence from base
    (default uniform) with w @ C = target, by Newton's method with a backtracking
    line search on the dual. Raises ValueError naming the moment that cannot be met.
    -> (weights, lambda, iterations)."""
    n, k = C.shape
    names = names or [f"moment {j}" for j in range(k)]
    q = np.full(n, 1.0 / n) if base is None else base / base.sum()
    # a target outside the range of one column is infeasible whatever the others do
    for j in range(k):
        lo, hi = C[q > 0, j].min(), C[q > 0, j].max()
        span = max(hi - lo, 1e-300)
        if target[j] < lo - 1e-12 * span or target[j] > hi + 1e-12 * span:
            raise ValueError(f"Z: balance is infeasible for {names[j]!r}: the target mean {target[j]:.4g} is "
                             f"outside the reweighted group's range [{lo:.4g}, {hi:.4g}]")
    scale = C.std(0)
    scale[scale == 0] = 1.0
    Cs = (C - target) / scale  # centred and scaled: the constraint is w @ Cs = 0
    lam = np.zeros(k)
    f, g, H, w = _dual(Cs, q, lam)
    for it in range(1, max_iter + 1):
        if np.abs(g).max() < tol:
            return w, lam / scale, it - 1
        step = -np.linalg.lstsq(H, g, rcond=None)[0]
        t = 1.0
        while True:
            f_new, g_new, H_new, w_new = _dual(Cs, q, lam + t * step)
            if f_new <= f + 1e-4 * t * (g @ step) or t < 1e-12:
                break
            t *= 0.5
        lam, f, g, H, w = lam + t * step, f_new, g_new, H_new, w_new
        if not np.isfinite(lam).all() or np.abs(lam).max() > 1e8 or t < 1e-12:
            break
    # the line search can stall at float64 rounding short of tol: a balance within a
    # millionth of each covariate's standard deviation is met for any purpose
    if np.abs(g).max() < max(tol, 1e-6):
        return w, lam / scale, max_iter
    worst = int(np.argmax(np.abs(g)))
    raise ValueError(f"Z: balance is infeasible for {names[worst]!r} (the weights cannot make its mean equal the "
                     f"target; it stays {g[worst] * scale[worst]:+.3g} away); drop or coarsen that covariate, "
                     "or balance fewer moments")


def entropy_balance(Z, treatment, estimand="ATT", moments=1, base_weights=None, names=None,
                    max_iter=200, tol=1e-10):
    """Entropy-balancing weights (Hainmueller 2012): of least KL divergence from the
    base weights such that the means of Z, Z^2, ..., Z^moments in the reweighted
    group(s) equal the target's exactly (see the module's docstring for estimand).
    Returns a Balance. A clear ValueError names the covariate when no weights can
    meet its moments."""
    a = check_treatment(treatment)
    n = a.size
    Z, names = check_covariates(Z, n, names)
    if estimand not in ("ATT", "ATE"):
        raise ValueError(f"estimand: expected 'ATT' or 'ATE', got {estimand!r}")
    from .bootstrap import check_weights
    base = check_weights(base_weights, n, "base_weights")
    C, cnames = _moments(Z, names, moments)
    w = np.zeros(n)
    iterations = 0
    if estimand == "ATT":
        target = base[a] @ C[a] / base[a].sum()
        w[a] = base[a] / base[a].sum()
        groups = [~a]
    else:
        target = base @ C / base.sum()
        groups = [a, ~a]
    for grp in groups:
        if base[grp].sum() <= 0:
            raise ValueError("base_weights: a group's base weights sum to 0")
        w[grp], _, it = solve_entropy_weights(C[grp], target, base[grp], max_iter, tol, cnames)
        iterations = max(iterations, it)
    return Balance(w, a, C, cnames, estimand, "entropy balancing", iterations, base)


def _solve_batch(C, target, Q, max_iter=100, tol=1e-9):
    """solve_entropy_weights for many base-weight rows at once: Q [k, m] base weights
    over the rows of C [m, d], targets [k, d]. -> weights [k, m] (each row sums to 1).
    Used to re-solve the balance inside the bootstrap; Newton steps with a
    backtracking line search, on the rows not yet converged only. A resample whose
    moments cannot be met keeps its last weights (rare; still counted)."""
    scale = C.std(0)
    scale[scale == 0] = 1.0
    Cs = C / scale
    tg = target / scale
    k, d = Q.shape[0], C.shape[1]
    logq = np.where(Q > 0, np.log(np.where(Q > 0, Q, 1.0)), -np.inf)

    def evaluate(lam, rows):
        # the dual log sum q exp(C lam) - lam . target, its gradient and Hessian
        s = Cs @ lam.T                                               # [m, r]
        s = s.T + logq[rows]
        top = s.max(1, keepdims=True)
        e = np.exp(s - top)
        tot = e.sum(1, keepdims=True)
        w = e / tot
        mean = w @ Cs                                                # [r, d]
        g = mean - tg[rows]
        H = np.einsum("rm,md,me->rde", w, Cs, Cs) - mean[:, :, None] * mean[:, None, :]
        f = (np.log(tot) + top)[:, 0] - (lam * tg[rows]).sum(1)
        return f, g, H, w

    lam = np.zeros((k, d))
    rows = np.arange(k)
    f, g, H, w = evaluate(lam, rows)
    out = w.copy()
    for _ in range(max_iter):
        live = np.abs(g).max(1) >= tol
        rows, f, g, H = rows[live], f[live], g[live], H[live]
        if rows.size == 0:
            break
        step = -np.einsum("rde,re->rd", np.linalg.pinv(H), g)
        t = np.ones(rows.size)
        new = evaluate(lam[rows] + step, rows)
        for _ in range(40):
            ok = new[0] <= f + 1e-4 * t * (g * step).sum(1)
            if ok.all():
                break
            t = np.where(ok, t, t * 0.5)
            retry = evaluate(lam[rows[~ok]] + t[~ok, None] * step[~ok], rows[~ok])
            for part, value in zip(new, retry):
                part[~ok] = value
        lam[rows] += t[:, None] * step
        f, g, H, w = new
        out[rows] = w
    return out


def rebalance(balance, W):
    """The balance's weights re-solved under example weights W [k, n] (resampling
    counts times the original base weights): [k, n], each group of each row summing
    to 1. Entropy balancing is re-solved; other methods' weights are carried along."""
    if balance.method != "entropy balancing":
        w = balance.weights[None] * W
    else:
        a, C = balance.treatment, balance.features
        base = W / W.sum(1, keepdims=True)
        w = np.zeros_like(W)
        if balance.estimand == "ATT":
            ta = base[:, a]
            target = ta @ C[a] / ta.sum(1, keepdims=True)
            w[:, a] = ta
            groups = [~a]
        else:
            target = base @ C / base.sum(1, keepdims=True)
            groups = [a, ~a]
        for grp in groups:
            w[:, grp] = _solve_batch(C[grp], target, base[:, grp])
    for grp in (balance.treatment, ~balance.treatment):
        w[:, grp] /= np.maximum(w[:, grp].sum(1, keepdims=True), 1e-300)
    return w


# ---------------------------------------------------------------- propensity weights

def logistic_fit(D, y, W=None, max_iter=100, tol=1e-10):
    """Weighted logistic regressions by Newton's method (IRLS), many at once.

    D: designs [..., n, p] (the intercept column included); y: 0/1 [n]; W: example
    weights [..., n] broadcasting against D's batch (None: 1). -> coefficients
    [..., p]. The linear predictor is clipped to +-30, so that a separated design
    stops at saturated probabilities instead of overflowing (callers check for it)."""
    D = np.asarray(D, np.float64)
    W = np.ones(D.shape[-2]) if W is None else np.asarray(W, np.float64)
    batch = np.broadcast_shapes(D.shape[:-2], W.shape[:-1])
    beta = np.zeros(batch + D.shape[-1:])
    for _ in range(max_iter):
        eta = np.clip(np.einsum("...np,...p->...n", D, beta), -30, 30)
        p = 1 / (1 + np.exp(-eta))
        g = np.einsum("...np,...n->...p", D, W * (y - p))
        H = np.swapaxes(D, -1, -2) @ (D * (W * p * (1 - p))[..., None])
        try:
            step = np.linalg.solve(H, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.einsum("...ij,...j->...i", np.linalg.pinv(H), g)
        beta += step
        if np.abs(step).max() < tol:
            break
    return beta


def _logistic(X, y, max_iter=100, tol=1e-10):
    """Logistic regression by Newton's method (IRLS): coefficients of [1, X]."""
    D = np.column_stack([np.ones(len(X)), X])
    return logistic_fit(D, y, None, max_iter, tol), D


def inverse_propensity_weights(Z, treatment, estimand="ATE", names=None, clip=1e-3):
    """Inverse-propensity weights from a logistic model of the treatment on Z:
    ATE 1/e (treated), 1/(1-e) (control); ATT 1 and e/(1-e). Propensities are
    clipped to [clip, 1 - clip]. Returns a Balance."""
    a = check_treatment(treatment)
    Z, names = check_covariates(Z, a.size, names)
    if estimand not in ("ATT", "ATE"):
        raise ValueError(f"estimand: expected 'ATT' or 'ATE', got {estimand!r}")
    beta, D = _logistic(Z, a.astype(np.float64))
    e = np.clip(1 / (1 + np.exp(-np.clip(D @ beta, -30, 30))), clip, 1 - clip)
    if estimand == "ATE":
        w = np.where(a, 1 / e, 1 / (1 - e))
    else:
        w = np.where(a, 1.0, e / (1 - e))
    w[a] /= w[a].sum()
    w[~a] /= w[~a].sum()
    return Balance(w, a, Z, names, estimand, "inverse propensity")


# ---------------------------------------------------------------- strata

def stratified_weights(strata, treatment, estimand="ATE"):
    """Standardisation over categorical strata: weights under which each group's
    distribution of strata is the target's (ATE: the pooled sample's, ATT: the
    treated group's), uniform within a stratum. A weighted mean difference is then
    the stratum-specific differences averaged with the target's stratum shares."""
    a = check_treatment(treatment)
    s = np.asarray(strata)
    if s.shape != a.shape:
        raise ValueError(f"strata: expected one label per example ({a.size}), got shape {list(s.shape)}")
    if estimand not in ("ATT", "ATE"):
        raise ValueError(f"estimand: expected 'ATT' or 'ATE', got {estimand!r}")
    levels, idx = np.unique(s, return_inverse=True)
    target_rows = a if estimand == "ATT" else np.ones_like(a)
    share = np.bincount(idx[target_rows], minlength=levels.size) / target_rows.sum()
    w = np.zeros(a.size)
    for grp in (a, ~a):
        count = np.bincount(idx[grp], minlength=levels.size)
        missing = np.flatnonzero((share > 0) & (count == 0))
        if missing.size:
            side = "treated" if grp is a else "control"
            raise ValueError(f"strata: stratum {levels[missing[0]]!r} has no {side} examples; its effect "
                             "cannot be estimated (merge it with another stratum)")
        w[grp] = (share / np.maximum(count, 1))[idx[grp]]
    X = (idx[:, None] == np.arange(levels.size)[None]).astype(np.float64)
    return Balance(w, a, X, [str(lv) for lv in levels], estimand, "stratification")
