"""The model's weights under TransformerLens's names and shapes, and the composition
scores between heads (Elhage et al. 2021, "A Mathematical Framework for Transformer
Circuits") computed from them.

    W_Q = ms.weights.get(model, "W_Q")                  # [n_layers, n_heads, d_model, d_head]
    k_comp = ms.weights.composition_scores(model, "K")  # [layer, head, layer, head]
    copying = ms.weights.copying_scores(model)          # [layer, head]
    fig = ms.plot.composition(k_comp)

The weights are the model's as loaded (TransformerLens with fold_ln=False,
center_writing_weights=False, center_unembed=False), or with processed=True as
TransformerLens's from_pretrained processes them by default. Every family the core
runs has the same names; a model of grouped keys and values gives W_K and W_V per query
head, as TransformerLens's W_K and W_V do.
"""
import numpy as np

from . import _dtypes, architectures

__all__ = ["NAMES", "get", "composition_scores", "copying_scores"]

# name -> its axes, as TransformerLens shapes it
NAMES = {
    "W_E": "d_vocab d_model", "W_pos": "n_ctx d_model",
    "W_Q": "layer head d_model d_head", "W_K": "layer head d_model d_head", "W_V": "layer head d_model d_head",
    "W_O": "layer head d_head d_model", "b_Q": "layer head d_head", "b_K": "layer head d_head",
    "b_V": "layer head d_head", "b_O": "layer d_model",
    "W_in": "layer d_model d_mlp", "W_gate": "layer d_model d_mlp", "W_out": "layer d_mlp d_model",
    "b_in": "layer d_mlp", "b_out": "layer d_model",
    "W_U": "d_model d_vocab", "b_U": "d_vocab",
}


def _float(a):
    return _dtypes.to_float32(a)


def _as_in_out(model, w):
    """A matrix as [in, out] (the core keeps nn.Linear's [out, in] for most families,
    GPT-2's Conv1D [in, out] as it is)"""
    return w.T if model.arch["linear_trans"] else w


def _attention(model, layer):
    """(q, k, v) weights [d_model, heads * d_head] of one layer and their biases or None"""
    a = model.arch
    QD, KD = a["n_heads"] * a["d_head"], a["n_kv_heads"] * a["d_head"]
    w = _as_in_out(model, _float(model._core_weights[f"blocks.{layer}.attn.w_qkv"]))
    b = model._core_weights.get(f"blocks.{layer}.attn.b_qkv")
    b = None if b is None else _float(b)
    cut = [QD, QD + KD]
    return np.split(w, cut, axis=1), (None, None, None) if b is None else np.split(b, cut)


