"""Attribution patching: every sweep of ``mechscope.patching`` estimated from one
backward pass.

Each function here has the name, the arguments and the result shape of its
``mechscope.patching`` counterpart, so that one replaces the other::

    clean = model.run(clean_tokens, cache=model.site_names)
    metric = ms.metrics.LogitDiff(correct, wrong)
    exact = ms.patching.attn_head_out_by_pos(model, corrupted_tokens, clean.cache, metric)
    approx = ms.attribution.attn_head_out_by_pos(model, corrupted_tokens, clean.cache, metric)

The exact sweep runs one patched forward pass per index; the estimate takes the
corrupted run's gradient of the metric with respect to every patched site (one
backward pass, ``model.grad``) and, for each index, adds to the corrupted run's
metric the first-order change

    sum over the patched box of (clean - corrupted) * d metric / d site

(attribution patching, "AtP": Nanda 2023; Kramár et al. 2024). The box is exactly
what the patch writes: one position's vector, one head at one position, a row of a
pattern, ... Values are in the metric's units (the batch mean, normalised for
``Recovery``), as the exact sweep's; where the metric is linear in the site the two
agree exactly.

Two refinements of Kramár et al. 2024 ("AtP*"):

- ``qk_fix=True`` (the default): a query or key patch changes the output only
  through the attention pattern, and the softmax is where the linear estimate fails
  most (a saturated softmax has almost no gradient). So for query and key patches
  the pattern the patch would give is recomputed exactly (the scores with the clean
  query or key, then the softmax; the keys and queries of the other positions stay
  the corrupted run's), and only the rest of the model is linearised: the estimate is
  (new pattern - corrupted pattern) . d metric / d pattern (the QK fix of Kramár et
  al. 2024, section 3: the softmax recomputed exactly, the rest linear). No extra
  backward pass (rotary models take one extra forward pass, to rotate the clean queries
  and keys). The recompute runs over blocks of (prompt, key/value head), each block's
  float64 [query, key] planes within 64 MiB and the memory budget
  (mechscope.set_memory_budget); a length whose single block is over the budget is
  refused before any work.
- ``graddrop=True`` (GradDrop): against cancellation between paths (a component
  whose direct and indirect effects cancel in the gradient). For each layer l one
  backward pass runs with the gradient through layer l's writes to the residual
  stream dropped (its attention and MLP outputs held at their values as constants,
  so only the skip connection carries the gradient past the block), which gives an
  estimate d_l(prompt) of the change per prompt. The result is, averaged over the
  prompts, (1 / (n_layers - 1)) * sum over l of |d_l(prompt)|: the magnitude is taken
  per prompt, before the mean, so effects of opposite sign in different prompts do not
  cancel either. This is the AtP+GD contribution of Kramár et al. 2024
  (arXiv:2403.00745, section 3), as public reimplementations state it (e.g.
  github.com/koayon/atp_star, atp.py); the paper linearises at the clean
  run and patches in the noise, mechscope keeps the direction of its sweeps (linearised
  at the corrupted run, clean values patched in). The paper's components all sit inside
  a block, whose own layer's term is always 0, hence L - 1. For hook_resid_pre and
  hook_resid_mid, which the paper does not cover, no term is forced to 0 (the skip
  connection stays), so they are divided by n_layers: a site whose effect has no
  cancelling path then scores the magnitude of its plain estimate, as sites inside a
  block do. A GradDrop grid is therefore a magnitude (>= 0, in the metric's units or
  Recovery's, the corrupted run's value not added), for ranking components; it costs
  n_layers backward passes.

The full AtP* of the paper is ``qk_fix=True, graddrop=True``; plain AtP is
``qk_fix=False``.

The metric must be one of ``mechscope.metrics`` (differentiated in C); Python
metrics of the logits have no gradient here.
"""
import numpy as np

from . import metrics as _metrics
from . import sites
from ._progress import progress_bar
from ._runtime import format_bytes, get_memory_budget
from .interventions import Set, Source
from .patching import _same_head_counts, _source_array

__all__ = [
    "resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every",
    "attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos",
    "attn_head_pattern_all_pos", "attn_head_all_pos_every",
    "attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos",
    "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos", "attn_head_by_pos_every",
]

