"""Interventional mediation estimands, exact, per unit and per example.

For a pair of prompts (treated a, control a'), a unit m and an outcome metric y:

    TE        = y(a) - y(a')
    NIE       = y(a', m(a)) - y(a')        (pure: control input, unit from the treated run)
    NDE       = y(a, m(a')) - y(a')        (pure: treated input, unit held at control)
    NIE_total = y(a) - y(a, m(a'))         so that TE = NDE + NIE_total
    NDE_total = y(a) - y(a', m(a))         so that TE = NIE + NDE_total
    CDE(v)    = y(a, m=v) - y(a', m=v)

and Vig et al.'s relative form y(.)/y(a') - 1 of each. All units of a study run as
one patching sweep in C per direction: y(a', m(a)) for every unit is a sweep over the
control prompts patching from the treated run's cache, y(a, m(a')) the reverse, and
CDE(v) two sweeps writing v. Only the metric's per-example values leave the engine.
"""
import numpy as np

from .. import metrics as _metrics
from .. import sites
from ..interventions import Patch
from ..patching import _run_sweep, _writes_of_patch
from .units import check_units

__all__ = ["natural_effects", "controlled_direct_effect", "Effects", "KINDS"]

KINDS = ("te", "nie", "nde", "nie_total", "nde_total")


# ---------------------------------------------------------------- input checks

def check_pairs(model, treated, control, attention_mask=None):
    """Both sides of the pairs as int32 tokens of one shape and their one mask.
    attention_mask: one mask for both, or a pair (treated mask, control mask) that
    must be equal (a unit is patched at the same positions on both sides)."""
    if isinstance(attention_mask, (tuple, list)) and len(attention_mask) == 2 and np.ndim(attention_mask[0]) == 2:
        mask_t, mask_c = attention_mask
    else:
        mask_t = mask_c = attention_mask
    t, mt = model._check_tokens(treated, mask_t)
    c, mc = model._check_tokens(control, mask_c)
    if t.shape != c.shape:
        raise ValueError(f"treated, control: the pairs must have one shape, got {list(t.shape)} and "
                         f"{list(c.shape)} (pad both sides to the same length)")
    ones = np.ones(t.shape, np.int32)
    mt_full, mc_full = (ones if mt is None else mt), (ones if mc is None else mc)
    if not np.array_equal(mt_full, mc_full):
        row = int(np.flatnonzero((mt_full != mc_full).any(1))[0])
        raise ValueError(f"treated, control: pair {row} has prompts of different lengths (their attention "
                         "masks differ); a unit is set at the same positions on both sides")
    return t, c, mt


def _source_caches(model, tokens_t, tokens_c, mask, unit_parts):
    """The full values of every site a unit touches, in the treated and the control run."""
    names = sorted({p[0].site for parts in unit_parts for p in parts})
    ct = model.run(tokens_t, attention_mask=mask, cache=names, logits=None).cache
    cc = model.run(tokens_c, attention_mask=mask, cache=names, logits=None).cache
    return ct, cc


def _subspace_value(src, base, part, B, T):
    """The full value that a subspace part writes: base + Q Q^T (source - base) inside
    the box, base elsewhere. Exact in a sweep, where nothing before the part's site
    has changed, so the base run's value is the value the write sees."""
    patch, Q, _, (_, _, a, b, _) = part
    flat_b = np.asarray(base, np.float64).reshape(B, T, -1)
    flat_s = np.asarray(src, np.float64).reshape(B, T, -1)
    box = np.ix_(np.arange(B), a, b)
    out = flat_b.copy()
    out[box] = flat_b[box] + (flat_s[box] - flat_b[box]) @ Q @ Q.T
    return np.ascontiguousarray(out.reshape(np.shape(base)), dtype=np.float32)


def _unit_writes(model, parts, source, base, B, T):
    """One unit's parts -> the sweep's writes, patching from `source` (a cache)."""
    writes = []
    for part in parts:
        patch, Q = part[0], part[1]
        value = source[patch.site]
        if Q is not None:
            value = _subspace_value(value, base[patch.site], part, B, T)
        writes += _writes_of_patch(model, Patch(patch.site, value, pos=patch.pos, head=patch.head,
                                                index=patch.index), B, T)
    return writes


