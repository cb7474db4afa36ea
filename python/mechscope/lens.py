"""The residual stream read through the unembedding: the logit lens, the residual
stream's decomposition into what each part of the model wrote, and direct logit
attribution.

    lens = ms.lens.logit_lens(model, tokens)                        # [layers + 1, batch, vocab]
    attrs, labels = ms.lens.logit_attribution(model, tokens, mary, john, by="head",
                                              return_labels=True)   # [components, batch]
    effects = ms.lens.direction_logits(model, vectors, "blocks.3.hook_mlp_out")  # [n, vocab]
    check = ms.lens.test_prompt(model, "After John and Mary went to the store, Mary gave it to",
                                "John")                             # prints ranks and the top 10

The final residual stream is a sum: the embeddings, each attention layer's output
(each head's, plus the output bias) and each MLP's output. The final norm divides it by
one number per token (its scale), and the unembedding is linear, so with that scale held
at its value in the run each part's share of a logit is a term of its own, and the terms
add up to the logit the model computed. That is direct logit attribution; the logit lens
instead applies the final norm, with its statistics recomputed, to the residual stream as
it stands before each block.

Labels, order and values follow TransformerLens's ActivationCache (`accumulated_resid`
with `apply_ln=True`, `decompose_resid`, `get_full_resid_decomposition`, `logit_attrs`)
on the unprocessed model; attributions equal TransformerLens's on a model loaded with
`fold_ln` (which leaves the final norm's bias out: here it is one more row).
"""
from dataclasses import dataclass

import numpy as np

from . import _dtypes
from . import sites as _sites
from .architectures import NORM_LAYER
from .metrics import _per_row, positions

__all__ = ["logit_lens", "decompose", "logit_attribution", "direction_logits", "test_prompt", "PromptTest"]

_BY = ("layer", "head", "neuron")


def logit_lens(model, tokens, pos=None, *, mid=False, attention_mask=None, interventions=None,
               return_labels=False):
    """The logits the residual stream would give if the model stopped before each block.

    At position ``pos`` of each row (None: each row's last real token; an int, or one per
    row), the residual stream before each block (``blocks.L.hook_resid_pre``; with
    ``mid=True`` also ``hook_resid_mid`` after each block's attention) and after the last
    one goes through the final norm, its mean and scale recomputed for each, and the
    unembedding (and, for a model that soft-caps its logits, Gemma 2, the cap). Returns
    logits [n, batch, vocab] with labels "0_pre", ("0_mid",) ..., "final_post" (the last
    row is the model's own logits); ``return_labels=True`` returns (logits, labels).
    """
    L = model.n_layers
    labels, names = [], []
    for layer in range(L):
        labels.append(f"{layer}_pre")
        names.append(f"blocks.{layer}.hook_resid_pre")
        if mid:
            labels.append(f"{layer}_mid")
            names.append(f"blocks.{layer}.hook_resid_mid")
    labels.append("final_post")
    names.append(f"blocks.{L - 1}.hook_resid_post")
    values = _run_at(model, tokens, pos, attention_mask, interventions, names)
    stack = np.stack([values[n] for n in names])  # [n, batch, d_model]
    w, b, eps = _final_norm(model)
    if model.arch["norm"] == NORM_LAYER:
        centred = stack - stack.mean(-1, keepdims=True)
        normalized = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)
    else:
        normalized = stack / np.sqrt((stack * stack).mean(-1, keepdims=True) + eps)
    normalized = normalized * w + (0.0 if b is None else b)
    logits = normalized @ _unembedding(model).T  # [n, batch, vocab]
    if "unembed.b" in model._core_weights:  # Phi's unembedding has a bias
        logits = logits + _dtypes.to_float32(model._core_weights["unembed.b"])
    cap = model.arch.get("logit_softcap", 0.0)
    if cap:
        logits = cap * np.tanh(logits / cap)
    return (logits, labels) if return_labels else logits


