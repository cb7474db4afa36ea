"""Text generation: a continuation sampled one token at a time, with interventions
applied at every step (steering vectors, ablations, patches), as TransformerLens's
generate does with hooks.

The first step runs the prompt and keeps every layer's keys and values (a state
recorded in C, with room for the tokens to come); each later step computes only each
row's newest token, attending to the kept keys and values, and adds its own to them. An
intervention acts where the run computes: on the prompt's positions at the first step,
on each new token at its own step, so it acts at every position once, as when every
step reruns the whole sequence (use_cache=False), which gives the same tokens.

Positions count from the prompt's start, a negative one from the prompt's end (pos=-1
is the prompt's last token, at every step). Interventions that read another run (Patch
and SubspacePatch from a cache, an array or a Source; MeanAblate over a reference set)
hold values for the prompt's positions only: they act on the prompt and leave the new
tokens alone. A Source runs on its own prompt once, at the first step, beside the
patched rows, with its own interventions. Noise draws its values over the whole
[batch, pos] box, so a longer sequence draws other values at the same position (with
the cache each position keeps the draws of the step that computed it).
"""
import copy
import numbers

import numpy as np

from ._progress import progress_bar
from .interventions import Intervention, MeanAblate, Patch, Source, SubspacePatch
from .tokens import Tokens


def _check(max_new_tokens, do_sample, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not isinstance(temperature, numbers.Real) or not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature: expected a finite number > 0 when sampling, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise ValueError(f"top_k: expected an integer >= 1 or None, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")


def _eos(model, eos_token_id):
    if eos_token_id is not None:
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, numbers.Integral) or \
                not 0 <= eos_token_id < model.d_vocab:
            raise ValueError(f"eos_token_id: expected a token id in [0, {model.d_vocab}), got {eos_token_id!r}")
        return int(eos_token_id)
    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    eos = eos if eos is not None else model.config.get("eos_token_id")
    return int(eos) if isinstance(eos, numbers.Integral) and 0 <= eos < model.d_vocab else None


def _sample(logits, rng, temperature, top_k, top_p):
    """One token per row of logits [B, V], drawn from softmax(logits / temperature)
    restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (the most likely tokens first)."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # probability of the tokens ahead of each
        keep = np.zeros_like(p, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)


def _reads_another_run(iv):
    """Its values are the prompt's positions of another run (or of a reference set)."""
    return isinstance(iv, (Patch, SubspacePatch, MeanAblate))


class _OnThePrompt(Intervention):
    """An intervention that reads another run, acting on the prompt's positions
    [0, n_prompt) of a longer sequence: compiled as for a run of the prompt's length,
    with its Source (if any) replaced by `source`, the same prompt padded on the right."""

    def __init__(self, inner, n_prompt, source):
        self.inner, self.n_prompt, self.source = inner, n_prompt, source
        self.site = inner.site

    def __repr__(self):
        return f"{self.inner!r} on the prompt's {self.n_prompt} positions"

    def compile(self, model, batch, n_pos, context):
        if isinstance(self.source, Source):  # the padded source's rows are the inner source's
            context = dict(context)
            context[id(self.inner.source)] = context[id(self.source)]
        return self.inner.compile(model, batch, self.n_prompt, context)


def _at_length(model, interventions, n_prompt, n_pos, padded, in_source=False):
    """The interventions of a step that runs n_pos > n_prompt positions: those that read
    another run, and all of a Source's own, act on the prompt; a Source's prompt is
    padded on the right to n_pos (padded: one padded copy per Source, shared by every
    intervention reading it)."""
    out = []
    for iv in interventions:
        if not (in_source or _reads_another_run(iv)):
            out.append(iv)
            continue
        source = getattr(iv, "source", None)
        if isinstance(source, Source):
            if id(source) not in padded:
                padded[id(source)] = None  # a Source that reads itself: Model._plan refuses it
                ids, mask = model._check_tokens(source.tokens, source.attention_mask)
                mask = np.ones(ids.shape, np.int32) if mask is None else mask
                grow = ((0, 0), (0, max(n_pos - ids.shape[1], 0)))
                inner = _at_length(model, model._check_interventions(source.interventions), n_prompt, n_pos,
                                   padded, in_source=True)
                padded[id(source)] = Source(np.pad(ids, grow), np.pad(mask, grow), inner)
            source = padded[id(source)] or source
        out.append(_OnThePrompt(iv, n_prompt, source))
    return out


def _counted_from_the_prompt(iv, n_prompt):
    """iv with its negative positions (pos, key_pos) counted from the prompt's end, so
    that they name the same tokens at every step (pos=-1: the prompt's last token)."""
    changed = {}
    for name in ("pos", "key_pos"):
        value = getattr(iv, name, None)
        arr = np.asarray(value) if value is not None else None
        if arr is not None and arr.dtype.kind == "i" and (arr < 0).any() and (arr >= -n_prompt).all():
            changed[name] = np.where(arr < 0, arr + n_prompt, arr).tolist()
    if not changed:
        return iv  # out-of-range positions are left for the first step to refuse
    iv = copy.copy(iv)
    iv.__dict__.update(changed)
    return iv


