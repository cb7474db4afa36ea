"""Architectures as data: a HuggingFace config becomes the parts of a block, a
HuggingFace state dict becomes the core's weights under the core's names, and the
core's weight gradients come back under HuggingFace's names (one table per family,
read both ways).

Families: GPT-2 (LayerNorm, learned positions, Conv1D weights), Llama / Mistral /
SmolLM and Qwen2 (RMSNorm, rotary, grouped keys/values, SwiGLU; Qwen2 with q/k/v
biases), Qwen3 (Llama's block with queries and keys RMS-normalised per head), Mixtral
(Mistral's block with a mixture of SwiGLU experts in place of the MLP), Qwen2-MoE
(Qwen2's attention, a mixture of experts and a shared expert behind a sigmoid gate), Qwen3-MoE
(Qwen3's attention, a mixture of experts), Gemma (Llama's block with GeGLU, norms that
scale by 1 + weight, and token embeddings multiplied by sqrt(d_model)), Gemma 2 (Gemma's
block with the attention's and the MLP's outputs normed again, and soft-capped attention
scores and logits), Gemma 3's text model (Gemma 2's block with Qwen3's per-head query and
key norms, and its own rotary angles in its sliding-window layers), Phi-3 / Phi-3.5 /
Phi-4-mini (Llama's block with fused q|k|v and gate|up matrices, partial rotary and
LongRoPE), GPT-NeoX / Pythia (LayerNorm, partial rotary, parallel attention and MLP),
Phi-1 / 1.5 / 2 (GPT-NeoX's parallel block with one norm, and an unembedding bias),
GPT-J (Phi's block, rotating adjacent pairs), OLMo 2 (Llama's block with its norms
after the attention and the MLP instead of before, and query and key norms over all
heads), OLMo 3 (OLMo 2's block, three sliding-window layers in four, rotating with
unscaled angles), OLMoE (Llama's block with OLMo 2's query and key norms and a mixture
of experts routed as Qwen3-MoE's), OPT (GPT-2's block with a ReLU MLP, separate q, k
and v, and learned positions whose table starts two rows later) and GPT-Neo / TinyStories
(GPT-2's block with separate q, k and v without biases, unscaled attention scores, and
sliding-window attention in its "local" layers), GPT-BigCode (GPT-2's block with
multi-query attention) and StableLM (Llama's block with LayerNorms and partial rotary).
Anything in a config that would change the computation in a way the core does not run
is refused by name.
"""
import math
import warnings
from typing import NamedTuple

import numpy as np

from . import _dtypes

# activation names of HuggingFace's ACT2FN -> the core's codes
ACTIVATIONS = {
    "gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "relu": 2, "silu": 3, "swish": 3,
    "gelu_fast": 4, "quick_gelu": 5, "tanh": 6, "sigmoid": 7,
}
NORM_LAYER, NORM_RMS = 0, 1

LLAMA_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma",
               "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "olmo3", "olmoe", "smollm3", "starcoder2", "helium",
               "exaone4")
GEMMA2_TYPES = ("gemma2", "gemma3_text")  # normed block outputs, query_pre_attn_scalar, soft caps
QWEN_TYPES = ("qwen2", "qwen3", "qwen3_moe")
# families with sliding windows: in every layer (when the config has a window); in the
# layers layer_types marks; in those layers only with use_sliding_window
WINDOW_EVERY_LAYER = ("mistral", "mixtral", "phi3", "starcoder2")
WINDOW_BY_LAYER_TYPES = GEMMA2_TYPES + ("olmo3", "ministral", "exaone4")
WINDOW_IF_USED = QWEN_TYPES + ("smollm3",)
FAMILIES = ("gpt2",) + LLAMA_TYPES + ("gpt_neox", "phi", "gptj", "opt", "gpt_neo", "gpt_bigcode", "stablelm")

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
_PHI_DEFAULTS = {
    "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "gelu_new",
    "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_scaling": None, "partial_rotary_factor": 0.5, "qk_layernorm": False,
}
_GPTJ_DEFAULTS = {
    "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
}
_OPT_DEFAULTS = {
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "num_attention_heads": 12, "activation_function": "relu", "pad_token_id": 1,
    "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
}
_NEO_DEFAULTS = {
    "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2048, "num_layers": 24,
    "attention_types": [[["global", "local"], 12]], "num_heads": 16, "intermediate_size": None, "window_size": 256,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
}
_BIGCODE_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "multi_query": True, "add_cross_attention": False, "tie_word_embeddings": True,
}
_STABLELM_DEFAULTS = {
    "vocab_size": 50304, "intermediate_size": 6912, "hidden_size": 2560, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "use_qkv_bias": False, "qk_layernorm": False, "use_parallel_residual": False, "partial_rotary_factor": 0.25,
}
_NEOX_DEFAULTS = {
    "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
    "intermediate_size": 24576, "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "use_parallel_residual": True,
    "rope_scaling": None, "attention_bias": True, "tie_word_embeddings": False,
}
_ARCH_OF = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "MinistralForCausalLM": "ministral", "HeliumForCausalLM": "helium", "Exaone4ForCausalLM": "exaone4",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral",
            "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe", "GemmaForCausalLM": "gemma",
            "Gemma2ForCausalLM": "gemma2",
            "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3", "OlmoForCausalLM": "olmo",
            "Olmo2ForCausalLM": "olmo2", "SmolLM3ForCausalLM": "smollm3", "Starcoder2ForCausalLM": "starcoder2",
            "Olmo3ForCausalLM": "olmo3", "OlmoeForCausalLM": "olmoe", "GPTNeoXForCausalLM": "gpt_neox",
            "PhiForCausalLM": "phi",
            "GPTJForCausalLM": "gptj", "OPTForCausalLM": "opt", "GPTNeoForCausalLM": "gpt_neo",
            "GPTBigCodeForCausalLM": "gpt_bigcode", "StableLmForCausalLM": "stablelm"}


def _positive_int(cfg, key):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config: {key} must be a positive int, got {v!r}")
    return v


def _number(cfg, key, low=0.0):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v >= low:
        raise ValueError(f"config: {key} must be a finite number >= {low}, got {v!r}")
    return float(v)


def _scaling_number(scaling, kind, key, default=None, low=-math.inf):
    """rope_scaling[key] checked as _number checks it; default when absent (None: required)."""
    if scaling.get(key) is None:
        if default is None:
            raise ValueError(f"config: rope_scaling of type {kind} needs {key}")
        return default
    return _number(scaling, key, low)


def _activation(cfg, key):
    act = cfg[key]
    if act not in ACTIVATIONS:
        raise ValueError(f"config: {key} {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[act]


# Image-text checkpoints whose language model the core runs (Gemma 3 from 4B on):
# model_type -> (its language model's family, the prefixes of that model's weights in
# the files transformers writes and in its newer in-memory layout, its unembedding's
# prefix, the prefixes of the parts mechscope does not run: the vision tower and the
# projection of its output into the stream)
MULTIMODAL = {"gemma3": ("gemma3_text", ("language_model.model.", "model.language_model."), "language_model.",
                         ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                          "model.multi_modal_projector."))}


def text_config(config):
    """An image-text checkpoint's config (model_type "gemma3") -> its language model's
    config, text_config, with its family set; any other config as it is."""
    if not isinstance(config, dict) or config.get("model_type") not in MULTIMODAL:
        return config
    family = MULTIMODAL[config["model_type"]][0]
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config: model_type {config['model_type']!r} needs a text_config (its language model)")
    if text.get("model_type", family) != family:
        raise ValueError(f"config: text_config's model_type {text['model_type']!r} is not {family!r}")
    text = {k: v for k, v in text.items() if k != "architectures"}
    text["model_type"] = family
    return text


def text_weight_name(name, config):
    """A weight's name in an image-text checkpoint -> its name in the language model's
    own checkpoint ('language_model.model.layers.0...' -> 'model.layers.0...'), or None
    for the parts mechscope does not run; any other model's names as they are."""
    if not isinstance(config, dict) or config.get("model_type") not in MULTIMODAL:
        return name
    _, prefixes, head_prefix, others = MULTIMODAL[config["model_type"]]
    if name.startswith(others):
        return None
    for prefix in prefixes:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name[len(head_prefix):] if name.startswith(head_prefix + "lm_head.") else name


def text_weights(arrays, config):
    """An image-text checkpoint's arrays -> its language model's, under that model's own
    names (the vision parts left out); any other model's dict as it is."""
    if not isinstance(config, dict) or config.get("model_type") not in MULTIMODAL:
        return arrays
    renamed = ((text_weight_name(k, config), v) for k, v in arrays.items())
    return {name: v for name, v in renamed if name is not None}


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


def _rope_type(scaling):
    return scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else None


def rope_frequencies(theta, dim, scaling, max_positions, original_max_positions=None):
    """(angle per position of each rotary pair [dim / 2] float32, the factor cos and sin
    are multiplied by), as HuggingFace computes them for rope types default, linear,
    llama3, yarn, dynamic (within max_positions) and longrope (within
    original_max_positions)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    inv = inv.astype(np.float32).astype(np.float64)
    if not scaling:
        return inv.astype(np.float32), 1.0
    if not isinstance(scaling, dict):
        raise ValueError(f"config: rope_scaling must be a dict or None, got {scaling!r}")
    kind = _rope_type(scaling)
    if kind == "default":
        return inv.astype(np.float32), 1.0
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32), 1.0
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
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(theta, dim, scaling, max_positions)
    if kind == "dynamic":
        # dynamic NTK scaling raises theta only for sequences longer than
        # max_position_embeddings, which is also the core's limit: within it, the angles
        # are the default ones
        _scaling_number(scaling, "dynamic", "factor", low=1.0)
        return inv.astype(np.float32), 1.0
    if kind == "longrope":
        return _longrope(theta, dim, scaling, max_positions, original_max_positions)
    raise ValueError(f"config: rope type {kind!r} is not supported (supported: default, linear, llama3, yarn, "
                     "dynamic, longrope)")


def longrope_attention(factor, original_max_positions):
    """LongRoPE's default factor on cos and sin for a context `factor` times the
    original one: sqrt(1 + ln(factor) / ln(original context)), 1 when not longer."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_positions))