def decompose(model, tokens, pos=None, *, by="layer", attention_mask=None, interventions=None,
              return_labels=False):
    """The final residual stream at ``pos`` as the sum of what each part wrote into it.

    by="layer": "embed", "pos_embed" (learned positions only), then "L_attn_out" and
    "L_mlp_out" for each layer (TransformerLens's `decompose_resid`). by="head": each
    head's output "LlHh" (its z times its rows of the output matrix), each
    "L_mlp_out", "embed", "pos_embed" and "bias", the attention output biases of every
    layer (TransformerLens's `get_full_resid_decomposition`). by="neuron": the heads,
    then each MLP neuron "LlNn" (its activation ``mlp.hook_post`` times its row of the
    MLP's output matrix), "embed", "pos_embed" and "bias", now with the MLP output biases
    too (`get_full_resid_decomposition(expand_neurons=True)`); that stack has
    layers x d_mlp rows per token (113 MB per token at GPT-2 small's size), which
    `logit_attribution` never builds. Each way the rows add up to
    ``blocks.{last}.hook_resid_post``. Returns [components, batch, d_model] (and the
    labels with ``return_labels=True``).

    With by="head", an intervention at ``hook_attn_out`` itself is not seen by the
    heads (they are read at ``hook_z``); interventions upstream of a head are.
    """
    stack, labels, _ = _decompose(model, tokens, pos, by, attention_mask, interventions, scale=False)
    return (stack, labels) if return_labels else stack


def logit_attribution(model, tokens, answer, incorrect=None, pos=None, *, by="layer", attention_mask=None,
                      interventions=None, return_labels=False):
    """Direct logit attribution: each component's share of a logit, or of a logit
    difference, at ``pos``.

    answer, incorrect: token ids (an int, or one per row); with ``incorrect`` the
    attributions are those of logit[answer] - logit[incorrect]. Each component of
    `decompose` (``by`` as there: "layer", "head" or "neuron") is centred (LayerNorm models), divided by the final
    norm's scale in the run (``ln_final.hook_scale``), multiplied by the norm's weight
    and projected on the answer's unembedding row (minus the incorrect one's). A last
    row "final_norm_bias" holds the final norm's bias term where the norm has a bias,
    and "unembed_bias" the unembedding's bias where it has one (Phi, GPT-J). The rows
    add up to the logit (difference) the model computes; for a model that soft-caps its
    logits (Gemma 2), to the logit (difference) before the cap, as the cap is not
    linear.
    Returns [components, batch] (and the labels with ``return_labels=True``).
    """
    stack, labels, (values, B, neurons) = _decompose(model, tokens, pos, by, attention_mask, interventions,
                                                     scale=True, expand_neurons=False)
    direction = _directions(model, answer, incorrect, B)  # [batch, d_model]
    w, b, _ = _final_norm(model)
    centre = model.arch["norm"] == NORM_LAYER
    if centre:
        stack = stack - stack.mean(-1, keepdims=True)
    scale = values["ln_final.hook_scale"].reshape(1, B, 1)
    attrs = np.einsum("nbc,bc->nb", stack / scale * w, direction)
    if neurons is not None:
        # a neuron's part is its activation times its output row: project the rows once
        # (centred as the parts are) on each row's direction, scaled like the parts
        read = direction * w / scale[0]  # [batch, d_model]
        per_layer = []
        for post, w_out in neurons:
            rows = w_out - w_out.mean(-1, keepdims=True) if centre else w_out
            per_layer.append((rows @ read.T) * post.T)  # [d_mlp, batch]
        n_heads = model.n_layers * model.n_heads
        attrs = np.concatenate([attrs[:n_heads]] + per_layer + [attrs[n_heads:]])
        labels = labels[:n_heads] + _neuron_labels(model) + labels[n_heads:]
    if b is not None:
        attrs = np.concatenate([attrs, (direction @ b)[None]])
        labels = labels + ["final_norm_bias"]
    if "unembed.b" in model._core_weights:
        ub = _dtypes.to_float32(model._core_weights["unembed.b"])
        answer = _per_row(answer, B, model.d_vocab, "answer")
        share = ub[answer] - (0.0 if incorrect is None else ub[_per_row(incorrect, B, model.d_vocab, "incorrect")])
        attrs = np.concatenate([attrs, np.asarray(share, attrs.dtype)[None]])
        labels = labels + ["unembed_bias"]
    return (attrs, labels) if return_labels else attrs