class _CachedSteps:
    """The last logits of each row, step after step, with the keys and values of the
    tokens computed so far kept between steps. The first step runs the prompt with
    every intervention (a Source's rows beside the patched ones, recorded too); later
    steps compute the new tokens with the interventions that act on them (those that
    read another run act on the prompt only), the patched rows alone."""

    def __init__(self, model, interventions, hook_fns, capacity):
        self.model, self.state = model, None
        self.interventions, self.hook_fns = interventions, hook_fns
        self.later = [iv for iv in interventions if not _reads_another_run(iv)]
        self.capacity = capacity  # the most real tokens a row will have

    def logits(self, ids, mask, start):
        """ids, mask [B, T]; start: each row's first position to compute (None: all)."""
        model = self.model
        interventions = self.interventions if self.state is None else self.later
        tokens, full_mask, actions = model._plan(ids.astype(np.int32), mask, interventions)
        R, T = tokens.shape  # R > B at the first step when Sources add rows
        last, _ = model._logit_positions("last", R, T, full_mask)
        # hooks see the positions this step computes: the prompt's, then each row's newest
        hook_actions, call_hook = model._hook_actions(self.hook_fns, len(ids), R, T,
                                                      None if self.state is None else start)
        if self.state is None:
            kept = 4 * 2 * model.n_layers * R * self.capacity * model.n_kv_heads * model.d_head
            hooked = sum(a[11].nbytes for a in hook_actions)
            model._check_budget(4 * R * model.d_vocab + kept + hooked, full_mask, R, T, 1)
        out = np.empty((R, 1, model.d_vocab), np.float32)
        # the first step records the prompt's keys and values with room for the rest; each
        # later step appends its tokens' to them (row r to row r: a Source's rows, after
        # the patched ones, stay as the first step left them)
        kw = {"capacity": self.capacity} if self.state is None else \
            {"state": self.state, "start_pos": start.astype(np.int32)}
        _, self.state = model._core.run(tokens, full_mask, actions + hook_actions, last, out, call_hook,
                                        record=True, **kw)
        return out[:len(ids), 0]


def generate(model, tokens, max_new_tokens=20, *, do_sample=True, temperature=1.0, top_k=None, top_p=None,
             seed=None, stop_at_eos=True, eos_token_id=None, interventions=None, attention_mask=None,
             progress=None, use_cache=True, hooks=None):
    """See Model.generate."""
    _check(max_new_tokens, do_sample, temperature, top_k, top_p)
    if not isinstance(use_cache, bool):
        raise ValueError(f"use_cache: expected True or False, got {use_cache!r}")
    interventions = model._check_interventions(interventions)
    hook_fns = model._resolve_hooks(hooks)
    text_in = isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str))
    single = isinstance(tokens, str)
    ids, mask = model._check_tokens(tokens, attention_mask)  # text -> tokens; shapes, ids and mask checked
    if mask is None:
        mask = np.ones(ids.shape, np.int32)
    # each row's next token goes right after its last real one
    length = ids.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1)
    longest = int(mask.sum(axis=1).max()) + max_new_tokens
    if longest > model.n_ctx:
        raise ValueError(f"max_new_tokens: {max_new_tokens} new tokens after {longest - max_new_tokens} would "
                         f"exceed the model's {model.n_ctx} positions")
    eos = _eos(model, eos_token_id) if stop_at_eos else None
    pad = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
    pad = pad if pad is not None else (eos if eos is not None else 0)
    n_prompt = ids.shape[1]
    interventions = [iv if _reads_another_run(iv) else _counted_from_the_prompt(iv, n_prompt)
                     for iv in interventions]
    if any(_reads_another_run(iv) for iv in interventions) and (length < n_prompt).any():
        raise ValueError("interventions: a patch from another run (or a mean ablation) acts on the prompt's "
                         "positions, and a row padded on the right would write its new tokens among them; "
                         "pad the prompts on the left")
    rng = np.random.default_rng(seed)
    ids, mask = ids.astype(np.int64), mask.copy()
    done = np.zeros(len(ids), bool)
    rows = np.arange(len(ids))
    cached = _CachedSteps(model, interventions, hook_fns, max(longest, n_prompt)) if use_cache else None
    start = None
    with progress_bar(progress, "generating", "token", total=max_new_tokens) as bar:
        for _ in range(max_new_tokens):
            if done.all():
                break
            if cached is not None:
                logits = cached.logits(ids, mask, start)
            else:
                now = interventions if ids.shape[1] == n_prompt else \
                    _at_length(model, interventions, n_prompt, ids.shape[1], {})
                logits = model.run(Tokens(ids, mask), logits="last", interventions=now, hooks=hooks).logits
            if np.isnan(logits[~done]).any():
                raise ValueError("generate: the logits of a row are NaN (an intervention wrote NaN?)")
            if do_sample:
                new = _sample(logits, rng, temperature, top_k, top_p)
            else:
                new = np.argmax(logits, axis=1)
            grow = int(length[~done].max()) + 1 - ids.shape[1]
            if grow > 0:
                ids = np.concatenate([ids, np.full((len(ids), grow), pad, np.int64)], axis=1)
                mask = np.concatenate([mask, np.zeros((len(ids), grow), np.int32)], axis=1)
            live = rows[~done]
            ids[live, length[live]] = new[live]
            mask[live, length[live]] = 1
            length[live] += 1
            start = length - 1  # the next step computes each row's newest token (a finished row's last)
            if eos is not None:
                done |= (new == eos) & ~done
            bar.update(1)
    out = Tokens(ids, None if mask.all() else mask)
    if not text_in:
        return out
    bos = model._bos() if model._prepend_bos(None) else None
    texts = []
    for row, keep in zip(ids, mask):
        real = [int(t) for t in row[keep != 0]]
        if bos is not None and real and real[0] == bos:
            real = real[1:]
        if eos is not None and real and real[-1] == eos:
            real = real[:-1]
        texts.append(model._need_tokenizer().decode(real))
    return texts[0] if single else texts