def _longrope(theta, dim, scaling, max_positions, original_max_positions):
    """LongRoPE (Phi-3.5, Phi-4-mini) up to the original context: each pair's angle
    divided by its short_factor, cos and sin multiplied by attention_factor, else by
    sqrt(1 + ln(s) / ln(original context)) where s is max_positions over the original
    context (transformers' reading of Phi-3's configs). Float32 like HuggingFace's."""
    short = scaling.get("short_factor")
    if not isinstance(short, (list, tuple)) or len(short) != dim // 2:
        raise ValueError(f"config: rope_scaling of type longrope needs short_factor, {dim // 2} numbers "
                         "(one per rotary pair)")
    short = np.array([_number(dict(f=x), "f", 1e-9) for x in short], np.float32)
    if original_max_positions:
        old = float(original_max_positions)
        factor = max_positions / old
    else:
        old, factor = float(max_positions), _scaling_number(scaling, "longrope", "factor", 1.0, low=1e-9)
    if scaling.get("attention_factor") is not None:
        attention = _scaling_number(scaling, "longrope", "attention_factor", low=1e-9)
    else:
        attention = longrope_attention(factor, old)
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv = np.float32(1.0) / (short * np.power(np.float32(theta), exponent, dtype=np.float32))
    return inv.astype(np.float32), float(attention)


