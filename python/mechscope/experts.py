"""Mixtures of experts (Mixtral-style blocks): how the router sends tokens to the
experts, what removing an expert does, and how independently the experts act.

    routes = ms.experts.routing(model, tokens)
    routes.weights             # [layers, batch, pos, experts] the router's probabilities
    routes.chosen              # [layers, batch, pos, experts] each token's chosen experts
    routes.load                # [layers, experts] share of the real tokens sent to each expert
    routes.coactivation(1)     # [experts, experts] P(i and j chosen) / (P(i) P(j)) at layer 1
    routes.mutual_information(0, 1)  # bits shared by the choices of two layers

    effects = ms.experts.ablate(model, tokens, metric)    # [layers, experts]
    dropped = ms.experts.ablate(model, tokens, metric, reroute=False)  # outputs dropped, routing kept
    attrs = ms.experts.logit_attribution(model, tokens, answer, incorrect)  # [layers, experts, batch]
    pairs = ms.experts.interaction(model, tokens, metric, layer=1)
    pairs.interaction          # [experts, experts]; 0 where two removals add up

The router's probabilities are the site ``blocks.L.mlp.hook_expert_weights`` (its
softmax over the experts, [batch, pos, experts]); each token goes to its
``experts_per_token`` most probable experts (the lower index first among equal ones),
weighted by their probabilities renormalised to sum 1. Any intervention there changes
the routing: ``ms.Zero(site, index=e)`` removes expert e (every token that chose it goes
to its next most probable expert instead), ``ms.Patch(site, clean.cache)`` routes each
token as the clean run did, ``ms.Set`` routes by hand.

Removing an expert is what ``ablate`` and ``interaction`` do, all removals in one
patching sweep. ``contributions`` and ``logit_attribution`` split a block's output into
what each expert wrote (its routing weight times its output), directly onto the logits;
a shared expert (Qwen2-MoE's, which every token runs, scaled by a sigmoid gate of its
own) is one more part after the routed experts there, and is not removed by ``ablate``.
The interaction of two experts i and j is
m(without i and j) - m(without i) - m(without j) + m(all): zero when their effects on
the metric add up, as they would if the experts worked independently.
"""
from dataclasses import dataclass

import numpy as np

from . import _dtypes
from . import metrics as _metrics
from ._runtime import _core
from .interventions import Patch

__all__ = ["routing", "Routing", "ablate", "interaction", "Interaction", "contributions", "logit_attribution"]

_SITE = "blocks.{}.mlp.hook_expert_weights"


def _check_moe(model):
    if not getattr(model, "n_experts", 0):
        raise ValueError("model: not a mixture of experts (its blocks have one MLP; see Model.n_experts)")


def chosen_experts(weights, k):
    """[..., experts] probabilities -> bool [..., experts], True for the k most
    probable of each token (the lower index first among equal ones), as the core routes."""
    order = np.argsort(-np.asarray(weights), axis=-1, kind="stable")[..., :k]
    out = np.zeros(np.shape(weights), bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out


@dataclass
class Routing:
    """The routing of one run: router probabilities and chosen experts of every layer."""
    weights: np.ndarray  # [layers, batch, pos, experts] float32
    chosen: np.ndarray   # [layers, batch, pos, experts] bool, False at padding
    mask: np.ndarray     # [batch, pos] 1 for real tokens

    @property
    def load(self):
        """[layers, experts]: the share of real tokens that chose each expert."""
        real = self.mask.astype(bool)
        return self.chosen[:, real].mean(1)

    def _layer(self, layer):
        n = self.chosen.shape[0]
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
            raise ValueError(f"layer: expected an int in [0, {n}), got {layer!r}")
        return self.chosen[layer][self.mask.astype(bool)]  # [tokens, experts]

    def coactivation(self, layer):
        """[experts, experts] lift of choosing experts i and j for the same token:
        P(i and j) / (P(i) P(j)) over the real tokens; 1 where the choices are
        independent, NaN on the diagonal and for an expert no token chose."""
        c = self._layer(layer).astype(np.float64)
        joint = c.T @ c / len(c)
        p = c.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = joint / np.outer(p, p)
        lift[~np.isfinite(lift)] = np.nan
        np.fill_diagonal(lift, np.nan)
        return lift

    def mutual_information(self, layer_a, layer_b):
        """Bits of information the set of experts a token chose at one layer gives
        about the set it chose at another, over the real tokens (the plug-in estimate
        from the counts: 0 for independent choices, biased upwards on few tokens)."""
        bits = 1 << np.arange(self.chosen.shape[-1], dtype=np.int64)
        a = self._layer(layer_a) @ bits
        b = self._layer(layer_b) @ bits
        _, ia = np.unique(a, return_inverse=True)
        _, ib = np.unique(b, return_inverse=True)
        joint = np.zeros((ia.max() + 1, ib.max() + 1))
        np.add.at(joint, (ia, ib), 1.0)
        joint /= joint.sum()
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())