_HEAD_SITES = {"out": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}
_PATTERN = "attn.hook_pattern"

# A grid is (kind, suffix): kind says how the patched box is summed.
#   "layer_pos"     site [B, T, d]        -> [B, T]        (one position, all columns)
#   "head_by_pos"   site [B, T, H, dh]    -> [B, T, H]     (one head at one position)
#   "head_all_pos"  site [B, T, H, dh]    -> [B, H]        (one head at every position)
#   "pattern_all"   site [B, H, T, T]     -> [B, H]        (one head's whole pattern)
#   "pattern_dest"  site [B, H, T, T]     -> [B, H, T]     (one destination row)
#   "pattern_entry" site [B, H, T, T]     -> [B, H, T, T]  (one entry)
_SUMMED_AXES = {"layer_pos": (2,), "head_by_pos": (3,), "head_all_pos": (1, 3), "pattern_all": (2, 3),
                "pattern_dest": (3,), "pattern_entry": ()}


def _box_sums(kind, contribution):
    """(clean - corrupted) * gradient [B, ...site] -> its sums over each patched box."""
    return contribution.sum(axis=_SUMMED_AXES[kind]) if _SUMMED_AXES[kind] else contribution


# ---------------------------------------------------------------- AtP*: exact softmax

def _scoring(model, layer):
    """(the factor the core multiplies q . k by, the scores' soft cap or 0, the
    layer's sliding window or 0), as csrc/forward.c computes a layer's scores"""
    scale = model.arch.get("attn_scale") or 1.0
    if not model.arch.get("attn_scale") and model.arch.get("scale_attn_weights", 1):
        scale /= np.sqrt(model.d_head)
    if model.arch.get("scale_attn_by_inverse_layer", 0):
        scale /= layer + 1
    window = (model.arch.get("attn_windows") or [0] * model.n_layers)[layer]
    return scale, model.arch.get("attn_softcap", 0.0), window


def _allowed(mask, B, T, window=0):
    """[B, T(query), T(key)] bool: keys a query attends to (causal, real tokens; with a
    sliding window, the last `window` real tokens up to the query)."""
    real = np.ones((B, T), bool) if mask is None else mask.astype(bool)
    index = np.cumsum(real, axis=1, dtype=np.int32)  # a real token's index among its row's real tokens, + 1
    gap = index[:, :, None] - index[:, None, :]  # [B, query, key]
    allowed = (gap >= 0) & real[:, None, :] & real[:, :, None] & np.tril(np.ones((T, T), bool))[None]
    return allowed & (gap < window) if window else allowed


def _scores(q, k, scoring, n_rep):
    """q [B, T, H, dh], k [B, T, KV, dh] -> scale * q . k [B, H, T(query), T(key)] (float64),
    soft-capped (cap tanh(s / cap)) when scoring = (scale, cap, window) has a cap."""
    scale, cap = scoring[:2]
    k = np.repeat(k, n_rep, axis=2) if n_rep > 1 else k
    s = scale * np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64))
    return cap * np.tanh(s / cap) if cap else s


