"""Architectures as data: a HuggingFace config becomes the parts of a block, and a
HuggingFace state dict becomes the core's weights under the core's names.

Families: GPT-2 (LayerNorm, learned positions, Conv1D weights), Llama / Mistral /
SmolLM and Qwen2 (RMSNorm, rotary, grouped keys/values, SwiGLU; Qwen2 with q/k/v
biases) and GPT-NeoX / Pythia (LayerNorm, partial rotary, parallel attention and
MLP). Anything in a config that would change the computation in a way the core
does not run is refused by name.
"""
import math

import numpy as np

from . import _dtypes

# activation names of HuggingFace's ACT2FN -> the core's codes
ACTIVATIONS = {
    "gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "relu": 2, "silu": 3, "swish": 3,
    "gelu_fast": 4, "quick_gelu": 5, "tanh": 6, "sigmoid": 7,
}
NORM_LAYER, NORM_RMS = 0, 1

LLAMA_TYPES = ("llama", "mistral", "qwen2")
FAMILIES = ("gpt2",) + LLAMA_TYPES + ("gpt_neox",)

_GPT2_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
}
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "partial_rotary_factor": 1.0,
}
_NEOX_DEFAULTS = {
    "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
    "intermediate_size": 24576, "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "use_parallel_residual": True,
    "rope_scaling": None, "attention_bias": True, "tie_word_embeddings": False,
}
_ARCH_OF = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2", "GPTNeoXForCausalLM": "gpt_neox"}


def _positive_int(cfg, key):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config: {key} must be a positive int, got {v!r}")
    return v


def _number(cfg, key, low=0.0):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= low:
        raise ValueError(f"config: {key} must be a number >= {low}, got {v!r}")
    return float(v)


