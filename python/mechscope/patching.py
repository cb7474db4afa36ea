"""Activation patching: sweeps of patches over layers, positions and heads.

Every function here has the signature of TransformerLens's ``patching`` function of
the same name (without ``get_act_patch_``) and returns the same array::

    clean = model.run(clean_tokens, cache=model.site_names)
    grid = ms.patching.resid_pre(model, corrupted_tokens, clean.cache,
                                 ms.metrics.LogitDiff(correct, wrong))   # [n_layers, pos]

For each index (layer, position, head, ...) the clean run's value is written into
the corrupted run at that index, for every prompt of the batch, and the metric of
the patched run is recorded (the batch mean for the built-in metrics). The whole
sweep is one plan executed in C: a patch at layer L and position p recomputes only
layers >= L at positions >= p, many patches share each matrix product, and patches
that cannot change anything (they write the value that is already there) are not
run at all.

Base interventions (``interventions=``) hold in every patched run. At the attention
sites the causal mask holds whatever they write (entries whose key comes after its
query stay -inf / 0), which is what lets a sweep skip positions before a patch and
still equal one explicit run per patch.

Noising, the reverse direction, is the same call with the roles swapped: the clean
tokens and the corrupted run's cache, ``resid_pre(model, clean_tokens,
corrupted.cache, metric)``.

The metric is one of ``mechscope.metrics`` (computed in C) or any Python function of
the logits [batch, pos, vocab] that returns a number; the latter runs one forward
pass per patch and is much slower.
"""
import numpy as np

from . import metrics as _metrics
from . import sites
from ._progress import progress_bar
from ._runtime import format_bytes, get_memory_budget
from .interventions import _ADD, _PROJECT, _SCALE, _SET, Intervention, Patch, Source, _full_site_value

__all__ = [
    "sweep",
    "resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every",
    "attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos",
    "attn_head_pattern_all_pos", "attn_head_all_pos_every",
    "attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos",
    "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos", "attn_head_by_pos_every",
    "path",
]


# ---------------------------------------------------------------- the engine

class _Write(Intervention):
    """One box of a site set to the same box of a full source value, as the core's
    sweep takes it: ranges (a0, na), (b0, nb), (c0, nc) over positions x columns for
    token sites, heads x queries x keys for attention sites."""

    def __init__(self, name, code, layer, a, b, c, source):
        super().__init__(name)
        self.code, self.layer, self.a, self.b, self.c, self.source = code, layer, a, b, c, source

    def core_tuple(self):
        (a0, na), (b0, nb), (c0, nc) = self.a, self.b, self.c
        return (self.code, self.layer, a0, na, b0, nb, c0, nc, self.source)

    def compile(self, model, batch, n_pos, context):
        """As an ordinary intervention (the slow path): a SET of the box, every row."""
        a, b, c = (np.arange(s, s + n, dtype=np.int32) for s, n in (self.a, self.b, self.c))
        src = self.source if self.source.shape[0] == batch else np.broadcast_to(self.source, (batch,) + self.source.shape[1:])
        if self.code in _ATTENTION_CODES:
            value = src[:, a][:, :, b][:, :, :, c]
        else:
            value = src.reshape(batch, n_pos, -1)[:, a][:, :, b]
            c = None
        return [(_SET, self.code, self.layer, -1, 0, a, b, c, np.ascontiguousarray(value), None, 0, None, 0)]


_ATTENTION_CODES = {sites.SITE_CODES[s] for s in sites.ATTENTION}


def _runs(indices):
    """Sorted unique indices -> contiguous (start, length) runs."""
    idx = np.unique(np.asarray(indices))
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r.size)) for r in np.split(idx, breaks)]


def _writes_of_patch(model, patch, batch, n_pos):
    """A mechscope.Patch -> writes covering the same entries (one per contiguous box)."""
    if not isinstance(patch, Patch):
        raise TypeError(f"patches: expected mechscope.Patch interventions, got {type(patch).__name__}")
    if isinstance(patch.source, Source):
        raise ValueError("patches: a sweep patches from a cache or an array, not from a Source run")
    if patch.row is not None:
        raise ValueError("patches: a sweep patches every row of the batch; row= is not supported here")
    code, layer, suffix, a, b, c, _ = patch._box(model, batch, n_pos)
    source = _source_array(model, patch.source, patch.site, suffix, batch, n_pos)
    writes = []
    for ra in _runs(a):
        for rb in _runs(b):
            for rc in (_runs(c) if c is not None else [(0, 0)]):
                writes.append(_Write(patch.site, code, layer, ra, rb, rc, source))
    return writes


