"""Probes per layer, their control tasks, and from a probe's direction to an intervention.

    sweep = ms.probing.probe_sweep(model, prompts, labels, sites="blocks.*.hook_resid_post")
    sweep.plot()                                   # score (and control) against layer
    probe = sweep.probes[sweep.best_site]
    effect = ms.probing.causal_effect(model, tokens, probe, sweep.best_site, metric, pos=-1)

A probe that decodes a variable shows that the variable is linearly readable at a site,
not that the model uses it there: the control task (Hewitt & Liang 2019) measures how
much of the score the probe would reach on labels with no relation to the model, and
causal_effect measures what moving the activation along the probe's direction does to
the model's output, against random directions of the same size.

scikit-learn is needed (an optional extra) and imported when these functions run.
"""
import re
from dataclasses import dataclass, field

import numpy as np

from .extract import _check_positions, _items, extract
from .interventions import Add, SubspacePatch


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("mechscope.probing needs scikit-learn: pip install 'mechscope[sklearn]'") from None


@dataclass
class ProbeSweep:
    """The result of probe_sweep, one entry per site (in forward order).

    scores [sites, folds]: the probe's cross-validated score on each fold.
    control_scores [sites, folds]: the same probe trained on the control task's labels.
    probes: {site: the estimator fitted on all prompts}.
    """
    sites: list
    scores: np.ndarray
    control_scores: np.ndarray
    probes: dict = field(repr=False)
    scoring: str = "accuracy"

    @property
    def mean(self):
        return self.scores.mean(axis=1)

    @property
    def std(self):
        return self.scores.std(axis=1)

    @property
    def control_mean(self):
        return self.control_scores.mean(axis=1)

    @property
    def selectivity(self):
        """score - control score (Hewitt & Liang): what the site adds over what the probe
        could reach on labels unrelated to the model."""
        return self.mean - self.control_mean

    @property
    def layers(self):
        """The block of each site (-1 for the embeddings, n_layers for ln_final)."""
        out = []
        for s in self.sites:
            m = re.match(r"blocks\.(\d+)\.", s)
            out.append(int(m.group(1)) if m else (-1 if s.startswith("hook_") else 10**6))
        return np.array(out)

    @property
    def best_site(self):
        """The site with the highest mean score (the earliest of ties)."""
        return self.sites[int(np.argmax(self.mean))]

    def __repr__(self):
        lines = [f"ProbeSweep({len(self.sites)} sites, {self.scores.shape[1]} folds, scoring={self.scoring!r})",
                 f"  {'site':<34} {'score':>7} {'± sd':>6} {'control':>8} {'selectivity':>11}"]
        for i, s in enumerate(self.sites):
            lines.append(f"  {s:<34} {self.mean[i]:7.3f} {self.std[i]:6.3f} {self.control_mean[i]:8.3f} "
                         f"{self.selectivity[i]:11.3f}")
        return "\n".join(lines)

    def plot(self, ax=None, title=None):
        """Score (mean ± sd over folds) and control score against the site, a matplotlib
        Figure."""
        from .plot import _pyplot

        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(self.sites) + 2), 3.2))
        else:
            fig = ax.figure
        x = np.arange(len(self.sites))
        ax.errorbar(x, self.mean, yerr=self.std, marker="o", capsize=3, label="probe")
        ax.errorbar(x, self.control_mean, yerr=self.control_scores.std(axis=1), marker="s", capsize=3,
                    linestyle="--", color="gray", label="control task")
        suffixes = {s.split(".", 2)[-1] for s in self.sites if s.startswith("blocks.")}
        short = [s.split(".")[1] if s.startswith("blocks.") and len(suffixes) == 1 else
                 s.replace("blocks.", "").replace("hook_", "") for s in self.sites]
        ax.set_xticks(x)
        ax.set_xticklabels(short, rotation=0 if len(suffixes) == 1 else 60,
                           ha="center" if len(suffixes) == 1 else "right", fontsize=8)
        ax.set_xlabel(f"layer ({suffixes.pop()})" if len(suffixes) == 1 else "site")
        ax.set_ylabel(self.scoring)
        ax.set_title(title or "probe score by layer")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