# ---------------------------------------------------------------- helpers

def direction_logits(model, vectors, site):
    """What each vector, written at `site`, does to the logits directly: [n, vocab]
    (or [vocab] for one vector), the tokens it promotes (large) and suppresses (small).

    The vector is carried into the residual stream by what the site adds there: a
    residual stream, the embedding or a block's attention or MLP output is itself; the
    heads' ``attn.hook_z`` [n_heads * d_head, or n_heads x d_head] goes through W_O;
    ``mlp.hook_post`` [d_mlp] through the MLP's output matrix. Then through the final
    norm's linear part with its scale held at 1 (centred for LayerNorm, times its
    weight) and the unembedding; biases are left out. Divided by a token's final-norm
    scale (``ln_final.hook_scale``), a residual-stream value's direction_logits plus the
    norm's bias through the unembedding and the unembedding's bias are the model's
    logits. The order of the tokens does not depend on the scale.

    Used for a feature's decoder row (``ms.sae.logit_effects``), a steering vector, a
    probe's or a subspace's directions."""
    _, layer, suffix = _sites.parse(site, model)
    vectors = np.asarray(vectors, dtype=np.float32)
    one = vectors.ndim == 1
    if suffix == "attn.hook_z" and vectors.ndim >= 2 and vectors.shape[-2:] == (model.n_heads, model.d_head):
        vectors = vectors.reshape(vectors.shape[:-2] + (model.n_heads * model.d_head,))
        one = vectors.ndim == 1
    widths = {"attn.hook_z": model.n_heads * model.d_head, "mlp.hook_post": model.d_mlp}
    if suffix in widths:
        _check_linear_outputs(model, f"site {site!r}")
        width = widths[suffix]
    elif suffix in _RESIDUAL:
        width = model.d_model
    else:
        raise ValueError(f"site {site!r}: does not add into the residual stream directly (sites that do: "
                         "hook_embed, hook_pos_embed, blocks.L.hook_resid_pre / _mid / _post, hook_attn_out, "
                         "hook_mlp_out, attn.hook_z, mlp.hook_post)")
    if vectors.ndim not in (1, 2) or vectors.shape[-1] != width:
        raise ValueError(f"vectors: expected shape [n, {width}] or [{width}] (site {site!r}), "
                         f"got {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors: contains NaN or infinity")
    vectors = vectors.reshape(-1, width)
    if suffix == "attn.hook_z":
        w_o = _output_matrix(model, layer)  # [head, d_head, d_model]
        vectors = vectors @ w_o.reshape(-1, model.d_model)
    elif suffix == "mlp.hook_post":
        vectors = vectors @ _mlp_output_matrix(model, layer)
    if model.arch["norm"] == NORM_LAYER:
        vectors = vectors - vectors.mean(-1, keepdims=True)
    logits = (vectors * _final_norm(model)[0]) @ _unembedding(model).T
    return logits[0] if one else logits