def _yarn(theta, dim, scaling, max_positions):
    """YaRN (Peng et al. 2023): the pairs that turn fewer than beta_slow times over the
    original context are interpolated (angles / factor), those that turn more than
    beta_fast times are kept, with a linear ramp between; cos and sin are multiplied by
    0.1 ln(factor) + 1 (or attention_factor, or DeepSeek's mscale ratio). Computed in
    float32 like HuggingFace's."""
    def number(key, default=None, low=-math.inf):
        return _scaling_number(scaling, "yarn", key, default, low)
    factor = number("factor", low=1e-9)
    old = number("original_max_position_embeddings", float(max_positions), low=1e-9)
    fast, slow = number("beta_fast", 32.0), number("beta_slow", 1.0)
    mscale, mscale_all = number("mscale", 0.0), number("mscale_all_dim", 0.0)

    def get_mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if scaling.get("attention_factor") is not None:
        attention = number("attention_factor", low=1e-9)
    elif mscale and mscale_all:
        attention = get_mscale(mscale) / get_mscale(mscale_all)
    else:
        attention = get_mscale()

    def turns_dim(turns):  # the pair index that turns this many times over the old context
        return dim * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = turns_dim(fast), turns_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    f32 = np.float32
    pos_freqs = (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(f32)
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep = f32(1) - ramp
    inv = (f32(1) / (f32(factor) * pos_freqs)) * (f32(1) - keep) + (f32(1) / pos_freqs) * keep
    return inv.astype(np.float32), float(attention)


def normalize(config):
    """A config (dict or HF config object) -> (the full HF dict, the core's arch dict)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict or a HuggingFace config, got {type(config).__name__}")
    config = text_config(config)  # an image-text checkpoint: its language model
    family = model_type(config)
    if family in LLAMA_TYPES:
        return _llama(config, family)
    return _BUILDERS[family](config)


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
    _optional_width(cfg, "n_inner")
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
    if family == "mistral":
        cfg.update(sliding_window=4096)
    if family == "helium":
        cfg.update(vocab_size=48000, hidden_size=2560, intermediate_size=7040, num_hidden_layers=24,
                   num_attention_heads=20, num_key_value_heads=20, head_dim=128, max_position_embeddings=4096,
                   rms_norm_eps=1e-8, rope_theta=100000.0, pad_token_id=3)
    if family == "ministral":
        cfg.update(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                   sliding_window=4096)
    if family in ("olmo2", "olmo3"):
        cfg.update(vocab_size=50304, rms_norm_eps=1e-5, pad_token_id=1)
    if family == "exaone4":
        cfg.update(vocab_size=102400, intermediate_size=16384, num_key_value_heads=32, rms_norm_eps=1e-5,
                   sliding_window=4096, sliding_window_pattern=4)
    if family == "olmo":
        cfg.update(vocab_size=50304, pad_token_id=1, clip_qkv=None)
    if family == "starcoder2":
        cfg.update(vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                   num_attention_heads=24, num_key_value_heads=2, hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=4096, norm_epsilon=1e-5, sliding_window=None, use_bias=True,
                   tie_word_embeddings=True)
    if family == "smollm3":
        cfg.update(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=2e6,
                   pad_token_id=128004, use_sliding_window=False, sliding_window=None, no_rope_layers=None,
                   no_rope_layer_interval=4, tie_word_embeddings=True)
    if family == "olmo3":
        cfg.update(sliding_window=4096)
    if family == "olmoe":
        cfg.update(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                   num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=1,
                   num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None)
    if family == "phi3":
        cfg.update(vocab_size=32064, hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
                   original_max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32000)
    if family == "mixtral":
        cfg.update(num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5)
    if family in ("qwen3", "qwen3_moe"):
        cfg.update(head_dim=128, use_sliding_window=False, rope_theta=10000.0)
    if family == "gemma":
        cfg.update(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                   num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=8192, tie_word_embeddings=True)
    if family == "gemma2":
        cfg.update(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, tie_word_embeddings=True, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if family == "gemma3_text":
        cfg.update(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=1e6,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                   attn_logit_softcapping=None, rope_local_base_freq=10000.0, use_bidirectional_attention=False)
    if family == "qwen3_moe":
        cfg.update(num_experts=128, num_experts_per_tok=8, norm_topk_prob=False, moe_intermediate_size=768,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen2_moe":
        cfg.update(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                   num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, moe_intermediate_size=1408,
                   shared_expert_intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=[],
                   qkv_bias=True, use_sliding_window=False)
    cfg.update(config)
    cfg["model_type"] = family
    if cfg.get("head_dim") is None or family == "olmoe":
        # transformers' Phi-3 and OLMo 2 read a head_dim key even when it is None;
        # its OLMoE ignores the key (hidden_size / num_attention_heads)
        cfg.pop("head_dim", None)
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
    rotary_dim = d_head
    if family == "phi3":  # Phi-4-mini rotates the first 3/4 of each head
        rotary_dim = _partial_rotary(cfg, "partial_rotary_factor", d_head)
    elif cfg.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ValueError(f"config: partial_rotary_factor {cfg['partial_rotary_factor']!r} is not "
                         f"supported for {family} (only 1.0)")
    windowed = family in WINDOW_BY_LAYER_TYPES or (family in WINDOW_IF_USED and cfg.get("use_sliding_window"))
    kinds = ("full_attention", "sliding_attention") if windowed else ("full_attention",)
    if any(t not in kinds for t in cfg.get("layer_types") or ()):
        raise ValueError(f"config: layer_types other than {' and '.join(map(repr, kinds))} are not supported "
                         "(sliding-window attention)")
    n_ctx = cfg["max_position_embeddings"]
    theta = _number(cfg, "rope_theta", 1e-9)
    arch = dict(family=family, n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=KV,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"], n_ctx=n_ctx,
                ln_eps=_number(cfg, "rms_norm_eps"), norm=NORM_RMS,
                activation=_activation(cfg, "hidden_act"), gated_mlp=1, parallel=0, rotary_dim=rotary_dim,
                scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(cfg.get("qkv_bias" if family == "qwen2_moe"
                                                           else "attention_bias")),
                o_bias=family != "qwen2" and bool(cfg.get("attention_bias")),
                mlp_bias=bool(cfg.get("mlp_bias", False)), n_experts=0, experts_per_token=0,
                qk_norm=int(family in ("qwen3", "qwen3_moe", "gemma3_text")), expert_renormalize=1)
    if family in GEMMA2_TYPES:
        # the block: Gemma's, with the attention's and the MLP's outputs normed again
        # (post_attention_layernorm and post_feedforward_layernorm) before they join the
        # stream; the scores multiplied by query_pre_attn_scalar^-1/2 and both the scores
        # (before the mask) and the logits soft-capped, cap tanh(x / cap)
        arch.update(activation=_activation(cfg, "hidden_activation"), post_norms=1,
                    attn_scale=float(np.float32(_number(cfg, "query_pre_attn_scalar", 1e-9) ** -0.5)))
        for key, name in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "logit_softcap")):
            arch[name] = 0.0 if cfg.get(key) is None else _number(cfg, key, 1e-9)
    if family == "gemma":
        act = cfg.get("hidden_activation")
        if act is not None and act != cfg["hidden_act"]:
            # Gemma's own checkpoints say hidden_act "gelu" and hidden_activation
            # "gelu_pytorch_tanh"; transformers' Gemma reads hidden_act only
            warnings.warn(f"config: hidden_activation {act!r} differs from hidden_act {cfg['hidden_act']!r}; "
                          "the MLP uses hidden_act, as transformers' Gemma does (TransformerLens's Gemma "
                          "uses gelu_pytorch_tanh)", stacklevel=3)
    pad = cfg.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < cfg["vocab_size"]:
        # transformers' embedding here is nn.Embedding(padding_idx=pad_token_id): the pad
        # token's row takes no gradient from the lookup (it does as the tied unembedding)
        arch["padding_idx"] = pad
    if family == "olmo":
        # Llama's block with LayerNorms that have no scale or bias (transformers' fixed
        # eps 1e-5): the core's scales are ones (see ONES), and there are no biases
        if cfg.get("clip_qkv") is not None:
            raise ValueError(f"config: clip_qkv {cfg['clip_qkv']!r} is not supported (clamped queries, keys "
                             "and values); only None")
        arch.update(norm=NORM_LAYER, ln_eps=1e-5)
    if family == "helium":
        # Llama's block rotating adjacent pairs (as GPT-J's); attention_bias gives q, k
        # and v biases, never the output's
        arch.update(rotary_interleaved=1, o_bias=False)
    if family == "starcoder2":
        # Mistral's attention around LayerNorms with biases, and GPT-2's MLP (no gate);
        # use_bias gives every product its bias
        bias = bool(cfg["use_bias"])
        arch.update(norm=NORM_LAYER, ln_eps=_number(cfg, "norm_epsilon"), gated_mlp=0, qkv_bias=bias, o_bias=bias,
                    mlp_bias=bias)
    if family in ("olmo2", "olmo3"):
        # no norm before the attention and the MLP; their outputs normed (as Gemma 2's),
        # and the queries and keys each normed over all heads at once
        arch.update(input_norms=0, post_norms=1, qk_norm=2)
    if family == "exaone4":
        # OLMo 2's norms after the attention and the MLP, Qwen3's per-head query and key norms
        arch.update(input_norms=0, post_norms=1, qk_norm=1)
    if family == "olmoe":
        # Llama's norms, OLMo 2's query and key norms over all heads
        if cfg.get("clip_qkv") is not None:
            raise ValueError(f"config: clip_qkv {cfg['clip_qkv']!r} is not supported (clamped queries, keys "
                             "and values); only None")
        arch["qk_norm"] = 2
    if family.startswith("gemma"):
        # HF multiplies the embeddings by sqrt(hidden_size) rounded to the model's float
        # type (float32 here) and keeps the unembedding (the tied embedding) as it is
        arch["embed_scale"] = float(np.float32(C ** 0.5))
    if family == "mixtral":
        # router_jitter_noise and the auxiliary loss act in training only; mechscope runs
        # the model as HuggingFace evaluates it
        arch["n_experts"] = _positive_int(cfg, "num_local_experts")
        arch["experts_per_token"] = _positive_int(cfg, "num_experts_per_tok")
        if arch["experts_per_token"] > arch["n_experts"]:
            raise ValueError(f"config: num_experts_per_tok ({arch['experts_per_token']}) must be at most "
                             f"num_local_experts ({arch['n_experts']})")
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        # every block a mixture (Qwen's configs can also make some blocks plain MLPs);
        # the router's softmax over every expert, the chosen experts' probabilities
        # renormalised only with norm_topk_prob
        if family != "olmoe" and (cfg["decoder_sparse_step"] != 1 or cfg["mlp_only_layers"]):
            raise ValueError("config: decoder_sparse_step other than 1 and mlp_only_layers are not supported "
                             "(blocks of two kinds in one model)")
        arch["n_experts"] = _positive_int(cfg, "num_experts")
        arch["experts_per_token"] = _positive_int(cfg, "num_experts_per_tok")
        if family != "olmoe":  # OLMoE's experts are intermediate_size wide
            arch["d_mlp"] = _positive_int(cfg, "moe_intermediate_size")
        if family == "qwen2_moe":
            # and a shared expert every token runs, scaled by sigmoid(x . shared_expert_gate)
            arch["d_shared"] = _positive_int(cfg, "shared_expert_intermediate_size")
            if cfg.get("use_sliding_window"):
                raise ValueError("config: use_sliding_window=True is not supported for qwen2_moe (transformers "
                                 "applies its window in flash attention only)")
        arch["expert_renormalize"] = int(bool(cfg["norm_topk_prob"]))
        if arch["experts_per_token"] > arch["n_experts"]:
            raise ValueError(f"config: num_experts_per_tok ({arch['experts_per_token']}) must be at most "
                             f"num_experts ({arch['n_experts']})")
    arch["rope_inv_freq"], arch["rope_scale"] = rope_frequencies(theta, rotary_dim, cfg.get("rope_scaling"),
                                                                 cfg["max_position_embeddings"],
                                                                 cfg.get("original_max_position_embeddings"))
    if _rope_type(cfg.get("rope_scaling")) == "longrope":
        # past original_max_position_embeddings transformers turns every position's angles
        # to long_factor's: within it, short_factor's hold, so that is the core's limit
        arch["n_ctx"] = min(arch["n_ctx"], cfg.get("original_max_position_embeddings") or arch["n_ctx"])
    if family == "gemma3_text":
        _gemma3_layers(cfg, arch)
    if family == "olmo3" and cfg.get("rope_scaling"):
        # OLMo 3's sliding layers rotate with the default angles, its full layers scaled
        arch["rope_inv_freq_local"] = rope_frequencies(theta, rotary_dim, None, cfg["max_position_embeddings"])[0]
        arch["rope_local_layers"] = [int(k == "sliding_attention")
                                     for k in _layer_kinds(cfg, family, arch["n_layers"])]
    if family == "smollm3":
        _smollm3_layers(cfg, arch)
    if family == "exaone4" and cfg.get("sliding_window") is not None:
        # with a window, the full-attention layers do not rotate ("global NoPE")
        _without_rotary(arch, [k == "full_attention" for k in _layer_kinds(cfg, family, arch["n_layers"])])
    windows = _attention_windows(cfg, family, arch["n_layers"])
    if any(windows):
        arch["attn_windows"] = windows
    return cfg, arch




def _layer_kinds(cfg, family, n_layers):
    """Gemma 2's and 3's, OLMo 3's, Ministral's and EXAONE 4's layer_types
    (sliding_attention or full_attention per layer), filled in as transformers fills
    them when the config has none: every other layer sliding from the first (Gemma 2),
    five of every six (Gemma 3), three of every four (OLMo 3), every layer (Ministral,
    with a window), all but every sliding_window_pattern-th (EXAONE 4)."""
    kinds = cfg.get("layer_types")
    if kinds is None and family == "ministral":
        kinds = ["sliding_attention"] * n_layers
    if kinds is None and family == "exaone4":
        every = cfg.get("sliding_window_pattern")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"config: sliding_window_pattern {every!r} without layer_types is not supported "
                             "(only a positive int: every n-th layer full attention)")
    if kinds is None:
        every = {"gemma2": 2, "olmo3": 4}.get(family) or cfg.get("sliding_window_pattern", 6)
        kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    if len(kinds) != n_layers:
        raise ValueError(f"config: layer_types has {len(kinds)} entries for {n_layers} layers")
    return kinds


def _smollm3_rope_layers(cfg, n_layers):
    """SmolLM3's no_rope_layers (1: the layer rotates q and k, 0: it does not, "NoPE"),
    filled in as transformers fills them when the config has none: every
    no_rope_layer_interval-th layer without rotation."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        every = _positive_int(cfg, "no_rope_layer_interval")
        flags = [int((i + 1) % every != 0) for i in range(n_layers)]
    if (not isinstance(flags, (list, tuple)) or len(flags) != n_layers
            or any(f not in (0, 1) or isinstance(f, float) for f in flags)):
        raise ValueError(f"config: no_rope_layers must be a list of {n_layers} flags 0 or 1 (one per layer), "
                         f"got {flags!r}")
    return [int(f) for f in flags]


def _smollm3_layers(cfg, arch):
    """SmolLM3's layers without rotation (see _without_rotary), the others rotating with
    the model's angles; and its sliding windows, when use_sliding_window, in
    layer_types, which transformers fills in as the layers without rotation."""
    flags = _smollm3_rope_layers(cfg, arch["n_layers"])
    if cfg.get("layer_types") is None:
        windowed = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
        cfg["layer_types"] = ["sliding_attention" if windowed and not f else "full_attention" for f in flags]
    if not all(flags):
        _without_rotary(arch, [not f for f in flags])


def _without_rotary(arch, unrotated):
    """Layers that do not rotate q and k (unrotated[layer] true; "NoPE") rotate by the
    core's local angles, all zero here: cos 1 and sin 0 leave q and k as they are."""
    arch["rope_inv_freq_local"] = np.zeros(arch["rotary_dim"] // 2, np.float32)
    arch["rope_local_layers"] = [int(u) for u in unrotated]


def _gemma3_layers(cfg, arch):
    """Gemma 3's sliding-window layers rotate with angles of their own (theta
    rope_local_base_freq, no scaling); the others with the model's."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("config: use_bidirectional_attention=True is not supported (attention to later tokens)")
    kinds = _layer_kinds(cfg, "gemma3_text", arch["n_layers"])
    local = _number(cfg, "rope_local_base_freq", 1e-9)
    arch["rope_inv_freq_local"] = rope_frequencies(local, arch["d_head"], None, cfg["max_position_embeddings"])[0]
    arch["rope_local_layers"] = [int(k == "sliding_attention") for k in kinds]


def _attention_windows(cfg, family, n_layers):
    """Per layer, the sliding window (a query sees the last `sliding_window` tokens,
    itself included, as transformers masks them) or 0 (every earlier token): every
    layer of Mistral, Mixtral, Phi-3 and StarCoder 2 when they have a window, Gemma 2's
    and 3's, OLMo 3's and Ministral's sliding_attention layers, and Qwen's and SmolLM3's with
    use_sliding_window (layer_types, else for Qwen the layers from max_window_layers on)."""
    if family in WINDOW_IF_USED and not cfg.get("use_sliding_window"):
        return [0] * n_layers
    if (family not in WINDOW_EVERY_LAYER + WINDOW_BY_LAYER_TYPES + WINDOW_IF_USED
            or cfg.get("sliding_window") is None):
        return [0] * n_layers
    window = _positive_int(cfg, "sliding_window")
    if family in WINDOW_EVERY_LAYER:
        return [window] * n_layers
    if family in QWEN_TYPES:
        first = cfg.get("max_window_layers", 28)
        kinds = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                           for i in range(n_layers)]
        if len(kinds) != n_layers:
            raise ValueError(f"config: layer_types has {len(kinds)} entries for {n_layers} layers")
        return [window if k == "sliding_attention" else 0 for k in kinds]
    return [window if k == "sliding_attention" else 0 for k in _layer_kinds(cfg, family, n_layers)]


def _optional_width(cfg, key):
    """An MLP width that may be None (4 * d_model then): None or a positive int."""
    width = cfg[key]
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise ValueError(f"config: {key} must be None or a positive int, got {width!r}")
    return width


def _partial_rotary(cfg, key, d_head):
    """The rotary dims of a head that rotates the first cfg[key] of its dims: an even
    number from 2 to d_head."""
    rot = int(d_head * _number(cfg, key))
    if rot < 2 or rot % 2 or rot > d_head:
        raise ValueError(f"config: {key} {cfg[key]} gives {rot} rotary dims of {d_head}; mechscope needs an even "
                         "number from 2 to head_dim")
    return rot


def _filled(defaults, config, family, sizes):
    """The family's defaults updated by config, its model_type set, the sizes checked
    to be positive ints."""
    cfg = dict(defaults)
    cfg.update(config)
    cfg["model_type"] = family
    for key in sizes:
        _positive_int(cfg, key)
    return cfg


def _opt(config):
    """OPT: GPT-2's pre-norm block (LayerNorms with biases, a non-gated MLP, ReLU by
    default) with nn.Linear matrices, q, k and v separate, and learned positions whose
    table has two rows before position 0 (HF's offset of 2, kept out of the core)."""
    cfg = _filled(_OPT_DEFAULTS, config, "opt", ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                                                 "max_position_embeddings", "num_attention_heads"))
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if C % H:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_attention_heads ({H})")
    if not cfg["do_layer_norm_before"]:
        raise ValueError("config: do_layer_norm_before=False is not supported (OPT-350m's norms after the "
                         "attention and the MLP)")
    if cfg["_remove_final_layer_norm"]:
        raise ValueError("config: _remove_final_layer_norm=True is not supported (no final LayerNorm)")
    if cfg["word_embed_proj_dim"] not in (None, C):
        raise ValueError(f"config: word_embed_proj_dim {cfg['word_embed_proj_dim']!r} other than hidden_size "
                         f"({C}) is not supported (projections in and out of the embedding)")
    if not cfg["layer_norm_elementwise_affine"]:
        raise ValueError("config: layer_norm_elementwise_affine=False is not supported")
    bias = bool(cfg["enable_bias"])
    arch = dict(family="opt", n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=H, d_head=C // H,
                d_mlp=cfg["ffn_dim"], d_vocab=cfg["vocab_size"], n_ctx=cfg["max_position_embeddings"],
                ln_eps=1e-5,  # nn.LayerNorm's default: OPT's config has no epsilon
                norm=NORM_LAYER, activation=_activation(cfg, "activation_function"), gated_mlp=0, parallel=0,
                rotary_dim=0, rope_scale=1.0, scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    pad = cfg.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < cfg["vocab_size"]:
        arch["padding_idx"] = pad  # nn.Embedding(padding_idx=pad_token_id), as Llama's
    return cfg, arch


def _gpt_neo(config):
    """GPT-Neo (and the TinyStories models): GPT-2's pre-norm block with nn.Linear
    matrices, q, k and v separate and without biases, attention scores that are not
    divided by sqrt(d_head), and layers of two kinds from attention_types: "global"
    (every earlier token) and "local" (the last window_size tokens, itself included)."""
    cfg = _filled(_NEO_DEFAULTS, config, "gpt_neo", ("vocab_size", "max_position_embeddings", "hidden_size",
                                                     "num_layers", "num_heads", "window_size"))
    C, H, L = cfg["hidden_size"], cfg["num_heads"], cfg["num_layers"]
    if C % H:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_heads ({H})")
    inner = _optional_width(cfg, "intermediate_size")
    kinds = _neo_layer_kinds(cfg["attention_types"])
    if len(kinds) != L:
        raise ValueError(f"config: attention_types gives {len(kinds)} layers for num_layers={L}")
    arch = dict(family="gpt_neo", n_layers=L, d_model=C, n_heads=H, n_kv_heads=H, d_head=C // H,
                d_mlp=inner or 4 * C, d_vocab=cfg["vocab_size"], n_ctx=cfg["max_position_embeddings"],
                ln_eps=_number(cfg, "layer_norm_epsilon"), norm=NORM_LAYER,
                activation=_activation(cfg, "activation_function"), gated_mlp=0, parallel=0, rotary_dim=0,
                rope_scale=1.0, scale_attn_weights=0, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=False, o_bias=True, mlp_bias=True)
    if "local" in kinds:
        arch["attn_windows"] = [cfg["window_size"] if k == "local" else 0 for k in kinds]
    return cfg, arch


def _bigcode(config):
    """GPT-BigCode (SantaCoder, StarCoder, TinyStarCoder): GPT-2's block with nn.Linear
    matrices and multi-query attention, one key/value head that every query head reads
    (c_attn's rows: q for all heads, then k, then v)."""
    cfg = _filled(_BIGCODE_DEFAULTS, config, "gpt_bigcode", ("vocab_size", "n_positions", "n_embd", "n_layer",
                                                             "n_head"))
    C, H = cfg["n_embd"], cfg["n_head"]
    if C % H:
        raise ValueError(f"config: n_embd ({C}) must be divisible by n_head ({H})")
    if not cfg["multi_query"]:
        raise ValueError("config: multi_query=False is not supported (GPT-BigCode's q, k and v interleaved by head)")
    if cfg["add_cross_attention"]:
        raise ValueError("config: add_cross_attention=True: cross-attention layers are not supported")
    inner = _optional_width(cfg, "n_inner")
    # attention_softmax_in_fp32 and scale_attention_softmax_in_fp32 change only half-precision runs
    arch = dict(family="gpt_bigcode", n_layers=cfg["n_layer"], d_model=C, n_heads=H, n_kv_heads=1, d_head=C // H,
                d_mlp=inner or 4 * C, d_vocab=cfg["vocab_size"], n_ctx=cfg["n_positions"],
                ln_eps=_number(cfg, "layer_norm_epsilon"), norm=NORM_LAYER,
                activation=_activation(cfg, "activation_function"), gated_mlp=0, parallel=0, rotary_dim=0,
                rope_scale=1.0, scale_attn_weights=int(bool(cfg["scale_attn_weights"])), scale_attn_by_inverse_layer=0,
                linear_trans=1, tied=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=True, o_bias=True,
                mlp_bias=True)
    return cfg, arch


def _head_counts(cfg):
    """(hidden_size, num_attention_heads, num_key_value_heads) of a config, the last
    None for one per head; the heads must divide the width and the key/value heads the heads"""
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"] if cfg["num_key_value_heads"] is not None else H
    if C % H or isinstance(KV, bool) or not isinstance(KV, int) or KV < 1 or H % KV:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_attention_heads ({H}), and "
                         f"num_key_value_heads ({KV!r}) divide it")
    return C, H, KV


def _stablelm(config):
    """StableLM (StableLM-2, StableLM-3B-4E1T, Zephyr): Llama's block (SwiGLU, grouped
    keys and values) with LayerNorms (weight and bias), partial rotary over the first
    partial_rotary_factor of each head, q/k/v biases by use_qkv_bias."""
    cfg = _filled(_STABLELM_DEFAULTS, config, "stablelm", ("vocab_size", "hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "intermediate_size",
                                                          "max_position_embeddings"))
    if cfg["qk_layernorm"]:
        raise ValueError("config: qk_layernorm=True is not supported (LayerNorms of each head's queries and keys)")
    if cfg["use_parallel_residual"]:
        raise ValueError("config: use_parallel_residual=True is not supported for stablelm")
    C, H, KV = _head_counts(cfg)
    d_head = C // H
    rot = _partial_rotary(cfg, "partial_rotary_factor", d_head)
    arch = dict(family="stablelm", n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=KV,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
                n_ctx=cfg["max_position_embeddings"], ln_eps=_number(cfg, "layer_norm_eps"), norm=NORM_LAYER,
                activation=_activation(cfg, "hidden_act"), gated_mlp=1, parallel=0, rotary_dim=rot,
                scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=bool(cfg["use_qkv_bias"]), o_bias=False,
                mlp_bias=False)
    arch["rope_inv_freq"], arch["rope_scale"] = rope_frequencies(_number(cfg, "rope_theta"), rot,
                                                                 cfg.get("rope_scaling"),
                                                                 cfg["max_position_embeddings"])
    return cfg, arch


def _neo_layer_kinds(attention_types):
    """GPT-Neo's attention_types, [[kinds, repeats], ...] (e.g. [[["global", "local"], 12]]),
    -> one kind per layer, as transformers expands it"""
    kinds = []
    try:
        for group, repeats in attention_types:
            if (not isinstance(group, (list, tuple)) or not isinstance(repeats, int) or isinstance(repeats, bool)
                    or repeats < 0):
                raise ValueError
            kinds.extend(list(group) * repeats)
    except (TypeError, ValueError):
        raise ValueError(f"config: attention_types must be a list of [kinds, repeats] pairs, "
                         f"got {attention_types!r}") from None
    other = sorted({repr(k) for k in kinds} - {"'global'", "'local'"})
    if other:
        raise ValueError(f"config: attention_types: kinds other than 'global' and 'local' are not supported "
                         f"({', '.join(other)})")
    return kinds


def _neox(config):
    cfg = _filled(_NEOX_DEFAULTS, config, "gpt_neox", ("vocab_size", "hidden_size", "num_hidden_layers",
                                                       "num_attention_heads", "intermediate_size",
                                                       "max_position_embeddings"))
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if C % H:
        raise ValueError(f"config: hidden_size ({C}) must be divisible by num_attention_heads ({H})")
    d_head = C // H
    rot = _partial_rotary(cfg, "rotary_pct", d_head)
    theta = float(cfg.get("rope_theta", cfg["rotary_emb_base"]))
    arch = dict(family="gpt_neox", n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=H,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
                n_ctx=cfg["max_position_embeddings"], ln_eps=_number(cfg, "layer_norm_eps"),
                norm=NORM_LAYER, activation=_activation(cfg, "hidden_act"), gated_mlp=0,
                parallel=int(bool(cfg["use_parallel_residual"])), rotary_dim=rot,
                scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", True)), o_bias=bool(cfg.get("attention_bias", True)),
                mlp_bias=True)
    arch["rope_inv_freq"], arch["rope_scale"] = rope_frequencies(theta, rot, cfg.get("rope_scaling"),
                                                                 cfg["max_position_embeddings"])
    return cfg, arch


def _phi(config):
    """Phi-1, Phi-1.5, Phi-2: one LayerNorm whose output both the attention and the MLP
    read (the core's parallel block, its second norm the first's weights), partial
    rotary, biases everywhere, the unembedding's included."""
    cfg = _filled(_PHI_DEFAULTS, config, "phi", ("vocab_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "intermediate_size", "max_position_embeddings"))
    if cfg.get("qk_layernorm"):
        raise ValueError("config: qk_layernorm=True is not supported (LayerNorms of the queries and keys)")
    C, H, KV = _head_counts(cfg)
    d_head = C // H
    rot = _partial_rotary(cfg, "partial_rotary_factor", d_head)
    arch = dict(family="phi", n_layers=cfg["num_hidden_layers"], d_model=C, n_heads=H, n_kv_heads=KV,
                d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
                n_ctx=cfg["max_position_embeddings"], ln_eps=_number(cfg, "layer_norm_eps"),
                norm=NORM_LAYER, activation=_activation(cfg, "hidden_act"), gated_mlp=0, parallel=1,
                rotary_dim=rot, scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=True, o_bias=True, mlp_bias=True)
    arch["rope_inv_freq"], arch["rope_scale"] = rope_frequencies(_number(cfg, "rope_theta", 1e-9), rot,
                                                                 cfg.get("rope_scaling"),
                                                                 cfg["max_position_embeddings"])
    return cfg, arch


def _gptj(config):
    """GPT-J: Phi's block (one LayerNorm read by the parallel attention and MLP, an
    unembedding bias) without attention biases, its rotary over the first rotary_dim
    dimensions of each head in adjacent pairs (2i, 2i + 1) and theta 10^4."""
    cfg = _filled(_GPTJ_DEFAULTS, config, "gptj", ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
    C, H = cfg["n_embd"], cfg["n_head"]
    if C % H:
        raise ValueError(f"config: n_embd ({C}) must be divisible by n_head ({H})")
    d_head = C // H
    rot = cfg["rotary_dim"]
    if isinstance(rot, bool) or not isinstance(rot, int) or rot < 2 or rot % 2 or rot > d_head:
        raise ValueError(f"config: rotary_dim must be an even number from 2 to the head width ({d_head}), "
                         f"got {rot!r}")
    _optional_width(cfg, "n_inner")
    arch = dict(family="gptj", n_layers=cfg["n_layer"], d_model=C, n_heads=H, n_kv_heads=H, d_head=d_head,
                d_mlp=cfg["n_inner"] or 4 * C, d_vocab=cfg["vocab_size"], n_ctx=cfg["n_positions"],
                ln_eps=_number(cfg, "layer_norm_epsilon"), norm=NORM_LAYER,
                activation=_activation(cfg, "activation_function"), gated_mlp=0, parallel=1, rotary_dim=rot,
                rotary_interleaved=1, scale_attn_weights=1, scale_attn_by_inverse_layer=0, linear_trans=1,
                tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=False, o_bias=False, mlp_bias=True)
    arch["rope_inv_freq"], arch["rope_scale"] = rope_frequencies(10000.0, rot, None, cfg["n_positions"])
    return cfg, arch


# the families' config readers (the Llama family's take its model_type too)
_BUILDERS = {"gpt2": _gpt2, "phi": _phi, "gptj": _gptj, "opt": _opt, "gpt_neo": _gpt_neo, "gpt_bigcode": _bigcode,
             "stablelm": _stablelm, "gpt_neox": _neox}


# ---- weights: one table per family, read in both directions ------------------------------
#
# Each family declares once how its HuggingFace weights make up the core's weights. The
# table is read one way to load (core_weights: HF arrays -> the core's) and the other way
# to return gradients (hf_gradients: the core's weight gradients -> HF-named arrays); it
# also gives the HF names and shapes a checkpoint must hold (hf_shapes), how each starts
# and is stored (weight_kinds), the names' prefix (strip_prefix, hf_name), and the HF
# names of the weights the core's error messages mention (hf_message). The weights of a
# new family are one more table (its config still needs its own function above).
#
# How a core weight is made of its HF weights:
SAME = "same"    # the HF array itself (GPT-2's Conv1D [in, out] matrices too: the core reads
#                  either layout, see core_config's linear_trans)
STACK = "stack"  # the HF arrays stacked along rows (q|k|v, gate|up): one product instead of several
HEADS = "heads"  # GPT-NeoX's fused q|k|v, whose rows are [head, q|k|v, d_head] in HF and
#                  [q|k|v, head, d_head] in the core (so that q, k and v are blocks of rows)
TIED = "tied"    # another weight's array read again (a tied unembedding, the embedding; Phi's
#                  second norm, its first): its gradient is added to that weight's
OFFSET = "offset"  # a norm's scale 1 + the HF array (Gemma's norms multiply by 1 + weight), made
#                    in float32 as HF makes it; its gradient is the HF array's
ONES = "ones"    # a scale the checkpoint does not hold (OLMo's norms have none): ones, made here,
#                  as wide as the model; no HF weight, so no gradient is returned for it
POSITIONS = "positions"  # OPT's learned positions: the HF table's rows from 2 on (HF looks up
#                          position p at row p + 2; rows 0 and 1 serve no real token), whose
#                          first two rows get no gradient
_POSITION_OFFSET = 2


class Pair(NamedTuple):
    """One core weight and the HF weights it is made of.

    core: the core's name (in a block: the part after "blocks.{layer}.")
    how: SAME, STACK, HEADS, TIED, OFFSET, ONES or POSITIONS (above)
    hf: ((HF name, shape), ...) in stacking order (none for ONES); a shape is dimension letters, e.g. "3C C"
        (C d_model, V d_vocab, P n_ctx, P2 n_ctx + 2, F d_mlp, FS a shared expert's width,
        QD/KD the widths of q and of k, v)
    when: the arch flag the weight exists under ("qkv_bias", "o_bias", "mlp_bias"), or
        "tied"/"untied" for the unembedding; None: always"""
    core: str
    how: str
    hf: tuple
    when: str = None


class Family(NamedTuple):
    prefix: str    # HF's prefix of every name but the unembedding's ("transformer.")
    block: str     # HF's name of block l is f"{block}.{l}."
    top: tuple     # Pairs outside the blocks
    blocks: tuple  # Pairs of every block
    head: tuple    # Pairs of the unembedding (its HF name carries no prefix)


def _same(core, hf, shape, when=None):
    return Pair(core, SAME, ((hf, shape),), when)


_GPT2_WEIGHTS = Family(
    prefix="transformer.", block="h",
    top=(_same("embed", "wte.weight", "V C"), _same("pos_embed", "wpe.weight", "P C"),
         _same("ln_final.w", "ln_f.weight", "C"), _same("ln_final.b", "ln_f.bias", "C")),
    blocks=(_same("ln1.w", "ln_1.weight", "C"), _same("ln1.b", "ln_1.bias", "C"),
            _same("attn.w_qkv", "attn.c_attn.weight", "C 3C"), _same("attn.b_qkv", "attn.c_attn.bias", "3C"),
            _same("attn.w_o", "attn.c_proj.weight", "C C"), _same("attn.b_o", "attn.c_proj.bias", "C"),
            _same("ln2.w", "ln_2.weight", "C"), _same("ln2.b", "ln_2.bias", "C"),
            _same("mlp.w_in", "mlp.c_fc.weight", "C F"), _same("mlp.b_in", "mlp.c_fc.bias", "F"),
            _same("mlp.w_out", "mlp.c_proj.weight", "F C"), _same("mlp.b_out", "mlp.c_proj.bias", "C")),
    head=(_same("unembed", "lm_head.weight", "V C", "untied"),))

_LLAMA_WEIGHTS = Family(
    prefix="model.", block="layers",
    top=(_same("embed", "embed_tokens.weight", "V C"), _same("ln_final.w", "norm.weight", "C")),
    blocks=(_same("ln1.w", "input_layernorm.weight", "C"), _same("ln2.w", "post_attention_layernorm.weight", "C"),
            Pair("attn.w_qkv", STACK, (("self_attn.q_proj.weight", "QD C"), ("self_attn.k_proj.weight", "KD C"),
                                       ("self_attn.v_proj.weight", "KD C"))),
            _same("attn.w_o", "self_attn.o_proj.weight", "C QD"),
            Pair("mlp.w_in", STACK, (("mlp.gate_proj.weight", "F C"), ("mlp.up_proj.weight", "F C"))),
            _same("mlp.w_out", "mlp.down_proj.weight", "C F"),
            Pair("attn.b_qkv", STACK, (("self_attn.q_proj.bias", "QD"), ("self_attn.k_proj.bias", "KD"),
                                       ("self_attn.v_proj.bias", "KD")), "qkv_bias"),
            _same("attn.b_o", "self_attn.o_proj.bias", "C", "o_bias"),
            Pair("mlp.b_in", STACK, (("mlp.gate_proj.bias", "F"), ("mlp.up_proj.bias", "F")), "mlp_bias"),
            _same("mlp.b_out", "mlp.down_proj.bias", "C", "mlp_bias")),
    head=(_same("unembed", "lm_head.weight", "V C", "untied"),))

_NEOX_WEIGHTS = Family(
    prefix="gpt_neox.", block="layers",
    top=(_same("embed", "embed_in.weight", "V C"), _same("ln_final.w", "final_layer_norm.weight", "C"),
         _same("ln_final.b", "final_layer_norm.bias", "C")),
    blocks=(_same("ln1.w", "input_layernorm.weight", "C"), _same("ln1.b", "input_layernorm.bias", "C"),
            _same("ln2.w", "post_attention_layernorm.weight", "C"),
            _same("ln2.b", "post_attention_layernorm.bias", "C"),
            Pair("attn.w_qkv", HEADS, (("attention.query_key_value.weight", "3C C"),)),
            _same("attn.w_o", "attention.dense.weight", "C C"),
            _same("mlp.w_in", "mlp.dense_h_to_4h.weight", "F C"), _same("mlp.b_in", "mlp.dense_h_to_4h.bias", "F"),
            _same("mlp.w_out", "mlp.dense_4h_to_h.weight", "C F"), _same("mlp.b_out", "mlp.dense_4h_to_h.bias", "C"),
            Pair("attn.b_qkv", HEADS, (("attention.query_key_value.bias", "3C"),), "qkv_bias"),
            _same("attn.b_o", "attention.dense.bias", "C", "o_bias")),
    # tied, the core still gets the unembedding under its own name (the embedding's array)
    head=(_same("unembed", "embed_out.weight", "V C", "untied"),
          Pair("unembed", TIED, (("embed_in.weight", "V C"),), "tied")))

# Mixtral: Llama's attention; in place of the MLP a router and experts, whose matrices
# are stacked expert after expert ("{e}" stands for each expert's index)
_MIXTRAL_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=tuple(p for p in _LLAMA_WEIGHTS.blocks if p.core.startswith(("ln", "attn."))) + (
    _same("mlp.w_router", "block_sparse_moe.gate.weight", "E C"),
    Pair("mlp.w_in", STACK, (("block_sparse_moe.experts.{e}.w1.weight", "F C"),
                             ("block_sparse_moe.experts.{e}.w3.weight", "F C"))),
    Pair("mlp.w_out", STACK, (("block_sparse_moe.experts.{e}.w2.weight", "C F"),))))

# Qwen3: Llama's weights and each block's per-head query and key norms ("D": d_head)
_QWEN3_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=_LLAMA_WEIGHTS.blocks + (
    _same("attn.q_norm.w", "self_attn.q_norm.weight", "D"), _same("attn.k_norm.w", "self_attn.k_norm.weight", "D")))

# Qwen3-MoE: Qwen3's attention and norms; a router and experts as Mixtral's, under other names
_QWEN3_MOE_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=tuple(
    p for p in _QWEN3_WEIGHTS.blocks if not p.core.startswith("mlp.")) + (
    _same("mlp.w_router", "mlp.gate.weight", "E C"),
    Pair("mlp.w_in", STACK, (("mlp.experts.{e}.gate_proj.weight", "F C"), ("mlp.experts.{e}.up_proj.weight", "F C"))),
    Pair("mlp.w_out", STACK, (("mlp.experts.{e}.down_proj.weight", "C F"),))))

# Qwen2-MoE: Qwen2's attention (q/k/v biases by qkv_bias), Qwen3-MoE's router and experts,
# and the shared expert: gate | up stacked as a gated MLP's, out, and its gate's [1, C] weights
_QWEN2_MOE_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=tuple(
    p for p in _LLAMA_WEIGHTS.blocks if not p.core.startswith("mlp.")) + tuple(
    p for p in _QWEN3_MOE_WEIGHTS.blocks if p.core.startswith("mlp.")) + (
    Pair("mlp.shared.w_in", STACK, (("mlp.shared_expert.gate_proj.weight", "FS C"),
                                    ("mlp.shared_expert.up_proj.weight", "FS C"))),
    _same("mlp.shared.w_out", "mlp.shared_expert.down_proj.weight", "C FS"),
    _same("mlp.shared.w_router", "mlp.shared_expert_gate.weight", "1 C")))

