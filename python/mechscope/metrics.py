"""Metrics that the C core computes from a run's final states: one value per row,
averaged over the batch. Any Python function of the logits [batch, pos, vocab] that
returns a scalar also works where a metric is taken (on a slower path)."""
import numpy as np

# the core's metric codes
_LOGIT_DIFF, _LOGPROB, _PROB, _KL, _ACCURACY = 1, 2, 3, 4, 5


def _per_row(value, batch, vocab, argument):
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{argument}: expected token ids (int or [batch] ints)")
    arr = np.broadcast_to(arr, (batch,)) if arr.ndim == 0 else arr
    if arr.shape != (batch,):
        raise ValueError(f"{argument}: expected one token per row ({batch}), got shape {list(arr.shape)}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"{argument}: token id out of range [0, {vocab})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def last_positions(mask, batch, n_pos):
    """Each row's last real position."""
    if mask is None:
        return np.full(batch, n_pos - 1, np.int32)
    return (n_pos - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)).astype(np.int32)


def positions(pos, mask, batch, n_pos):
    """The position each row reads: pos None (each row's last real token), an int (a
    negative one counts from the block's end) or one int per row -> int32 [batch]."""
    if pos is None:
        return last_positions(mask, batch, n_pos)
    pos = np.asarray(pos)
    if pos.dtype == bool or not np.issubdtype(pos.dtype, np.integer):
        raise TypeError("pos: expected an int or one int per row")
    pos = np.broadcast_to(pos, (batch,)) if pos.ndim == 0 else pos
    if pos.shape != (batch,):
        raise ValueError(f"pos: expected one position per row ({batch}), got shape {list(pos.shape)}")
    pos = np.where(pos < 0, pos + n_pos, pos)
    if pos.min() < 0 or pos.max() >= n_pos:
        raise ValueError(f"pos: position out of range [0, {n_pos})")
    if mask is not None:
        padding = np.flatnonzero(np.asarray(mask)[np.arange(batch), pos] == 0)
        if padding.size:
            row = int(padding[0])
            raise ValueError(f"pos: row {row} would be read at position {int(pos[row])}, which is padding")
    return np.ascontiguousarray(pos, dtype=np.int32)


class Metric:
    """Base class. pos: the position each row's metric reads (default: each row's
    last real token); an int or one per row."""
    kind = 0

    def __init__(self, pos=None):
        self.pos = pos

    def _positions(self, mask, batch, n_pos):
        return positions(self.pos, mask, batch, n_pos)

    def core_args(self, model, batch, n_pos, mask):
        """-> dict of the core's metric arguments for a [batch, n_pos] run."""
        return {"metric": self.kind, "pos": self._positions(mask, batch, n_pos), "correct": None,
                "wrong": None, "ref_logprob": None}

    def reduce(self, per_row):
        """Per-row values [..., batch] -> the metric's value (the batch mean)."""
        return np.asarray(per_row, np.float64).mean(axis=-1).astype(np.float32)

    def rows(self, per_row):
        """Raw per-row values [..., batch] -> the metric's value for each row (the
        identity here; Recovery normalises each row)."""
        return np.asarray(per_row, np.float32)

    def _raw_rows(self, model, tokens, attention_mask=None, interventions=None):
        """The core's per-row values of one (optionally intervened) run; interventions
        may patch from Sources, which add rows whose values are dropped."""
        tokens, mask = model._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        args = self.core_args(model, B, T, mask)
        full_tokens, full_mask, actions = model._plan(tokens, mask, interventions)
        R = full_tokens.shape[0]
        if R > B:  # the Sources' rows: read their own last real token, answers of row 0
            args["pos"] = np.concatenate([args["pos"], last_positions(None if full_mask is None else full_mask[B:],
                                                                      R - B, T)])
            for key in ("correct", "wrong", "ref_logprob"):
                if args[key] is not None:
                    args[key] = np.concatenate([args[key], np.repeat(args[key][:1], R - B, axis=0)])
        out = model._core.run(full_tokens, full_mask, actions, None, None, None, metric=args["metric"],
                              metric_pos=args["pos"], correct=args["correct"],
                              wrong=args["wrong"], ref_logprob=args["ref_logprob"])
        return out[:B]

    def per_row(self, model, tokens, attention_mask=None, interventions=None):
        """The metric's value for each row of one (optionally intervened) run."""
        return self.rows(self._raw_rows(model, tokens, attention_mask, interventions))

    def evaluate(self, model, tokens, attention_mask=None, interventions=None):
        """The metric's value (batch mean) on one run."""
        return float(self.reduce(self._raw_rows(model, tokens, attention_mask, interventions)))


class LogitDiff(Metric):
    """logit[correct] - logit[wrong] at each row's position; answers per row or shared."""
    kind = _LOGIT_DIFF

    def __init__(self, correct, wrong, pos=None):
        super().__init__(pos)
        self.correct, self.wrong = correct, wrong

    def core_args(self, model, batch, n_pos, mask):
        args = super().core_args(model, batch, n_pos, mask)
        args["correct"] = _per_row(self.correct, batch, model.d_vocab, "correct")
        args["wrong"] = _per_row(self.wrong, batch, model.d_vocab, "wrong")
        return args