def _source_array(model, source, name, suffix, batch, n_pos, argument="source"):
    """The full value of site `name` in a cache (dict, RunResult, TransformerLens
    ActivationCache) or an array, checked against the run's shape, as C-contiguous
    float32 [rows, ...] with rows = batch (or 1: the same for every row)."""
    value = np.asarray(_full_site_value(source, name, argument), dtype=np.float32)
    expected = sites.shape(suffix, model._shape_cfg, batch, n_pos)
    if value.shape != expected and value.shape != (1,) + expected[1:]:
        raise ValueError(f"{argument}: {name!r} has shape {list(value.shape)}, the patched run needs "
                         f"{list(expected)} (same batch and positions as its tokens)")
    return np.ascontiguousarray(value)


def _base_actions(model, interventions, batch, n_pos):
    actions = []
    for iv in model._check_interventions(interventions):
        if isinstance(getattr(iv, "source", None), Source):
            raise ValueError("interventions: a sweep's base run cannot patch from a Source run")
        actions += iv.compile(model, batch, n_pos, {})
    for act in actions:
        if act[0] not in (_SET, _ADD, _SCALE, _PROJECT):
            raise ValueError("interventions: a sweep's base run takes Set, Zero, Add, Scale, "
                             "MeanAblate, Noise and SubspacePatch interventions")
    return actions


