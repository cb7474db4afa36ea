"""Interventions: declared changes to a site's value, applied by the C core during a run.

Each intervention names a site and, optionally, which part of its value to touch:

    pos    positions (token sites) or query positions (attention sites)
    head   heads (hook_q/k/v/z and attention sites)
    index  dimensions: neurons of hook_mlp_post, coordinates of the residual stream,
           coordinates within d_head for the headed sites
    key_pos key positions (attention sites only)
    row    one row of the batch (default: every row)

Each of these is None (everything), an int, or a list of distinct ints (a repeated
index is refused: NumPy's x[[2, 2]] *= 2 scales once, a loop would scale twice, and
neither is what a repeated index usually means). Values given for the touched part
broadcast to its shape [rows, positions, (heads,) dims] or, for attention sites,
[rows, heads, queries, keys].

At hook_attn_scores and hook_pattern the causal mask holds whatever is written:
entries whose key comes after its query (key_pos > pos), and padding, are left as
they are (-inf in the scores, 0 in the pattern) by every intervention and hook, so
a run never reads the future and sweeps stay exact.
"""
import numpy as np

from . import sites

# the core's action kinds
_CACHE, _SET, _ADD, _SCALE, _COPY_ROW, _PROJECT, _CALLBACK, _PROJECT_ROW = range(8)


def cache_action(code, layer, out):
    """The core's action that copies a whole site (every row) into out."""
    return (_CACHE, code, layer, -1, 0, None, None, None, None, None, 0, out, 0)


def _as_index(value, limit, argument):
    """None / int / sequence -> int32 array of indices in [0, limit)."""
    if value is None:
        return np.arange(limit, dtype=np.int32)
    arr = np.atleast_1d(np.asarray(value))
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise TypeError(f"{argument}: expected None, an int or a list of ints")
    arr = np.where(arr < 0, arr + limit, arr)
    if arr.size == 0 or arr.min() < 0 or arr.max() >= limit:
        raise ValueError(f"{argument}: index out of range [0, {limit}) ({value!r})")
    if np.unique(arr).size != arr.size:
        values, counts = np.unique(arr, return_counts=True)
        raise ValueError(f"{argument}: index {int(values[counts > 1][0])} is repeated ({value!r}); "
                         "give each index once")
    return arr.astype(np.int32)


class Intervention:
    """Base class: a site and which part of it; subclasses say what happens there."""

    def __init__(self, site, pos=None, head=None, index=None, key_pos=None, row=None):
        if not isinstance(site, str):
            raise TypeError(f"site: expected a site name, got {type(site).__name__}")
        self.site, self.pos, self.head, self.index = site, pos, head, index
        self.key_pos, self.row = key_pos, row

    def __repr__(self):
        parts = [repr(self.site)] + [f"{k}={getattr(self, k)!r}" for k in ("pos", "head", "index", "key_pos", "row")
                                     if getattr(self, k) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- where ---------------------------------------------------------------

    def _box(self, model, batch, n_pos):
        """(site code, layer, suffix, a, b, c, rows, box shape, full-value indexer)"""
        code, layer, suffix = sites.parse(self.site, model)
        if self.row is None:
            rows = None
        else:
            if isinstance(self.row, bool) or not isinstance(self.row, (int, np.integer)) or not 0 <= self.row < batch:
                raise ValueError(f"row: expected an int in [0, {batch}), got {self.row!r}")
            rows = int(self.row)
        if suffix in sites.ATTENTION:
            if self.index is not None:
                raise ValueError(f"index: not used at attention site {self.site!r} (use head, pos, key_pos)")
            a = _as_index(self.head, model.n_heads, "head")
            b = _as_index(self.pos, n_pos, "pos")
            c = _as_index(self.key_pos, n_pos, "key_pos")
            return code, layer, suffix, a, b, c, rows
        if self.key_pos is not None:
            raise ValueError(f"key_pos: only used at attention sites, not {self.site!r}")
        a = _as_index(self.pos, n_pos, "pos")
        if suffix in sites.HEADED:
            n = model.n_kv_heads if suffix in sites.KV_HEADED else model.n_heads
            heads = _as_index(self.head, n, "head")
            dims = _as_index(self.index, model.d_head, "index")
            b = (heads[:, None] * model.d_head + dims[None, :]).reshape(-1).astype(np.int32)
        else:
            if self.head is not None:
                raise ValueError(f"head: site {self.site!r} has no heads")
            width = sites.shape(suffix, model._shape_cfg, 1, 1)[-1]
            b = _as_index(self.index, width, "index")
        return code, layer, suffix, a, b, None, rows

    def _gather(self, full, a, b, c, suffix, model, rows):
        """Take the box out of a full site value [batch, ...] -> [rows, n_a, n_b(, n_c)]."""
        full = np.asarray(full, dtype=np.float32)
        if rows is not None:
            full = full[rows:rows + 1]
        if c is not None:
            return full[:, a][:, :, b][:, :, :, c]
        flat = full.reshape(full.shape[0], full.shape[1], -1)
        return flat[:, a][:, :, b]

    def _values(self, value, shape, argument):
        try:
            return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=np.float32), shape))
        except ValueError:
            raise ValueError(f"{argument}: shape {np.shape(value)} does not broadcast to the "
                             f"intervened part's shape {list(shape)}") from None

    def _box_shape(self, a, b, c, rows, batch, suffix, model):
        n_rows = batch if rows is None else 1
        if c is not None:
            return (n_rows, a.size, b.size, c.size)
        if suffix in sites.HEADED:
            heads = b.size // (self.index_count(model))
            return (n_rows, a.size, heads, self.index_count(model))
        return (n_rows, a.size, b.size)

    def index_count(self, model):
        return _as_index(self.index, model.d_head, "index").size

    def compile(self, model, batch, n_pos, context):
        """-> list of action tuples for the core."""
        raise NotImplementedError

    def _action(self, kind, code, layer, rows, a, b, c, value=None, value2=None, rank=0, src_row=0):
        return (kind, code, layer, -1 if rows is None else rows, src_row, a, b, c, value, value2, rank, None, 0)