def _activation(cfg, key):
    act = cfg[key]
    if act not in ACTIVATIONS:
        raise ValueError(f"config: {key} {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def model_type(config):
    """The family of a config dict: model_type, else the architectures list, else gpt2."""
    mt = config.get("model_type")
    if mt is None:
        for a in config.get("architectures") or ():
            if a in _ARCH_OF:
                return _ARCH_OF[a]
        return "gpt2"
    if mt not in FAMILIES:
        raise ValueError(f"config: model_type {mt!r} is not supported (supported: {', '.join(FAMILIES)})")
    archs = [a for a in (config.get("architectures") or ()) if a not in _ARCH_OF]
    if archs:
        raise ValueError(f"config: architecture {archs[0]!r} is not supported "
                         f"(supported: {', '.join(sorted(_ARCH_OF))})")
    return mt


def rope_inv_freq(theta, dim, scaling, n_ctx):
    """The angle per position of each rotary pair, [dim / 2] float32, as HuggingFace
    computes it for rope types default, linear and llama3."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    inv = inv.astype(np.float32).astype(np.float64)
    if not scaling:
        return inv.astype(np.float32)
    if not isinstance(scaling, dict):
        raise ValueError(f"config: rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        try:
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old = float(scaling["original_max_position_embeddings"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("config: rope_scaling of type llama3 needs factor, low_freq_factor, "
                             "high_freq_factor and original_max_position_embeddings") from None
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"config: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def normalize(config):
    """A config (dict or HF config object) -> (the full HF dict, the core's arch dict)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict or a HuggingFace config, got {type(config).__name__}")
    family = model_type(config)
    if family == "gpt2":
        return _gpt2(config)
    if family in LLAMA_TYPES:
        return _llama(config, family)
    return _neox(config)


def _gpt2(config):
    cfg = dict(_GPT2_DEFAULTS)
    cfg.update(config)
    cfg.setdefault("model_type", "gpt2")
    for key, why in (("add_cross_attention", "cross-attention layers are not supported"),
                     ("is_encoder_decoder", "encoder-decoder models are not supported")):
        if cfg.get(key, False):
            raise ValueError(f"config: {key}={cfg[key]!r}: {why}")
    act = _activation(cfg, "activation_function")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        _positive_int(cfg, key)
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"config: n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})")
    if cfg["n_inner"] is not None and (not isinstance(cfg["n_inner"], int) or cfg["n_inner"] < 1):
        raise ValueError(f"config: n_inner must be None or a positive int, got {cfg['n_inner']!r}")
    eps = _number(cfg, "layer_norm_epsilon")
    # reorder_and_upcast_attn only changes how half-precision models compute the
    # scores; mechscope computes everything in float32, where it changes nothing.
    C, H = cfg["n_embd"], cfg["n_head"]
    arch = dict(family="gpt2", n_layers=cfg["n_layer"], d_model=C, n_heads=H, n_kv_heads=H,
                d_head=C // H, d_mlp=cfg["n_inner"] or 4 * C, d_vocab=cfg["vocab_size"],
                n_ctx=cfg["n_positions"], ln_eps=eps, norm=NORM_LAYER, activation=act, gated_mlp=0,
                parallel=0, rotary_dim=0, rope_scale=1.0,
                scale_attn_weights=int(bool(cfg["scale_attn_weights"])),
                scale_attn_by_inverse_layer=int(bool(cfg["scale_attn_by_inverse_layer_idx"])),
                linear_trans=0, tied=bool(cfg.get("tie_word_embeddings", True)))
    return cfg, arch


def _llama(config, family):
    cfg = dict(_LLAMA_DEFAULTS)
    if family == "qwen2":
        cfg.update(use_sliding_window=False, rope_theta=10000.0)
    cfg.update(config)
    cfg["model_type"] = family
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        _positive_int(cfg, key)
    H = cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"] if cfg["num_key_value_heads"] is not None else H
    if isinstance(KV, bool) or not isinstance(KV, int) or KV < 1 or H % KV:
        raise ValueError(f"config: num_key_value_heads ({KV!r}) must divide num_attention_heads ({H})")
    C = cfg["hidden_size"]
    d_head = cfg["head_dim"] if cfg.get("head_dim") is not None else C // H
    if cfg.get("head_dim") is None and C % H:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_attention_heads ({H})")
    if cfg.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ValueError(f"config: partial_rotary_factor {cfg['partial_rotary_factor']!r} is not "
                         f"supported for {family} (only 1.0)")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError("config: use_sliding_window=True is not supported (Qwen2 sliding-window attention)")
    n_ctx = cfg["max_position_embeddings"]
    if family == "mistral" and cfg.get("sliding_window"):
        # within the window, sliding-window attention is ordinary causal attention
        n_ctx = min(n_ctx, int(cfg["sliding_window"]))
    theta = _number(cfg, "rope_theta", 1e-9)
    arch = dict(family=family, n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=KV,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"], n_ctx=n_ctx,
                ln_eps=_number(cfg, "rms_norm_eps"), norm=NORM_RMS,
                activation=_activation(cfg, "hidden_act"), gated_mlp=1, parallel=0, rotary_dim=d_head,
                rope_scale=1.0, scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias")),
                o_bias=family != "qwen2" and bool(cfg.get("attention_bias")),
                mlp_bias=bool(cfg.get("mlp_bias", False)))
    arch["rope_inv_freq"] = rope_inv_freq(theta, d_head, cfg.get("rope_scaling"), n_ctx)
    return cfg, arch


def _neox(config):
    cfg = dict(_NEOX_DEFAULTS)
    cfg.update(config)
    cfg["model_type"] = "gpt_neox"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings"):
        _positive_int(cfg, key)
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if C % H:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_attention_heads ({H})")
    d_head = C // H
    pct = _number(cfg, "rotary_pct")
    rot = int(d_head * pct)
    if rot < 2 or rot % 2:
        raise ValueError(f"config: rotary_pct {pct} gives {rot} rotary dims of {d_head}; mechscope needs "
                         "an even number >= 2")
    theta = float(cfg.get("rope_theta", cfg["rotary_emb_base"]))
    arch = dict(family="gpt_neox", n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=H,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
                n_ctx=cfg["max_position_embeddings"], ln_eps=_number(cfg, "layer_norm_eps"),
                norm=NORM_LAYER, activation=_activation(cfg, "hidden_act"), gated_mlp=0,
                parallel=int(bool(cfg["use_parallel_residual"])), rotary_dim=rot, rope_scale=1.0,
                scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", True)), o_bias=bool(cfg.get("attention_bias", True)),
                mlp_bias=True)
    arch["rope_inv_freq"] = rope_inv_freq(theta, rot, cfg.get("rope_scaling"), arch["n_ctx"])
    return cfg, arch


# ---- weights -----------------------------------------------------------------------------

def strip_prefix(name, family):
    for prefix in {"gpt2": ("transformer.",), "gpt_neox": ("gpt_neox.",)}.get(family, ("model.",)):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def hf_shapes(arch):
    """{HF name (without the model prefix): shape} of every weight the family reads."""
    a = arch
    C, V, F, L = a["d_model"], a["d_vocab"], a["d_mlp"], a["n_layers"]
    QD, KD = a["n_heads"] * a["d_head"], a["n_kv_heads"] * a["d_head"]
    fam = a["family"]
    if fam == "gpt2":
        shapes = {"wte.weight": (V, C), "wpe.weight": (a["n_ctx"], C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
        block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C),
                 "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
                 "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,),
                 "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}
        prefix, head = "h", "lm_head.weight"
    elif fam == "gpt_neox":
        shapes = {"embed_in.weight": (V, C), "final_layer_norm.weight": (C,), "final_layer_norm.bias": (C,)}
        block = {"input_layernorm.weight": (C,), "input_layernorm.bias": (C,),
                 "post_attention_layernorm.weight": (C,), "post_attention_layernorm.bias": (C,),
                 "attention.query_key_value.weight": (3 * C, C), "attention.dense.weight": (C, C),
                 "mlp.dense_h_to_4h.weight": (F, C), "mlp.dense_h_to_4h.bias": (F,),
                 "mlp.dense_4h_to_h.weight": (C, F), "mlp.dense_4h_to_h.bias": (C,)}
        if a["qkv_bias"]:
            block["attention.query_key_value.bias"] = (3 * C,)
            block["attention.dense.bias"] = (C,)
        prefix, head = "layers", "embed_out.weight"
    else:
        shapes = {"embed_tokens.weight": (V, C), "norm.weight": (C,)}
        block = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
                 "self_attn.q_proj.weight": (QD, C), "self_attn.k_proj.weight": (KD, C),
                 "self_attn.v_proj.weight": (KD, C), "self_attn.o_proj.weight": (C, QD),
                 "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F)}
        if a["qkv_bias"]:
            block.update({"self_attn.q_proj.bias": (QD,), "self_attn.k_proj.bias": (KD,),
                          "self_attn.v_proj.bias": (KD,)})
        if a["o_bias"]:
            block["self_attn.o_proj.bias"] = (C,)
        if a["mlp_bias"]:
            block.update({"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,), "mlp.down_proj.bias": (C,)})
        prefix, head = "layers", "lm_head.weight"
    for layer in range(L):
        for k, s in block.items():
            shapes[f"{prefix}.{layer}.{k}"] = s
    if not a["tied"]:
        shapes[head] = (V, C)
    return shapes


def _stored(x):
    """float32, or a 2-byte matrix kept as it is (see _dtypes)"""
    if _dtypes.is_half(x):
        return np.ascontiguousarray(_dtypes.keep(x))
    return np.ascontiguousarray(x, dtype=np.float32)


def is_matrix(name):
    """True for the weights that may stay 2-byte: the embedding, the unembedding and
    the matrices of the blocks (not norms, biases, or GPT-2's position embedding)."""
    return not (is_norm_weight(name) or name.endswith(".bias") or name == "wpe.weight")


def _stack(w, names):
    """w[names[0]], w[names[1]], ... stacked along rows, as one array held once: the
    arrays are used in place when they already are consecutive rows of one array,
    else they are copied into a new one and w's entries become views of it (so that
    the model does not keep both). Arrays of different types are widened to float32."""
    parts = [np.asarray(w[n]) for n in names]
    first = parts[0]
    same = all(p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts)
    if not same:
        parts = [_dtypes.to_float32(p) for p in parts]
        first = parts[0]
    elif first.base is not None and all(p.base is first.base and p.flags.c_contiguous for p in parts):
        at = [p.__array_interface__["data"][0] for p in parts]
        if all(at[i] + parts[i].nbytes == at[i + 1] for i in range(len(parts) - 1)):
            rows = sum(p.shape[0] for p in parts)
            return np.lib.stride_tricks.as_strided(first, (rows,) + first.shape[1:], first.strides,
                                                   writeable=False)
    out = _stored(np.concatenate(parts))
    row = 0
    for n, p in zip(names, parts):
        w[n] = out[row:row + p.shape[0]]
        row += p.shape[0]
    return out


def core_weights(arch, w):
    """HF-named arrays (checked against hf_shapes) -> the core's weights: q|k|v fused,
    gate|up fused, GPT-NeoX's per-head q|k|v unpacked."""
    fam, L = arch["family"], arch["n_layers"]
    out = {}
    if fam == "gpt2":
        out.update({"embed": w["wte.weight"], "pos_embed": w["wpe.weight"], "ln_final.w": w["ln_f.weight"],
                    "ln_final.b": w["ln_f.bias"]})
        if not arch["tied"]:
            out["unembed"] = w["lm_head.weight"]
        for l in range(L):
            p = f"h.{l}."
            out.update({f"blocks.{l}.{k}": w[p + v] for k, v in (
                ("ln1.w", "ln_1.weight"), ("ln1.b", "ln_1.bias"), ("attn.w_qkv", "attn.c_attn.weight"),
                ("attn.b_qkv", "attn.c_attn.bias"), ("attn.w_o", "attn.c_proj.weight"),
                ("attn.b_o", "attn.c_proj.bias"), ("ln2.w", "ln_2.weight"), ("ln2.b", "ln_2.bias"),
                ("mlp.w_in", "mlp.c_fc.weight"), ("mlp.b_in", "mlp.c_fc.bias"),
                ("mlp.w_out", "mlp.c_proj.weight"), ("mlp.b_out", "mlp.c_proj.bias"))})
    elif fam == "gpt_neox":
        H, dh, C = arch["n_heads"], arch["d_head"], arch["d_model"]
        out.update({"embed": w["embed_in.weight"], "ln_final.w": w["final_layer_norm.weight"],
                    "ln_final.b": w["final_layer_norm.bias"]})
        out["unembed"] = w["embed_in.weight"] if arch["tied"] else w["embed_out.weight"]
        for l in range(L):
            p, q = f"layers.{l}.", f"blocks.{l}."
            # the fused matrix's rows are [head, q|k|v, d_head]: regroup them as [q|k|v, head, d_head]
            qkv = np.asarray(w[p + "attention.query_key_value.weight"]).reshape(H, 3, dh, C)
            out[q + "attn.w_qkv"] = _stored(qkv.transpose(1, 0, 2, 3).reshape(3 * C, C))
            if arch["qkv_bias"]:
                b = np.asarray(w[p + "attention.query_key_value.bias"]).reshape(H, 3, dh)
                out[q + "attn.b_qkv"] = _stored(b.transpose(1, 0, 2).reshape(3 * C))
                out[q + "attn.b_o"] = w[p + "attention.dense.bias"]
            out.update({q + k: w[p + v] for k, v in (
                ("ln1.w", "input_layernorm.weight"), ("ln1.b", "input_layernorm.bias"),
                ("ln2.w", "post_attention_layernorm.weight"), ("ln2.b", "post_attention_layernorm.bias"),
                ("attn.w_o", "attention.dense.weight"), ("mlp.w_in", "mlp.dense_h_to_4h.weight"),
                ("mlp.b_in", "mlp.dense_h_to_4h.bias"), ("mlp.w_out", "mlp.dense_4h_to_h.weight"),
                ("mlp.b_out", "mlp.dense_4h_to_h.bias"))})
    else:
        out.update({"embed": w["embed_tokens.weight"], "ln_final.w": w["norm.weight"]})
        if not arch["tied"]:
            out["unembed"] = w["lm_head.weight"]
        for l in range(L):
            p, q = f"layers.{l}.", f"blocks.{l}."
            a = p + "self_attn."
            out[q + "ln1.w"] = w[p + "input_layernorm.weight"]
            out[q + "ln2.w"] = w[p + "post_attention_layernorm.weight"]
            # one product for q|k|v and one for gate|up: the matrices are stacked once at load
            out[q + "attn.w_qkv"] = _stack(w, [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
            if arch["qkv_bias"]:
                out[q + "attn.b_qkv"] = _stack(w, [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"])
            out[q + "attn.w_o"] = w[a + "o_proj.weight"]
            if arch["o_bias"]:
                out[q + "attn.b_o"] = w[a + "o_proj.bias"]
            out[q + "mlp.w_in"] = _stack(w, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
            out[q + "mlp.w_out"] = w[p + "mlp.down_proj.weight"]
            if arch["mlp_bias"]:
                out[q + "mlp.b_in"] = _stack(w, [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"])
                out[q + "mlp.b_out"] = w[p + "mlp.down_proj.bias"]
        out["rope_inv_freq"] = arch["rope_inv_freq"]
    if fam == "gpt_neox":
        out["rope_inv_freq"] = arch["rope_inv_freq"]
    return {k: _stored(v) for k, v in out.items()}


def core_config(arch):
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "ln_eps",
            "norm", "activation", "gated_mlp", "parallel", "rotary_dim", "rope_scale", "scale_attn_weights",
            "scale_attn_by_inverse_layer", "linear_trans")
    return {k: arch[k] for k in keys}


def is_norm_weight(name):
    return name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "norm.weight",
                          "final_layer_norm.weight"))


_HF_NAMES = {
    "gpt2": {"embed": "wte.weight", "pos_embed": "wpe.weight", "ln_final.w": "ln_f.weight",
             "ln_final.b": "ln_f.bias", "unembed": "lm_head.weight", "ln1.w": "ln_1.weight",
             "ln1.b": "ln_1.bias", "ln2.w": "ln_2.weight", "ln2.b": "ln_2.bias",
             "attn.q": "attn.c_attn.weight", "attn.k": "attn.c_attn.weight", "attn.v": "attn.c_attn.weight",
             "attn.q.bias": "attn.c_attn.bias", "attn.k.bias": "attn.c_attn.bias",
             "attn.v.bias": "attn.c_attn.bias", "attn.o": "attn.c_proj.weight", "attn.o.bias": "attn.c_proj.bias",
             "mlp.in": "mlp.c_fc.weight", "mlp.in.bias": "mlp.c_fc.bias", "mlp.out": "mlp.c_proj.weight",
             "mlp.out.bias": "mlp.c_proj.bias"},
    "llama": {"embed": "embed_tokens.weight", "ln_final.w": "norm.weight", "unembed": "lm_head.weight",
              "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight",
              "attn.q": "self_attn.q_proj.weight", "attn.k": "self_attn.k_proj.weight",
              "attn.v": "self_attn.v_proj.weight", "attn.o": "self_attn.o_proj.weight",
              "attn.q.bias": "self_attn.q_proj.bias", "attn.k.bias": "self_attn.k_proj.bias",
              "attn.v.bias": "self_attn.v_proj.bias", "attn.o.bias": "self_attn.o_proj.bias",
              "mlp.gate": "mlp.gate_proj.weight", "mlp.in": "mlp.up_proj.weight", "mlp.out": "mlp.down_proj.weight",
              "mlp.gate.bias": "mlp.gate_proj.bias", "mlp.in.bias": "mlp.up_proj.bias",
              "mlp.out.bias": "mlp.down_proj.bias"},
    "gpt_neox": {"embed": "embed_in.weight", "ln_final.w": "final_layer_norm.weight",
                 "ln_final.b": "final_layer_norm.bias", "unembed": "embed_out.weight",
                 "ln1.w": "input_layernorm.weight", "ln1.b": "input_layernorm.bias",
                 "ln2.w": "post_attention_layernorm.weight", "ln2.b": "post_attention_layernorm.bias",
                 "attn.q": "attention.query_key_value.weight", "attn.k": "attention.query_key_value.weight",
                 "attn.v": "attention.query_key_value.weight", "attn.q.bias": "attention.query_key_value.bias",
                 "attn.k.bias": "attention.query_key_value.bias", "attn.v.bias": "attention.query_key_value.bias",
                 "attn.o": "attention.dense.weight", "attn.o.bias": "attention.dense.bias",
                 "mlp.in": "mlp.dense_h_to_4h.weight", "mlp.in.bias": "mlp.dense_h_to_4h.bias",
                 "mlp.out": "mlp.dense_4h_to_h.weight", "mlp.out.bias": "mlp.dense_4h_to_h.bias"},
}


def hf_message(arch, message):
    """The core's message about a weight, with the weight's HuggingFace name."""
    import re
    names = _HF_NAMES["llama" if arch["family"] in LLAMA_TYPES else arch["family"]]
    layer_word = "h" if arch["family"] == "gpt2" else "layers"

    def sub(m):
        layer, name = m.group(1), m.group(2)
        hf = names.get(name)
        if hf is None:
            return (f"blocks.{layer}." if layer is not None else "") + name
        return f"{layer_word}.{layer}.{hf}" if layer is not None else hf
    return re.sub(r"weights: (?:blocks\.(\d+)\.)?([a-z_.]+?) (?=has|is)", lambda m: "weights: " + sub(m) + " ", message)
