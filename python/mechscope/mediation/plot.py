"""A plot of per-unit effects: the interventional truth and observational estimates
side by side, with their intervals (matplotlib, imported when first used)."""
import numpy as np

__all__ = ["effects"]


def effects(truth, estimates=None, top=20, ax=None, title=None):
    """Bars of the top units (by |truth|) with intervals: truth (an Estimates) and
    any observational Estimates ({name: Estimates}) beside it. Returns the figure."""
    from ..plot import _pyplot
    plt = _pyplot()
    estimates = estimates or {}
    order = np.argsort(-np.abs(truth.estimate), kind="stable")[:top]
    series = [("intervention", truth)] + list(estimates.items())
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(order) * len(series)), 3.6), constrained_layout=True)
    else:
        fig = ax.figure
    width = 0.8 / len(series)
    x = np.arange(len(order))
    for j, (name, est) in enumerate(series):
        v = est.estimate[order]
        err = np.abs(np.stack([v - est.low[order], est.high[order] - v]))
        ax.bar(x + (j - (len(series) - 1) / 2) * width, v, width, yerr=err, capsize=2, label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([truth.units[i] for i in order], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(truth.kind)
    ax.set_title(title or f"{truth.kind} by unit (top {len(order)} by intervention)")
    ax.legend(fontsize=8)
    return fig