def _full_site_value(source, site, argument="source"):
    """A cache (dict, RunResult, TransformerLens ActivationCache) or an array -> the
    full value of `site`."""
    cache = getattr(source, "cache", source)
    if isinstance(cache, np.ndarray) or not hasattr(cache, "__getitem__"):
        return np.asarray(cache)
    try:
        return cache[site]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{argument}: the cache has no {site!r}; cache it in the source run "
                         f"(e.g. model.run(tokens, cache={site!r}))") from None


def _checked_source(source, site, suffix, model, batch, n_pos):
    """The full value of `site` in a cache or array, which must have this run's shape."""
    full = np.asarray(_full_site_value(source, site), dtype=np.float32)
    expected = sites.shape(suffix, model._shape_cfg, batch, n_pos)
    if tuple(full.shape) != expected:
        raise ValueError(f"source: {site!r} has shape {list(full.shape)}, this run needs {list(expected)}")
    return full


def _row_copies(kind, code, layer, rows, a, b, c, batch, context, source, basis=None, rank=0):
    """Actions copying (or projecting) the box from a Source's rows, computed in the
    same pass: row r reads the source's row r (or its only row)."""
    offset, count = context[id(source)]
    targets = range(batch) if rows is None else [rows]
    return [(kind, code, layer, r, offset + (r if count > 1 else 0), a, b, c, basis, None, rank, None, 0)
            for r in targets]


