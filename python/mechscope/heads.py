"""Attention heads found by the shape of their attention patterns: previous-token,
duplicate-token and induction heads, or heads matching any pattern you give, scored for
every head of every layer from one run.

    tokens = ms.heads.repeated_tokens(model, 50, batch=4, seed=0)  # BOS, 50 random ids, the same 50 again
    scores = ms.heads.detect(model, tokens, "induction_head")      # [layers, heads]
    ms.plot.heatmap(scores, layout="layer head", center=None, colorbar_label="induction score")

A detection pattern D says where a head of that kind attends: D[q, k] = 1 when query
position q should attend to key position k. A head's score with error_measure="mul" is
the share of its attention that falls where D is 1 (summed over every query position,
divided by all the attention it pays); with "abs" it is 1 minus the mean absolute
difference between its pattern and D, times the sequence length (1 is a perfect match).
These are TransformerLens's `detect_head` scores, with the same pattern names and
options ("abs" unrounded here; TransformerLens rounds it to 3 decimals). Each row of a
batch is scored on its own tokens, padding left out, and the rows' scores are averaged.
"""
import warnings

import numpy as np

__all__ = ["detect", "repeated_tokens"]

PATTERNS = ("previous_token_head", "duplicate_token_head", "induction_head")
_MEASURES = ("mul", "abs")


def detect(model, tokens, pattern, *, heads=None, exclude_bos=False, exclude_current_token=False,
           error_measure="mul", per_row=False, attention_mask=None, interventions=None):
    """How much each head's attention pattern looks like ``pattern``.

    pattern: "previous_token_head" (each token attends to the one before it),
    "duplicate_token_head" (to earlier copies of itself), "induction_head" (to the token
    after an earlier copy of itself), each built from every row's own tokens; or an
    array [pos, pos] (or [batch, pos, pos]), lower triangular, for a batch without padding.
    heads: None (every head) or the heads to score, as (layer, head) pairs or a dict
    {layer: [heads]}; the others get -1, and only their layers' patterns are kept.
    exclude_bos / exclude_current_token: leave the attention to each row's first token /
    to the query's own position out of the comparison.
    error_measure: "mul" or "abs" (see the module's text).
    per_row: True returns each row's scores [batch, layers, heads] instead of their mean.
    interventions: applied in the run, as in ``model.run``.
    Returns float64 scores [layers, heads].
    """
    if error_measure not in _MEASURES:
        raise ValueError(f"error_measure: expected one of {list(_MEASURES)}, got {error_measure!r}")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    chosen = _chosen_heads(model, heads)
    given = _given_pattern(pattern, B, T, mask, error_measure)
    layers = sorted({layer for layer, _ in chosen})
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    run = model.run(tokens, attention_mask=mask, cache=names, logits=None, interventions=interventions)
    scores = np.full((B, model.n_layers, model.n_heads), -1.0)
    for b in range(B):
        real = np.arange(T) if mask is None else np.flatnonzero(mask[b])
        target = given[b] if given is not None else _named_pattern(pattern, tokens[b, real])
        for layer, name in zip(layers, names):
            attention = np.asarray(run.cache[name][b], dtype=np.float64)[:, real[:, None], real[None, :]]
            row = _similarity(attention, target, exclude_bos, exclude_current_token, error_measure, b)
            hs = [h for l, h in chosen if l == layer]
            scores[b, layer, hs] = row[hs]
    return scores if per_row else scores.mean(0)


def repeated_tokens(model, n, batch=1, seed=0):
    """Random token ids repeated once: [batch, 1 + 2n] (the BOS token, n ids drawn
    uniformly from the vocabulary with ``numpy.random.default_rng(seed)``, the same n
    again), or [batch, 2n] for a model whose tokenizer adds no BOS token. On the second
    copy an induction head attends to the token after the current one's first
    occurrence, so ``detect(model, repeated_tokens(model, n), "induction_head")`` finds them."""
    n, batch = _count(n, "n"), _count(batch, "batch")
    width = 2 * n + (1 if model._prepend_bos(None) else 0)
    if width > model.n_ctx:
        raise ValueError(f"n: {width} tokens do not fit the model's context of {model.n_ctx}")
    draws = np.random.default_rng(seed).integers(0, model.d_vocab, size=(batch, n))
    parts = [draws, draws]
    if model._prepend_bos(None):
        parts.insert(0, np.full((batch, 1), model._bos()))
    return np.concatenate(parts, axis=1).astype(np.int64)