@dataclass(repr=False)
class PromptTest:
    """What `test_prompt` found. Answer positions are the positions of the answer's
    tokens after the prompt (one when several answers are compared, each by its first
    token); ranks count the tokens whose logit is larger (0: the model's top choice).

    prompt_tokens: the prompt's token strings; answer_tokens: each answer's token strings;
    tokens [answers, prompt + answer positions]: what the model read;
    ranks, logits, probs [answer positions, answers]: each answer token's rank, logit and
    probability at the position before it;
    top_ids, top_logits, top_probs [answer positions, top_k]: the most likely tokens
    there (the same for every answer: the answers differ only after it).
    ``str()`` (and ``print``) gives the report as TransformerLens's ``test_prompt`` prints it."""
    prompt_tokens: list
    answer_tokens: list
    tokens: np.ndarray
    ranks: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    top_ids: np.ndarray
    top_logits: np.ndarray
    top_probs: np.ndarray
    top_strings: list

    def __repr__(self):
        return (f"PromptTest(ranks={self.ranks.tolist()}, answers={self.answer_tokens!r}, "
                f"top_k={self.top_ids.shape[1]})")

    def __str__(self):
        several = len(self.answer_tokens) > 1
        lines = [f"Tokenized prompt: {self.prompt_tokens!r}",
                 f"Tokenized answer{'s' if several else ''}: "
                 f"{self.answer_tokens if several else self.answer_tokens[0]!r}"]
        for p in range(self.ranks.shape[0]):
            lines.append(f"Performance on answer token{'s' if several else ''}:")
            for a, pieces in enumerate(self.answer_tokens):
                lines.append(f"Rank: {int(self.ranks[p, a]): <8} Logit: {self.logits[p, a]:5.2f} "
                             f"Prob: {self.probs[p, a]:6.2%} Token: |{pieces[p]}|")
            for i in range(self.top_ids.shape[1]):
                lines.append(f"Top {i}th token. Logit: {self.top_logits[p, i]:5.2f} "
                             f"Prob: {self.top_probs[p, i]:6.2%} Token: |{self.top_strings[p][i]}|")
        ranks = [[(pieces[p], int(self.ranks[p, a])) for a, pieces in enumerate(self.answer_tokens)]
                 for p in range(self.ranks.shape[0])]
        lines.append(f"Ranks of the answer tokens: {ranks if several else [r[0] for r in ranks]}")
        return "\n".join(lines)