def _set_value(model, part, value, B, T, ct, cc):
    """The full site value [1 or B, ...] holding `value` in the part's box (what a
    Set writes): a number, an array broadcast to the box [rows?, ...], or "mean"
    (the part's mean over both sides of every pair)."""
    patch, Q, suffix, (_, _, a, b, c) = part
    full_shape = sites.shape(suffix, model._shape_cfg, B, T)
    if isinstance(value, str):
        if value != "mean":
            raise ValueError(f"value: expected a number, an array or 'mean', got {value!r}")
        both = np.concatenate([ct[patch.site], cc[patch.site]]).astype(np.float64)
        return np.ascontiguousarray(both.mean(axis=0, keepdims=True), dtype=np.float32)
    v = np.asarray(value, np.float64)
    per_row = v.ndim >= 1 and v.shape[0] == B and B > 1 and v.ndim == (4 if c is not None else 3)
    rows = B if per_row else 1
    full = np.zeros((rows,) + full_shape[1:], np.float32)
    if c is not None:
        box = np.ix_(np.arange(rows), a, b, c)
        target = full
    else:
        target = full.reshape(rows, T, -1)
        box = np.ix_(np.arange(rows), a, b)
    box_shape = tuple(len(ix.reshape(-1)) for ix in box)
    try:
        target[box] = np.broadcast_to(v, box_shape)
    except ValueError:
        raise ValueError(f"value: shape {list(v.shape)} does not broadcast to unit part {patch.site!r}'s "
                         f"box {list(box_shape[1:])} (or [{B}, ...] per example)") from None
    if Q is not None:
        raise ValueError("value: a controlled direct effect sets a unit's value; subspace units are not supported")
    return full


def _per_example(model, tokens, mask, unit_writes, metric, progress, what):
    """The metric per example under each unit's writes, and without them:
    ([U, B], [B]). Built-in metrics: one sweep in C. A Python function of the
    logits [B, pos, vocab] returning [B] values: one intervened run per unit."""
    B = tokens.shape[0]
    if isinstance(metric, _metrics.Metric):
        if isinstance(metric, _metrics.Recovery):
            raise TypeError("metric: Recovery normalises a batch mean; give the underlying metric")
        values, base = _run_sweep(model, tokens, mask, unit_writes, metric, None, progress)
        return np.asarray(values, np.float64), np.asarray(base, np.float64)

    def rows(logits):
        out = np.asarray(metric(logits), np.float64)
        if out.shape != (B,):
            raise ValueError(f"metric: a Python metric must return one value per example ({B}), "
                             f"got shape {list(out.shape)}")
        return out

    from .._progress import progress_bar
    base = rows(model.run(tokens, attention_mask=mask).logits)
    values = np.empty((len(unit_writes), B))
    with progress_bar(progress, f"{what} (Python metric)", unit="unit", total=len(unit_writes)) as bar:
        for i, writes in enumerate(unit_writes):
            values[i] = rows(model.run(tokens, attention_mask=mask, interventions=writes).logits)
            bar.update(1)
    return values, base


def _check_metric(metric):
    if not isinstance(metric, _metrics.Metric) and not callable(metric):
        raise TypeError("metric: expected a mechscope.metrics metric or a function of the logits "
                        "[batch, pos, vocab] returning one value per example")


# ---------------------------------------------------------------- the estimands

def natural_effects(model, treated, control, units, metric, *, attention_mask=None, progress=None):
    """Natural direct and indirect effects of every unit on every pair, exactly.

    treated, control: tokens [n, pos] (or texts), the two sides of n pairs, of one
        shape; attention_mask: their one mask (padding on either side).
    units: a list of mediation.Unit (see neurons, heads, layer_outputs, group).
    metric: a mechscope.metrics metric (LogitDiff, LogProb, Prob, KL) with answers per
        example, or a Python function of the logits [n, pos, vocab] returning [n]
        (the slow path: one run per unit).
    Returns Effects: per-example outcomes and every estimand as [units, n] arrays.
    Runs two sweeps: control prompts patched from the treated run, and the reverse.
    """
    _check_metric(metric)
    t, c, mask = check_pairs(model, treated, control, attention_mask)
    B, T = t.shape
    units, parts = check_units(model, units, B, T, mask)
    ct, cc = _source_caches(model, t, c, mask, parts)
    nie_writes = [_unit_writes(model, p, ct, cc, B, T) for p in parts]
    nde_writes = [_unit_writes(model, p, cc, ct, B, T) for p in parts]
    y_c_mt, y_c = _per_example(model, c, mask, nie_writes, metric, progress, "indirect effects")
    y_t_mc, y_t = _per_example(model, t, mask, nde_writes, metric, progress, "direct effects")
    return Effects([u.label for u in units], y_t, y_c, y_c_mt, y_t_mc)