# OLMoE: Qwen3-MoE's names, its query and key norms as wide as q and k (OLMo 2's)
_OLMOE_WEIGHTS = _QWEN3_MOE_WEIGHTS._replace(blocks=tuple(
    p for p in _QWEN3_MOE_WEIGHTS.blocks if p.core not in ("attn.q_norm.w", "attn.k_norm.w")) + (
    _same("attn.q_norm.w", "self_attn.q_norm.weight", "QD"), _same("attn.k_norm.w", "self_attn.k_norm.weight", "KD")))


def _offset_norms(pairs):
    """the pairs with every norm's scale read as 1 + the HF weight"""
    return tuple(p._replace(how=OFFSET) if p.core.endswith(("ln1.w", "ln2.w", "ln_final.w")) else p for p in pairs)


# Gemma: Llama's names; every norm scales by 1 + its weight
_GEMMA_WEIGHTS = _LLAMA_WEIGHTS._replace(top=_offset_norms(_LLAMA_WEIGHTS.top),
                                         blocks=_offset_norms(_LLAMA_WEIGHTS.blocks))

# Gemma 2: four norms a block; HF's post_attention_layernorm norms the attention's output
# (Llama's name for the MLP's input norm, which is pre_feedforward_layernorm here)
_GEMMA2_WEIGHTS = _GEMMA_WEIGHTS._replace(blocks=tuple(
    p for p in _GEMMA_WEIGHTS.blocks if p.core not in ("ln1.w", "ln2.w")) + tuple(
    Pair(core, OFFSET, ((hf, "C"),)) for core, hf in (
        ("ln1.w", "input_layernorm.weight"), ("ln1_post.w", "post_attention_layernorm.weight"),
        ("ln2.w", "pre_feedforward_layernorm.weight"), ("ln2_post.w", "post_feedforward_layernorm.weight"))))

