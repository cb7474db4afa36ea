"""Gradients of a scalar of the forward pass, computed by the C core's backward pass.

The scalar is a metric summed over the batch (each row's site gradients are that
row's own d metric / d site) or the mean next-token cross-entropy. Gradients come
back for sites (named and shaped like the cache of model.run) and, on request, for
the weights (HuggingFace names and shapes). Interventions are honoured: this is the
gradient of the intervened run."""
from dataclasses import dataclass, field

import numpy as np

from . import _dtypes, architectures, sites as _sites
from ._progress import progress_bar
from ._runtime import _core, format_bytes, get_memory_budget
from .interventions import cache_action
from .metrics import Metric, Recovery, last_positions


@dataclass
class Gradients:
    """What model.grad returns.

    value: the differentiated scalar; metric: each row's metric [batch] (None without
    one); seeds: each row's sum of the seeds' read-outs [batch] (None without seeds);
    sites / g[site]: d value / d site, shaped like the site's cache entry;
    activations: the requested sites' forward values (the intervened run's cache);
    weights: HuggingFace parameter name -> d value / d parameter."""
    value: float = 0.0
    metric: np.ndarray = None
    seeds: np.ndarray = None
    sites: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    # the full buffers behind the arrays above, for a later call's out= (see grad)
    _buffers: dict = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, site):
        if site not in self.sites:
            raise KeyError(f"{site!r}: no gradient was asked for this site (asked: {sorted(self.sites)})")
        return self.sites[site]

    def __repr__(self):
        return (f"Gradients(value={self.value:.6g}, sites=[{len(self.sites)}], "
                f"weights=[{len(self.weights)}])")


def _weight_names(model, weights):
    """weights argument -> {name to return: HF name without the model prefix} (possibly
    empty); names given in a list come back as given (with or without 'transformer.')."""
    every = list(architectures.hf_shapes(model.arch))
    if weights is False or weights is None:
        return {}
    if weights is True:
        return {n: n for n in every}
    if isinstance(weights, str):
        weights = [weights]
    try:
        names = list(weights)
    except TypeError:
        raise TypeError("weights: expected False, True or a list of HuggingFace parameter names") from None
    known = set(every)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"weights: parameter names are strings, got {type(n).__name__}")
        stripped = architectures.strip_prefix(n, model.family)
        if stripped not in known:
            raise ValueError(f"weights: {n!r} is not a parameter of this model (e.g. {every[0]!r}, {every[-1]!r})")
    return {n: architectures.strip_prefix(n, model.family) for n in names}


def _float32_core(model):
    """The core that takes the gradient: the model's own, or for a model that keeps
    2-byte weight matrices a float32 twin holding them widened exactly (made at the
    first gradient and kept, so that repeated gradients do not widen again). The
    backward pass reads float32 weights; the twin's forward pass gives the same
    activations as the 2-byte model's, whose products widen the same numbers."""
    if model.dtype == "float32":
        return model._core
    twin = model._grad_core
    if twin is None:
        twin = _core.Model(architectures.core_config(model.arch),
                           {k: _dtypes.to_float32(v) for k, v in model._core_weights.items()})
        model._grad_core = twin
    return twin


def _reused(out, model, key):
    """out= of grad: the buffers of an earlier result for the same request, or None."""
    if out is None:
        return None
    if not isinstance(out, Gradients):
        raise TypeError(f"out: expected the Gradients of an earlier model.grad call, got {type(out).__name__}")
    if out._buffers.get("key") != key or out._buffers.get("model") is not model:
        raise ValueError("out: it holds the gradients of a different request; out= takes the result of an "
                         "earlier call on the same model with the same batch shape (rows of sources "
                         "included), sites and weights")
    return out._buffers