def probe_sweep(model, data, labels, sites="blocks.*.hook_resid_post", estimator=None, cv=5, *,
                positions="last", scoring=None, control_types=None, random_state=0, batch_size=32,
                progress=None):
    """A probe per site, with cross-validation and a control task, from one extraction.

    data: texts or token arrays (see mechscope.extract); labels: one per prompt.
    sites: names or patterns; all are extracted in one pass over the data.
    estimator: a scikit-learn estimator (default LogisticRegression(max_iter=1000));
        cloned for every site and fold.
    cv: folds (int) or a scikit-learn splitter; every site uses the same splits.
    positions: where to read each prompt; one position per prompt ("last", an int, or
        a callable returning one position) or a fixed number of them (features side by side).
    scoring: a scikit-learn scorer name (default: the estimator's own score, accuracy
        for a classifier).
    control_types: the control task (Hewitt & Liang 2019) gives every type a random
        label drawn from the labels' distribution and trains the same probe on it:
        one type per prompt by default (a random-label control), or the type of each
        prompt (e.g. the token at the probed position), so that equal types share a label.

    Returns a ProbeSweep.
    """
    _sklearn()
    from sklearn.base import clone, is_classifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import check_scoring
    from sklearn.model_selection import check_cv

    estimator = LogisticRegression(max_iter=1000) if estimator is None else estimator
    if not hasattr(estimator, "fit"):
        raise TypeError(f"estimator: expected a scikit-learn estimator, got {type(estimator).__name__}")
    items, total = _items(data)
    if total is None:
        items = list(items)  # the features of every prompt are held in memory for the probes
        total = len(items)
    if total == 0:
        raise ValueError("data: empty (no prompts)")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != total:
        raise ValueError(f"labels: expected one label per prompt ({total}), got shape {list(y.shape)}")
    if isinstance(positions, str) and positions == "all":
        raise ValueError("positions: a probe reads a fixed number of positions per prompt; 'all' gives "
                         "prompts of different lengths different numbers")
    _check_positions(positions)
    if control_types is None:
        types = np.arange(total)
    else:
        types = np.asarray(control_types)
        if types.ndim != 1 or len(types) != total:
            raise ValueError(f"control_types: expected one type per prompt ({total}), got shape {list(types.shape)}")
    splitter = check_cv(cv, y, classifier=is_classifier(estimator))
    scorer = check_scoring(estimator, scoring=scoring)
    rng = np.random.default_rng(random_state)
    kinds, type_index = np.unique(types, return_inverse=True)
    y_control = rng.choice(y, size=len(kinds), replace=True)[type_index]

    acts = extract(model, items, sites, positions=positions, batch_size=batch_size, progress=progress)
    counts = np.bincount(acts.prompt, minlength=total)
    if not (counts == counts[0]).all() or counts[0] == 0:
        raise ValueError("positions: every prompt must give the same number of positions (at least one) "
                         f"for a probe; they gave between {counts.min()} and {counts.max()}")
    features = {s: np.asarray(acts[s]).reshape(total, -1) for s in acts}
    first = features[acts.sites[0]]
    splits = list(splitter.split(first, y))

    scores = np.zeros((len(acts.sites), len(splits)))
    control = np.zeros_like(scores)
    probes = {}
    for i, site in enumerate(acts.sites):
        X = features[site]
        for f, (train, test) in enumerate(splits):
            fitted = clone(estimator).fit(X[train], y[train])
            scores[i, f] = scorer(fitted, X[test], y[test])
            fitted = clone(estimator).fit(X[train], y_control[train])
            control[i, f] = scorer(fitted, X[test], y_control[test])
        probes[site] = clone(estimator).fit(X, y)
    name = scoring if isinstance(scoring, str) else ("accuracy" if is_classifier(estimator) else "score")
    return ProbeSweep(list(acts.sites), scores, control, probes, name)


# ---- from a probe to an intervention ----------------------------------------------------------

def probe_directions(probe):
    """The directions a fitted linear probe reads, in the activation space: its coef_
    rows [k, d] (k = 1 for a binary or a single-output probe, one per class otherwise),
    each of unit length. A Pipeline whose last step is linear and whose other steps
    are StandardScaler is mapped back through the scaling."""
    scale = None
    if hasattr(probe, "steps"):
        *head, (_, last) = probe.steps
        for _, step in head:
            if step is None or step == "passthrough":
                continue
            if type(step).__name__ != "StandardScaler":
                raise TypeError(f"probe: cannot map directions back through a {type(step).__name__} step "
                                "(only StandardScaler)")
            if getattr(step, "scale_", None) is not None:
                scale = step.scale_ if scale is None else scale * step.scale_
        probe = last
    coef = getattr(probe, "coef_", None)
    if coef is None:
        raise TypeError(f"probe: expected a fitted linear estimator (with coef_), got {type(probe).__name__}")
    w = np.atleast_2d(np.asarray(coef, np.float64))
    if scale is not None:
        w = w / scale  # w . (x - mean) / scale = (w / scale) . x + const
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("probe: a direction is zero (the probe reads nothing)")
    return (w / norms).astype(np.float32)


