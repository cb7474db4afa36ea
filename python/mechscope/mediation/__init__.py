"""Causal mediation analysis: exact interventional effects of any units, observational
estimators adjusted for confounders, and the truth beside every estimate.

    units = ms.mediation.neurons(model, layer=2, pos="last")
    eff = ms.mediation.natural_effects(model, treated, control, units, metric)
    eff.nie                      # [units, pairs]: y(a', m(a)) - y(a')
    eff.summary("nie")           # mean over pairs, bootstrap intervals, per unit
    w = ms.mediation.entropy_balance(Z, treatment, "ATE", moments=2).weights
    ms.mediation.product_of_coefficients(A, M, Y, Z, weights=w)["nie"]
    ms.mediation.study(model, treated, control, treatment, units, metric, Z)  # side by side

Every unit of a study runs in one patching sweep in C per direction (see effects.py).
"""
from .balancing import (Balance, entropy_balance, inverse_propensity_weights, one_hot,
                        stratified_weights)
from .bootstrap import bootstrap, weighted_mean_ci
from .effects import KINDS, Effects, controlled_direct_effect, natural_effects
from .observational import imai_keele_tingley, observe, product_of_coefficients
from .plot import effects as plot_effects
from .report import Estimates, Table, compare, localization
from .study import Study, study
from .units import Unit, group, heads, layer_outputs, neurons

__all__ = [
    "Unit", "group", "neurons", "heads", "layer_outputs",
    "natural_effects", "controlled_direct_effect", "Effects", "KINDS",
    "entropy_balance", "inverse_propensity_weights", "stratified_weights", "one_hot", "Balance",
    "product_of_coefficients", "imai_keele_tingley", "observe",
    "bootstrap", "weighted_mean_ci",
    "Estimates", "Table", "compare", "localization", "plot_effects",
    "study", "Study",
]
