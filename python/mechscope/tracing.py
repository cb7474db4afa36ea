"""Causal tracing as in ROME (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT").

The subject's token embeddings are corrupted with Gaussian noise in several copies
of the prompt; then, one (layer, token) at a time, a state of the clean run is
restored in the corrupted copies, and the probability of the clean answer is
measured. States whose restoration brings the answer back carry the fact.

    result = ms.tracing.trace(model, "Tom Baker lives in", subject="Tom Baker")
    result.scores              # [tokens, layers]: P(answer) with that state restored
    result.indirect_effect     # scores - low_score
    ms.plot.trace(result)

The whole map (every token x every layer) is one sweep executed in C.
"""
from dataclasses import dataclass, field

import numpy as np

from . import metrics as _metrics
from .interventions import Noise
from .patching import _run_sweep, _source_array, _Write
from . import _dtypes, sites

__all__ = ["TraceResult", "embedding_std", "trace", "AverageTrace", "average_indirect_effect", "TOKEN_CLASSES"]

_KIND_SITES = {None: "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclass
class TraceResult:
    """The outcome of one causal trace, with the fields of ROME's saved results.

    scores: [tokens, layers] mean probability of the answer over the noised copies
        with the state at (token, layer) restored (for kind "mlp"/"attn": the module
        outputs at that token over the window of layers around the layer).
    low_score: the same probability with nothing restored (the corrupted run).
    high_score: the clean run's probability of the answer.
    """
    scores: np.ndarray
    low_score: float
    high_score: float
    subject_range: tuple
    answer: int
    kind: str
    window: int
    noise: float
    tokens: np.ndarray
    str_tokens: list = field(default=None)
    answer_str: str = None

    @property
    def indirect_effect(self):
        """scores - low_score: what restoring each state recovers."""
        return self.scores - self.low_score

    @property
    def total_effect(self):
        """high_score - low_score: what the noise took away."""
        return self.high_score - self.low_score

    def __repr__(self):
        return (f"TraceResult(kind={self.kind or 'hidden'}, scores={list(self.scores.shape)}, "
                f"high_score={self.high_score:.4f}, low_score={self.low_score:.4f}, "
                f"subject_range={self.subject_range}, answer={self.answer_str or self.answer!r})")


def embedding_std(model, subjects):
    """The standard deviation of the token embeddings as hook_embed holds them (before
    position embeddings; Gemma's multiplied by sqrt(d_model)) over all tokens of the given subjects (strings, or token lists), as ROME computes
    the scale of its noise: noise = 3 * embedding_std(model, subjects)."""
    rows = []
    for s in subjects:
        ids = model._encode(s) if isinstance(s, str) else [int(t) for t in np.asarray(s).ravel()]
        if not ids:
            continue
        if min(ids) < 0 or max(ids) >= model.d_vocab:
            raise ValueError(f"subjects: token id out of range [0, {model.d_vocab})")
        rows.append(np.asarray(ids))
    if not rows:
        raise ValueError("subjects: expected at least one non-empty subject")
    wte = model._core_weights["embed"]
    std = _dtypes.to_float32(wte[np.concatenate(rows)]).astype(np.float64).std(ddof=1)
    return float(std * _embed_scale(model))


def _embed_scale(model):
    """hook_embed = embedding row * this (Gemma's sqrt(d_model)): the noise is added to
    hook_embed, so its scale is that of the rows as the model multiplies them."""
    return model.arch.get("embed_scale", 1.0)


def _find_subject(model, tokens, subject):
    """The token range [b, e) covering `subject` in the prompt's decoded text. Token k
    starts where the decoding of the first k tokens ends (this holds for byte-level
    BPE and for word-level tokenizers that join words with spaces alike)."""
    tok = model._need_tokenizer()
    text = tok.decode([int(t) for t in tokens])
    at = text.find(subject)
    if at < 0:
        raise ValueError(f"subject: {subject!r} not found in the prompt {text!r}")
    starts = [len(tok.decode([int(t) for t in tokens[:k]])) for k in range(len(tokens) + 1)]
    b = max(k for k in range(len(tokens)) if starts[k] <= at)
    e = min(k for k in range(b + 1, len(tokens) + 1) if starts[k] >= at + len(subject))
    return b, e


def trace(model, prompt, subject, answer=None, *, kind=None, window=10, noise=None, samples=10,
          seed=1, progress=None):
    """Trace which states of the model carry the prediction (ROME's causal tracing).

    prompt: one prompt, as text (with the model's tokenizer) or tokens [pos].
    subject: the token range (b, e) to corrupt, or the subject's text.
    answer: the token whose probability is measured; default: the clean run's top
        prediction, as in ROME.
    kind: None restores the residual stream after each block (ROME's hidden states);
        "mlp" or "attn" restores that module's outputs at the token over `window`
        layers around each layer, [L - window // 2, L + window - window // 2).
    noise: the standard deviation of the noise; default 3 * the standard deviation of
        all token embeddings. ROME uses 3 * embedding_std(model, all_subjects).
    samples, seed: noised copies, drawn as numpy.random.RandomState(seed).randn(
        samples, e - b, d_model) (seed 1 gives ROME's draws).
    """
    if kind not in _KIND_SITES:
        raise ValueError(f"kind: expected None, 'mlp' or 'attn', got {kind!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected a positive int, got {samples!r}")
    tokens, _ = model._check_tokens(prompt, None)
    if tokens.shape[0] != 1:
        raise ValueError(f"prompt: trace takes one prompt, got a batch of {tokens.shape[0]}")
    tokens = tokens[0]
    T = tokens.shape[0]
    if isinstance(subject, str):
        b, e = _find_subject(model, tokens, subject)
    else:
        try:
            b, e = (int(x) for x in subject)
        except (TypeError, ValueError):
            raise TypeError("subject: expected the subject's text or a token range (b, e)") from None
        if not 0 <= b < e <= T:
            raise ValueError(f"subject: range ({b}, {e}) is not inside the prompt's {T} tokens")
    if noise is None:
        noise = 3.0 * _dtypes.std(model._core_weights["embed"]) * _embed_scale(model)
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite standard deviation >= 0, got {noise!r}")

    site = _KIND_SITES[kind]
    clean = model.run(tokens[None], cache=f"blocks.*.{site}", logits="last")
    clean_logits = clean.logits[0].astype(np.float64)
    probs = np.exp(clean_logits - clean_logits.max())
    probs /= probs.sum()
    if answer is None:
        answer = int(np.argmax(probs))
    answer = int(answer)
    if not 0 <= answer < model.d_vocab:
        raise ValueError(f"answer: token id {answer} out of range [0, {model.d_vocab})")

    # the clean states, one row broadcast to every noised copy
    L = model.n_layers
    code = sites.SITE_CODES[site]
    sources = [_source_array(model, clean.cache, f"blocks.{layer}.{site}", site, 1, T)
               for layer in range(L)]
    width = model.d_model
    patches = []
    for t in range(T):
        for layer in range(L):
            if kind is None:
                layers = [layer]
            else:
                layers = range(max(0, layer - window // 2), min(L, layer + window - window // 2))
            patches.append([_Write(f"blocks.{l}.{site}", code, l, (t, 1), (0, width), (0, 0), sources[l])
                            for l in layers])
    noised = np.broadcast_to(tokens, (samples, T))
    corrupt = [Noise("hook_embed", std=noise, seed=seed, pos=list(range(b, e)))]
    metric = _metrics.Prob(answer)
    values, base = _run_sweep(model, noised, None, patches, metric, corrupt, progress)
    scores = values.astype(np.float64).mean(axis=1).reshape(T, L)
    str_tokens = answer_str = None
    if model.tokenizer is not None:
        str_tokens = model.to_str_tokens(tokens)
        answer_str = model.tokenizer.decode([answer])
    return TraceResult(scores=scores.astype(np.float32), low_score=float(np.mean(base, dtype=np.float64)),
                       high_score=float(probs[answer]), subject_range=(b, e), answer=answer,
                       kind=kind or "", window=window, noise=noise, tokens=tokens.astype(np.int64),
                       str_tokens=str_tokens, answer_str=answer_str)


# ---------------------------------------------------------------- many facts

TOKEN_CLASSES = ("first subject token", "middle subject tokens", "last subject token",
                 "first subsequent token", "further tokens", "last token")


def _class_rows(b, e, T):
    """The token positions of each of ROME's token classes in a prompt of T tokens with
    the subject at [b, e). A class the prompt lacks is empty (a one-token subject has
    no middle; a subject just before the last token has no first subsequent token
    apart from the last token, which is counted there only)."""
    return [[b], list(range(b + 1, e - 1)), [e - 1], [e] if e < T - 1 else [], list(range(e + 1, T - 1)),
            [T - 1]]


@dataclass
class AverageTrace:
    """ROME's average indirect effect over many facts.

    aie: [rows, layers] mean over the kept prompts of (score with the state restored)
        - (corrupted score); rows are ROME's token classes (TOKEN_CLASSES) or positions.
    low, high, se: the bootstrap interval and standard error over prompts [rows, layers].
    counts: [rows] prompts that have the row (a class may be empty in a prompt).
    per_prompt: [kept prompts, rows, layers] each prompt's indirect effect (NaN: row absent).
    kept: indices of the prompts traced (correctly predicted, when checked).
    results: their TraceResults. low_score, high_score: means over the kept prompts.
    """
    aie: np.ndarray
    low: np.ndarray
    high: np.ndarray
    se: np.ndarray
    rows: list
    counts: np.ndarray
    per_prompt: np.ndarray
    kept: np.ndarray
    results: list
    low_score: float
    high_score: float
    kind: str

    @property
    def total_effect(self):
        """Mean over the kept prompts of high_score - low_score."""
        return self.high_score - self.low_score

    def __repr__(self):
        return (f"AverageTrace(kind={self.kind or 'hidden'}, aie={list(self.aie.shape)}, prompts={self.kept.size}, "
                f"total_effect={self.total_effect:.4f}, max aie={np.nanmax(self.aie):.4f})")

    def plot(self, title=None, ax=None):
        """The AIE map as in ROME's figures: rows down, layers across."""
        from .plot import _pyplot
        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(4 + 0.2 * self.aie.shape[1], 1.0 + 0.35 * self.aie.shape[0]),
                                   constrained_layout=True)
        else:
            fig = ax.figure
        image = ax.pcolor(self.aie, cmap={"": "Purples", "mlp": "Greens", "attn": "Reds"}.get(self.kind, "Purples"))
        ax.invert_yaxis()
        ax.set_yticks(np.arange(self.aie.shape[0]) + 0.5)
        ax.set_yticklabels([str(r) for r in self.rows])
        ax.set_xticks(np.arange(self.aie.shape[1]) + 0.5)
        ax.set_xticklabels(range(self.aie.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(title or f"Average indirect effect over {self.kept.size} prompts")
        fig.colorbar(image, ax=ax, label="AIE")
        return fig


def average_indirect_effect(model, prompts, subjects, answers=None, *, by="class", correct_only=True, kind=None,
                            window=10, noise=None, samples=10, seed=1, n_boot=1000, boot_seed=0, level=0.95,
                            method="percentile", progress=None):
    """ROME's average indirect effect (AIE): trace() every fact and average each
    state's indirect effect, scores - low_score, over the prompts.

    prompts, subjects: one subject (text or token range) per prompt; answers: the
    token (id, or text whose first token is used) each fact should predict, or None
    (each prompt's own top prediction, as trace() does). correct_only: trace only
    the prompts whose clean top prediction is their answer, as ROME does (needs
    answers). by: "class" averages each prompt's tokens within ROME's six token
    classes (TOKEN_CLASSES) first; "position" keeps positions (prompts of one length).
    noise: default 3 * embedding_std(model, subjects), ROME's choice. kind, window,
    samples, seed: as trace(). The interval is a seeded bootstrap over prompts
    (n_boot, boot_seed, level, method "percentile" or "bca"). Returns an AverageTrace.
    """
    from .mediation.bootstrap import bootstrap
    if by not in ("class", "position"):
        raise ValueError(f"by: expected 'class' or 'position', got {by!r}")
    if isinstance(prompts, (str, np.ndarray)) and np.ndim(prompts) < 2:
        raise TypeError("prompts: expected a list of prompts (for one prompt, use trace)")
    prompts, subjects = list(prompts), list(subjects)
    if not prompts or len(subjects) != len(prompts):
        raise ValueError(f"subjects: expected one subject per prompt ({len(prompts)}), got {len(subjects)}")
    if answers is not None:
        answers = list(answers)
        if len(answers) != len(prompts):
            raise ValueError(f"answers: expected one answer per prompt ({len(prompts)}), got {len(answers)}")
        ids = []
        for i, ans in enumerate(answers):
            if isinstance(ans, str):
                enc = model._encode(ans)
                if not enc:
                    raise ValueError(f"answers[{i}]: {ans!r} has no tokens")
                ans = enc[0]
            ans = int(ans)
            if not 0 <= ans < model.d_vocab:
                raise ValueError(f"answers[{i}]: token id {ans} out of range [0, {model.d_vocab})")
            ids.append(ans)
        answers = ids
    if not isinstance(correct_only, (bool, np.bool_)):
        raise TypeError(f"correct_only: expected a bool, got {correct_only!r}")
    tokens = []
    for i, p in enumerate(prompts):
        t, _ = model._check_tokens(p, None)
        if t.shape[0] != 1:
            raise ValueError(f"prompts[{i}]: expected one prompt, got a batch of {t.shape[0]}")
        tokens.append(t[0])
    if by == "position" and len({t.size for t in tokens}) > 1:
        raise ValueError("by: 'position' needs prompts of one length; use by='class'")
    if noise is None:
        parts = [s if isinstance(s, str) else tokens[i][int(s[0]):int(s[1])] for i, s in enumerate(subjects)]
        noise = 3.0 * embedding_std(model, parts)
    keep = list(range(len(prompts)))
    if answers is not None and correct_only:
        top = [int(np.argmax(model.run(t[None], logits="last").logits[0])) for t in tokens]
        keep = [i for i in keep if top[i] == answers[i]]
        if not keep:
            raise ValueError("answers: the model predicts none of the facts correctly (correct_only=True)")
    results = []
    for i in keep:
        results.append(trace(model, tokens[i], subjects[i], None if answers is None else answers[i], kind=kind,
                             window=window, noise=noise, samples=samples, seed=seed, progress=progress))
    L = model.n_layers
    if by == "class":
        rows = list(TOKEN_CLASSES)
        per = np.full((len(results), len(rows), L), np.nan)
        for j, r in enumerate(results):
            ie = r.indirect_effect.astype(np.float64)
            for c, pos in enumerate(_class_rows(*r.subject_range, ie.shape[0])):
                if pos:
                    per[j, c] = ie[pos].mean(0)
    else:
        rows = list(range(tokens[0].size))
        per = np.stack([r.indirect_effect.astype(np.float64) for r in results])
    present = np.isfinite(per).reshape(len(results), -1).astype(np.float64)
    values = np.nan_to_num(per).reshape(len(results), -1)

    def mean(W):  # W [k, prompts]: each row's weighted mean over the prompts that have it
        total = W @ present
        return np.divide(W @ values, total, out=np.full(total.shape, np.nan), where=total > 0)

    res = bootstrap(mean, len(results), None, n_boot=n_boot, seed=boot_seed, level=level, method=method)
    shape = (len(rows), L)
    return AverageTrace(aie=res["estimate"].reshape(shape), low=res["low"].reshape(shape),
                        high=res["high"].reshape(shape), se=res["se"].reshape(shape), rows=rows,
                        counts=present.reshape(len(results), *shape)[:, :, 0].sum(0).astype(int),
                        per_prompt=per, kept=np.asarray(keep), results=results,
                        low_score=float(np.mean([r.low_score for r in results])),
                        high_score=float(np.mean([r.high_score for r in results])), kind=kind or "")
