"""Results people read: labelled estimates, localization summaries, and the report that
puts the observational estimate beside the exact interventional value."""
import numpy as np

__all__ = ["Table", "Estimates", "localization", "compare"]


class Table:
    """Columns of equal length (a dict name -> list/array), printable, with to_pandas()."""

    def __init__(self, columns):
        self.columns = {k: (list(v) if not isinstance(v, np.ndarray) else v) for k, v in columns.items()}
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError("columns: of different lengths")

    def __len__(self):
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name):
        return self.columns[name]

    def to_pandas(self):
        import pandas as pd  # optional: imported here only
        return pd.DataFrame(self.columns)

    def __repr__(self):
        return self.to_string()

    def to_string(self, max_rows=20):
        names = list(self.columns)

        def fmt(v):
            if isinstance(v, (float, np.floating)):
                return f"{v:+.4f}" if np.isfinite(v) else str(v)
            return str(v)

        rows = [[fmt(self.columns[k][i]) for k in names] for i in range(min(len(self), max_rows))]
        widths = [max([len(k)] + [len(r[j]) for r in rows]) for j, k in enumerate(names)]
        lines = ["  ".join(k.rjust(w) for k, w in zip(names, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        if len(self) > max_rows:
            lines.append(f"... ({len(self)} rows)")
        return "\n".join(lines)


class Estimates:
    """One effect for every unit: estimate, se, low, high [units] (a bootstrap
    interval), replicates [n_boot, units]; units: labels; kind: which effect."""

    def __init__(self, units, kind, estimate, se, low, high, replicates=None, label=""):
        self.units, self.kind, self.label = list(units), kind, label
        self.estimate, self.se = np.atleast_1d(estimate), np.atleast_1d(se)
        self.low, self.high = np.atleast_1d(low), np.atleast_1d(high)
        self.replicates = replicates

    def __len__(self):
        return len(self.units)

    def __repr__(self):
        return f"Estimates({self.kind}, {self.label or 'interventional'}, {len(self)} units)\n" + self.table().to_string()

    def table(self):
        return Table({"unit": self.units, self.kind: self.estimate, "se": self.se, "low": self.low,
                      "high": self.high})

    def to_pandas(self):
        return self.table().to_pandas().set_index("unit")

    def ranking(self):
        """Unit indices by decreasing |estimate|."""
        return np.argsort(-np.abs(self.estimate), kind="stable")


def localization(nie, total=None, k=(1, 5, 10)):
    """How concentrated an effect is over units.

    nie: per-unit indirect effects [units] (or Estimates); total: the total effect
    (for shares of it), default the sum of |nie|. Returns a dict: order (units by
    decreasing |nie|), top_share {k: share of the total carried by the top-k units},
    effective_units (exp of the entropy of the |nie| shares: 1 when one unit carries
    everything, the unit count when all carry the same)."""
    values = np.asarray(nie.estimate if isinstance(nie, Estimates) else nie, np.float64)
    mag = np.abs(values)
    order = np.argsort(-mag, kind="stable")
    denom = float(np.abs(total)) if total is not None else float(mag.sum())
    shares = mag / mag.sum() if mag.sum() > 0 else np.full(mag.size, 1.0 / mag.size)
    nz = shares[shares > 0]
    ks = [k] if np.isscalar(k) else list(k)
    return {"order": order,
            "top_share": {int(kk): float(mag[order[:kk]].sum() / denom) if denom > 0 else float("nan") for kk in ks},
            "effective_units": float(np.exp(-(nz * np.log(nz)).sum()))}


def compare(truth, estimates, kind="nie", k=(1, 5, 10)):
    """The report: for the same units, the exact interventional effect (an Estimates
    from Effects.summary) beside each observational estimate (a dict name ->
    Estimates), with localization summaries of each.

    Returns (Table: one row per unit with the truth, each estimate and its interval,
    and whether the interval covers the truth; Table: one row per estimator with
    effective number of units, top-k shares, rank correlation with the truth and
    the mean absolute error)."""
    rows = {"unit": truth.units, f"{kind} (intervention)": truth.estimate,
            "low (intervention)": truth.low, "high (intervention)": truth.high}
    summary = {"estimator": ["intervention"], "effective_units": [], "mean_abs_error": [0.0],
               "rank_corr": [1.0]}
    loc = localization(truth.estimate, k=k)
    summary["effective_units"].append(loc["effective_units"])
    tops = {kk: [v] for kk, v in loc["top_share"].items()}
    for name, est in estimates.items():
        if list(est.units) != list(truth.units):
            raise ValueError(f"estimates[{name!r}]: its units differ from the truth's")
        rows[name] = est.estimate
        rows[f"low ({name})"] = est.low
        rows[f"high ({name})"] = est.high
        rows[f"covers ({name})"] = (est.low <= truth.estimate) & (truth.estimate <= est.high)
        loc = localization(est.estimate, k=k)
        summary["estimator"].append(name)
        summary["effective_units"].append(loc["effective_units"])
        summary["mean_abs_error"].append(float(np.abs(est.estimate - truth.estimate).mean()))
        summary["rank_corr"].append(_spearman(est.estimate, truth.estimate))
        for kk, v in loc["top_share"].items():
            tops[kk].append(v)
    for kk, v in tops.items():
        summary[f"top{kk}_share"] = v
    return Table(rows), Table(summary)


def _spearman(x, y):
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