def _softmax(scores, allowed):
    """Row softmax over the allowed keys; rows with none are 0. Also returns the log-sum-exp."""
    s = np.where(allowed[:, None], scores, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(s - top)
    z = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(z > 0, e / z, 0.0)
        lse = top + np.log(z)
    return p, lse


def _qk_fix(kind, which, q_rot, k_rot, q_clean_rot, k_clean_rot, grad_pattern, allowed, scoring, n_rep):
    """Per-row change of the metric for query or key patches, the softmax recomputed
    exactly and the rest linearised: sum of (new pattern - pattern) * d metric / d pattern.
    Returns [B, T, heads] ("head_by_pos") or [B, heads] ("head_all_pos"); heads are the
    query heads for q and the key/value heads for k."""
    S = _scores(q_rot, k_rot, scoring, n_rep)
    P, lse = _softmax(S, allowed)
    G = grad_pattern.astype(np.float64)
    A = (P * G).sum(-1, keepdims=True)                      # [B, H, T, 1]: P . G per row
    B, H, T, _ = S.shape
    if which == "q":
        # a query patch at (i, h) replaces row i of head h: all rows at once
        P_new, _ = _softmax(_scores(q_clean_rot, k_rot, scoring, n_rep), allowed)
        per_row = (P_new * G).sum(-1) - A[..., 0]            # [B, H, T(query)]
        if kind == "head_all_pos":
            return per_row.sum(-1)
        return per_row.transpose(0, 2, 1)
    if kind == "head_all_pos":
        # every key of the head replaced: every row's softmax recomputed
        P_new, _ = _softmax(_scores(q_rot, k_clean_rot, scoring, n_rep), allowed)
        change = ((P_new * G).sum(-1) - A[..., 0]).sum(-1)  # [B, H]
        return change.reshape(B, H // n_rep, n_rep).sum(-1)
    # a key patch at (p, g) changes column p of every later row of the heads of group g;
    # in closed form per (row i, key p): the row's normaliser with entry p replaced
    S_new = _scores(q_rot, k_clean_rot, scoring, n_rep)       # S_new[..., i, p]: query i, clean key p
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rest = lse + np.log1p(-np.minimum(P, 1.0))          # log of the row's mass without entry p
        lse_new = np.logaddexp(rest, S_new)
        others = (A - P * G) * np.exp(lse - lse_new)        # the other entries, renormalised
        mine = np.exp(S_new - lse_new) * G                   # the replaced entry
        # exactly 0 where the clean key gives the same score (the closed form would leave
        # ~1e-17 there, which a GradDrop magnitude, with no base value added, would keep)
        change = np.where(allowed[:, None] & (S_new != S), others + mine - A, 0.0)
    change = change.sum(axis=2)                              # over query rows -> [B, H, T(key)]
    change = change.reshape(B, H // n_rep, n_rep, T).sum(2)  # heads of a key/value group
    return change.transpose(0, 2, 1)                         # [B, T, KV]


def _whole_norm_ratios(pre, pre_clean, eps):
    """OLMo 2 norms each token's queries (keys) over all heads at once, so patching one
    head's pre-norm values rescales every head's normed ones. For a patch of head h at
    a token: (the factor on the other heads' normed values, the factor on head h's clean
    normed values from the clean run), each [B, T, heads]: the old and the clean run's
    root mean squares over the new one's."""
    pre, pre_clean = pre.astype(np.float64), pre_clean.astype(np.float64)
    width = pre.shape[2] * pre.shape[3]
    head, head_clean = (pre * pre).sum(-1), (pre_clean * pre_clean).sum(-1)   # [B, T, heads]
    total, total_clean = head.sum(-1, keepdims=True), head_clean.sum(-1, keepdims=True)
    rms_new = np.sqrt((total - head + head_clean) / width + eps)
    return np.sqrt(total / width + eps) / rms_new, np.sqrt(total_clean / width + eps) / rms_new


def _capped(s, cap):
    return cap * np.tanh(s / cap) if cap else s


def _qk_fix_whole(kind, which, q_rot, k_rot, q_clean_rot, k_clean_rot, pre, pre_clean, grad_pattern, allowed,
                  scoring, n_rep, eps):
    """_qk_fix for query and key norms over all heads (OLMo 2): a patch of one head
    at a token also rescales the other heads' queries (keys) there, so every head's
    pattern is recomputed: rows (query patches) or columns (key patches) of the other
    heads' scores scaled by one factor, the patched head's from its clean values by
    another (_whole_norm_ratios). Returns what _qk_fix returns."""
    scale, cap = scoring[:2]
    S0 = _scores(q_rot, k_rot, (scale, 0.0), n_rep)           # [B, H, T, T] before any cap
    S = _capped(S0, cap)
    P, lse = _softmax(S, allowed)
    G = grad_pattern.astype(np.float64)
    A = (P * G).sum(-1)                                       # [B, H, T]
    other, mine = _whole_norm_ratios(pre, pre_clean, eps)     # [B, T, heads patched]
    B, H, T, _ = S0.shape
    if which == "q":
        S_clean = _scores(q_clean_rot, k_rot, (scale, 0.0), n_rep)
        change = np.zeros((B, T, H))
        for h in range(H):
            # the other heads' rows i scaled by other[:, i, h]; head h's row from its clean query
            P_o, _ = _softmax(_capped(S0 * other[:, None, :, h, None], cap), allowed)
            rows = (P_o * G).sum(-1) - A                      # [B, H, T]
            rows[:, h] = 0.0
            P_h, _ = _softmax(_capped(S_clean[:, h] * mine[:, :, h, None], cap)[:, None], allowed)
            change[:, :, h] = rows.sum(1) + (P_h[:, 0] * G[:, h]).sum(-1) - A[:, h]
        return change.sum(1) if kind == "head_all_pos" else change
    S_clean = _scores(q_rot, k_clean_rot, (scale, 0.0), n_rep)   # query i, clean key p
    KV = H // n_rep
    group = np.arange(H) // n_rep
    out = np.zeros((B, KV) if kind == "head_all_pos" else (B, T, KV))
    for g in range(KV):
        # column p of every head: group g's from its clean key, the others' scaled
        S_new = np.where((group == g)[None, :, None, None], S_clean * mine[:, None, None, :, g],
                         S0 * other[:, None, None, :, g])
        if kind == "head_all_pos":
            P_new, _ = _softmax(_capped(S_new, cap), allowed)
            out[:, g] = ((P_new * G).sum(-1) - A).sum((1, 2))
            continue
        # one column p replaced in each row (closed form per (row, key), as in _qk_fix)
        S_p = _capped(S_new, cap)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            rest = lse + np.log1p(-np.minimum(P, 1.0))
            lse_new = np.logaddexp(rest, S_p)
            entry = (A[..., None] - P * G) * np.exp(lse - lse_new) + np.exp(S_p - lse_new) * G - A[..., None]
            entry = np.where(allowed[:, None] & (S_p != S), entry, 0.0)
        out[:, :, g] = entry.sum((1, 2))                      # over heads and query rows -> [B, T(key)]
    return out


# The exact softmax works on [query, key] planes of float64, about this many at once.
_QK_PLANES = 12
# Planes are processed (prompt, key/value head) at a time, up to this many bytes of them
# per step (or the memory budget, if smaller): the full [B, H, T, T] arrays of a long
# batch would be gigabytes (B = 8, H = 12, T = 1,024: 800 MB each).
_CHUNK_BYTES = 64 << 20


def _qk_unit_bytes(n_rep, T):
    """Working memory of the exact softmax for one prompt and one key/value head (with
    the n_rep query heads that share it)."""
    return _QK_PLANES * n_rep * T * T * 8


def _check_qk_memory(model, T):
    unit, budget = _qk_unit_bytes(model.n_heads // model.n_kv_heads, T), get_memory_budget()
    if unit > budget:
        raise ValueError(f"qk_fix: the exact softmax of query/key patches needs {format_bytes(unit)} for one "
                         f"prompt and head at {T} positions, over the memory budget of {format_bytes(budget)}; "
                         "use shorter prompts, qk_fix=False, or raise it with mechscope.set_memory_budget")


def _qk_fix_chunked(kind, which, q_rot, k_rot, q_clean_rot, k_clean_rot, grad_pattern, mask, scoring, n_rep):
    """_qk_fix over blocks of prompts and key/value heads (each block's planes within
    _CHUNK_BYTES and the memory budget); the same result as one call on everything."""
    B, T, KV = k_rot.shape[0], k_rot.shape[1], k_rot.shape[2]
    unit = _qk_unit_bytes(n_rep, T)
    units = max(1, min(_CHUNK_BYTES, get_memory_budget()) // unit)
    rows, groups = (max(1, units // KV), KV) if units >= KV else (1, units)
    heads_out = KV * n_rep if which == "q" else KV
    out = np.zeros((B, heads_out) if kind == "head_all_pos" else (B, T, heads_out))
    for b0 in range(0, B, rows):
        b = slice(b0, min(B, b0 + rows))
        allowed = _allowed(None if mask is None else mask[b], b.stop - b.start, T, scoring[2])
        for g0 in range(0, KV, groups):
            g = slice(g0, min(KV, g0 + groups))
            h = slice(g.start * n_rep, g.stop * n_rep)
            part = _qk_fix(kind, which, q_rot[b, :, h], k_rot[b, :, g],
                           None if q_clean_rot is None else q_clean_rot[b, :, h],
                           None if k_clean_rot is None else k_clean_rot[b, :, g],
                           grad_pattern[b, h], allowed, scoring, n_rep)
            heads = h if which == "q" else g
            out[(b, heads) if kind == "head_all_pos" else (b, slice(None), heads)] = part
    return out


# ---------------------------------------------------------------- the engine

def _check_metric(metric):
    if not isinstance(metric, _metrics.Metric):
        raise TypeError("metric: attribution patching differentiates the metric, so it must be one of "
                        "mechscope.metrics (LogitDiff, LogProb, Prob, KL, Recovery); a Python function "
                        "of the logits has no gradient here (use mechscope.patching for it)")
    return metric.metric if isinstance(metric, _metrics.Recovery) else metric


def _check_options(model, qk_fix, graddrop, interventions, grids):
    for name, value in (("qk_fix", qk_fix), ("graddrop", graddrop)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if graddrop and model.n_layers < 2:
        raise ValueError("graddrop: GradDrop averages over the other layers and needs a model of at least "
                         "2 layers; use graddrop=False")
    ivs = model._check_interventions(interventions)
    for iv in ivs:
        if isinstance(getattr(iv, "source", None), Source):
            raise ValueError("interventions: attribution's base run cannot patch from a Source run (the "
                             "exact sweeps refuse it too)")
    if qk_fix and any(suffix in (_HEAD_SITES["q"], _HEAD_SITES["k"]) for _, suffix in grids):
        for iv in ivs:
            suffix = sites.parse(iv.site, model)[2]
            if suffix in sites.ATTENTION:
                raise ValueError(f"interventions: {iv!r} changes attention scores or patterns, which the "
                                 "exact softmax of qk_fix=True recomputes from queries and keys; use "
                                 "qk_fix=False with such interventions")
    return ivs


def _needs(model, grids, qk_fix):
    """-> (suffixes whose gradient is needed, suffixes whose corrupted and clean values
    are needed for the query/key fix)."""
    grad_suffixes, qk = [], []
    for _, suffix in grids:
        if qk_fix and suffix in (_HEAD_SITES["q"], _HEAD_SITES["k"]):
            qk.append(suffix)
            if _PATTERN not in grad_suffixes:
                grad_suffixes.append(_PATTERN)
        elif suffix not in grad_suffixes:
            grad_suffixes.append(suffix)
    return grad_suffixes, qk


def _rotated_clean(model, tokens, mask, clean, qk, base):
    """{layer: (clean query, clean key)} as the attention uses them in the corrupted run
    (rotary models rotate them by position; None where not patched): for rotary models
    one forward pass with every layer's patched hook_q / hook_k set to the clean values."""
    L = model.n_layers
    if not model.arch.get("rotary_dim"):
        return {l: tuple(clean.get(f"blocks.{l}.{s}") for s in (_HEAD_SITES["q"], _HEAD_SITES["k"]))
                for l in range(L)}
    sets = [Set(f"blocks.{l}.{s}", clean[f"blocks.{l}.{s}"]) for s in qk for l in range(L)]
    rot = [s.replace("hook_", "hook_rot_") for s in qk]
    cache = model.run(tokens, attention_mask=mask, logits=None, interventions=list(base) + sets,
                      cache=[f"blocks.*.{s}" for s in rot]).cache
    return {l: tuple(cache.get(f"blocks.{l}.{s.replace('hook_', 'hook_rot_')}") if s in qk else None
                     for s in (_HEAD_SITES["q"], _HEAD_SITES["k"])) for l in range(L)}


def _layer_change(model, kind, suffix, layer, grads, acts, clean, rotated_clean, mask, qk_fix, absolute=False):
    """The first-order changes of the metric for one grid's patches at one layer, averaged
    over the rows (of their magnitudes with absolute=True, as GradDrop wants): [...]."""
    if qk_fix and suffix in (_HEAD_SITES["q"], _HEAD_SITES["k"]):
        rotary = bool(model.arch.get("rotary_dim"))
        q = acts[f"blocks.{layer}.attn.hook_rot_q" if rotary else f"blocks.{layer}.attn.hook_q"]
        k = acts[f"blocks.{layer}.attn.hook_rot_k" if rotary else f"blocks.{layer}.attn.hook_k"]
        qc, kc = rotated_clean[layer]
        which = "q" if suffix == _HEAD_SITES["q"] else "k"
        scoring, n_rep = _scoring(model, layer), model.n_heads // model.n_kv_heads
        grad = grads[f"blocks.{layer}.{_PATTERN}"]
        if model.arch.get("qk_norm") == 2:  # OLMo 2: a head's patch rescales the other heads too
            name = f"blocks.{layer}.{suffix}"
            B, T = q.shape[:2]
            # every head at once, so blocks of whole prompts within the budget
            per = max(1, min(_CHUNK_BYTES, get_memory_budget()) // (_qk_unit_bytes(n_rep, T) * model.n_kv_heads))
            rows = np.concatenate([
                _qk_fix_whole(kind, which, q[b:b + per], k[b:b + per], qc[b:b + per] if qc is not None else None,
                              kc[b:b + per] if kc is not None else None, acts[name][b:b + per],
                              clean[name][b:b + per], grad[b:b + per],
                              _allowed(None if mask is None else mask[b:b + per], min(per, B - b), T, scoring[2]),
                              scoring, n_rep, float(model.arch["ln_eps"]))
                for b in range(0, B, per)])
        else:
            rows = _qk_fix_chunked(kind, which, q, k, qc, kc, grad, mask, scoring, n_rep)
        return (np.abs(rows) if absolute else rows).mean(axis=0)
    name = f"blocks.{layer}.{suffix}"
    c, a, g = clean[name], acts[name], grads[name]
    # float64 products in blocks of prompts, summed as they go: a pattern site is [B, H, T, T]
    rows = max(1, min(_CHUNK_BYTES, get_memory_budget()) // (3 * 8 * a[0].size))
    total = 0.0
    for b0 in range(0, a.shape[0], rows):
        block = _box_sums(kind, (c[b0:b0 + rows].astype(np.float64) - a[b0:b0 + rows].astype(np.float64))
                          * g[b0:b0 + rows].astype(np.float64))
        total = total + (np.abs(block) if absolute else block).sum(axis=0)
    return total / a.shape[0]


def _values(metric, base_rows, mean_change):
    """The metric (batch value, normalised for Recovery) of the estimated patched runs
    [...], from the base run's rows [B] and the changes averaged over the rows [...].
    Every built-in metric's batch value is a function of the mean of its rows, so the
    mean of the changed rows is all it needs."""
    mean = float(np.mean(base_rows.astype(np.float64))) + np.asarray(mean_change, np.float64)
    return np.asarray(metric.reduce(mean[..., None]), np.float64)


def _row_scale(metric):
    """The factor from a change of every row's metric to a change of the reported value:
    the batch mean's own units, divided by |clean - corrupted| for Recovery."""
    if isinstance(metric, _metrics.Recovery):
        return 1.0 / abs(metric.clean - metric.corrupted)
    return 1.0


def _attribute(model, corrupted_tokens, clean_cache, metric, grids, attention_mask, interventions,
               progress, qk_fix, graddrop):
    """Estimates of several grids of patches from one backward pass (n_layers with
    GradDrop). Each grid is (kind, site suffix); returns one float32 array per grid,
    [n_layers, ...] as the exact sweep's."""
    inner = _check_metric(metric)
    tokens, mask = model._check_tokens(corrupted_tokens, attention_mask)
    base = _check_options(model, qk_fix, graddrop, interventions, grids)
    B, T = tokens.shape
    L = model.n_layers
    grad_suffixes, qk = _needs(model, grids, qk_fix)
    rotary = bool(model.arch.get("rotary_dim"))
    if qk:
        _check_qk_memory(model, T)

    # the clean values the exact patches would write (checked as the sweep checks them)
    value_suffixes = [s for _, s in grids if s not in qk] + qk
    clean = {}
    for suffix in dict.fromkeys(value_suffixes):
        for layer in range(L):
            name = f"blocks.{layer}.{suffix}"
            clean[name] = _source_array(model, clean_cache, name, suffix, B, T, "clean_cache")
            if clean[name].shape[0] != B:
                clean[name] = np.broadcast_to(clean[name], (B,) + clean[name].shape[1:])
    act_suffixes = [s for s in value_suffixes if s not in qk]
    if qk:
        act_suffixes += ["attn.hook_rot_q", "attn.hook_rot_k"] if rotary else ["attn.hook_q", "attn.hook_k"]
        if model.arch.get("qk_norm") == 2:  # the pre-norm values too (_whole_norm_ratios)
            act_suffixes += qk
    rotated_clean = _rotated_clean(model, tokens, mask, clean, qk, base) if qk else None

    def backward(extra=(), drop=None):
        # with layer `drop` held constant, the sites inside it have no gradient: not asked for
        names = [f"blocks.{l}.{s}" for s in dict.fromkeys(grad_suffixes + act_suffixes) for l in range(L)
                 if l != drop or not _inside_block(s)]
        return model.grad(tokens, inner, sites=names, interventions=list(base) + list(extra), attention_mask=mask,
                          progress=False)

    def change(g, kind, suffix, layer, absolute=False):
        return _layer_change(model, kind, suffix, layer, g.sites, g.activations, clean, rotated_clean, mask, qk_fix,
                             absolute)

    if not graddrop:
        with progress_bar(progress, "attribution (backward pass)", unit="pass", total=1) as bar:
            g = backward()
            bar.update(1)
        base_rows = np.asarray(g.metric, np.float64)
        # reduced layer by layer: the per-row changes of every layer are never all held
        return [np.stack([_values(metric, base_rows, change(g, kind, suffix, layer)) for layer in range(L)])
                .astype(np.float32) for kind, suffix in grids]

    # GradDrop (Kramár et al. 2024): for each layer l one backward pass with l's writes to
    # the residual stream (attention and MLP outputs, Set to their own values) held
    # constant; per prompt the magnitude |d_l| of each estimate; summed over l, divided by
    # the number of layers whose drop can leave the site a path (L - 1 inside a block, L
    # on the residual stream), averaged over the prompts.
    held = model.run(tokens, attention_mask=mask, logits=None, interventions=base,
                     cache=["blocks.*.hook_attn_out", "blocks.*.hook_mlp_out"]).cache
    totals = [[0.0] * L for _ in grids]
    with progress_bar(progress, "attribution (GradDrop backward passes)", unit="pass", total=L) as bar:
        for drop in range(L):
            hold = [Set(f"blocks.{drop}.{s}", held[f"blocks.{drop}.{s}"]) for s in ("hook_attn_out", "hook_mlp_out")]
            g = backward(hold, drop=drop)
            for i, (kind, suffix) in enumerate(grids):
                for layer in range(L):
                    if layer == drop and _inside_block(suffix):
                        continue  # its only way to the metric is held constant: a zero term
                    totals[i][layer] = totals[i][layer] + change(g, kind, suffix, layer, absolute=True)
            bar.update(1)
    scale = _row_scale(metric)
    return [(np.stack(t) * scale / ((L - 1) if _inside_block(suffix) else L)).astype(np.float32)
            for t, (_, suffix) in zip(totals, grids)]


def _inside_block(suffix):
    """Sites between a block's input and its outputs to the residual stream: GradDrop's
    term of their own layer is 0 (hook_resid_pre and hook_resid_mid also reach the
    metric through the residual connection around the block)."""
    return suffix not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


# ------------------------------------------------- the functions of mechscope.patching

_DOC = ("\n\nArguments as mechscope.patching.{name} (corrupted_tokens, clean_cache, metric, "
        "attention_mask, interventions, progress), plus qk_fix and graddrop (see "
        "mechscope.attribution). Returns the estimate, shaped as the exact sweep's result.")


def _n_heads(model, kind):
    return model.n_kv_heads if kind in ("k", "v") else model.n_heads


def _one_grid(grid, name, doc):
    def fn(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, interventions=None,
           progress=None, qk_fix=True, graddrop=False):
        return _attribute(model, corrupted_tokens, clean_cache, metric, [grid], attention_mask, interventions,
                          progress, qk_fix, graddrop)[0]
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc + _DOC.format(name=name)
    return fn


resid_pre, resid_mid, attn_out, mlp_out = (
    _one_grid(("layer_pos", suffix), name,
              f"Estimate of patching blocks.L.{suffix} at each (layer, position): [n_layers, pos].")
    for name, suffix in (("resid_pre", "hook_resid_pre"), ("resid_mid", "hook_resid_mid"),
                         ("attn_out", "hook_attn_out"), ("mlp_out", "hook_mlp_out")))

attn_head_out_by_pos, attn_head_q_by_pos, attn_head_k_by_pos, attn_head_v_by_pos = (
    _one_grid(("head_by_pos", _HEAD_SITES[kind]), f"attn_head_{kind}_by_pos",
              f"Estimate of patching one head's {_HEAD_SITES[kind]} at one position, each (layer, "
              "position, head): [n_layers, pos, n_heads] (key/value heads for k and v).")
    for kind in ("out", "q", "k", "v"))

attn_head_out_all_pos, attn_head_q_all_pos, attn_head_k_all_pos, attn_head_v_all_pos = (
    _one_grid(("head_all_pos", _HEAD_SITES[kind]), f"attn_head_{kind}_all_pos",
              f"Estimate of patching one head's {_HEAD_SITES[kind]} at every position, each (layer, "
              "head): [n_layers, n_heads] (key/value heads for k and v).")
    for kind in ("out", "q", "k", "v"))

attn_head_pattern_all_pos = _one_grid(
    ("pattern_all", _PATTERN), "attn_head_pattern_all_pos",
    "Estimate of patching one head's whole attention pattern, each (layer, head): [n_layers, n_heads].")

attn_head_pattern_by_pos = _one_grid(
    ("pattern_dest", _PATTERN), "attn_head_pattern_by_pos",
    "Estimate of patching one head's pattern row of one destination, each (layer, head, dest): "
    "[n_layers, n_heads, pos].")

attn_head_pattern_dest_src_pos = _one_grid(
    ("pattern_entry", _PATTERN), "attn_head_pattern_dest_src_pos",
    "Estimate of patching one entry of one head's pattern, each (layer, head, dest, src): "
    "[n_layers, n_heads, pos, pos].")


def attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None,
                            interventions=None, progress=None, qk_fix=True, graddrop=False):
    """Estimates for out, q, k, v and pattern of each head at all positions:
    [5, n_layers, n_heads]. One backward pass."""
    _same_head_counts(model, "attn_head_all_pos_every")
    grids = [("head_all_pos", _HEAD_SITES[k]) for k in ("out", "q", "k", "v")] + [("pattern_all", _PATTERN)]
    return np.stack(_attribute(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                               interventions, progress, qk_fix, graddrop))


def attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None,
                           interventions=None, progress=None, qk_fix=True, graddrop=False):
    """Estimates for out, q, k, v and pattern (by destination) of each head at each
    position: [5, n_layers, pos, n_heads]. One backward pass."""
    _same_head_counts(model, "attn_head_by_pos_every")
    grids = [("head_by_pos", _HEAD_SITES[k]) for k in ("out", "q", "k", "v")] + [("pattern_dest", _PATTERN)]
    *heads, pattern = _attribute(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                                 interventions, progress, qk_fix, graddrop)
    return np.stack(heads + [pattern.transpose(0, 2, 1)])


def block_every(model, corrupted_tokens, clean_cache, metric, *, attention_mask=None, interventions=None,
                progress=None, qk_fix=True, graddrop=False):
    """Estimates for resid_pre, attn_out and mlp_out per (layer, position): [3, n_layers, pos].
    One backward pass."""
    grids = [("layer_pos", s) for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]
    return np.stack(_attribute(model, corrupted_tokens, clean_cache, metric, grids, attention_mask,
                               interventions, progress, qk_fix, graddrop))