def grad(model, tokens, metric, *, sites=(), weights=False, interventions=None, attention_mask=None,
         progress=None, hooks=None, out=None, seeds=None, _start=None):
    """The gradient of a scalar of one (optionally intervened) forward pass; see Model.grad.

    _start: (block, resid_pre) runs the blocks from `block` on only, with resid_pre
    [batch, pos, d_model] as their hook_resid_pre there: the same run when resid_pre is
    what the tokens give, for callers that repeat runs whose earlier blocks never change
    (DAS's base inputs). The sites must be at that block or later; no weights; no Source
    rows."""
    if hooks is not None:
        raise ValueError("hooks: a gradient run cannot call Python hooks (what a hook does cannot be "
                         "differentiated); express the change as interventions")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    seeds = _check_seeds(model, seeds, B, T)
    if metric is None and not seeds:
        raise ValueError("metric: give a metric, 'cross_entropy', or seeds= (a read-out of a site to differentiate)")
    cross_entropy = isinstance(metric, str) and metric == "cross_entropy"
    if isinstance(metric, str) and not cross_entropy:
        raise ValueError(f"metric: unknown name {metric!r}; the named scalar is 'cross_entropy', or give a "
                         "metric object (ms.metrics.LogitDiff, LogProb, Prob, KL)")
    if isinstance(metric, Recovery):
        raise TypeError("metric: Recovery is an affine function of its metric's batch mean; differentiate "
                        "the metric itself (its gradient divided by clean - corrupted is Recovery's)")
    if metric is not None and not cross_entropy and not isinstance(metric, Metric):
        raise TypeError("metric: expected a mechscope metric (LogitDiff, LogProb, Prob, KL) or "
                        f"'cross_entropy', got {metric!r}")
    names = _sites.resolve(sites, model, "sites")
    wanted = _weight_names(model, weights)
    interventions = model._check_interventions(interventions)
    full_tokens, full_mask, actions = model._plan(tokens, mask, interventions)
    R = full_tokens.shape[0]
    start_block, start_resid = -1, None
    if _start is not None:
        start_block, start_resid = int(_start[0]), np.ascontiguousarray(_start[1], np.float32)
        if R != B:
            raise ValueError("_start: a run that starts at a block cannot read Source rows (compute the "
                             "source values first and write them with Add or Set)")

    if metric is None or cross_entropy:
        args = {"metric": 0, "pos": None, "correct": None, "wrong": None, "ref_logprob": None}
    if cross_entropy:
        real = np.ones((B, T), bool) if mask is None else mask.astype(bool)
        if not (real[:, :-1] & real[:, 1:]).any():
            raise ValueError("metric: 'cross_entropy' needs a row with at least two real tokens (a token "
                             "and the next one it predicts)")
    elif metric is not None:
        args = metric.core_args(model, B, T, mask)
        if R > B:  # the Sources' rows: the metric does not read them, but the core wants a value per row
            args["pos"] = np.concatenate([args["pos"], last_positions(None if full_mask is None else full_mask[B:],
                                                                      R - B, T)])
            for key in ("correct", "wrong", "ref_logprob"):
                if args[key] is not None:
                    args[key] = np.concatenate([args[key], np.repeat(args[key][:1], R - B, axis=0)])
    if not seeds:
        _check_reach(model, names, interventions)
    elif metric is None:
        _check_after_seeds(model, names, seeds)

    shapes = {n: _sites.shape(_sites.parse(n, model)[2], model._shape_cfg, R, T) for n in names}
    core_names = {}
    if wanted:
        core_names = {k: v.shape for k, v in model._core_weights.items() if not k.startswith("rope_inv_freq")}
    out_bytes = 4 * (2 * sum(int(np.prod(s)) for s in shapes.values()) +
                     sum(int(np.prod(s)) for s in core_names.values()))
    work = model._core.grad_workspace_bytes(full_mask if full_mask is not None else np.ones((R, T), np.int32))
    widened = 0 if model.dtype == "float32" or model._grad_core is not None else \
        4 * sum(int(np.prod(v.shape)) for v in model._core_weights.values())
    budget = get_memory_budget()
    if out_bytes + work + widened > budget:
        copy = f", a float32 copy of the 2-byte weights {format_bytes(widened)}" if widened else ""
        raise ValueError(f"grad: this gradient run needs {format_bytes(out_bytes + work + widened)} (outputs "
                         f"{format_bytes(out_bytes)}{copy}), over the memory budget of {format_bytes(budget)}; "
                         "use a smaller batch, fewer sites, or raise it with mechscope.set_memory_budget")
    core = _float32_core(model)

    key = (B, tuple((n, shapes[n]) for n in names), tuple(wanted.items()))
    kept = _reused(out, model, key)
    result = Gradients() if out is None else out
    grad_sites, site_buffers = [], {}
    for name in names:
        code, layer, _ = _sites.parse(name, model)
        if kept:
            act, g = kept["sites"][name]
        else:
            act, g = np.empty(shapes[name], np.float32), np.empty(shapes[name], np.float32)
        site_buffers[name] = (act, g)
        result.activations[name] = act[:B]
        result.sites[name] = g[:B]
        actions.append(cache_action(code, layer, act))
        grad_sites.append((code, layer, g))
    # the seeds' sites, cached too: the scalar adds their read-outs of the values
    seed_values, seed_args = {}, []
    for name, value in seeds.items():
        code, layer, _ = _sites.parse(name, model)
        act = site_buffers[name][0] if name in site_buffers else np.empty((R,) + value.shape[1:], np.float32)
        if name not in site_buffers:
            actions.append(cache_action(code, layer, act))
        seed_values[name] = act
        full = value if R == B else np.concatenate([value, np.zeros((R - B,) + value.shape[1:], np.float32)])
        seed_args.append((code, layer, full))
    core_grads = None
    if wanted and kept:
        core_grads = kept["core"]  # the core zeroes them (with every thread), then adds each contribution
    elif wanted:
        core_grads = {k: np.empty(s, np.float32) for k, s in core_names.items()}
    result._buffers = {"key": key, "model": model, "sites": site_buffers, "core": core_grads}

    with progress_bar(progress, "grad", "pass", total=1) as bar:
        value, per_row = core.grad(full_tokens, full_mask, actions, B, args["metric"], args["pos"],
                                          args["correct"], args["wrong"], args["ref_logprob"], int(cross_entropy),
                                          grad_sites, core_grads, start_block, start_resid, seed_args or None)
        bar.update(1)
    result.value = float(value)
    result.metric = None if metric is None else per_row
    result.seeds = None
    if seeds:  # each row's read-outs, at its real tokens
        real = np.ones((B, T), np.float64) if mask is None else (np.asarray(mask) != 0).astype(np.float64)
        read = sum(np.einsum("btw,btw,bt->b", seed_values[name][:B].reshape(B, T, -1).astype(np.float64),
                             seed.reshape(B, T, -1), real) for name, seed in seeds.items())
        result.seeds = read.astype(np.float32)
        result.value += float(read.sum())
    if wanted:
        hf = architectures.hf_gradients(model.arch, core_grads)
        for n, k in wanted.items():
            if kept and not np.shares_memory(result.weights[n], hf[k]):
                np.copyto(result.weights[n], hf[k])  # a reordered or summed copy: into the kept array
            else:
                result.weights[n] = np.ascontiguousarray(hf[k], np.float32)
    return result