def controlled_direct_effect(model, treated, control, units, metric, value=0.0, *, attention_mask=None,
                             relative=False, progress=None):
    """CDE(v) = y(a, m=v) - y(a', m=v) for every unit and pair: [units, n].

    value: what the unit is set to: a number (0 = zero-ablation), an array broadcast
    to the unit's box (or [n, ...], one per example), or "mean" (its mean over both
    sides of every pair). relative: Vig's form, y(a, m=v)/y(a', m=v) - 1.
    Two sweeps (the treated and the control prompts, every unit set to v)."""
    _check_metric(metric)
    t, c, mask = check_pairs(model, treated, control, attention_mask)
    B, T = t.shape
    units, parts = check_units(model, units, B, T, mask)
    ct, cc = _source_caches(model, t, c, mask, parts) if isinstance(value, str) else (None, None)
    writes = []
    for p in parts:
        w = []
        for part in p:
            patch = part[0]
            full = _set_value(model, part, value, B, T, ct, cc)
            w += _writes_of_patch(model, Patch(patch.site, full, pos=patch.pos, head=patch.head,
                                               index=patch.index), B, T)
        writes.append(w)
    y_t, _ = _per_example(model, t, mask, writes, metric, progress, "controlled effects (treated)")
    y_c, _ = _per_example(model, c, mask, writes, metric, progress, "controlled effects (control)")
    return (y_t / y_c - 1.0) if relative else (y_t - y_c)


class Effects:
    """The outcome of every pair under each intervention, and the estimands.

    units: unit labels. y_treated, y_control: y(a), y(a') [n].
    y_control_treated_unit: y(a', m(a)) [units, n]; y_treated_control_unit:
    y(a, m(a')) [units, n]. effect(kind) gives the per-example estimand;
    te, nie, nde, nie_total, nde_total are shortcuts (differences)."""

    def __init__(self, units, y_treated, y_control, y_control_treated_unit, y_treated_control_unit):
        self.units = list(units)
        self.y_treated, self.y_control = y_treated, y_control
        self.y_control_treated_unit, self.y_treated_control_unit = y_control_treated_unit, y_treated_control_unit

    def __repr__(self):
        return f"Effects({len(self.units)} units x {self.y_treated.size} pairs)"

    def effect(self, kind, relative=False):
        """kind in KINDS -> [units, n] ([n] for "te"). relative: y(.)/y(a') - 1, for
        the pure forms (te, nie, nde), as in Vig et al."""
        yt, yc = self.y_treated, self.y_control
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if relative:
            if kind not in ("te", "nie", "nde"):
                raise ValueError("relative: Vig's relative form exists for te, nie and nde")
            num = {"te": yt, "nie": self.y_control_treated_unit, "nde": self.y_treated_control_unit}[kind]
            return num / yc - 1.0
        return {"te": yt - yc,
                "nie": self.y_control_treated_unit - yc,
                "nde": self.y_treated_control_unit - yc,
                "nie_total": yt - self.y_treated_control_unit,
                "nde_total": yt - self.y_control_treated_unit}[kind]

    te = property(lambda self: self.effect("te"))
    nie = property(lambda self: self.effect("nie"))
    nde = property(lambda self: self.effect("nde"))
    nie_total = property(lambda self: self.effect("nie_total"))
    nde_total = property(lambda self: self.effect("nde_total"))

    def summary(self, kind="nie", weights=None, relative=False, n_boot=1000, seed=0, level=0.95,
                method="bca"):
        """Weighted mean over pairs of one estimand for every unit, with a seeded
        bootstrap over pairs: a report.Estimates (estimate, se, interval per unit).
        weights: per-pair weights (e.g. from balancing.entropy_balance or
        stratified_weights) that make the pairs represent a target population."""
        from .bootstrap import weighted_mean_ci
        from .report import Estimates
        values = self.effect(kind, relative)
        labels = ["total"] if values.ndim == 1 else self.units
        values = np.atleast_2d(values)
        est = weighted_mean_ci(values, weights, n_boot=n_boot, seed=seed, level=level, method=method)
        return Estimates(labels, kind + ("_relative" if relative else ""), **est)