# Gemma 3: Gemma 2's, and per-head query and key norms that also scale by 1 + weight
_GEMMA3_WEIGHTS = _GEMMA2_WEIGHTS._replace(blocks=_GEMMA2_WEIGHTS.blocks + tuple(
    Pair(core, OFFSET, ((f"self_attn.{core[len('attn.'):-len('.w')]}.weight", "D"),))
    for core in ("attn.q_norm.w", "attn.k_norm.w")))

# Phi-1 / 1.5 / 2: one norm read by the attention and the MLP (the core's ln2 is ln1's
# arrays), biases everywhere, the unembedding's too
_PHI_WEIGHTS = Family(
    prefix="model.", block="layers",
    top=(_same("embed", "embed_tokens.weight", "V C"), _same("ln_final.w", "final_layernorm.weight", "C"),
         _same("ln_final.b", "final_layernorm.bias", "C")),
    blocks=(_same("ln1.w", "input_layernorm.weight", "C"), _same("ln1.b", "input_layernorm.bias", "C"),
            Pair("ln2.w", TIED, (("input_layernorm.weight", "C"),)),
            Pair("ln2.b", TIED, (("input_layernorm.bias", "C"),)),
            Pair("attn.w_qkv", STACK, (("self_attn.q_proj.weight", "QD C"), ("self_attn.k_proj.weight", "KD C"),
                                       ("self_attn.v_proj.weight", "KD C"))),
            Pair("attn.b_qkv", STACK, (("self_attn.q_proj.bias", "QD"), ("self_attn.k_proj.bias", "KD"),
                                       ("self_attn.v_proj.bias", "KD"))),
            _same("attn.w_o", "self_attn.dense.weight", "C QD"), _same("attn.b_o", "self_attn.dense.bias", "C"),
            _same("mlp.w_in", "mlp.fc1.weight", "F C"), _same("mlp.b_in", "mlp.fc1.bias", "F"),
            _same("mlp.w_out", "mlp.fc2.weight", "C F"), _same("mlp.b_out", "mlp.fc2.bias", "C")),
    head=(_same("unembed", "lm_head.weight", "V C", "untied"), _same("unembed.b", "lm_head.bias", "V")))