def _direction(probe_or_direction, direction_index):
    if isinstance(probe_or_direction, np.ndarray) or isinstance(probe_or_direction, (list, tuple)):
        v = np.asarray(probe_or_direction, np.float64).reshape(-1)
        n = np.linalg.norm(v)
        if not np.isfinite(n) or n == 0:
            raise ValueError("direction: expected a finite non-zero vector")
        return (v / n).astype(np.float32)
    dirs = probe_directions(probe_or_direction)
    if not 0 <= direction_index < len(dirs):
        raise ValueError(f"direction_index: the probe has {len(dirs)} directions, got {direction_index}")
    return dirs[direction_index]


def steering(probe, site, scale=1.0, pos=None, direction_index=0):
    """Add(site, scale * unit direction of the probe): steering along what the probe reads.
    probe: a fitted linear probe, or a direction vector; direction_index: which row of a
    multi-class probe's coef_ (the class's own direction)."""
    return Add(site, vector=_direction(probe, direction_index), scale=scale, pos=pos)


def subspace_patch(probe, site, source, pos=None):
    """SubspacePatch(site) on the span of the probe's directions (orthonormalised): the
    activation's coordinates in that span are taken from the source run, the rest kept.
    source: as for Patch (a cache or RunResult of the source prompts)."""
    w = probe_directions(probe) if not isinstance(probe, np.ndarray) else np.atleast_2d(probe)
    q, r = np.linalg.qr(np.asarray(w, np.float64).T)
    keep = np.abs(np.diag(r)) > 1e-6 * np.abs(np.diag(r)).max()  # independent directions only
    return SubspacePatch(site, basis=q[:, keep].astype(np.float32), source=source, pos=pos)


@dataclass
class CausalEffect:
    """metric(steered by scale) - metric(unsteered), along the probe's direction and
    along random unit directions (the baseline a used direction must beat)."""
    scales: np.ndarray
    effect: np.ndarray          # [scales]
    random_effects: np.ndarray  # [n_random, scales]
    base: float

    @property
    def random_mean(self):
        return self.random_effects.mean(axis=0)

    @property
    def random_std(self):
        return self.random_effects.std(axis=0)

    @property
    def z(self):
        """How many random-direction standard deviations the probe's effect is from their mean."""
        return (self.effect - self.random_mean) / np.maximum(self.random_std, 1e-12)

    def plot(self, ax=None, title=None):
        from .plot import _pyplot

        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.8, 3.2))
        else:
            fig = ax.figure
        for k, r in enumerate(self.random_effects):
            ax.plot(self.scales, r, color="gray", alpha=0.35, lw=1, label="random directions" if k == 0 else None)
        ax.plot(self.scales, self.effect, marker="o", color="C3", label="probe direction")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("steering scale")
        ax.set_ylabel("change of the metric")
        ax.set_title(title or "causal effect of the probed direction")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


def causal_effect(model, tokens, probe, site, metric, scales=(-8, -4, -2, 0, 2, 4, 8), *, pos=None,
                  attention_mask=None, direction_index=0, n_random=10, random_state=0):
    """The change of a metric when the activation at site (positions pos) is moved along
    the probe's direction by each scale, and the same along n_random random unit
    directions: a direction the model uses moves the metric more than random ones.

    metric: a mechscope metric (LogitDiff, LogProb, ...), evaluated on the whole batch."""
    from .metrics import Metric

    if not isinstance(metric, Metric):
        raise TypeError(f"metric: expected a mechscope metric (e.g. ms.metrics.LogitDiff), got {type(metric).__name__}")
    scales = np.atleast_1d(np.asarray(scales, np.float64))
    if scales.ndim != 1 or scales.size == 0 or not np.isfinite(scales).all():
        raise ValueError("scales: expected a non-empty list of finite numbers")
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise ValueError(f"n_random: expected an int >= 0, got {n_random!r}")
    direction = _direction(probe, direction_index)
    from . import sites as site_names

    _, _, suffix = site_names.parse(site, model.n_layers)
    width = site_names.shape(suffix, model._shape_cfg, 1, 1)[2:]
    if int(np.prod(width)) != direction.size:
        raise ValueError(f"probe: its directions have {direction.size} dimensions, site {site!r} has {list(width)}")
    base = metric.evaluate(model, tokens, attention_mask)
    rng = np.random.default_rng(random_state)

    def effects(v):
        v = v.reshape(width)
        return np.array([metric.evaluate(model, tokens, attention_mask,
                                         [Add(site, vector=v, scale=s, pos=pos)]) - base for s in scales])
    random_dirs = rng.standard_normal((n_random, direction.size))
    random_dirs /= np.linalg.norm(random_dirs, axis=1, keepdims=True)
    return CausalEffect(scales, effects(direction),
                        np.array([effects(r.astype(np.float32)) for r in random_dirs]).reshape(n_random, scales.size),
                        float(base))
