"""Tokens: the token ids Model.to_tokens returns, carrying the padding mask with them."""
import numpy as np


class Tokens(np.ndarray):
    """int64 token ids [batch, pos] (a NumPy array) with ``attention_mask``: 1 for real
    tokens, 0 for padding, or None when no row is padded.

    Model.run, the metrics, sweeps and patching functions use the mask when they are
    given no attention_mask, so rows of different lengths read their own last token.
    Indexing and slicing keep the matching part of the mask; np.asarray(tokens) gives
    a plain array without it."""

    def __new__(cls, tokens, attention_mask=None):
        obj = np.asarray(tokens).view(cls)
        obj.attention_mask = None if attention_mask is None else np.asarray(attention_mask)
        return obj

    def __array_finalize__(self, obj):
        # copies, casts and element-wise results of the same shape keep the mask
        mask = getattr(obj, "attention_mask", None)
        self.attention_mask = mask if mask is not None and mask.shape == self.shape else None

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(out, Tokens):
            out.attention_mask = None
            if self.attention_mask is not None:
                try:
                    mask = np.asarray(self.attention_mask[key])
                except (IndexError, TypeError, ValueError):
                    mask = None
                if mask is not None and mask.shape == out.shape:
                    out.attention_mask = mask
        return out

    def __reduce__(self):
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.attention_mask)

    def __setstate__(self, state):
        array_state, mask = state
        super().__setstate__(array_state)
        self.attention_mask = mask