# GPT-J: Phi's table under GPT-2-like names, without attention biases
_GPTJ_WEIGHTS = Family(
    prefix="transformer.", block="h",
    top=(_same("embed", "wte.weight", "V C"), _same("ln_final.w", "ln_f.weight", "C"),
         _same("ln_final.b", "ln_f.bias", "C")),
    blocks=(_same("ln1.w", "ln_1.weight", "C"), _same("ln1.b", "ln_1.bias", "C"),
            Pair("ln2.w", TIED, (("ln_1.weight", "C"),)), Pair("ln2.b", TIED, (("ln_1.bias", "C"),)),
            Pair("attn.w_qkv", STACK, (("attn.q_proj.weight", "C C"), ("attn.k_proj.weight", "C C"),
                                       ("attn.v_proj.weight", "C C"))),
            _same("attn.w_o", "attn.out_proj.weight", "C C"),
            _same("mlp.w_in", "mlp.fc_in.weight", "F C"), _same("mlp.b_in", "mlp.fc_in.bias", "F"),
            _same("mlp.w_out", "mlp.fc_out.weight", "C F"), _same("mlp.b_out", "mlp.fc_out.bias", "C")),
    head=(_same("unembed", "lm_head.weight", "V C", "untied"), _same("unembed.b", "lm_head.bias", "V")))