def routing(model, tokens, *, attention_mask=None, interventions=None):
    """The router's probabilities and each token's chosen experts at every layer, from
    one run (under ``interventions`` if given). Returns a Routing."""
    _check_moe(model)
    tokens, mask = model._check_tokens(tokens, attention_mask)
    if mask is None:
        mask = np.ones(tokens.shape, np.int32)
    names = [_SITE.format(layer) for layer in range(model.n_layers)]
    run = model.run(tokens, attention_mask=mask, cache=names, logits=None, interventions=interventions)
    weights = np.stack([run.cache[n] for n in names])
    chosen = chosen_experts(weights, model.experts_per_token) & mask.astype(bool)[None, :, :, None]
    return Routing(weights=weights, chosen=chosen, mask=mask)


def _removal(model, layer, experts, B, T):
    """the patch that removes ``experts`` of ``layer`` from every token's routing"""
    return Patch(_SITE.format(layer), np.zeros((B, T, model.n_experts), np.float32), index=list(experts))


def _check_metric(metric):
    if not isinstance(metric, _metrics.Metric):
        raise TypeError(f"metric: expected a mechscope metric (e.g. ms.metrics.LogitDiff), "
                        f"got {type(metric).__name__}")


def _layers(model, layers):
    if layers is None:
        return list(range(model.n_layers))
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < model.n_layers:
            raise ValueError(f"layers: expected ints in [0, {model.n_layers}), got {layer!r}")
    return [int(layer) for layer in layers]


def ablate(model, tokens, metric, *, layers=None, reroute=True, attention_mask=None, interventions=None,
           per_row=False, progress=None):
    """The metric with each expert of each layer removed, as one patching sweep.

    reroute: True removes the expert from the routing (its router probability set to
        0, so each of its tokens goes to its next most probable expert, the weights
        renormalised); False drops its output only: the block writes what it wrote
        minus that expert's weighted output (``contributions``), the other experts'
        weights unchanged.
    layers: the layers to sweep (None: all).
    interventions: applied in every run, the unablated one too.
    Returns [len(layers), n_experts] (per_row=True: [len(layers), n_experts, batch]);
    subtract the unablated metric for effects.
    """
    _check_moe(model)
    _check_metric(metric)
    from .patching import sweep

    layers = _layers(model, layers)
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    if reroute:
        patches = [_removal(model, layer, [e], B, T) for layer in layers for e in range(model.n_experts)]
    else:
        patches = _drops(model, tokens, mask, layers, interventions)
    values = sweep(model, tokens, patches, metric, attention_mask=mask, interventions=interventions,
                   per_row=per_row, progress=progress)
    return np.asarray(values).reshape((len(layers), model.n_experts) + np.shape(values)[1:])


def _drops(model, tokens, mask, layers, interventions):
    """For each layer and expert, the patch of hook_mlp_out that drops the expert's
    weighted output from the (intervened) base run's block output. Nothing before the
    block changes under it, so its inputs and routing are the base run's."""
    names = [f"blocks.{layer}.{s}" for layer in layers
             for s in ("ln2.hook_normalized", "mlp.hook_expert_weights", "hook_mlp_out")]
    cache = model.run(tokens, attention_mask=mask, cache=names, logits=None, interventions=interventions).cache
    B, T = tokens.shape
    patches = []
    for layer in layers:
        block = f"blocks.{layer}."
        parts = _block_contributions(model, layer, cache[block + "ln2.hook_normalized"].reshape(B * T, -1),
                                     cache[block + "mlp.hook_expert_weights"].reshape(B * T, -1))
        out = cache[block + "hook_mlp_out"]
        patches += [Patch(block + "hook_mlp_out", out - parts[:, e].reshape(out.shape))
                    for e in range(model.n_experts)]
    return patches


