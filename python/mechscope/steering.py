"""Steering vectors from contrasting prompts, and their effect at every layer and
strength in one sweep.

    vector = ms.steering.vector(model, positive, negative, "blocks.6.hook_resid_pre")
    print(model.generate(prompt, 20, interventions=ms.Add("blocks.6.hook_resid_pre", vector, scale=4)))

    vectors = ms.steering.vector(model, positive, negative, "blocks.*.hook_resid_pre")  # {site: vector}
    result = ms.steering.sweep(model, tokens, vectors, metric, scales=[-4, -2, 0, 2, 4])
    result.effects            # [sites, scales]: metric(steered) - metric(unsteered)
    result.plot()

A steering vector here is the mean activation over the positive prompts minus the mean
over the negative ones, at each prompt's last token by default: with pairs of prompts
that differ only in the behaviour, this is the mean difference of contrastive
activation addition (Rimsky et al. 2024); with one pair of prompts and
``positions="all"``, the difference of activation addition (Turner et al. 2023) at
each position, averaged. Adding ``scale`` times it at a site (``ms.Add``) steers every
later computation.
"""
from dataclasses import dataclass

import numpy as np

from . import metrics as _metrics
from . import sites as _sites
from .interventions import Patch

__all__ = ["vector", "sweep", "SteeringSweep"]


def vector(model, positive, negative, site, positions="last", *, batch_size=32, progress=None):
    """Mean activation of ``positive`` minus mean activation of ``negative`` at ``site``.

    positive, negative: texts or token arrays (anything ``ms.extract`` reads); their
        counts may differ (with pairs, the mean of the pairs' differences).
    site: one site name -> an array shaped like the site at one token (d_model for the
        residual stream); a list of names or a pattern ("blocks.*.hook_resid_pre") ->
        {site: array}, all from one pass over the prompts.
    positions: as in ``ms.extract`` ("last", "all", ints, or a function of the tokens);
        the mean is over every (prompt, position) row.
    """
    from .extract import extract

    names = [site] if isinstance(site, str) else list(site)
    means = []
    for data, argument in ((positive, "positive"), (negative, "negative")):
        if isinstance(data, str):
            raise TypeError(f"{argument}: expected a list of prompts, got one string")
        acts = extract(model, data, names, positions=positions, batch_size=batch_size, progress=progress)
        if len(acts.prompt) == 0:
            raise ValueError(f"{argument}: no prompts")
        means.append({name: np.asarray(acts[name], np.float64).mean(0) for name in acts.sites})
    out = {name: (means[0][name] - means[1][name]).astype(np.float32) for name in means[0]}
    single = isinstance(site, str) and "*" not in site
    return out[site] if single else out


@dataclass
class SteeringSweep:
    """metric(with scale * vector added at the site) - metric(unsteered), for every
    site and scale."""
    sites: list
    scales: np.ndarray
    effects: np.ndarray  # [sites, scales] (or [sites, scales, batch] with per_row=True)
    base: object         # the unsteered metric (float, or [batch])

    def plot(self, ax=None, title=None, cmap="RdBu"):
        """Heatmap of the effects: sites down, scales across (the batch mean)."""
        from .plot import _pyplot

        values = self.effects if self.effects.ndim == 2 else self.effects.mean(-1)
        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(self.scales), 1.0 + 0.28 * len(self.sites)),
                                   constrained_layout=True)
        else:
            fig = ax.figure
        span = max(float(np.abs(values).max()), 1e-12)
        image = ax.imshow(values, cmap=cmap, vmin=-span, vmax=span, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(self.scales)))
        ax.set_xticklabels([f"{s:g}" for s in self.scales])
        ax.set_yticks(range(len(self.sites)))
        ax.set_yticklabels(self.sites, fontsize=7)
        ax.set_xlabel("scale")
        ax.set_title(title or "change of the metric when steering")
        fig.colorbar(image, ax=ax, shrink=0.8, label="metric - unsteered")
        return fig


def sweep(model, tokens, vectors, metric, scales=(-8, -4, -2, 2, 4, 8), *, pos=None, attention_mask=None,
          interventions=None, per_row=False, progress=None):
    """The metric with ``scale * vector`` added at each site, for every site and scale,
    as one patching sweep (``ms.Add`` at one site changes nothing before it, so each
    steered run is the unsteered run with that site's value plus the vector: a patch).

    vectors: {site: vector} (as ``vector`` returns for several sites) or (site, vector)
        pairs; each vector shaped like the site at one token.
    pos: the positions to add at (None: every position), as for ``ms.Add``.
    interventions: applied in every run, the unsteered one too.
    Returns a SteeringSweep: effects [sites, scales] (per_row=True: [sites, scales, batch]).
    """
    if not isinstance(metric, _metrics.Metric):
        raise TypeError(f"metric: expected a mechscope metric (e.g. ms.metrics.LogitDiff), got {type(metric).__name__}")
    from .patching import sweep as _sweep  # patching imports this package's modules lazily too

    pairs = list(vectors.items()) if isinstance(vectors, dict) else list(vectors)
    if not pairs:
        raise ValueError("vectors: empty")
    scales = np.atleast_1d(np.asarray(scales, np.float64))
    if scales.ndim != 1 or scales.size == 0 or not np.isfinite(scales).all():
        raise ValueError("scales: expected a non-empty list of finite numbers")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    names = []
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"vectors: expected {{site: vector}} or (site, vector) pairs, got {item!r}")
        names.append(item[0])
    for name in names:
        _, _, suffix = _sites.parse(name, model)
        if suffix in _sites.ATTENTION:
            raise ValueError(f"vectors: {name!r} is an attention site; steering adds at a site with "
                             "one value per token")
    if len(set(names)) != len(names):
        raise ValueError("vectors: a site is given twice")
    base_run = model.run(tokens, attention_mask=mask, cache=names, logits=None, interventions=interventions)
    patches = []
    for name, v in pairs:
        base_value = np.asarray(base_run.cache[name], np.float32)
        v = np.asarray(v, np.float32)
        if v.shape != base_value.shape[2:]:
            raise ValueError(f"vectors: {name!r} takes vectors of shape {list(base_value.shape[2:])}, "
                             f"got {list(v.shape)}")
        if not np.isfinite(v).all():
            raise ValueError(f"vectors: the vector of {name!r} is not finite")
        where = slice(None) if pos is None else pos
        for s in scales:
            steered = base_value.copy()
            steered[:, where] += v * np.float32(s)  # what ms.Add(name, v, scale=s, pos=pos) adds
            patches.append(Patch(name, steered, pos=pos))
    values = _sweep(model, tokens, patches, metric, attention_mask=mask, interventions=interventions,
                    per_row=per_row, progress=progress)
    base = (metric.per_row(model, tokens, mask, interventions) if per_row
            else metric.evaluate(model, tokens, mask, interventions))
    effects = np.asarray(values).reshape((len(pairs), scales.size) + np.shape(base)) - base
    return SteeringSweep(names, scales, effects, base)