# Phi-3: Llama's block, its q|k|v one matrix (qkv_proj) and its gate|up another
# (gate_up_proj), in the core's order already
_PHI3_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=(
    _same("ln1.w", "input_layernorm.weight", "C"), _same("ln2.w", "post_attention_layernorm.weight", "C"),
    _same("attn.w_qkv", "self_attn.qkv_proj.weight", "QKV C"), _same("attn.w_o", "self_attn.o_proj.weight", "C QD"),
    _same("mlp.w_in", "mlp.gate_up_proj.weight", "2F C"), _same("mlp.w_out", "mlp.down_proj.weight", "C F")))

# OLMo 2: Llama's matrices; the outputs' norms, and query and key norms as wide as q and k
_OLMO2_WEIGHTS = _LLAMA_WEIGHTS._replace(blocks=tuple(
    p for p in _LLAMA_WEIGHTS.blocks if p.core not in ("ln1.w", "ln2.w")) + (
    _same("ln1_post.w", "post_attention_layernorm.weight", "C"),
    _same("ln2_post.w", "post_feedforward_layernorm.weight", "C"),
    _same("attn.q_norm.w", "self_attn.q_norm.weight", "QD"), _same("attn.k_norm.w", "self_attn.k_norm.weight", "KD")))

# OLMo: Llama's matrices; its LayerNorms hold no weights
_OLMO_WEIGHTS = _LLAMA_WEIGHTS._replace(
    top=(_same("embed", "embed_tokens.weight", "V C"), Pair("ln_final.w", ONES, ())),
    blocks=(Pair("ln1.w", ONES, ()), Pair("ln2.w", ONES, ())) + tuple(
        p for p in _LLAMA_WEIGHTS.blocks if p.core not in ("ln1.w", "ln2.w")))

# EXAONE 4: OLMo 2's output norms, Qwen3's per-head query and key norms
_EXAONE4_WEIGHTS = _OLMO2_WEIGHTS._replace(blocks=tuple(
    p for p in _OLMO2_WEIGHTS.blocks if p.core not in ("attn.q_norm.w", "attn.k_norm.w")) + (
    _same("attn.q_norm.w", "self_attn.q_norm.weight", "D"), _same("attn.k_norm.w", "self_attn.k_norm.weight", "D")))

# StarCoder 2: Llama's attention, LayerNorms with biases, GPT-2's MLP under nn.Linear names
_STARCODER2_WEIGHTS = _LLAMA_WEIGHTS._replace(
    top=_LLAMA_WEIGHTS.top + (_same("ln_final.b", "norm.bias", "C"),),
    blocks=tuple(p for p in _LLAMA_WEIGHTS.blocks if not p.core.startswith("mlp.")) + (
        _same("ln1.b", "input_layernorm.bias", "C"), _same("ln2.b", "post_attention_layernorm.bias", "C"),
        _same("mlp.w_in", "mlp.c_fc.weight", "F C"), _same("mlp.b_in", "mlp.c_fc.bias", "F", "mlp_bias"),
        _same("mlp.w_out", "mlp.c_proj.weight", "C F"), _same("mlp.b_out", "mlp.c_proj.bias", "C", "mlp_bias")))

# OPT: GPT-2's table under its own names, q, k and v separate (and nn.Linear's [out, in]),
# the positions' table two rows longer
_OPT_WEIGHTS = Family(
    prefix="model.decoder.", block="layers",
    top=(_same("embed", "embed_tokens.weight", "V C"),
         Pair("pos_embed", POSITIONS, (("embed_positions.weight", "P2 C"),)),
         _same("ln_final.w", "final_layer_norm.weight", "C"), _same("ln_final.b", "final_layer_norm.bias", "C")),
    blocks=(_same("ln1.w", "self_attn_layer_norm.weight", "C"), _same("ln1.b", "self_attn_layer_norm.bias", "C"),
            Pair("attn.w_qkv", STACK, (("self_attn.q_proj.weight", "C C"), ("self_attn.k_proj.weight", "C C"),
                                       ("self_attn.v_proj.weight", "C C"))),
            Pair("attn.b_qkv", STACK, (("self_attn.q_proj.bias", "C"), ("self_attn.k_proj.bias", "C"),
                                       ("self_attn.v_proj.bias", "C")), "qkv_bias"),
            _same("attn.w_o", "self_attn.out_proj.weight", "C C"),
            _same("attn.b_o", "self_attn.out_proj.bias", "C", "o_bias"),
            _same("ln2.w", "final_layer_norm.weight", "C"), _same("ln2.b", "final_layer_norm.bias", "C"),
            _same("mlp.w_in", "fc1.weight", "F C"), _same("mlp.b_in", "fc1.bias", "F", "mlp_bias"),
            _same("mlp.w_out", "fc2.weight", "C F"), _same("mlp.b_out", "fc2.bias", "C", "mlp_bias")),
    head=(_same("unembed", "lm_head.weight", "V C", "untied"),))

# GPT-Neo: GPT-2's table with nn.Linear matrices, q, k and v separate and without biases
_NEO_WEIGHTS = _GPT2_WEIGHTS._replace(blocks=(
    _same("ln1.w", "ln_1.weight", "C"), _same("ln1.b", "ln_1.bias", "C"),
    Pair("attn.w_qkv", STACK, (("attn.attention.q_proj.weight", "C C"), ("attn.attention.k_proj.weight", "C C"),
                               ("attn.attention.v_proj.weight", "C C"))),
    _same("attn.w_o", "attn.attention.out_proj.weight", "C C"), _same("attn.b_o", "attn.attention.out_proj.bias", "C"),
    _same("ln2.w", "ln_2.weight", "C"), _same("ln2.b", "ln_2.bias", "C"),
    _same("mlp.w_in", "mlp.c_fc.weight", "F C"), _same("mlp.b_in", "mlp.c_fc.bias", "F"),
    _same("mlp.w_out", "mlp.c_proj.weight", "C F"), _same("mlp.b_out", "mlp.c_proj.bias", "C")))

# GPT-BigCode: GPT-2's table with nn.Linear matrices, c_attn's rows q | k | v of one key/value head
_BIGCODE_WEIGHTS = _GPT2_WEIGHTS._replace(blocks=tuple(
    p._replace(hf=((p.hf[0][0], {"attn.w_qkv": "QKV C", "attn.b_qkv": "QKV", "attn.w_o": "C C",
                                 "mlp.w_in": "F C", "mlp.w_out": "C F"}.get(p.core, p.hf[0][1])),))
    for p in _GPT2_WEIGHTS.blocks))

# StableLM: Llama's table with the norms' biases
_STABLELM_WEIGHTS = _LLAMA_WEIGHTS._replace(
    top=_LLAMA_WEIGHTS.top + (_same("ln_final.b", "norm.bias", "C"),),
    blocks=_LLAMA_WEIGHTS.blocks + (_same("ln1.b", "input_layernorm.bias", "C"),
                                    _same("ln2.b", "post_attention_layernorm.bias", "C")))

_WEIGHTS = {"gpt2": _GPT2_WEIGHTS, "gpt_neox": _NEOX_WEIGHTS, **{t: _LLAMA_WEIGHTS for t in LLAMA_TYPES},
            "mixtral": _MIXTRAL_WEIGHTS, "qwen3": _QWEN3_WEIGHTS, "qwen2_moe": _QWEN2_MOE_WEIGHTS,
            "qwen3_moe": _QWEN3_MOE_WEIGHTS,
            "gemma": _GEMMA_WEIGHTS, "gemma2": _GEMMA2_WEIGHTS, "gemma3_text": _GEMMA3_WEIGHTS, "phi3": _PHI3_WEIGHTS,
            "phi": _PHI_WEIGHTS, "gptj": _GPTJ_WEIGHTS, "olmo": _OLMO_WEIGHTS, "olmo2": _OLMO2_WEIGHTS,
            "starcoder2": _STARCODER2_WEIGHTS, "olmo3": _OLMO2_WEIGHTS, "exaone4": _EXAONE4_WEIGHTS,
            "olmoe": _OLMOE_WEIGHTS, "opt": _OPT_WEIGHTS, "gpt_neo": _NEO_WEIGHTS,
            "gpt_bigcode": _BIGCODE_WEIGHTS, "stablelm": _STABLELM_WEIGHTS}

# the unembeddings' HF names: kept at the top level of a state dict, outside the prefix
HEAD_NAMES = tuple(dict.fromkeys(p.hf[0][0] for f in _WEIGHTS.values() for p in f.head if p.how != TIED))


def architecture_class(family):
    """The HuggingFace model class of a family (a config's "architectures")."""
    return next(cls for cls, fam in _ARCH_OF.items() if fam == family)


def strip_prefix(name, family):
    prefix = _WEIGHTS[family].prefix
    return name[len(prefix):] if name.startswith(prefix) else name


def hf_name(name, family):
    """A name without the model prefix -> the name in a HF state dict (the unembedding
    has none)."""
    return name if name in HEAD_NAMES else _WEIGHTS[family].prefix + name