def _run_sweep(model, tokens, mask, patches, metric, interventions, progress):
    """patches: list of lists of _Write. Returns (values [n_patches, batch], base
    [batch]) for the built-in metrics, (values [n_patches], None) for a Python one."""
    B, T = tokens.shape
    if isinstance(metric, _metrics.Metric):
        args = metric.core_args(model, B, T, mask)
        writes, ranges = [], []
        for patch in patches:
            if not patch:
                raise ValueError("patches: a patch with nothing to write")
            ranges.append((len(writes), len(patch)))
            writes += [w.core_tuple() for w in patch]
        base = _base_actions(model, interventions, B, T)
        # rows enough for tall matrix products (thousands of tokens), within the budget
        chunk = max(1 << 16, min(get_memory_budget() // 4, 256 << 20))
        _check_sweep_memory(model, tokens, mask, patches, chunk)
        with progress_bar(progress, "patching", unit="row") as bar:
            return model._core.sweep(
                tokens, mask, base, writes, np.asarray(ranges, np.int32).reshape(-1, 2),
                args["metric"], args["pos"], args["correct"], args["wrong"], args["ref_logprob"],
                chunk, bar.callback)
    if not callable(metric):
        raise TypeError("metric: expected a mechscope.metrics metric or a function of the logits")
    base = model._check_interventions(interventions)
    out = np.empty(len(patches), np.float32)
    with progress_bar(progress, "patching (Python metric)", unit="patch", total=len(patches)) as bar:
        for i, patch in enumerate(patches):
            logits = model.run(tokens, attention_mask=mask, interventions=base + list(patch)).logits
            out[i] = _one_number(metric(logits))
            bar.update(1)
    return out, None


def _one_number(value):
    """A Python metric's value for one patched run, which must be one number."""
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"metric: a Python metric must return a number, got {type(value).__name__}")
    if arr.size != 1:
        raise TypeError(f"metric: a Python metric must return one number per patched run (e.g. the batch "
                        f"mean), got an array of shape {list(arr.shape)}; for values per row use a "
                        "mechscope.metrics metric with per_row=True")
    return float(arr.reshape(()))


def _check_sweep_memory(model, tokens, mask, patches, chunk):
    """Refuse, before any work, a sweep whose fixed memory does not fit the budget: the
    base run's recorded state (residual stream, keys and values of every layer), its
    values at every patched site, and one chunk of patched rows."""
    B, T = tokens.shape
    n_tokens = B * T if mask is None else int(mask.sum())
    recorded = 3 * 4 * model.n_layers * n_tokens * model.d_model
    sites_seen = {(w.code, w.layer): w.source[0].nbytes * B for patch in patches for w in patch}
    base_run = model._core.workspace_bytes(mask if mask is not None else np.ones((B, T), np.int32), 0)
    need = recorded + sum(sites_seen.values()) + base_run + chunk
    budget = get_memory_budget()
    if need > budget:
        raise ValueError(f"tokens: this sweep needs about {format_bytes(need)} (the base run's state for "
                         f"{n_tokens} tokens and its values at the patched sites), over the memory budget of "
                         f"{format_bytes(budget)}; patch fewer prompts at once or raise it with "
                         "mechscope.set_memory_budget")


def _reduce(metric, values):
    """The metric per patch: the batch mean of the built-in metrics (normalised for
    Recovery); a Python metric's values are already one per patch."""
    return metric.reduce(values) if isinstance(metric, _metrics.Metric) else values


def sweep(model, tokens, patches, metric, *, attention_mask=None, interventions=None,
          per_row=False, progress=None):
    """Run many patches, each one intervened run of the whole batch, in one plan.

    patches: a list whose entries are a mechscope.Patch or a list of Patches applied
        together (e.g. one head's output at several layers); sources are caches or
        arrays of the run's shape.
    metric: a mechscope.metrics metric, or a function of the logits [batch, pos, vocab].
    interventions: applied in every run (the base run and every patched one), e.g.
        noise on the subject tokens; a patch at the same site overrides them.
    per_row: return [n_patches, batch] values instead of the batch mean (built-in
        metrics only; Recovery normalises each row).
    Returns a float32 array [n_patches] (or [n_patches, batch]).
    """
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    if isinstance(patches, Intervention):
        patches = [patches]
    if per_row and not isinstance(metric, _metrics.Metric):
        raise ValueError("per_row: only the built-in metrics give values per row")
    compiled = []
    for patch in patches:
        group = patch if isinstance(patch, (list, tuple)) else [patch]
        compiled.append([w for p in group for w in _writes_of_patch(model, p, B, T)])
    values, _ = _run_sweep(model, tokens, mask, compiled, metric, interventions, progress)
    return metric.rows(values) if per_row else _reduce(metric, values)


# ------------------------------------------------- TransformerLens's patching functions

def _grids(model, corrupted_tokens, clean_cache, metric, grids, attention_mask, interventions, progress):
    """Several grids of patches run as one sweep. Each grid is (site suffix, axes, box):
    the first axis is the layer, the others sizes or "pos" (the prompts' length), and
    box(T, *index without the layer) gives the patched box as ranges (a, b, c).
    Returns the metric of each grid, in its shape."""
    tokens, mask = model._check_tokens(corrupted_tokens, attention_mask)
    B, T = tokens.shape
    patches, shapes = [], []
    for suffix, axes, box in grids:
        code = sites.SITE_CODES[suffix]
        sources = [_source_array(model, clean_cache, f"blocks.{layer}.{suffix}", suffix, B, T, "clean_cache")
                   for layer in range(model.n_layers)]
        shape = [model.n_layers] + [T if n == "pos" else n for n in axes]
        for index in np.ndindex(*shape):
            layer = index[0]
            a, b, c = box(T, *index[1:])
            patches.append([_Write(f"blocks.{layer}.{suffix}", code, layer, a, b, c, sources[layer])])
        shapes.append(shape)
    values, _ = _run_sweep(model, tokens, mask, patches, metric, interventions, progress)
    values = np.asarray(_reduce(metric, values), np.float32)
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(values[at:at + n].reshape(shape))
        at += n
    return out


_DOC = ("\n\nArguments as TransformerLens's get_act_patch_{name}; also attention_mask, "
        "interventions (applied in every run, e.g. noise) and progress (True, False, or None: "
        "a bar once the sweep takes more than a second).")

_HEAD_SITES = {"out": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


# Each grid of patches, as _grids takes it: (site suffix, axes after the layer, box).
def _layer_pos_grid(model, suffix):
    width = sites.shape(suffix, model._shape_cfg, 1, 1)[-1]
    return suffix, ["pos"], lambda T, p: ((p, 1), (0, width), (0, 0))


def _n_heads(model, kind):
    # keys and values have the key/value heads (TransformerLens does the same)
    return model.n_kv_heads if kind in ("k", "v") else model.n_heads


def _head_by_pos_grid(model, kind):
    dh = model.d_head
    return _HEAD_SITES[kind], ["pos", _n_heads(model, kind)], lambda T, p, h: ((p, 1), (h * dh, dh), (0, 0))


def _head_all_pos_grid(model, kind):
    dh = model.d_head
    return _HEAD_SITES[kind], [_n_heads(model, kind)], lambda T, h: ((0, T), (h * dh, dh), (0, 0))


def _pattern_all_pos_grid(model):
    return "attn.hook_pattern", [model.n_heads], lambda T, h: ((h, 1), (0, T), (0, T))


def _pattern_by_pos_grid(model):
    return "attn.hook_pattern", [model.n_heads, "pos"], lambda T, h, d: ((h, 1), (d, 1), (0, T))


def _one_grid(make_grid, name, doc):
    """A public sweep function over the grid make_grid(model, ...) builds."""
    def fn(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, interventions=None,
           progress=None):
        return _grids(model, corrupted_tokens, clean_cache, metric, [make_grid(model)], attention_mask,
                      interventions, progress)[0]
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc + _DOC.format(name=name)
    return fn


resid_pre, resid_mid, attn_out, mlp_out = (
    _one_grid(lambda model, s=suffix: _layer_pos_grid(model, s), name,
              f"Patch blocks.L.{suffix} at each (layer, position): [n_layers, pos].")
    for name, suffix in (("resid_pre", "hook_resid_pre"), ("resid_mid", "hook_resid_mid"),
                         ("attn_out", "hook_attn_out"), ("mlp_out", "hook_mlp_out")))

attn_head_out_by_pos, attn_head_q_by_pos, attn_head_k_by_pos, attn_head_v_by_pos = (
    _one_grid(lambda model, k=kind: _head_by_pos_grid(model, k), f"attn_head_{kind}_by_pos",
              f"Patch one head's {_HEAD_SITES[kind]} at one position, each (layer, position, head): "
              "[n_layers, pos, n_heads].")
    for kind in ("out", "q", "k", "v"))

attn_head_out_all_pos, attn_head_q_all_pos, attn_head_k_all_pos, attn_head_v_all_pos = (
    _one_grid(lambda model, k=kind: _head_all_pos_grid(model, k), f"attn_head_{kind}_all_pos",
              f"Patch one head's {_HEAD_SITES[kind]} at every position, each (layer, head): "
              "[n_layers, n_heads].")
    for kind in ("out", "q", "k", "v"))

attn_head_pattern_all_pos = _one_grid(
    _pattern_all_pos_grid, "attn_head_pattern_all_pos",
    "Patch one head's whole attention pattern, each (layer, head): [n_layers, n_heads].")

attn_head_pattern_by_pos = _one_grid(
    _pattern_by_pos_grid, "attn_head_pattern_by_pos",
    "Patch one head's attention from one destination position (a row of its pattern), "
    "each (layer, head, dest): [n_layers, n_heads, pos].")

attn_head_pattern_dest_src_pos = _one_grid(
    lambda model: ("attn.hook_pattern", [model.n_heads, "pos", "pos"],
                   lambda T, h, d, s: ((h, 1), (d, 1), (s, 1))),
    "attn_head_pattern_dest_src_pos",
    "Patch one entry of one head's pattern, each (layer, head, dest, src): "
    "[n_layers, n_heads, pos, pos]. Entries no query can see (src > dest) leave the run "
    "unchanged and are not run.")


def _same_head_counts(model, name):
    if model.n_kv_heads != model.n_heads:
        raise ValueError(f"model: {name} stacks q, k and v results, but this model has {model.n_heads} "
                         f"query heads and {model.n_kv_heads} key/value heads; call the per-site "
                         "functions (attn_head_k_all_pos, ...) instead")


def attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None,
                            interventions=None, progress=None):
    """out, q, k, v and pattern of each head patched at all positions: [5, n_layers, n_heads].
    One sweep."""
    _same_head_counts(model, "attn_head_all_pos_every")
    grids = [_head_all_pos_grid(model, k) for k in ("out", "q", "k", "v")] + [_pattern_all_pos_grid(model)]
    return np.stack(_grids(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                           interventions, progress))


def attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None,
                           interventions=None, progress=None):
    """out, q, k, v and pattern (by destination) of each head at each position:
    [5, n_layers, pos, n_heads]. One sweep."""
    _same_head_counts(model, "attn_head_by_pos_every")
    grids = [_head_by_pos_grid(model, k) for k in ("out", "q", "k", "v")] + [_pattern_by_pos_grid(model)]
    *heads, pattern = _grids(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                             interventions, progress)
    return np.stack(heads + [pattern.transpose(0, 2, 1)])


def block_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, interventions=None,
                progress=None):
    """resid_pre, attn_out and mlp_out per (layer, position): [3, n_layers, pos]. One sweep."""
    grids = [_layer_pos_grid(model, suffix) for suffix in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]
    return np.stack(_grids(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                           interventions, progress))


from .path_patching import path  # noqa: E402  (path patching: a sender head's effect along chosen paths)