# ---------------------------------------------------------------- helpers

def _count(value, argument):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument}: expected a positive int, got {value!r}")
    return int(value)


def _chosen_heads(model, heads):
    """-> list of (layer, head) to score."""
    L, H = model.n_layers, model.n_heads
    if heads is None:
        return [(layer, head) for layer in range(L) for head in range(H)]
    if isinstance(heads, dict):
        heads = [(layer, head) for layer, hs in heads.items() for head in hs]
    chosen = []
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in item)):
            raise TypeError(f"heads: expected (layer, head) pairs of ints or a dict {{layer: [heads]}}, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < L and 0 <= head < H):
            raise ValueError(f"heads: ({layer}, {head}) is not a head of this model ({L} layers, {H} heads)")
        chosen.append((layer, head))
    if not chosen:
        raise ValueError("heads: empty")
    return chosen


def _given_pattern(pattern, B, T, mask, error_measure):
    """A pattern array checked -> float64 [batch, pos, pos]; a pattern name -> None."""
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern: expected an array or one of {list(PATTERNS)}, got {pattern!r}")
        return None
    given = np.asarray(pattern)
    if given.dtype == bool or not np.issubdtype(given.dtype, np.number) or np.iscomplexobj(given):
        raise TypeError(f"pattern: expected a real array or one of {list(PATTERNS)}, got dtype {given.dtype}")
    if mask is not None and not mask.all():
        raise ValueError("pattern: an array pattern is given in the batch's positions, so the batch "
                         "must have no padding (score rows of different lengths separately)")
    if given.shape not in ((T, T), (B, T, T)):
        raise ValueError(f"pattern: expected shape [{T}, {T}] or [{B}, {T}, {T}] for tokens "
                         f"[{B}, {T}], got {list(given.shape)}")
    given = np.broadcast_to(given.astype(np.float64), (B, T, T))
    if not np.isfinite(given).all():
        raise ValueError("pattern: not finite")
    if np.triu(given, 1).any():
        raise ValueError("pattern: must be lower triangular (a query never attends to a later key)")
    if error_measure == "mul" and not np.isin(given, (0.0, 1.0)).all():
        warnings.warn("pattern: values other than 0 and 1 with error_measure='mul' (the score is then "
                      "not a share of attention)", stacklevel=3)
    return given


def _named_pattern(name, ids):
    """The detection pattern of one row's real tokens ``ids`` [n] -> float64 [n, n]."""
    n = len(ids)
    if name == "previous_token_head":
        return np.eye(n, k=-1)
    same = ids[:, None] == ids[None, :]
    if name == "duplicate_token_head":  # an earlier copy of the query's token
        return np.tril(same, -1).astype(np.float64)
    # induction_head: the key right after an earlier copy of the query's token
    out = np.zeros((n, n))
    out[:, 1:] = np.tril(same[:, :-1], -1)
    return out


def _similarity(attention, target, exclude_bos, exclude_current_token, error_measure, row):
    """Scores of each head's pattern attention [heads, n, n] against target [n, n] -> [heads]."""
    n = target.shape[0]
    keep = np.ones((n, n))
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(keep, 0)
    if error_measure == "mul":
        attention = attention * keep
        total = attention.sum((1, 2))
        if not (total > 0).all():
            raise ValueError(f"row {row}: no attention is left to score once the excluded positions are "
                             f"left out ({n} real tokens)")
        return (attention * target).sum((1, 2)) / total
    return 1.0 - (np.abs(attention - target) * keep).sum((1, 2)) / n