def _pairs(arch):
    """[(core name, how, ((HF name, shape), ...))] of this arch's weights, in HF's order:
    the top weights, block 0, block 1, ..., the unembedding. (The order is the order
    of hf_shapes, in which from_config draws its random weights: keep it.)"""
    fam = _WEIGHTS[arch["family"]]
    flags = dict(arch, untied=not arch["tied"])
    QD, KD = arch["n_heads"] * arch["d_head"], arch["n_kv_heads"] * arch["d_head"]
    dims = {"C": arch["d_model"], "3C": 3 * arch["d_model"], "V": arch["d_vocab"], "P": arch["n_ctx"],
            "P2": arch["n_ctx"] + _POSITION_OFFSET,
            "F": arch["d_mlp"], "2F": 2 * arch["d_mlp"], "QD": QD, "KD": KD, "QKV": QD + 2 * KD,
            "E": arch.get("n_experts", 0), "D": arch["d_head"], "FS": arch.get("d_shared", 0), "1": 1}

    def per_expert(hf):
        if not any("{e}" in n for n, _ in hf):
            return hf
        return tuple((n.format(e=e), shape) for e in range(dims["E"]) for n, shape in hf)

    def expand(pairs, core_prefix="", hf_prefix=""):
        return [(core_prefix + p.core, p.how, tuple((hf_prefix + n, tuple(dims[d] for d in shape.split()))
                                                   for n, shape in per_expert(p.hf)))
                for p in pairs if p.when is None or flags[p.when]]

    out = expand(fam.top)
    for l in range(arch["n_layers"]):
        out += expand(fam.blocks, f"blocks.{l}.", f"{fam.block}.{l}.")
    return out + expand(fam.head)


def hf_shapes(arch):
    """{HF name (without the model prefix): shape} of every weight the family reads."""
    return {name: shape for _, how, hf in _pairs(arch) if how != TIED for name, shape in hf}


def _in_block(core):
    """("blocks.3.", "attn.w_qkv") for "blocks.3.attn.w_qkv"; ("", "embed") for "embed"."""
    if not core.startswith("blocks."):
        return "", core
    layer, short = core[len("blocks."):].split(".", 1)
    return f"blocks.{layer}.", short


def weight_kinds(arch):
    """{HF name: kind} by what the core makes of the weight: "norm" (a norm's scale,
    initialised to 1), "offset norm" (a norm's scale less 1, Gemma's: initialised to 0),
    "bias" (a norm's or a product's bias, initialised to 0),
    "positions" (GPT-2's learned position embedding, kept float32) or "matrix" (the
    embedding, the unembedding and the blocks' matrices: these may stay 2-byte)."""
    kinds = {}
    for core, how, hf in _pairs(arch):
        if how == TIED:
            continue
        short = _in_block(core)[1]
        if how == OFFSET:
            kind = "offset norm"
        elif (short.startswith("ln") or short.endswith("_norm.w")) and short.endswith(".w"):
            kind = "norm"
        elif short.startswith("ln") or ".b_" in short:
            kind = "bias"
        elif short == "pos_embed":  # (POSITIONS too)
            kind = "positions"
        else:
            kind = "matrix"
        kinds.update({name: kind for name, _ in hf})
    return kinds


def _stored(x):
    """float32, or a 2-byte matrix kept as it is (see _dtypes)"""
    if _dtypes.is_half(x):
        return np.ascontiguousarray(_dtypes.keep(x))
    return np.ascontiguousarray(x, dtype=np.float32)


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


def _regroup_heads(x, n_heads, hf_to_core):
    """GPT-NeoX's fused q|k|v rows (a weight or a bias): [head, q|k|v, d_head] in HF,
    [q|k|v, head, d_head] in the core; a permutation of rows, so exact both ways."""
    x = np.asarray(x)
    rows = (n_heads, 3, -1) if hf_to_core else (3, n_heads, -1)
    return x.reshape(rows + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def core_weights(arch, w):
    """HF-named arrays (checked against hf_shapes) -> the core's weights, by the
    family's table (stacks are made once: see _stack)."""
    out = {}
    for core, how, hf in _pairs(arch):
        names = [n for n, _ in hf]
        if how == STACK:
            out[core] = _stack(w, names)
        elif how == HEADS:
            out[core] = _stored(_regroup_heads(w[names[0]], arch["n_heads"], hf_to_core=True))
        elif how == OFFSET:
            out[core] = np.float32(1) + _dtypes.to_float32(w[names[0]])
        elif how == POSITIONS:  # a view of the rows from 2 on (contiguous: rows of a C-ordered table)
            out[core] = np.asarray(w[names[0]])[_POSITION_OFFSET:]
        elif how == ONES:
            out[core] = np.ones(arch["d_model"], np.float32)
        else:  # SAME, TIED
            out[core] = w[names[0]]
    if arch["rotary_dim"]:
        out["rope_inv_freq"] = arch["rope_inv_freq"]
        if "rope_inv_freq_local" in arch:
            out["rope_inv_freq_local"] = arch["rope_inv_freq_local"]
    return {k: _stored(v) for k, v in out.items()}


def hf_gradients(arch, core):
    """The core's weight gradients (named as core_weights names them) -> {HF name:
    gradient}, by the same table read backwards: stacks split into views of their rows,
    GPT-NeoX's q|k|v regrouped into a copy, a tied unembedding's gradient added to the
    embedding's (a new array)."""
    out = {}
    for name, how, hf in _pairs(arch):
        if how == ONES:
            continue
        g = core[name]
        if how == STACK:
            row = 0
            for n, shape in hf:
                out[n] = g[row:row + shape[0]]
                row += shape[0]
        elif how == HEADS:
            out[hf[0][0]] = np.ascontiguousarray(_regroup_heads(g, arch["n_heads"], hf_to_core=False))
        elif how == TIED:
            out[hf[0][0]] = out[hf[0][0]] + g
        elif how == POSITIONS:
            out[hf[0][0]] = np.concatenate([np.zeros((_POSITION_OFFSET,) + g.shape[1:], g.dtype), g])
        else:  # SAME, OFFSET (d/dw of (1 + w) x is d/d(1 + w))
            out[hf[0][0]] = g
    return out


def core_config(arch):
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "ln_eps",
            "norm", "activation", "gated_mlp", "parallel", "rotary_dim", "rope_scale", "scale_attn_weights",
            "scale_attn_by_inverse_layer", "linear_trans")
    out = {k: arch[k] for k in keys}
    out.update(n_experts=arch.get("n_experts", 0), experts_per_token=arch.get("experts_per_token", 0),
               qk_norm=arch.get("qk_norm", 0), expert_renormalize=arch.get("expert_renormalize", 1),
               embed_scale=arch.get("embed_scale", 1.0), padding_idx=arch.get("padding_idx", -1), post_norms=arch.get("post_norms", 0),
               attn_scale=arch.get("attn_scale", 0.0), attn_softcap=arch.get("attn_softcap", 0.0),
               logit_softcap=arch.get("logit_softcap", 0.0), rotary_interleaved=arch.get("rotary_interleaved", 0),
               input_norms=arch.get("input_norms", 1), d_shared=arch.get("d_shared", 0))
    for key in ("rope_local_layers", "attn_windows"):
        if key in arch:
            out[key] = arch[key]
    return out


# The core's checks name the parts of its fused weights (csrc/model.c): the i-th part of
# a STACK is its i-th HF weight; a fused HF weight (GPT-2's c_attn) is all its parts.
_CORE_PARTS = {"attn.w_qkv": ("attn.q", "attn.k", "attn.v"),
               "attn.b_qkv": ("attn.q.bias", "attn.k.bias", "attn.v.bias"),
               "attn.w_o": ("attn.o",), "attn.b_o": ("attn.o.bias",),
               "mlp.w_in": ("mlp.gate", "mlp.in"), "mlp.b_in": ("mlp.gate.bias", "mlp.in.bias"),
               "mlp.w_out": ("mlp.out",), "mlp.b_out": ("mlp.out.bias",), "mlp.w_router": ("mlp.router",),
               "mlp.shared.w_in": ("mlp.shared.gate", "mlp.shared.in"), "mlp.shared.w_out": ("mlp.shared.out",),
               "mlp.shared.w_router": ("mlp.shared.router",)}


def _message_names(arch):
    """{name in the core's messages ("blocks.0.attn.q", "embed"): HF name}"""
    names = {}
    for core, how, hf in _pairs(arch):
        if how == ONES:
            continue
        block, short = _in_block(core)
        parts = _CORE_PARTS.get(short, (short,))
        if short in ("mlp.w_in", "mlp.b_in") and not arch["gated_mlp"]:
            parts = parts[1:]  # no gate: the core's one input matrix is "mlp.in"
        if short in ("mlp.w_in", "mlp.w_out") and arch.get("n_experts"):
            # the core names each expert's matrices: mlp.experts.{e}.gate | in | out
            parts = [f"mlp.experts.{e}.{p}" for e in range(arch["n_experts"])
                     for p in (("gate", "in") if short == "mlp.w_in" else ("out",))]
        if how == STACK:
            names.update({block + p: n for p, (n, _) in zip(parts, hf)})
        else:
            names.update({block + p: hf[0][0] for p in parts})
    return names


def hf_message(arch, message):
    """The core's message about a weight, with the weight's HuggingFace name (names
    the table does not know, e.g. the core's fused "attn.w_qkv", are left as they are)."""
    import re
    names = _message_names(arch)
    return re.sub(r"weights: ((?:blocks\.\d+\.)?[a-z0-9_.]+?) (?=has|is)",
                  lambda m: "weights: " + names.get(m.group(1), m.group(1)) + " ", message)