@dataclass
class Interaction:
    """Removing experts one and two at a time; units are (layer, expert) pairs."""
    units: list
    base: float               # the metric with every expert in place
    single: np.ndarray        # [units] metric without unit i, minus base
    pair: np.ndarray          # [units, units] metric without units i and j, minus base (single on the diagonal)

    @property
    def interaction(self):
        """[units, units]: pair - single_i - single_j (0 on the diagonal); 0 where the
        two removals' effects add up."""
        out = self.pair - self.single[:, None] - self.single[None, :]
        np.fill_diagonal(out, 0.0)
        return out

    def plot(self, ax=None, title=None, cmap="RdBu"):
        """Heatmap of the interactions, with each unit's own effect on the diagonal."""
        from .plot import _pyplot

        values = self.interaction
        np.fill_diagonal(values, self.single)
        plt = _pyplot()
        if ax is None:
            size = 1.5 + 0.35 * len(self.units)
            fig, ax = plt.subplots(figsize=(size + 1.0, size), constrained_layout=True)
        else:
            fig = ax.figure
        span = max(float(np.abs(values).max()), 1e-12)
        image = ax.imshow(values, cmap=cmap, vmin=-span, vmax=span, interpolation="nearest")
        labels = [f"L{layer}E{e}" for layer, e in self.units]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_title(title or "removing two experts: interaction (diagonal: one expert's effect)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="metric")
        return fig


def interaction(model, tokens, metric, layer=None, *, units=None, attention_mask=None, interventions=None,
                progress=None):
    """How independently experts act on a metric: the metric with each expert removed
    from the routing (rerouted, as ``ablate``), and with each pair removed together, in
    one patching sweep.

    layer: every expert of this layer; or units: a list of (layer, expert) pairs (experts
        of different layers too).
    Returns an Interaction (single, pair, interaction, plot), metrics averaged over the batch.
    """
    _check_moe(model)
    _check_metric(metric)
    from .patching import sweep

    if (layer is None) == (units is None):
        raise ValueError("give layer (all its experts) or units ((layer, expert) pairs), not both")
    if units is None:
        units = [(_layers(model, layer)[0], e) for e in range(model.n_experts)]
    units = [tuple(u) for u in units]
    for u in units:
        if len(u) != 2 or not 0 <= u[0] < model.n_layers or not 0 <= u[1] < model.n_experts:
            raise ValueError(f"units: expected (layer, expert) pairs within [0, {model.n_layers}) x "
                             f"[0, {model.n_experts}), got {u!r}")
    if len(set(units)) != len(units) or len(units) < 2:
        raise ValueError("units: expected at least two different (layer, expert) pairs")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape

    def removal(group):
        by_layer = {}
        for layer_, e in group:
            by_layer.setdefault(layer_, []).append(e)
        return [_removal(model, layer_, es, B, T) for layer_, es in by_layer.items()]

    n = len(units)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    patches = [removal([u]) for u in units] + [removal([units[i], units[j]]) for i, j in pairs]
    values = np.asarray(sweep(model, tokens, patches, metric, attention_mask=mask, interventions=interventions,
                              progress=progress), np.float64)
    base = float(metric.evaluate(model, tokens, mask, interventions))
    single = values[:n] - base
    pair = np.diag(single)
    for (i, j), v in zip(pairs, values[n:]):
        pair[i, j] = pair[j, i] = v - base
    return Interaction(units=units, base=base, single=single, pair=pair)


# ---- what each expert writes --------------------------------------------------------------

def _expert_weights(model, probabilities):
    """[..., experts] router probabilities -> each expert's weight: the chosen experts'
    probabilities, renormalised to sum 1 where the model does (Mixtral; Qwen3-MoE's
    norm_topk_prob; 0 everywhere where they sum to 0), 0 for the others."""
    chosen = chosen_experts(probabilities, model.experts_per_token)
    kept = np.where(chosen, probabilities, 0.0).astype(np.float32)
    if not model.arch.get("expert_renormalize", 1):
        return kept
    total = kept.sum(-1, keepdims=True)
    return np.divide(kept, total, out=np.zeros_like(kept), where=total != 0)


def _n_parts(model):
    """the routed experts, and the shared expert after them if the model has one"""
    return model.n_experts + bool(model.arch.get("d_shared"))


def _block_contributions(model, layer, normalized, probabilities):
    """What each expert of ``layer`` writes for each token: [tokens, parts, d_model]
    (the experts, then a shared expert's sigmoid(x . gate) * its output), from ln2's
    hook_normalized [tokens, d_model] and the router's probabilities [tokens, experts];
    summed over the parts, the block's hook_mlp_out."""
    w = model._core_weights
    x = normalized * _dtypes.to_float32(w[f"blocks.{layer}.ln2.w"])  # RMSNorm: the weight comes after the site
    if f"blocks.{layer}.ln2.b" in w:
        x = x + _dtypes.to_float32(w[f"blocks.{layer}.ln2.b"])
    E, F, C = model.n_experts, model.d_mlp, model.d_model
    gate_up = _dtypes.to_float32(w[f"blocks.{layer}.mlp.w_in"]).reshape(E, 2 * F, C)
    down = _dtypes.to_float32(w[f"blocks.{layer}.mlp.w_out"]).reshape(E, C, F)
    weights = _expert_weights(model, probabilities)
    out = np.zeros((len(x), _n_parts(model), C), np.float32)
    for e in range(E):
        rows = np.flatnonzero(weights[:, e])
        if rows.size:
            hidden = _core.gated_post(np.ascontiguousarray(x[rows] @ gate_up[e].T), model.arch["activation"])
            out[rows, e] = weights[rows, e, None] * (hidden @ down[e].T)
    if model.arch.get("d_shared"):
        shared = f"blocks.{layer}.mlp.shared."
        hidden = _core.gated_post(np.ascontiguousarray(x @ _dtypes.to_float32(w[shared + "w_in"]).T),
                                  model.arch["activation"])
        gate = 1.0 / (1.0 + np.exp(-(x @ _dtypes.to_float32(w[shared + "w_router"]).T)))  # [tokens, 1]
        out[:, E] = gate * (hidden @ _dtypes.to_float32(w[shared + "w_out"]).T)
    return out


def contributions(model, tokens, layer, pos=None, *, attention_mask=None, interventions=None):
    """What each expert of a layer wrote at each row's position ``pos`` (default: its
    last real token): its routing weight times its output, [batch, experts, d_model]
    (0 for experts the token did not choose; with a shared expert, [batch, experts + 1,
    d_model], its part last). The sum over the experts is the block's ``hook_mlp_out``
    there. From one run (under ``interventions``); the chosen experts' outputs are
    recomputed from ln2's output with the model's weights."""
    from . import lens

    _check_moe(model)
    layer = _layers(model, layer)[0]
    names = [f"blocks.{layer}.ln2.hook_normalized", _SITE.format(layer)]
    values = lens._run_at(model, tokens, pos, attention_mask, interventions, names)
    return _block_contributions(model, layer, values[names[0]], values[names[1]])


def logit_attribution(model, tokens, answer, incorrect=None, pos=None, *, attention_mask=None,
                      interventions=None):
    """Each expert's direct effect on the logit of ``answer`` (minus that of
    ``incorrect``) at each row's position: what it wrote, through the final norm with
    its scale held at its value in the run and the unembedding, as ``ms.lens.logit_attribution``
    does for layers and heads. [layers, experts, batch] ([layers, experts + 1, batch] with a
    shared expert, its row last); summed over a layer's experts,
    the layer's MLP row of ``ms.lens.logit_attribution``. One run."""
    from . import lens

    _check_moe(model)
    names = ([f"blocks.{layer}.ln2.hook_normalized" for layer in range(model.n_layers)]
             + [_SITE.format(layer) for layer in range(model.n_layers)] + ["ln_final.hook_scale"])
    values = lens._run_at(model, tokens, pos, attention_mask, interventions, names)
    batch = len(values["ln_final.hook_scale"])
    direction = lens._directions(model, answer, incorrect, batch)  # [batch, d_model]
    w, _, _ = lens._final_norm(model)
    read = direction * w / values["ln_final.hook_scale"]  # [batch, d_model]
    out = np.zeros((model.n_layers, _n_parts(model), batch), np.float32)
    for layer in range(model.n_layers):
        parts = _block_contributions(model, layer, values[names[layer]], values[_SITE.format(layer)])
        out[layer] = np.einsum("bec,bc->eb", parts, read)
    return out
