"""Interventions: declared changes to a site's value, applied by the C core during a run.

Each intervention names a site and, optionally, which part of its value to touch:

    pos    positions (token sites) or query positions (attention sites)
    head   heads (hook_q/k/v/z and attention sites)
    index  dimensions: neurons of hook_mlp_post, coordinates of the residual stream,
           coordinates within d_head for the headed sites
    key_pos key positions (attention sites only)
    row    one row of the batch (default: every row)

Each of these is None (everything), an int, or a list of ints. Values given for the
touched part broadcast to its shape [rows, positions, (heads,) dims] or, for
attention sites, [rows, heads, queries, keys].
"""
import numpy as np

from . import sites

# the core's action kinds
_CACHE, _SET, _ADD, _SCALE, _COPY_ROW, _PROJECT, _CALLBACK = range(7)


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
            offset, count = context[id(self.source)]
            targets = range(batch) if rows is None else [rows]
            return [(_COPY_ROW, code, layer, r, offset + (r if count > 1 else 0), a, b, c,
                     None, None, 0, None, 0) for r in targets]
        full = _full_site_value(self.source, self.site)
        expected = sites.shape(suffix, model._shape_cfg, batch, n_pos)
        if tuple(full.shape) != expected:
            raise ValueError(f"source: {self.site!r} has shape {list(full.shape)}, this run needs {list(expected)}")
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
    source: as for Patch."""

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
        if not np.allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-4):
            raise ValueError("basis: columns must be orthonormal (use numpy.linalg.qr)")
        full = _full_site_value(self.source, self.site)
        s = np.ascontiguousarray(self._gather(full, a, b, None, suffix, model, rows))
        return [self._action(_PROJECT, code, layer, rows, a, b, None, np.ascontiguousarray(Q), s, rank=Q.shape[1])]


class Source:
    """Another run computed in the same forward pass, to patch from: its rows run in
    lockstep with the patched rows, so Y(a, M(a')) with M(a') itself intervened is
    one call. tokens must have the patched run's shape [batch, pos] (or batch 1)."""

    def __init__(self, tokens, attention_mask=None, interventions=()):
        self.tokens, self.attention_mask = tokens, attention_mask
        self.interventions = list(interventions)


def expand_rows(actions, offset, count):
    """Actions compiled for a batch of `count` rows -> the same actions on rows
    offset .. offset + count - 1 of a larger batch (one action per row)."""
    out = []
    for act in actions:
        kind, code, layer, row, src_row, a, b, c, value, value2, rank, outbuf, ident = act
        if row >= 0:
            out.append((kind, code, layer, row + offset, src_row + offset, a, b, c, value, value2, rank, outbuf, ident))
            continue
        for i in range(count):
            v = value[i:i + 1] if kind in (_SET, _ADD) else value
            v2 = value2[i:i + 1] if kind == _PROJECT else value2
            out.append((kind, code, layer, offset + i, src_row, a, b, c, v, v2, rank, outbuf, ident))
    return out
