"""A whole study in one call: the exact interventional effects of every unit on the
pairs, and the observational estimates a user without patching would make from the
prompts actually observed, unadjusted and adjusted for covariates, side by side."""
import numpy as np

from .balancing import check_covariates, check_treatment, entropy_balance
from .effects import check_pairs, natural_effects
from .observational import observe, product_of_coefficients
from .report import compare

__all__ = ["study", "Study"]


class Study:
    """What study() returns: effects (Effects), truth (Estimates of the interventional
    effect, averaged over the pairs with the target weights), estimates (name ->
    Estimates), balance (the Balance used), table and summary (report.compare)."""

    def __init__(self, effects, truth, estimates, balance, table, summary, M, Y):
        self.effects, self.truth, self.estimates, self.balance = effects, truth, estimates, balance
        self.table, self.summary, self.M, self.Y = table, summary, M, Y

    def __repr__(self):
        return "Study\n" + self.summary.to_string()

    def plot(self, top=20, ax=None):
        from .plot import effects
        return effects(self.truth, self.estimates, top=top, ax=ax)


def study(model, treated, control, treatment, units, metric, Z=None, *, attention_mask=None, kind="nie",
          moments=1, interaction=False, n_boot=500, seed=0, level=0.95, progress=None):
    """Truth beside estimate for every unit.

    treated, control: the n pairs (tokens of one shape); treatment [n] 0/1: which side
    of each pair was observed (the observational data are that prompt's unit values
    and outcome); Z: covariates [n, k] of each pair (None: no adjustment).
    The truth is the interventional effect `kind` averaged over all pairs (the
    population the pairs stand for). Estimators: "unadjusted" (regression on A),
    and with Z: "adjusted" (Z in both regressions) and "balanced" (Z in both
    regressions and entropy-balancing ATE weights on Z's moments up to `moments`,
    re-solved on every bootstrap resample).
    """
    t, c, mask = check_pairs(model, treated, control, attention_mask)
    a = check_treatment(treatment, t.shape[0])
    if Z is not None:
        Z, _ = check_covariates(Z, t.shape[0])
    balance = entropy_balance(Z, a, "ATE", moments=moments) if Z is not None else None
    eff = natural_effects(model, t, c, units, metric, attention_mask=mask, progress=progress)
    truth = eff.summary(kind, n_boot=n_boot, seed=seed, level=level)
    observed = np.where(a[:, None], t, c)
    M, Y = observe(model, observed, units, metric, attention_mask=mask, treatment=a)
    kw = dict(interaction=interaction, n_boot=n_boot, seed=seed, level=level, units=eff.units)
    estimates = {"unadjusted": product_of_coefficients(a, M, Y, **kw, label="unadjusted")[kind]}
    if Z is not None:
        estimates["adjusted"] = product_of_coefficients(a, M, Y, Z, **kw, label="adjusted")[kind]
        estimates["balanced"] = product_of_coefficients(a, M, Y, Z, weights=balance, **kw,
                                                        label="balanced")[kind]
    table, summary = compare(truth, estimates, kind)
    return Study(eff, truth, estimates, balance, table, summary, M, Y)