class Patch(Intervention):
    """Replace the value with the same part of another run's value (an interchange).

    source: the other run's cache (RunResult, or dict name -> array), or the full
    site value as an array [batch, ...] of this run's shape."""

    def __init__(self, site, source, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.source = source

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        if isinstance(self.source, Source):
            # rows feed rows: copy from the source's rows, computed in the same pass
            return _row_copies(_COPY_ROW, code, layer, rows, a, b, c, batch, context, self.source)
        full = _checked_source(self.source, self.site, suffix, model, batch, n_pos)
        value = np.ascontiguousarray(self._gather(full, a, b, c, suffix, model, rows))
        return [self._action(_SET, code, layer, rows, a, b, c, value)]


class Set(Intervention):
    """Set the value to a given array (broadcast to the touched part)."""

    def __init__(self, site, value, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.value = value

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        shape = self._box_shape(a, b, c, rows, batch, suffix, model)
        value = self._values(self.value, shape, "value")
        return [self._action(_SET, code, layer, rows, a, b, c, value)]


class Zero(Set):
    """Set the value to zero (zero-ablation)."""

    def __init__(self, site, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, 0.0, pos, head, index, key_pos, row)


class Add(Intervention):
    """Add scale * vector (steering); the vector broadcasts to the touched part."""

    def __init__(self, site, vector, scale=1.0, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.vector, self.scale = vector, float(scale)

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        shape = self._box_shape(a, b, c, rows, batch, suffix, model)
        value = self._values(np.asarray(self.vector, np.float32) * np.float32(self.scale), shape, "vector")
        return [self._action(_ADD, code, layer, rows, a, b, c, value)]


class Scale(Intervention):
    """Multiply the value by a factor."""

    def __init__(self, site, factor, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.factor = float(factor)

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        return [self._action(_SCALE, code, layer, rows, a, b, c, np.array([self.factor], np.float32))]


class MeanAblate(Intervention):
    """Replace the value by its mean over a reference set.

    reference: the site's values over the reference set, [n, pos, ...] (or a cache /
    RunResult holding the site); the mean is taken over the first axis."""

    def __init__(self, site, reference, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.reference = reference

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        full = np.asarray(_full_site_value(self.reference, self.site, "reference"), np.float32)
        mean = full.mean(axis=0, keepdims=True)
        if mean.shape[1:] != sites.shape(suffix, model._shape_cfg, 1, n_pos)[1:]:
            raise ValueError(f"reference: {self.site!r} values have shape {list(full.shape)}, "
                             f"expected [n, {', '.join(map(str, sites.shape(suffix, model._shape_cfg, 1, n_pos)[1:]))}]")
        value = self._gather(np.broadcast_to(mean, (batch,) + mean.shape[1:]), a, b, c, suffix, model, rows)
        return [self._action(_SET, code, layer, rows, a, b, c, np.ascontiguousarray(value))]


class Noise(Intervention):
    """Add Gaussian noise std * N(0, 1), drawn from numpy.random.RandomState(seed)
    in the touched part's shape (so runs are exactly reproducible)."""

    def __init__(self, site, std, seed=0, pos=None, head=None, index=None, key_pos=None, row=None):
        super().__init__(site, pos, head, index, key_pos, row)
        self.std, self.seed = float(std), seed

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        shape = self._box_shape(a, b, c, rows, batch, suffix, model)
        draws = np.random.RandomState(self.seed).randn(*shape) * self.std
        return [self._action(_ADD, code, layer, rows, a, b, c, draws.astype(np.float32))]


class SubspacePatch(Intervention):
    """Interchange inside a linear subspace: b <- (I - Q Q^T) b + Q Q^T s.

    basis: Q [dims, k] with orthonormal columns, over the touched dimensions (index);
    source: as for Patch (a cache, an array of the run's shape, or a Source)."""

    def __init__(self, site, basis, source, pos=None, head=None, index=None, row=None):
        super().__init__(site, pos, head, index, None, row)
        self.basis, self.source = basis, source

    def compile(self, model, batch, n_pos, context):
        code, layer, suffix, a, b, c, rows = self._box(model, batch, n_pos)
        if c is not None:
            raise ValueError("site: a subspace interchange needs a token site, not an attention site")
        Q = np.asarray(self.basis, np.float32)
        if Q.ndim == 1:
            Q = Q[:, None]
        if Q.ndim != 2 or Q.shape[0] != b.size:
            raise ValueError(f"basis: expected shape [{b.size}, k] (one row per touched dimension), got {list(Q.shape)}")
        if Q.shape[1] == 0:
            raise ValueError("basis: has no columns (rank 0); a subspace interchange needs at least one "
                             "basis vector")
        if not np.allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-4):
            raise ValueError("basis: columns must be orthonormal (use numpy.linalg.qr)")
        Q = np.ascontiguousarray(Q)
        if isinstance(self.source, Source):
            return _row_copies(_PROJECT_ROW, code, layer, rows, a, b, None, batch, context, self.source,
                               basis=Q, rank=Q.shape[1])
        full = _checked_source(self.source, self.site, suffix, model, batch, n_pos)
        s = np.ascontiguousarray(self._gather(full, a, b, None, suffix, model, rows))
        return [self._action(_PROJECT, code, layer, rows, a, b, None, Q, s, rank=Q.shape[1])]


class Source:
    """Another run computed in the same forward pass, to patch from: its rows run in
    lockstep with the patched rows, so Y(a, M(a')) with M(a') itself intervened is
    one call. tokens must have the patched run's shape [batch, pos] (or batch 1).

    A Source's interventions may themselves patch from Sources, to any depth
    (Y(a, M(a', N(a'')))); each Source is one set of rows however often it is used,
    and a Source may not patch, directly or through others, from itself."""

    def __init__(self, tokens, attention_mask=None, interventions=()):
        self.tokens, self.attention_mask = tokens, attention_mask
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        self.interventions = list(interventions)

    def __repr__(self):
        return f"Source(tokens of shape {list(np.shape(self.tokens))}, {len(self.interventions)} interventions)"


def place_rows(actions, offset, own, count, per_row_sources):
    """Actions compiled for a run of `own` rows -> the same actions on rows offset ..
    offset + count - 1 of a larger batch, one action per row.

    own is count, or 1 for a batch-1 Source that runs once per row because a Source
    it patches from has a row per prompt: then each of its actions applies to every
    row, and row i reads row i of such a Source (per_row_sources: their first rows).
    Row copies name their source row in the large batch already."""
    out = []
    for act in actions:
        kind, code, layer, row, src_row, a, b, c, value, value2, rank, outbuf, ident = act
        copies = kind in (_COPY_ROW, _PROJECT_ROW)
        for i in (range(count) if row < 0 or own != count else [row]):
            v, v2 = value, value2
            if row < 0 and own == count:  # per-row values of an action on every row
                v = value[i:i + 1] if kind in (_SET, _ADD) else value
                v2 = value2[i:i + 1] if kind == _PROJECT else value2
            src = src_row
            if copies and own != count and src_row in per_row_sources:
                src = src_row + i
            out.append((kind, code, layer, offset + i, src, a, b, c, v, v2, rank, outbuf, ident))
    return out