class LogProb(Metric):
    """log softmax(logits)[correct] at each row's position."""
    kind = _LOGPROB

    def __init__(self, correct, pos=None):
        super().__init__(pos)
        self.correct = correct

    def core_args(self, model, batch, n_pos, mask):
        args = super().core_args(model, batch, n_pos, mask)
        args["correct"] = _per_row(self.correct, batch, model.d_vocab, "correct")
        return args


class Prob(LogProb):
    """softmax(logits)[correct] at each row's position."""
    kind = _PROB


class Accuracy(LogProb):
    """1 where the answer is the top token at each row's position (the first of equal
    logits, as numpy.argmax), else 0: the batch value is the share answered; per row,
    whether each row is. Not differentiable (``model.grad`` refuses it)."""
    kind = _ACCURACY

    def __init__(self, answer, pos=None):
        super().__init__(answer, pos)


class KL(Metric):
    """KL(reference || run) of the next-token distributions at each row's position.

    reference_logits: [batch, vocab], e.g. the clean run's logits="last"."""
    kind = _KL

    def __init__(self, reference_logits, pos=None):
        super().__init__(pos)
        ref = np.asarray(reference_logits, np.float64)
        if ref.ndim != 2:
            raise ValueError(f"reference_logits: expected [batch, vocab], got shape {list(ref.shape)}")
        # NaN or +inf has no distribution to compare with (and would read as a KL of 0);
        # -inf is a token of probability 0, as long as some token of the row is finite
        bad = np.isnan(ref) | (ref == np.inf)
        if bad.any() or not np.isfinite(ref).any(axis=1).all():
            r = int(np.flatnonzero(bad.any(axis=1) | ~np.isfinite(ref).any(axis=1))[0])
            raise ValueError(f"reference_logits: row {r} is not a distribution (NaN, +inf, or no finite "
                             "logit); the reference run's logits must be finite")
        shifted = ref - ref.max(axis=1, keepdims=True)
        self.ref_logprob = (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)

    def core_args(self, model, batch, n_pos, mask):
        args = super().core_args(model, batch, n_pos, mask)
        if self.ref_logprob.shape != (batch, model.d_vocab):
            raise ValueError(f"reference_logits: expected shape [{batch}, {model.d_vocab}], "
                             f"got {list(self.ref_logprob.shape)}")
        args["ref_logprob"] = np.ascontiguousarray(self.ref_logprob)
        return args


class Recovery(Metric):
    """The normalised recovery (patched - corrupted) / (clean - corrupted) of a metric:
    0 where a patch changes nothing, 1 where it restores the clean value.

    clean, corrupted: the metric's values on the clean and the corrupted run, as
    numbers (batch means) or one per row (Recovery.from_runs computes both). The batch
    value normalises the batch means; values per row (per_row=True) normalise each
    row by its own clean and corrupted values (NaN for a row where the two are equal)."""

    def __init__(self, metric, clean, corrupted):
        if not isinstance(metric, Metric) or isinstance(metric, Recovery):
            raise TypeError("metric: expected a mechscope metric (LogitDiff, LogProb, Prob, KL)")
        super().__init__(metric.pos)
        self.metric = metric
        self.clean_rows = np.asarray(clean, np.float64)
        self.corrupted_rows = np.asarray(corrupted, np.float64)
        for name, v in (("clean", self.clean_rows), ("corrupted", self.corrupted_rows)):
            if v.ndim > 1 or v.size == 0 or not np.isfinite(v).all():
                raise ValueError(f"{name}: expected a finite number or one per row, got {v!r}")
        self.clean, self.corrupted = float(self.clean_rows.mean()), float(self.corrupted_rows.mean())
        if self.clean == self.corrupted:
            raise ValueError("clean, corrupted: equal values leave the recovery undefined")
        self.kind = metric.kind

    @classmethod
    def from_runs(cls, metric, model, clean_tokens, corrupted_tokens, attention_mask=None):
        return cls(metric, metric.per_row(model, clean_tokens, attention_mask),
                   metric.per_row(model, corrupted_tokens, attention_mask))

    def core_args(self, model, batch, n_pos, mask):
        return self.metric.core_args(model, batch, n_pos, mask)

    def reduce(self, per_row):
        value = self.metric.reduce(per_row)
        return ((value - self.corrupted) / (self.clean - self.corrupted)).astype(np.float32)

    def rows(self, per_row):
        per_row = self.metric.rows(per_row).astype(np.float64)
        for name, v in (("clean", self.clean_rows), ("corrupted", self.corrupted_rows)):
            if v.ndim == 1 and v.shape != per_row.shape[-1:]:
                raise ValueError(f"{name}: {v.size} values per row, the run has {per_row.shape[-1]} rows "
                                 "(Recovery.from_runs on the same prompts gives one per row)")
        with np.errstate(divide="ignore", invalid="ignore"):
            den = self.clean_rows - self.corrupted_rows
            out = (per_row - self.corrupted_rows) / np.where(den == 0, np.nan, den)
        return out.astype(np.float32)