def _heads(x, model, kv):
    """[..., n * d_head] -> [n_heads, ..., d_head], key/value heads repeated for the
    query heads that read them"""
    a = model.arch
    n = a["n_kv_heads"] if kv else a["n_heads"]
    x = x.reshape(x.shape[:-1] + (n, a["d_head"]))
    x = np.moveaxis(x, -2, 0)
    return np.repeat(x, a["n_heads"] // n, axis=0) if kv else x


def _layer_weight(model, name, layer):
    a = model.arch
    L = f"blocks.{layer}."
    if name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        ws, bs = _attention(model, layer)
        i = "QKV".index(name[-1])
        if name[0] == "W":
            return _heads(ws[i], model, kv=i > 0)
        if bs[i] is None:
            return np.zeros((a["n_heads"], a["d_head"]), np.float32)
        return _heads(bs[i], model, kv=i > 0)
    if name == "W_O":
        return _as_in_out(model, _float(model._core_weights[L + "attn.w_o"])).reshape(
            a["n_heads"], a["d_head"], a["d_model"])
    if name == "b_O":
        b = model._core_weights.get(L + "attn.b_o")
        return np.zeros(a["d_model"], np.float32) if b is None else _float(b)
    # the MLP
    if a.get("n_experts"):
        raise ValueError(f"name: {name} of a mixture of experts has no single matrix (see ms.experts)")
    F = a["d_mlp"]
    if name in ("W_in", "W_gate"):
        if name == "W_gate" and not a["gated_mlp"]:
            raise ValueError("name: W_gate exists in gated MLPs only (SwiGLU, GeGLU)")
        w = _as_in_out(model, _float(model._core_weights[L + "mlp.w_in"]))
        if a["gated_mlp"]:  # [gate | in] along the outputs
            w = w[:, :F] if name == "W_gate" else w[:, F:]
        return w
    if name == "b_in":
        b = model._core_weights.get(L + "mlp.b_in")
        if b is None:
            return np.zeros(F, np.float32)
        return _float(b)[F:] if a["gated_mlp"] else _float(b)
    if name == "W_out":
        return _as_in_out(model, _float(model._core_weights[L + "mlp.w_out"]))
    b = model._core_weights.get(L + "mlp.b_out")  # b_out
    return np.zeros(a["d_model"], np.float32) if b is None else _float(b)


def get(model, name, processed=False):
    """One weight of every layer (or the model's one embedding, positions or
    unembedding) as a float32 array named and shaped as TransformerLens's: see NAMES.
    A bias the model does not have is zeros, as in TransformerLens.

    processed=True: as TransformerLens's from_pretrained gives it by default (fold_ln,
    center_writing_weights, center_unembed, fold_value_biases): the norms' scales (and
    LayerNorm's biases) folded into the matrices that read their output and those
    matrices centred over d_model; with LayerNorm, the weights that write to the stream
    centred over d_model; the unembedding centred over the vocabulary; the value biases
    folded into b_O."""
    if name not in NAMES:
        raise ValueError(f"name: expected one of {', '.join(NAMES)}, got {name!r}")
    if processed:
        return _processed(model, name)
    return _raw(model, name)


def _raw(model, name):
    w = model._core_weights
    if name == "W_E":  # as the stream receives it: Gemma's rows times sqrt(d_model), as TransformerLens's
        scale = model.arch.get("embed_scale", 1.0)
        return _float(w["embed"]) * np.float32(scale) if scale != 1.0 else _float(w["embed"])
    if name == "W_pos":
        if "pos_embed" not in w:
            raise ValueError("name: W_pos exists only in models with learned positions (this one is rotary)")
        return _float(w["pos_embed"])
    if name == "W_U":
        return _float(w.get("unembed", w["embed"])).T
    if name == "b_U":
        b = w.get("unembed.b")
        return np.zeros(model.d_vocab, np.float32) if b is None else _float(b)
    return np.stack([_layer_weight(model, name, layer) for layer in range(model.n_layers)])


def _norm(model, which, part):
    """A norm's scale or bias [layer, d_model] (or [d_model] for ln_final), float32; None
    for a bias an RMSNorm does not have"""
    w = model._core_weights
    if which == "ln_final":
        a = w.get(f"ln_final.{part}")
        return None if a is None else _float(a)
    arrays = [w.get(f"blocks.{layer}.{which}.{part}") for layer in range(model.n_layers)]
    return None if arrays[0] is None else np.stack([_float(a) for a in arrays])


def _processed(model, name):
    """TransformerLens's load_and_process_state_dict with its defaults, one weight at a
    time, from the weights as loaded (float64 inside)"""
    a = model.arch
    if "blocks.0.ln1.w" not in model._core_weights:
        raise ValueError("processed: this model has no norms before its attention (OLMo 2's and EXAONE 4's "
                         "norms come after it), which TransformerLens's processing folds; use processed=False")
    layer_norm = a["norm"] == architectures.NORM_LAYER
    fold = not a.get("n_experts")  # TransformerLens leaves a mixture's norms unfolded
    raw = lambda key: _raw(model, key).astype(np.float64)  # noqa: E731

    def centred(x, axis):
        return x - x.mean(axis=axis, keepdims=True)

    def read_through(key, norm):  # a matrix reading the norm's output, its rows d_model
        x = raw(key)
        if not fold:
            return x
        scale = _norm(model, norm, "w")
        x = x * (scale[:, None, :, None] if x.ndim == 4 else scale[:, :, None])
        return centred(x, -2) if layer_norm else x

    def bias_through(key, matrix, norm):  # its bias, with the norm's bias carried through
        b = raw(key)
        shift = _norm(model, norm, "b") if fold and layer_norm else None
        if shift is None:
            return b
        m = raw(matrix)
        return b + (np.einsum("lc,lhcd->lhd", shift, m) if m.ndim == 4 else np.einsum("lc,lcf->lf", shift, m))

    writing = layer_norm  # TransformerLens centres what writes to the stream with LayerNorm only
    if name in ("W_Q", "W_K", "W_V"):
        out = read_through(name, "ln1")
    elif name in ("b_Q", "b_K"):
        out = bias_through(name, "W_" + name[-1], "ln1")
    elif name == "b_V":  # folded into b_O
        out = np.zeros((model.n_layers, a["n_heads"], a["d_head"]))
    elif name == "W_O":
        out = centred(raw("W_O"), -1) if writing else raw("W_O")
    elif name == "b_O":
        b = centred(raw("b_O"), -1) if writing else raw("b_O")
        w_o = centred(raw("W_O"), -1) if writing else raw("W_O")
        out = b + np.einsum("lhd,lhdc->lc", bias_through("b_V", "W_V", "ln1"), w_o)
    elif name == "W_in":
        out = read_through("W_in", "ln2")
    elif name == "W_gate":
        out = raw("W_gate") * _norm(model, "ln2", "w")[:, :, None] if fold else raw("W_gate")
    elif name == "b_in":
        out = bias_through("b_in", "W_in", "ln2")
    elif name in ("W_out", "b_out", "W_E", "W_pos"):
        out = centred(raw(name), -1) if writing else raw(name)
    elif name == "W_U":
        out = raw("W_U")
        if fold:
            out = out * _norm(model, "ln_final", "w")[:, None]
            out = centred(out, 0) if layer_norm else out
        out = centred(out, -1)
    else:  # b_U
        out = raw("b_U")
        shift = _norm(model, "ln_final", "b") if fold and layer_norm else None
        if shift is not None:
            out = out + shift @ raw("W_U")
        out = centred(out, -1)
    return out.astype(np.float32)


_RIGHT = {"Q": ("W_Q", "W_K"), "K": ("W_K", "W_Q"), "V": ("W_V", "W_O")}


def _reduced(a, b, side):
    """A product a @ b (a [n, C, D], b [n, D, C]) reduced to D columns or rows with the
    same Frobenius norm of anything it is multiplied by on the other side: for
    side="left" (multiplied on the right) r @ b, r from a's QR; for side="right" a @ l,
    l from b's LQ. float64, returned float32."""
    if side == "left":
        r = np.linalg.qr(a.astype(np.float64), mode="r")
        return (r @ b.astype(np.float64)).astype(np.float32)
    r = np.linalg.qr(np.swapaxes(b, -1, -2).astype(np.float64), mode="r")
    return (a.astype(np.float64) @ np.swapaxes(r, -1, -2)).astype(np.float32)


def composition_scores(model, kind, processed=False):
    """How much each head's output is read by each later head, by weights alone:
    ||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F) for head 1's OV circuit (W_V W_O) and head
    2's M = W_Q W_K^T (kind "Q": head 1 writes what head 2's queries read), W_K W_Q^T
    ("K": its keys) or W_V W_O ("V": its values). Returns [layer, head, layer, head]
    float32, 0 where the second head is not in a later layer, as TransformerLens's
    all_composition_scores(kind); rotary angles and query/key norms are not part of M.
    processed: from the weights as get(processed=True) gives them (TransformerLens's
    defaults: the norms folded in, the writing weights centred)."""
    kind = kind.upper() if isinstance(kind, str) else kind
    if kind not in _RIGHT:
        raise ValueError(f"kind: expected 'Q', 'K' or 'V', got {kind!r}")
    L, H, D = model.n_layers, model.n_heads, model.arch["d_head"]
    flat = lambda x: x.reshape((L * H,) + x.shape[2:])  # noqa: E731
    weight = lambda key: flat(get(model, key, processed))  # noqa: E731
    left = _reduced(weight("W_V"), weight("W_O"), "left")                              # [LH, D, C]
    first, second = _RIGHT[kind]
    b = weight(second)
    right = _reduced(weight(first), b if kind == "V" else np.swapaxes(b, -1, -2), "right")  # [LH, C, D]
    left_norms = np.sqrt((left.astype(np.float64) ** 2).sum(axis=(1, 2)))
    right_norms = np.sqrt((right.astype(np.float64) ** 2).sum(axis=(1, 2)))
    scores = np.zeros((L, H, L, H), np.float32)
    later = np.concatenate([right[i] for i in range(H, L * H)], axis=1) if L > 1 else None  # [C, (L-1)H D]
    for layer in range(L - 1):
        rows = left[layer * H:(layer + 1) * H].reshape(H * D, -1)                         # [H D, C]
        cols = later[:, (layer * H) * D:]                                                  # heads of layers > layer
        prod = (rows @ cols).reshape(H, D, -1, D).astype(np.float64)
        norms = np.sqrt((prod ** 2).sum(axis=(1, 3)))                                      # [H, heads after]
        n_after = norms.shape[1]
        norms /= left_norms[layer * H:(layer + 1) * H, None] * right_norms[None, L * H - n_after:]
        scores[layer, :, layer + 1:, :] = norms.reshape(H, L - layer - 1, H)
    return scores


def copying_scores(model, processed=False):
    """How much each head copies the token it attends to into the prediction, by
    weights alone (Elhage et al. 2021): the eigenvalues of its full OV circuit
    W_E W_V W_O W_U [d_vocab, d_vocab], as sum(eigenvalues) / sum(|eigenvalues|) —
    1 for a head whose circuit only raises the logit of the token it reads, -1 for one
    that only lowers it. Returns [layer, head] float64. The nonzero eigenvalues of that
    product are those of W_O W_U W_E W_V [d_head, d_head], which is what is computed
    (W_U W_E once, d_model x d_model). processed: as composition_scores."""
    W_E = get(model, "W_E", processed).astype(np.float64)
    W_U = get(model, "W_U", processed).astype(np.float64)
    unembed_embed = W_U @ W_E                                                  # [C, C]
    W_V = get(model, "W_V", processed).astype(np.float64)                      # [L, H, C, D]
    W_O = get(model, "W_O", processed).astype(np.float64)                      # [L, H, D, C]
    small = W_O @ unembed_embed @ W_V                                          # [L, H, D, D]
    eig = np.linalg.eigvals(small)
    total = np.abs(eig).sum(-1)
    return np.divide(eig.sum(-1).real, total, out=np.zeros(total.shape), where=total > 0)