def _check_seeds(model, seeds, B, T):
    """seeds= of grad -> {site: float32 array shaped like the site's cache entry [B, T, ...]}"""
    if seeds is None:
        return {}
    if not isinstance(seeds, dict):
        raise TypeError(f"seeds: expected a dict {{site: array shaped like the site}}, got {type(seeds).__name__}")
    checked = {}
    for name, value in seeds.items():
        _, _, suffix = _sites.parse(name, model)
        if suffix in _sites.ATTENTION:
            raise ValueError(f"seeds: {name!r} is an attention pattern; seeds read per-token sites")
        shape = _sites.shape(suffix, model._shape_cfg, B, T)
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.shape != tuple(shape):
            raise ValueError(f"seeds[{name!r}]: expected shape {list(shape)} (the site's values for these tokens), "
                             f"got {list(value.shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"seeds[{name!r}]: contains NaN or infinity")
        checked[name] = value
    return checked


def _check_after_seeds(model, names, seeds):
    """With the seeds as the whole scalar, a site after every seed's site (in the forward
    order) cannot change it: its gradient would be 0 everywhere"""
    order = {n: i for i, n in enumerate(_sites.all_site_names(model))}
    last = max(order[n] for n in seeds)
    late = [n for n in names if order[n] > last]
    if late:
        raise ValueError(f"sites: {late[0]!r} comes after every seed's site, so the seeds cannot depend on it (its "
                         "gradient would be 0 everywhere); ask for sites before them, or add a metric")


_OVERWRITES = ("Set", "Zero", "Patch", "MeanAblate")  # interventions whose written values are constants
_STREAM = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
_QK = ("attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores")
# ln1's output feeds only the attention, ln2's only the MLP
_ATTN = _QK + ("attn.hook_v", "attn.hook_pattern", "ln1.hook_scale", "ln1.hook_normalized")
_MLP = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_expert_weights", "ln2.hook_scale", "ln2.hook_normalized")
# a site overwritten whole -> the sites of the same block that reach the scalar only through it
_ONLY_THROUGH = {
    "attn.hook_attn_scores": ("attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k"),
    "attn.hook_pattern": _QK,
    "attn.hook_z": _ATTN,
    "hook_attn_out": _ATTN + ("attn.hook_z",),
    "mlp.hook_post": _MLP,
    "hook_mlp_out": _MLP + ("mlp.hook_post",),
}


def _check_reach(model, names, interventions):
    """Refuse sites the scalar cannot depend on, before any work: a site whose every
    path to the scalar goes through a site an intervention overwrites whole (every
    row, position and dimension) with constants has a gradient of 0 everywhere, which
    is never what the user meant to ask for. Overwriting the residual stream cuts off
    every earlier site; overwriting e.g. a block's pattern cuts off its queries and keys."""
    order = {n: i for i, n in enumerate(_sites.all_site_names(model))}
    for iv in interventions:
        if (type(iv).__name__ not in _OVERWRITES or iv.site not in order or iv.pos is not None
                or iv.index is not None or iv.row is not None or getattr(iv, "head", None) is not None
                or getattr(iv, "key_pos", None) is not None):
            continue
        cut = []
        if iv.site.endswith(_STREAM):
            cut = [n for n in names if order[n] < order[iv.site]]
        elif iv.site.startswith("blocks."):
            block = ".".join(iv.site.split(".")[:2]) + "."
            suffix = iv.site[len(block):]
            cut = [n for n in names if n.startswith(block) and n[len(block):] in _ONLY_THROUGH.get(suffix, ())]
        if cut:
            raise ValueError(f"sites: {cut[0]!r} cannot change the metric: {iv!r} overwrites {iv.site!r} whole "
                             "with constants, and every path from it to the metric goes through that site, so "
                             "its gradient is 0 everywhere; ask for other sites, or overwrite only part of it")