def test_prompt(model, prompt, answer, *, prepend_space_to_answer=True, prepend_bos=None, top_k=10,
                print_details=True):
    """Does the model give the answer? For exploring a prompt before a sweep.

    The prompt is tokenized (``prepend_bos`` as `Model.to_tokens`), the answer on its
    own (a space put in front unless it starts with one, when
    ``prepend_space_to_answer``) and appended; one run scores each answer token at the
    position before it: its rank, logit and probability, and the ``top_k`` most likely
    tokens there. ``answer``: a string (all its tokens are scored), or a list of strings
    compared at the first answer position (each by its first token). Prints the report
    as TransformerLens's ``utils.test_prompt`` does (``print_details=False``: nothing)
    and returns it as a `PromptTest` of NumPy arrays."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
    answers = [answer] if isinstance(answer, str) else answer
    if (not isinstance(answers, (list, tuple)) or not answers
            or not all(isinstance(a, str) and a for a in answers)):
        raise TypeError("answer: expected a non-empty string or a non-empty list of them")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0, got {top_k!r}")
    top_k = min(int(top_k), model.d_vocab)
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_ids = [int(t) for t in model.to_tokens(prompt, prepend_bos=prepend_bos)[0]]
    answer_ids = [model._encode(a) for a in answers]
    empty = [a for a, ids in zip(answers, answer_ids) if not ids]
    if empty:
        raise ValueError(f"answer: {empty[0]!r} gives no tokens")
    n_pos = 1 if len(answers) > 1 else len(answer_ids[0])  # several answers: their first tokens
    tokens = np.array([prompt_ids + ids[:n_pos] for ids in answer_ids], dtype=np.int64)
    P = len(prompt_ids)
    # the logits at the positions before each answer token only [answers, n_pos, vocab]
    logits = np.asarray(model.run(tokens, logits=list(range(P - 1, P - 1 + n_pos))).logits, dtype=np.float32)
    z = logits.astype(np.float64)
    logprobs = z - z.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    targets = tokens[:, P:P + n_pos]  # [answers, n_pos]
    chosen = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ranks = (logits > chosen[..., None]).sum(-1)
    probs = np.exp(np.take_along_axis(logprobs, targets[..., None], -1)[..., 0])
    # the most likely tokens: the first row's (the rows agree up to each position scored)
    order = np.argsort(-logits[0], axis=-1, kind="stable")[:, :top_k]  # [n_pos, top_k]
    result = PromptTest(
        prompt_tokens=model.to_str_tokens(prompt_ids),
        answer_tokens=[model.to_str_tokens(ids) for ids in answer_ids],
        tokens=tokens, ranks=ranks.T, logits=chosen.T, probs=probs.T.astype(np.float32),
        top_ids=order, top_logits=np.take_along_axis(logits[0], order, -1),
        top_probs=np.exp(np.take_along_axis(logprobs[0], order, -1)).astype(np.float32),
        top_strings=[[model.to_string([int(i)]) for i in row] for row in order])
    if print_details:
        print(result)
    return result


def _check_linear_outputs(model, what):
    """Heads and neurons write into the stream through their output matrices alone,
    unless the model norms the block outputs (Gemma 2 and 3, OLMo 2): then their shares do not add up."""
    if model.arch.get("post_norms"):
        raise ValueError(f"{what}: this model norms the attention's and the MLP's outputs (Gemma 2 and 3, "
                         "OLMo 2) before they join the residual stream, so heads and neurons have no additive "
                         "share of it; "
                         "use the blocks' outputs (by='layer', hook_attn_out, hook_mlp_out)")


# the sites whose value is added into the residual stream as it is (or is the residual stream)
_RESIDUAL = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
             "hook_attn_out", "hook_mlp_out")


def _run_at(model, tokens, pos, attention_mask, interventions, names):
    """One run caching ``names`` -> ({name: value at each row's position [batch, ...]},)."""
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    at = positions(pos, mask, B, T)
    run = model.run(tokens, attention_mask=mask, cache=names, logits=None, interventions=interventions)
    rows = np.arange(B)
    # every site cached here is [batch, pos, ...]
    return {n: np.asarray(run.cache[n][rows, at], dtype=np.float32) for n in names}


def _decompose(model, tokens, pos, by, attention_mask, interventions, scale, expand_neurons=True):
    """-> (stack [components, batch, d_model], labels, (values, batch, neurons)). With
    by="neuron" and expand_neurons=False the neurons are left out of the stack and
    labels (they would follow the heads) and returned as neurons: per layer
    (hook_post at the position [batch, d_mlp], output matrix [d_mlp, d_model])."""
    if by not in _BY:
        raise ValueError(f"by: expected one of {list(_BY)}, got {by!r}")
    if by == "neuron" and getattr(model, "n_experts", 0):
        raise ValueError("by='neuron': a mixture of experts has no one MLP whose neurons every token "
                         "writes through (each expert sees its own tokens); use by='layer' or by='head'")
    if by != "layer":
        _check_linear_outputs(model, f"by={by!r}")
    L, H = model.n_layers, model.n_heads
    learned_positions = "hook_pos_embed" in model.site_names
    names = ["hook_embed"] + (["hook_pos_embed"] if learned_positions else [])
    if by == "layer":
        for layer in range(L):
            names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    else:
        names += [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
        mlp_site = "mlp.hook_post" if by == "neuron" else "hook_mlp_out"
        names += [f"blocks.{layer}.{mlp_site}" for layer in range(L)]
    values = _run_at(model, tokens, pos, attention_mask, interventions,
                     names + (["ln_final.hook_scale"] if scale else []))
    B = values["hook_embed"].shape[0]
    embeds = [values["hook_embed"]] + ([values["hook_pos_embed"]] if learned_positions else [])
    embed_labels = ["embed"] + (["pos_embed"] if learned_positions else [])
    if by == "layer":
        rows = embeds + [values[n] for n in names[len(embeds):]]
        labels = embed_labels + [f"{layer}_{part}" for layer in range(L) for part in ("attn_out", "mlp_out")]
        return np.stack(rows), labels, (values, B, None)
    heads = np.concatenate([
        np.einsum("bhd,hdc->hbc", values[f"blocks.{layer}.attn.hook_z"], _output_matrix(model, layer))
        for layer in range(L)])  # [L * H, batch, d_model]
    head_labels = [f"L{layer}H{h}" for layer in range(L) for h in range(H)]
    bias = np.zeros((1, B, model.d_model), np.float32)
    bias_names = ["attn.b_o"] + (["mlp.b_out"] if by == "neuron" else [])  # else in each MLP's output
    for layer in range(L):
        for name in bias_names:
            b = model._core_weights.get(f"blocks.{layer}.{name}")
            if b is not None:
                bias += _dtypes.to_float32(b)
    tail = np.concatenate([np.stack(embeds), bias])
    tail_labels = embed_labels + ["bias"]
    if by == "head":
        mlps = np.stack([values[f"blocks.{layer}.hook_mlp_out"] for layer in range(L)])
        labels = head_labels + [f"{layer}_mlp_out" for layer in range(L)] + tail_labels
        return np.concatenate([heads, mlps, tail]), labels, (values, B, None)
    neurons = [(values[f"blocks.{layer}.mlp.hook_post"], _mlp_output_matrix(model, layer)) for layer in range(L)]
    if not expand_neurons:
        return np.concatenate([heads, tail]), head_labels + tail_labels, (values, B, neurons)
    stack = np.concatenate([heads] + [np.einsum("bn,nc->nbc", post, w) for post, w in neurons] + [tail])
    labels = head_labels + _neuron_labels(model) + tail_labels
    return stack, labels, (values, B, neurons)


def _neuron_labels(model):
    return [f"L{layer}N{n}" for layer in range(model.n_layers) for n in range(model.d_mlp)]


def _mlp_output_matrix(model, layer):
    """Layer's MLP output matrix as [d_mlp, d_model] float32."""
    w = _dtypes.to_float32(model._core_weights[f"blocks.{layer}.mlp.w_out"])
    return w.T if model.arch["linear_trans"] else w


def _output_matrix(model, layer):
    """Layer's attention output matrix as [head, d_head, d_model] float32."""
    w = _dtypes.to_float32(model._core_weights[f"blocks.{layer}.attn.w_o"])
    if model.arch["linear_trans"]:  # stored [out, in] (Llama, GPT-NeoX); GPT-2's Conv1D is [in, out]
        w = w.T
    return w.reshape(model.n_heads, model.d_head, model.d_model)


def _final_norm(model):
    """(weight, bias or None, eps) of the final norm, float32."""
    w = model._core_weights
    b = w.get("ln_final.b")
    return (_dtypes.to_float32(w["ln_final.w"]), None if b is None else _dtypes.to_float32(b),
            float(model.arch["ln_eps"]))


def _unembedding(model, ids=None):
    """The unembedding [vocab, d_model] float32 (its rows ``ids`` only, if given)."""
    u = model._core_weights.get("unembed")
    if u is None:  # tied: the embedding
        u = model._core_weights["embed"]
    return _dtypes.to_float32(u if ids is None else u[ids])


def _directions(model, answer, incorrect, batch):
    """Each row's unembedding direction [batch, d_model]: answer's row, minus incorrect's."""
    answer = _per_row(answer, batch, model.d_vocab, "answer")
    direction = _unembedding(model, answer)
    if incorrect is not None:
        direction = direction - _unembedding(model, _per_row(incorrect, batch, model.d_vocab, "incorrect"))
    return direction
