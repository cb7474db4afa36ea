"""Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, Phi, GPT-J, OLMo 2 and 3, OPT, GPT-Neo,
GPT-BigCode, StableLM and GPT-NeoX: the forward pass and every site against
transformers (fp32, eager) and TransformerLens (no weight processing), on random
models with odd sizes saved with save_pretrained and loaded from the folder."""
import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from conftest import ATOL

torch.set_grad_enabled(False)

# grouped-query attention with 3 and 2 query heads per key/value head, Llama-3 and YaRN
# rope scaling, a tied embedding, q/k/v biases (Qwen2), partial rotary and both residual
# kinds (GPT-NeoX), Gemma's scaled embedding, 1 + weight norms and GeGLU; Gemma 2's
# normed outputs, query_pre_attn_scalar, and caps small enough to bend the scores and
# the logits (O(1) weights give scores of a few units and logits of about ten); Gemma 3's
# per-head query and key norms and its sliding layers' own angles (theta 50 there, 10^6
# in its full layer); sliding windows shorter than the prompts (5 tokens in every layer
# of Mistral, 4 in Gemma 2's and 3's sliding layers)
CONFIGS = {
    "llama_gqa3": ("llama", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2,
                                 num_hidden_layers=3, intermediate_size=50, vocab_size=101,
                                 max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5)),
    "llama3_rope_tied": ("llama", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=2, intermediate_size=36, vocab_size=90,
                                       max_position_embeddings=64, tie_word_embeddings=True,
                                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0,
                                                         original_max_position_embeddings=16))),
    "mistral_gqa2": ("mistral", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                     num_hidden_layers=2, intermediate_size=30, vocab_size=77,
                                     max_position_embeddings=64, rope_theta=10000.0, sliding_window=5)),
    "qwen2_bias": ("qwen2", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=44, vocab_size=83,
                                 max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e6)),
    # YaRN: with 16-dim heads, theta 500 and 64 original positions, pair 0 keeps its
    # angles, pairs 1-2 are on the ramp, pairs 3-7 are divided by 4; cos and sin are
    # multiplied by 0.1 ln 4 + 1
    "qwen2_yarn": ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=40, vocab_size=71,
                                 max_position_embeddings=256, rope_theta=500.0,
                                 rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=64))),
    "qwen3_qk_norm": ("qwen3", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                    num_hidden_layers=2, intermediate_size=44, vocab_size=79,
                                    max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6)),
    "gemma_gqa": ("gemma", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                num_hidden_layers=2, intermediate_size=44, vocab_size=79,
                                max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6)),
    "gemma2_softcap": ("gemma2", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      num_hidden_layers=2, intermediate_size=44, vocab_size=79,
                                      max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6,
                                      query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
                                      final_logit_softcapping=5.0, sliding_window=4)),
    "gemma3_local_rope": ("gemma3_text", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=12, num_hidden_layers=3, intermediate_size=44,
                                               vocab_size=79, max_position_embeddings=64, rope_theta=1e6,
                                               rope_local_base_freq=50.0, rms_norm_eps=1e-6,
                                               query_pre_attn_scalar=12, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention",
                                                            "sliding_attention"])),
    # Phi-3's fused q|k|v and gate|up; Phi-4-mini's partial rotary and tied unembedding;
    # token 0 its pad (transformers' embedding row without gradient)
    "phi3_partial_tied": ("phi3", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=2, intermediate_size=40, vocab_size=81,
                                       max_position_embeddings=64, original_max_position_embeddings=64,
                                       rope_theta=500.0, partial_rotary_factor=0.5, sliding_window=5,
                                       tie_word_embeddings=True, pad_token_id=0)),
    # Phi-2's block: one LayerNorm read by the parallel attention and MLP, partial rotary,
    # biases everywhere, the unembedding's too
    "phi_parallel": ("phi", dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=52,
                                 vocab_size=85, max_position_embeddings=64, rope_theta=500.0,
                                 partial_rotary_factor=0.4, hidden_act="gelu_new", layer_norm_eps=1e-5)),
    # GPT-J: Phi's block without attention biases, rotating adjacent pairs of the first
    # rotary_dim dimensions
    "gptj_adjacent": ("gptj", dict(n_embd=48, n_head=4, n_layer=2, n_inner=44, vocab_size=87, n_positions=64,
                                   rotary_dim=6, activation_function="gelu_new")),
    # OLMo: Llama's block with LayerNorms that have no weights; grouped keys and values,
    # the unembedding tied
    "olmo_plain_norms": ("olmo", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=40, vocab_size=83,
                                      max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=True)),
    # Helium: Llama's block rotating adjacent pairs, q, k and v biases (the output has none)
    "helium_adjacent": ("helium", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                       num_hidden_layers=2, intermediate_size=40, vocab_size=81,
                                       max_position_embeddings=64, rope_theta=500.0, attention_bias=True,
                                       rms_norm_eps=1e-6)),
    # Ministral: Mistral's block, a window of 3 in the layers layer_types marks
    "ministral_layers": ("ministral", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                           num_hidden_layers=3, intermediate_size=40, vocab_size=83,
                                           max_position_embeddings=64, rope_theta=500.0, sliding_window=3,
                                           layer_types=["sliding_attention", "full_attention",
                                                        "sliding_attention"])),
    # EXAONE 4: OLMo 2's output norms, per-head query and key norms; with a window (3 here),
    # three sliding layers in four that rotate, the fourth with full attention and no rotary
    "exaone4_hybrid": ("exaone4", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=4, intermediate_size=40, vocab_size=83,
                                       max_position_embeddings=64, rope_theta=500.0, sliding_window=3,
                                       sliding_window_pattern=4, rms_norm_eps=1e-6)),
    # SmolLM3: Llama's block, every second layer here without rotary ("NoPE"); biases in
    # the attention; with windows of 3 in the NoPE layers (as transformers places them)
    "smollm3_nope": ("smollm3", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                     num_hidden_layers=4, intermediate_size=40, vocab_size=97,
                                     max_position_embeddings=64, rope_theta=500.0, no_rope_layer_interval=2,
                                     tie_word_embeddings=True, attention_bias=True, pad_token_id=None)),
    "smollm3_windows": ("smollm3", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1,
                                        num_hidden_layers=3, intermediate_size=44, vocab_size=79,
                                        max_position_embeddings=64, rope_theta=1e4, no_rope_layers=[1, 0, 0],
                                        use_sliding_window=True, sliding_window=3, pad_token_id=None)),
    # StarCoder 2: LayerNorms with biases, biases on every product, GPT-2's MLP (no gate)
    # with tanh GELU, grouped keys and values, a window of 4 in every layer; and without biases
    "starcoder2_window": ("starcoder2", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                             num_hidden_layers=2, intermediate_size=52, vocab_size=89,
                                             max_position_embeddings=64, rope_theta=500.0, sliding_window=4,
                                             norm_epsilon=1e-4)),
    "starcoder2_nobias": ("starcoder2", dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1,
                                             num_hidden_layers=2, intermediate_size=36, vocab_size=73,
                                             max_position_embeddings=64, use_bias=False, tie_word_embeddings=False,
                                             hidden_act="gelu")),
    # OLMo 2: no norms before the attention and the MLP, their outputs normed, queries and
    # keys normed over all heads at once
    "olmo2_post_norms": ("olmo2", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=2, intermediate_size=40, vocab_size=83,
                                       max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6)),
    # OLMo 3: OLMo 2's block, three sliding layers in four (a window of 5), YaRN in the full
    # layer only
    "olmo3_windows_yarn": ("olmo3", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=4, intermediate_size=40, vocab_size=83,
                                         max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6,
                                         sliding_window=5, rope_scaling=dict(rope_type="yarn", factor=2.0,
                                                                             original_max_position_embeddings=64))),
    # OPT: learned positions two rows into their table, q, k, v separate with biases, ReLU;
    # the pad token (1) one the prompts use
    "opt_relu": ("opt", dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, ffn_dim=40,
                             vocab_size=91, max_position_embeddings=64, pad_token_id=1)),
    # GPT-Neo: separate q, k, v without biases, unscaled scores, "local" layers with a
    # window of 4 (the second and third) between "global" ones
    "neo_local": ("gpt_neo", dict(hidden_size=48, num_heads=4, num_layers=4, vocab_size=89,
                                  max_position_embeddings=64, window_size=4,
                                  attention_types=[[["global", "local"], 1], [["local", "global"], 1]])),
    # GPT-BigCode: GPT-2's block with nn.Linear matrices and one key/value head (multi-query)
    "bigcode_mq": ("gpt_bigcode", dict(n_embd=48, n_head=4, n_layer=2, n_inner=40, vocab_size=93, n_positions=64)),
    # StableLM: Llama's block with LayerNorms, partial rotary, q/k/v biases, grouped keys and values
    "stablelm_partial": ("stablelm", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                          num_hidden_layers=2, intermediate_size=40, vocab_size=91,
                                          max_position_embeddings=64, use_qkv_bias=True,
                                          partial_rotary_factor=0.5, rope_theta=500.0)),
    "neox_parallel": ("gpt_neox", dict(hidden_size=36, num_attention_heads=3, num_hidden_layers=3,
                                       intermediate_size=52, vocab_size=95, max_position_embeddings=64,
                                       rotary_pct=0.5, hidden_act="gelu")),
    "neox_sequential": ("gpt_neox", dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2,
                                         intermediate_size=40, vocab_size=70, max_position_embeddings=64,
                                         rotary_pct=0.25, use_parallel_residual=False, hidden_act="gelu_new",
                                         layer_norm_eps=1e-3)),
}

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
            "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
            "phi": ("PhiConfig", "PhiForCausalLM"), "gptj": ("GPTJConfig", "GPTJForCausalLM"),
            "olmo": ("OlmoConfig", "OlmoForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
            "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"), "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
            "ministral": ("MinistralConfig", "MinistralForCausalLM"), "helium": ("HeliumConfig", "HeliumForCausalLM"),
            "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),
            "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
            "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"), "opt": ("OPTConfig", "OPTForCausalLM"),
            "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"), "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM"),
            "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM"),
            "stablelm": ("StableLmConfig", "StableLmForCausalLM")}


def make_hf(name, seed=0, spec=None):
    """An fp32 eager HF model with O(1)-scale random weights (HF's std 0.02 would
    make attention nearly uniform and hide bugs); spec: (family, config) instead of
    a name of CONFIGS."""
    family, kw = spec or CONFIGS[name]
    conf_cls, model_cls = (getattr(transformers, c) for c in _CLASSES[family])
    torch.manual_seed(seed)
    model = model_cls(conf_cls(attn_implementation="eager", **kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        if ("norm" in pname or ".ln_" in pname) and pname.endswith("weight"):
            # Gemma's norms multiply by 1 + weight
            p.copy_((0 if family.startswith("gemma") else 1) + 0.3 * torch.randn(p.shape, generator=g))
        elif pname.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, HF model, mechscope model loaded from the saved folder)"""
    hf = make_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, ms.Model.from_pretrained(folder)


def hf_run(hf, tokens, mask):
    """logits and hidden states, positions counted over each row's real tokens"""
    t = torch.as_tensor(tokens, dtype=torch.long)
    m = torch.as_tensor(mask, dtype=torch.long)
    pos = (m.cumsum(1) - 1).clamp(min=0)
    out = hf(t, attention_mask=m, position_ids=pos, output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def batch(model, rng, lengths, T, left):
    tokens = rng.integers(0, model.d_vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    return tokens, mask


def assert_matches_hf(model, hf, tokens, mask):
    """the logits and every block's input at the real tokens, within ATOL"""
    ref_logits, hidden = hf_run(hf, tokens, mask)
    out = model.run(tokens, attention_mask=mask, cache="blocks.*.hook_resid_pre")
    real = mask.astype(bool)
    np.testing.assert_allclose(out.logits[real], ref_logits[real], atol=ATOL, rtol=0)
    for layer in range(model.n_layers):
        got = out.cache[f"blocks.{layer}.hook_resid_pre"]
        np.testing.assert_allclose(got[real], hidden[layer][real], atol=ATOL, rtol=0, err_msg=f"layer {layer}")


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_and_hidden_states_match_hf(pair, left):
    name, hf, model = pair
    assert_matches_hf(model, hf, *batch(model, np.random.default_rng(5), [9, 4, 1, 7], 9, left))


def test_length_one(pair):
    name, hf, model = pair
    tokens = np.array([[5], [11]])
    ref, _ = hf_run(hf, tokens, np.ones_like(tokens))
    np.testing.assert_allclose(model.run(tokens).logits, ref, atol=ATOL, rtol=0)


# ---- TransformerLens ---------------------------------------------------------------------

def tl_windows(c, family):
    """TransformerLens's local attention for the layers with a sliding window"""
    if family not in ("mistral", "phi3", "gemma2", "gemma3_text") or getattr(c, "sliding_window", None) is None:
        return {}
    kinds = ["sliding_attention"] * c.num_hidden_layers if family in ("mistral", "phi3") else c.layer_types
    return dict(use_local_attn=True, window_size=c.sliding_window,
                attn_types=["local" if t == "sliding_attention" else "global" for t in kinds])


def tl_from_hf(hf, family):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (convert_gemma_weights, convert_llama_weights,
                                                                 convert_mistral_weights, convert_neox_weights,
                                                                 convert_gptj_weights, convert_phi3_weights,
                                                                 convert_opt_weights, convert_phi_weights,
                                                                 convert_neo_weights,
                                                                 convert_qwen2_weights)
    from transformer_lens.pretrained.weight_conversions.qwen3 import convert_qwen3_weights
    c = hf.config
    if family == "gptj":
        cfg = HookedTransformerConfig(d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                      d_mlp=c.n_inner or 4 * c.n_embd, n_layers=c.n_layer, n_ctx=c.n_positions,
                                      d_vocab=c.vocab_size, act_fn=c.activation_function, eps=c.layer_norm_epsilon,
                                      normalization_type="LN", positional_embedding_type="rotary",
                                      rotary_dim=c.rotary_dim, rotary_adjacent_pairs=True, parallel_attn_mlp=True,
                                      original_architecture="GPTJForCausalLM", dtype=torch.float32, device="cpu")
        return _tl_loaded(HookedTransformer(cfg), convert_gptj_weights(hf, cfg))
    if family == "opt":
        cfg = HookedTransformerConfig(d_model=c.hidden_size, n_heads=c.num_attention_heads,
                                      d_head=c.hidden_size // c.num_attention_heads, d_mlp=c.ffn_dim,
                                      n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
                                      d_vocab=c.vocab_size, act_fn=c.activation_function, eps=1e-5,
                                      normalization_type="LN", positional_embedding_type="standard",
                                      original_architecture="OPTForCausalLM", dtype=torch.float32, device="cpu")
        return _tl_loaded(HookedTransformer(cfg), convert_opt_weights(hf, cfg))
    if family == "gpt_neo":
        cfg = HookedTransformerConfig(d_model=c.hidden_size, n_heads=c.num_heads, d_head=c.hidden_size // c.num_heads,
                                      d_mlp=c.intermediate_size or 4 * c.hidden_size, n_layers=c.num_layers,
                                      n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
                                      act_fn=c.activation_function, eps=c.layer_norm_epsilon, normalization_type="LN",
                                      positional_embedding_type="standard", use_attn_scale=False,
                                      use_local_attn=True, window_size=c.window_size, attn_types=c.attention_layers,
                                      original_architecture="GPTNeoForCausalLM", dtype=torch.float32, device="cpu")
        return _tl_loaded(HookedTransformer(cfg), convert_neo_weights(hf, cfg))
    common = dict(d_model=c.hidden_size, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
                  n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
                  act_fn=c.hidden_activation if family in ("gemma2", "gemma3_text") else c.hidden_act, positional_embedding_type="rotary", rotary_adjacent_pairs=False,
                  dtype=torch.float32, device="cpu", use_attn_scale=True)
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if family == "gpt_neox":
        cfg = HookedTransformerConfig(**common, d_head=d_head, eps=c.layer_norm_eps, normalization_type="LN",
                                      parallel_attn_mlp=c.use_parallel_residual,
                                      rotary_dim=round(c.rotary_pct * d_head), rotary_base=c.rope_theta,
                                      original_architecture="GPTNeoXForCausalLM")
        convert = convert_neox_weights
    elif family == "phi":
        cfg = HookedTransformerConfig(**common, d_head=d_head, eps=c.layer_norm_eps, normalization_type="LN",
                                      parallel_attn_mlp=True, rotary_dim=int(c.partial_rotary_factor * d_head),
                                      rotary_base=c.rope_theta, original_architecture="PhiForCausalLM")
        convert = convert_phi_weights
    else:
        cfg = HookedTransformerConfig(**common, d_head=d_head, eps=c.rms_norm_eps, normalization_type="RMS",
                                      final_rms=True, gated_mlp=True,
                                      rotary_dim=round(d_head * getattr(c, "partial_rotary_factor", 1.0)),
                                      rotary_base=c.rope_theta, n_key_value_heads=c.num_key_value_heads,
                                      use_qk_norm=family in ("qwen3", "gemma3_text"),
                                      original_architecture={"llama": "LlamaForCausalLM",
                                                             "mistral": "MistralForCausalLM",
                                                             "qwen2": "Qwen2ForCausalLM",
                                                             "qwen3": "Qwen3ForCausalLM",
                                                             "gemma": "GemmaForCausalLM",
                                                             "gemma2": "Gemma2ForCausalLM",
                                                             "gemma3_text": "Gemma3ForCausalLM",
                                                             "phi3": "Phi3ForCausalLM"}[family],
                                      **(dict(use_normalization_before_and_after=True,
                                              attn_scale=c.query_pre_attn_scalar ** 0.5,
                                              attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
                                              output_logits_soft_cap=c.final_logit_softcapping or -1.0)
                                         if family in ("gemma2", "gemma3_text") else {}),
                                      **(dict(rotary_base_local=c.rope_local_base_freq)
                                         if family == "gemma3_text" else {}),
                                      **tl_windows(c, family))
        convert = {"llama": convert_llama_weights, "mistral": convert_mistral_weights,
                   "qwen2": convert_qwen2_weights, "qwen3": convert_qwen3_weights,
                   "gemma": convert_gemma_weights, "gemma2": convert_gemma_weights,
                   "gemma3_text": convert_gemma_weights, "phi3": convert_phi3_weights}[family]
    return _tl_loaded(HookedTransformer(cfg), convert(hf, cfg))


def _tl_loaded(tl, state_dict):
    """TransformerLens's model with the converted weights as they are (no folding or
    centring), in eval mode"""
    tl.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    return tl.eval()


# TransformerLens 2.18 computes Llama-3 rope scaling differently (its PR #910): that
# configuration is compared with transformers only; TransformerLens has no OLMo (1, 2 or 3)
# TransformerLens has no GPT-BigCode, StableLM, SmolLM3, StarCoder 2, Ministral, Helium or EXAONE 4 either
TL_CONFIGS = sorted(n for n, (fam, kw) in CONFIGS.items() if not kw.get("rope_scaling")
                    and not fam.startswith("olmo") and fam not in ("gpt_bigcode", "stablelm", "smollm3",
                                                                               "starcoder2", "ministral",
                                                                               "helium", "exaone4"))


@pytest.mark.parametrize("name", TL_CONFIGS)
def test_every_site_matches_transformer_lens(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    family = CONFIGS[name][0]
    tl = tl_from_hf(hf, family)
    tokens = np.random.default_rng(7).integers(0, model.d_vocab, (2, 8))
    logits, cache = tl.run_with_cache(torch.as_tensor(tokens))
    ref = {k: v.numpy() for k, v in cache.items()}
    out = model.run(tokens, cache="*")
    # the same sites, under the same names, in the same order; TransformerLens adds the
    # per-head query and key norms' own hooks (flattened over batch, position and head)
    ref = {k: v for k, v in ref.items() if ".q_norm." not in k and ".k_norm." not in k}
    assert list(out.cache) == list(ref), (set(out.cache) ^ set(ref))
    np.testing.assert_allclose(out.logits, logits.numpy(), atol=ATOL, rtol=0)
    for site, want in ref.items():
        got = out.cache[site]
        assert got.shape == want.shape, site
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=site)


# ---- checkpoints: half precision, shards -----------------------------------------------------

@pytest.mark.parametrize("name", ["llama_gqa3", "gemma_gqa", "gemma2_softcap", "gemma3_local_rope", "phi3_partial_tied"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sharded_checkpoint(tmp_path, dtype, name):
    """(Gemma's norms are 2-byte in the file: 1 + weight is made in float32, as HF makes it)"""
    hf = make_hf(name)
    hf.to(dtype).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    model = ms.Model.from_pretrained(tmp_path)
    tokens = np.random.default_rng(3).integers(0, model.d_vocab, (2, 6))
    want = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=ATOL, rtol=0)


# ---- refused by name ------------------------------------------------------------------------

def test_absent_sites_are_refused_by_name(pair):
    name, hf, model = pair
    family = CONFIGS[name][0]
    if family not in ("opt", "gpt_neo", "gpt_bigcode"):  # (their positions are learned)
        with pytest.raises(ValueError, match="hook_pos_embed.*rotary"):
            model.run([[1, 2]], cache="hook_pos_embed")
    if family in ("olmo2", "olmo3", "exaone4"):
        with pytest.raises(ValueError, match="ln1.hook_normalized.*OLMo 2 and 3, EXAONE 4. norms the"):
            model.run([[1, 2]], cache="blocks.0.ln1.hook_normalized")
        with pytest.raises(ValueError, match="ln2.hook_scale.*OLMo 2 and 3, EXAONE 4. norms the"):
            model.run([[1, 2]], interventions=[ms.Zero("blocks.1.ln2.hook_scale")])
    if family == "gpt_neox":
        with pytest.raises(ValueError, match="hook_pre_linear.*gated"):
            model.run([[1, 2]], cache="blocks.0.mlp.hook_pre_linear")
        if hf.config.use_parallel_residual:
            with pytest.raises(ValueError, match="hook_resid_mid.*parallel"):
                model.run([[1, 2]], interventions=[ms.Zero("blocks.0.hook_resid_mid")])


@pytest.mark.parametrize("family, scaling", [
    ("qwen2", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    ("qwen2", dict(rope_type="yarn", factor=8.0)),  # the original context defaults to max_position_embeddings
    ("llama", dict(type="yarn", factor=2.5, beta_fast=8.0, beta_slow=0.5, truncate=False)),
    ("llama", dict(rope_type="yarn", factor=4.0, attention_factor=1.3)),
    ("llama", dict(rope_type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=1.0,  # DeepSeek's
                   original_max_position_embeddings=32)),
    ("gpt_neox", dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=48)),  # partial rotary
])
def test_yarn_frequencies_match_transformers(family, scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
              rope_theta=500.0, intermediate_size=32,
              rope_scaling=scaling)
    if family == "gpt_neox":
        kw.update(rotary_pct=0.5)
    conf = getattr(transformers, _CLASSES[family][0])(**kw)
    inv, attention = ROPE_INIT_FUNCTIONS["yarn"](conf, "cpu")
    arch = ms.Model.from_config(dict(conf.to_dict(), num_hidden_layers=1, vocab_size=11)).arch
    np.testing.assert_allclose(arch["rope_inv_freq"], inv.numpy(), rtol=2e-7, atol=0)
    assert arch["rope_scale"] == pytest.approx(attention, rel=1e-12)
    assert attention != 1.0


@pytest.mark.parametrize("short, longest, original", [([1.0, 1.5, 2.5], 256, 64), ([0.5, 1.0, 3.0], 512, 32)])
def test_longrope_equals_transformers_up_to_the_original_context(tmp_path, short, longest, original):
    """LongRoPE (Phi-3.5, Phi-4-mini; partial rotary here): transformers' angles and
    attention factor (from max_position_embeddings over the original context) for the
    short factors, which hold up to original_max_position_embeddings, the core's limit;
    a prompt of that length gives HF's logits, one token more is refused"""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    family, kw = CONFIGS["phi3_partial_tied"]
    scaling = dict(type="longrope", short_factor=short, long_factor=[4.0, 5.0, 6.0])
    hf = make_hf(None, seed=4, spec=(family, dict(kw, max_position_embeddings=longest, rope_scaling=scaling,
                                                  original_max_position_embeddings=original)))
    inv, attention = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu")
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    np.testing.assert_allclose(model.arch["rope_inv_freq"], inv.numpy(), rtol=2e-7, atol=0)
    assert model.arch["rope_scale"] == pytest.approx(attention, rel=1e-12) and attention != 1.0
    assert model.n_ctx == original
    tokens, mask = batch(model, np.random.default_rng(2), [original, original - 9], original, left=True)
    ref_logits, _ = hf_run(hf, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(model.run(tokens, attention_mask=mask).logits[real], ref_logits[real],
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=str(original)):
        model.run(np.zeros((1, original + 1), np.int64))


def test_dynamic_rope_scaling_equals_transformers_up_to_the_context_limit(tmp_path):
    """Dynamic NTK scaling changes HF's angles only past max_position_embeddings, the
    core's own limit; a run of exactly that length agrees, one longer is refused."""
    family, kw = CONFIGS["llama_gqa3"]
    kw = dict(kw, max_position_embeddings=24, rope_scaling=dict(rope_type="dynamic", factor=4.0))
    hf = make_hf(None, seed=3, spec=(family, kw))
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, kw["vocab_size"], (2, 24))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="24"):
        model.run(np.zeros((1, 25), np.int64))


@pytest.mark.parametrize("change, match", [
    (dict(model_type="falcon"), "model_type 'falcon'"),
    (dict(rope_scaling=dict(rope_type="longrope", factor=2.0)), "longrope needs short_factor"),
    (dict(rope_scaling=dict(rope_type="su", factor=2.0)), "rope type 'su'"),
    (dict(rope_scaling=dict(rope_type="yarn")), "yarn needs factor"),
    (dict(rope_scaling=dict(rope_type="yarn", factor="4")), "factor must be a finite number"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=float("nan"))), "beta_fast"),
    (dict(rope_scaling=dict(rope_type="dynamic")), "dynamic needs factor"),
    (dict(hidden_act="mish"), "hidden_act 'mish'"),
    (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(layer_types=["sliding_attention", "full_attention", "full_attention"]), "layer_types"),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=0), "sliding_window must be a positive int"),
    (dict(model_type="gemma2", layer_types=["chunked_attention"] * 3), "layer_types other than 'full_attention' "
                                                                      "and 'sliding_attention'"),
    (dict(model_type="gemma2", attn_logit_softcapping=-1.0), "attn_logit_softcapping must be a finite number"),
    (dict(model_type="gemma2", final_logit_softcapping=float("inf")), "final_logit_softcapping"),
    (dict(model_type="gemma2", query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(model_type="gemma2", sliding_window=0), "sliding_window must be a positive int"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma3_text", layer_types=["full_attention"] * 2), "layer_types has 2 entries for 3 layers"),
    (dict(model_type="gemma3_text", rope_local_base_freq=-1.0), "rope_local_base_freq"),
])
def test_unsupported_config_is_refused_by_name(change, match):
    cfg = dict(model_type="llama", **CONFIGS["llama_gqa3"][1])
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        ms.Model.from_config(cfg)


# the families beyond Llama's: (a config of CONFIGS, its change, the message)
FAMILY_REFUSALS = [
    # OPT-350m's post-norm block and embedding projections, among others
    ("opt_relu", dict(do_layer_norm_before=False), "do_layer_norm_before"),
    ("opt_relu", dict(word_embed_proj_dim=16), "word_embed_proj_dim 16"),
    ("opt_relu", dict(_remove_final_layer_norm=True), "_remove_final_layer_norm"),
    ("opt_relu", dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine"),
    ("opt_relu", dict(num_attention_heads=5), "divisible by num_attention_heads"),
    ("opt_relu", dict(activation_function="mish"), "activation_function 'mish'"),
    ("neo_local", dict(attention_types=[[["global", "sparse"], 2]]), "kinds other than 'global' and 'local'.*'sparse'"),
    ("neo_local", dict(attention_types=[[["global", "local"], 1]]), "attention_types gives 2 layers for num_layers=4"),
    ("neo_local", dict(attention_types=[["global", 4]]), "attention_types must be a list of .kinds, repeats. pairs"),
    ("neo_local", dict(attention_types=[[["global"], "4"]]),
     "attention_types must be a list of .kinds, repeats. pairs"),
    ("neo_local", dict(attention_types=None), "attention_types must be a list"),
    ("neo_local", dict(num_heads=5), "divisible by num_heads"),
    ("neo_local", dict(intermediate_size=0), "intermediate_size must be None or a positive int"),
    ("neo_local", dict(window_size=0), "window_size must be a positive int"),
    ("neo_local", dict(activation_function="mish"), "activation_function 'mish'"),
    ("bigcode_mq", dict(multi_query=False), "multi_query=False is not supported"),
    ("bigcode_mq", dict(add_cross_attention=True), "cross-attention"),
    ("bigcode_mq", dict(n_head=5), "divisible by n_head"),
    ("bigcode_mq", dict(n_inner=-1), "n_inner must be None or a positive int"),
    ("stablelm_partial", dict(qk_layernorm=True), "qk_layernorm=True is not supported"),
    ("stablelm_partial", dict(use_parallel_residual=True), "use_parallel_residual=True is not supported"),
    ("stablelm_partial", dict(partial_rotary_factor=0.05), "gives 0 rotary dims"),
    ("stablelm_partial", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("neox_parallel", dict(rotary_pct=1.2), "rotary_pct 1.2 gives 14 rotary dims of 12"),
    ("olmo_plain_norms", dict(clip_qkv=8.0), "clip_qkv 8.0 is not supported"),
]


@pytest.mark.parametrize("name, change, match", FAMILY_REFUSALS)
def test_unsupported_family_config_is_refused_by_name(name, change, match):
    family, kw = CONFIGS[name]
    cfg = dict(kw, model_type=family, **change)
    with pytest.raises(ValueError, match=match):
        ms.Model.from_config(cfg)


def test_opt_without_biases_matches_hf(tmp_path):
    """enable_bias=False: OPT's products without biases (its norms keep theirs)"""
    hf = make_hf(None, seed=4, spec=("opt", dict(CONFIGS["opt_relu"][1], enable_bias=False)))
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    assert [k for k in model._weights if k.endswith(".bias") and "layer_norm" not in k] == []
    assert_matches_hf(model, hf, *batch(model, np.random.default_rng(2), [6, 3], 6, True))


# ---- patching, one model per family, against TransformerLens's patching functions ------------

# TransformerLens runs one forward per patch: the per-head grids by position are
# kept to the key/value heads, the others are over all positions
PATCH_FUNCTIONS = ["resid_pre", "resid_mid", "mlp_out", "attn_head_k_by_pos", "attn_head_out_all_pos",
                   "attn_head_q_all_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos"]


@pytest.mark.parametrize("name", ["llama_gqa3", "qwen2_bias", "gemma_gqa", "gemma2_softcap", "gemma3_local_rope",
                                  "phi3_partial_tied", "phi_parallel", "gptj_adjacent", "neox_parallel", "opt_relu",
                                  "neo_local"])
def test_patching_matches_transformer_lens(name, tmp_path):
    from transformer_lens import patching as tl_patching
    hf = make_hf(name, seed=3)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    tl = tl_from_hf(hf, CONFIGS[name][0])
    rng = np.random.default_rng(11)
    B, T = 2, 6
    clean = rng.integers(0, model.d_vocab, (B, T))
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 13) % model.d_vocab
    corrupted[:, 3] = (clean[:, 3] + 29) % model.d_vocab
    correct, wrong = np.array([4, 9]), np.array([7, 2])
    ours_cache = model.run(clean, cache="*").cache
    _, tl_cache = tl.run_with_cache(torch.as_tensor(clean))

    def tl_metric(logits):
        rows = torch.arange(B)
        return (logits[rows, -1, correct] - logits[rows, -1, wrong]).mean()

    for fn in PATCH_FUNCTIONS:
        if fn == "resid_mid" and model.arch["parallel"]:
            with pytest.raises(ValueError, match="hook_resid_mid"):
                ms.patching.resid_mid(model, corrupted, ours_cache, ms.metrics.LogitDiff(correct, wrong))
            continue
        ours = getattr(ms.patching, fn)(model, corrupted, ours_cache, ms.metrics.LogitDiff(correct, wrong))
        theirs = getattr(tl_patching, "get_act_patch_" + fn)(tl, torch.as_tensor(corrupted), tl_cache,
                                                              tl_metric).numpy()
        assert ours.shape == theirs.shape, fn
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0, err_msg=fn)
        assert np.ptp(ours) > 1e-3, fn


def test_qwen3_greedy_generation_matches_hf(tmp_path):
    """the per-head query and key norms act on each new token in the cached steps too"""
    hf = make_hf("qwen3_qk_norm", seed=4)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    prompt = np.array([[5, 17, 33, 2, 61]])
    want = hf.generate(torch.as_tensor(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(1, 5, dtype=torch.long)).numpy()
    got = np.asarray(model.generate(prompt, 8, do_sample=False))
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


@pytest.mark.parametrize("name", ["gemma_gqa", "gemma2_softcap", "gemma3_local_rope"])
def test_gemma_scales_the_embedding_where_hook_embed_and_the_trace_noise_see_it(tmp_path, name):
    """hook_embed holds the embedding rows times sqrt(d_model) (HF's and TransformerLens's
    Gemma), the unembedding reads the rows unscaled (the logit test covers it), and
    causal tracing's noise is measured on hook_embed's scale; greedy generation (the
    key/value cache path) agrees with HF's"""
    hf = make_hf(name, seed=5)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    tokens = np.array([[5, 17, 33, 2, 61, 7]])
    embed = model.run(tokens, cache="hook_embed", logits=None).cache["hook_embed"][0]
    rows = hf.model.embed_tokens.weight.detach().numpy()[tokens[0]]
    np.testing.assert_array_equal(embed, rows * np.float32(model.d_model ** 0.5))
    np.testing.assert_allclose(ms.tracing.embedding_std(model, [tokens[0]]), embed.astype(np.float64).std(ddof=1),
                               rtol=1e-6)
    want = hf.generate(torch.as_tensor(tokens), max_new_tokens=6, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(tokens.shape, dtype=torch.long)).numpy()
    got = np.asarray(model.generate(tokens, 6, do_sample=False))
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def test_opt_positions_and_greedy_generation_match_hf(tmp_path):
    """OPT looks position p up at row p + 2 of its table: hook_pos_embed holds those rows
    (counted over each row's real tokens, as OPT counts them from the attention mask);
    greedy generation (the key/value cache path) agrees with HF's"""
    hf = make_hf("opt_relu", seed=6)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    table = hf.model.decoder.embed_positions.weight.detach().numpy()
    tokens, mask = np.array([[5, 17, 33, 2, 61, 7], [0, 0, 4, 9, 12, 3]]), np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos = model.run(tokens, attention_mask=mask, cache="hook_pos_embed", logits=None).cache["hook_pos_embed"]
    np.testing.assert_array_equal(pos[0], table[2:8])
    np.testing.assert_array_equal(pos[1, 2:], table[2:6])
    with torch.no_grad():  # HF's own positions from the mask: no position_ids given
        want = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens, attention_mask=mask).logits[mask == 1], want[mask == 1],
                               atol=ATOL, rtol=0)
    want = hf.generate(torch.as_tensor(tokens[:1]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones((1, 6), dtype=torch.long)).numpy()
    got = np.asarray(model.generate(tokens[:1], 6, do_sample=False))
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def _gemma3_image_text(seed=0, tied=True):
    """Gemma 3's image-text model (as from 4B on): gemma3_local_rope's language model
    with linear rope scaling in its full layer, behind a small vision tower"""
    text = dict(CONFIGS["gemma3_local_rope"][1], vocab_size=300, rope_scaling=dict(rope_type="linear", factor=8.0),
                tie_word_embeddings=tied)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298,
                                       tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():  # as make_hf: O(1) weights, Gemma's norms 1 + weight
        if "norm" in pname and pname.endswith("weight"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif pname.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gemma3_image_text_checkpoint_runs_its_language_model(tmp_path, tied):
    """A Gemma3ForConditionalGeneration folder (its weights under language_model.model.,
    as transformers writes them, an untied unembedding under language_model.lm_head.)
    and its in-memory state dict (model.language_model.): the language model alone, its
    logits and hidden states on text as HF's image-text model gives them, padded either
    side; the vision tower is not read"""
    hf = _gemma3_image_text(tied=tied)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    assert model.family == "gemma3_text" and model.config["rope_scaling"]["factor"] == 8.0
    assert not any("vision" in k or "projector" in k for k in model._weights)
    for left in (False, True):
        assert_matches_hf(model, hf, *batch(model, np.random.default_rng(6), [9, 4, 1, 7], 9, left))
    again = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    assert any(k.startswith("model.language_model.") for k in hf.state_dict())
    tokens = np.random.default_rng(7).integers(0, 297, (2, 8))
    np.testing.assert_array_equal(again.run(tokens).logits, model.run(tokens).logits)


@pytest.mark.parametrize("change, match", [
    (dict(text_config=None), "model_type 'gemma3' needs a text_config"),
    (dict(text_config=dict(model_type="llama")), "text_config's model_type 'llama' is not 'gemma3_text'"),
])
def test_bad_image_text_config_is_refused(change, match):
    config = dict(_gemma3_image_text().config.to_dict(), **change)
    with pytest.raises(ValueError, match=match):
        ms.Model.from_config(config)


def test_gemma_hidden_activation_warns_and_hidden_act_rules():
    """transformers' Gemma computes its MLP with hidden_act; a different hidden_activation
    (as in Gemma's own configs) is named in a warning, and the model follows hidden_act"""
    family, kw = CONFIGS["gemma_gqa"]
    hf = make_hf(None, spec=(family, dict(kw, hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")))
    with pytest.warns(UserWarning, match="hidden_activation 'gelu_pytorch_tanh' differs from hidden_act 'gelu'"):
        model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens = np.random.default_rng(2).integers(0, model.d_vocab, (2, 7))
    want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_bias", "qwen3_qk_norm"])
def test_qwen_use_sliding_window_matches_hf(tmp_path, name):
    """Qwen's use_sliding_window: the layers from max_window_layers on slide (a window of
    5 here, in the second of two layers), as transformers masks them"""
    family, kw = CONFIGS[name]
    hf = make_hf(None, seed=9, spec=(family, dict(kw, use_sliding_window=True, sliding_window=5, max_window_layers=1)))
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    assert model.arch["attn_windows"] == [0, 5]
    assert_matches_hf(model, hf, *batch(model, np.random.default_rng(4), [12, 7, 1], 12, True))


def test_attention_interventions_keep_the_sliding_window(tmp_path):
    """Keys before a query's window stay masked, as later keys do: actions and hooks
    that write scores or pattern entries there change nothing; inside the window a
    pattern action gives TransformerLens's hooked logits (its local attention)"""
    hf = make_hf("mistral_gqa2", seed=7)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    tl = tl_from_hf(hf, "mistral")
    tokens = np.random.default_rng(8).integers(0, model.d_vocab, (2, 9))
    plain = model.run(tokens).logits
    # query 8 with a window of 5 sees keys 4 .. 8
    outside = [ms.Set("blocks.1.attn.hook_pattern", 0.25, head=0, pos=8, key_pos=[0, 1, 2, 3]),
               ms.Set("blocks.0.attn.hook_attn_scores", 0.0, pos=8, key_pos=[0, 3])]
    np.testing.assert_array_equal(model.run(tokens, interventions=outside).logits, plain)
    unmask = {"blocks.*.attn.hook_attn_scores": lambda v, hook: np.where(np.isinf(v), 0.0, v)}
    np.testing.assert_array_equal(model.run(tokens, hooks=unmask).logits, plain)
    inside = model.run(tokens, interventions=[ms.Set("blocks.1.attn.hook_pattern", 0.25, head=0, pos=8,
                                                     key_pos=[4, 6])]).logits
    assert np.abs(inside - plain).max() > 1e-3

    def set_pattern(value, hook):
        value[:, 0, 8, [4, 6]] = 0.25
        return value
    want = tl.run_with_hooks(torch.as_tensor(tokens), fwd_hooks=[("blocks.1.attn.hook_pattern", set_pattern)])
    np.testing.assert_allclose(inside, want.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mistral_gqa2", "gemma2_softcap", "gemma3_local_rope", "phi3_partial_tied",
                                  "neo_local", "starcoder2_window", "ministral_layers", "exaone4_hybrid"])
def test_sliding_windows_past_the_window_match_hf(tmp_path, name):
    """Prompts of up to 100 tokens through windows of 37 (every layer for Mistral, the
    sliding layers for Gemma 2 and 3): windows that start past key 32 (the scores'
    kernel skips whole blocks of 32 keys), groups of four queries whose windows start
    at different keys, left and right padding; HF's logits and hidden states, a model
    whose context is its max_position_embeddings; and greedy generation from a prompt
    of 30 to 60 tokens, past the window in the cached steps (GPT-Neo: its local layers,
    window_size)"""
    family, kw = CONFIGS[name]
    window = {"window_size" if family == "gpt_neo" else "sliding_window": 37}
    hf = make_hf(None, seed=6, spec=(family, dict(kw, **window, max_position_embeddings=128,
                                                  **({"original_max_position_embeddings": 128}
                                                     if family == "phi3" else {}))))
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    assert model.n_ctx == 128
    rng = np.random.default_rng(3)
    for left in (False, True):
        assert_matches_hf(model, hf, *batch(model, rng, [100, 70, 33, 99], 100, left))
    prompt = rng.integers(0, model.d_vocab, (1, 30))
    want = hf.generate(torch.as_tensor(prompt), max_new_tokens=30, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(1, 30, dtype=torch.long)).numpy()
    got = np.asarray(model.generate(prompt, 30, do_sample=False))
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def test_olmo_norms_hold_no_weights_and_train_as_transformers_loads(tmp_path):
    """OLMo's LayerNorms have no weights: no gradient is returned for them, a trained
    checkpoint holds none, and transformers loads it with the trained logits."""
    hf = make_hf("olmo_plain_norms", seed=2)
    hf.save_pretrained(tmp_path / "start")
    model = ms.Model.from_pretrained(tmp_path / "start")
    assert model.arch["norm"] == 0 and model.arch["ln_eps"] == 1e-5  # LayerNorm, transformers' fixed eps
    tokens = np.random.default_rng(3).integers(0, model.d_vocab, (4, 9))
    g = model.grad(tokens, "cross_entropy", weights=True)
    assert set(g.weights) == {n.removeprefix("model.") for n, _ in hf.named_parameters()}
    assert not any("norm" in n for n in g.weights)
    ms.train.fit(model, tokens, steps=2, batch_size=2, lr=1e-2, progress=False)
    ms.train.save_pretrained(model, tmp_path / "trained")
    back = transformers.OlmoForCausalLM.from_pretrained(tmp_path / "trained", attn_implementation="eager").eval()
    with torch.no_grad():
        want = back(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=ATOL, rtol=0)
    assert np.abs(want - hf(torch.as_tensor(tokens)).logits.detach().numpy()).max() > 1e-3  # training moved it


@pytest.mark.parametrize("change, rope_local, windows", [
    (dict(), [0, 1, 1], [0, 3, 3]),
    (dict(no_rope_layers=None, no_rope_layer_interval=3), [0, 0, 1], [0, 0, 3]),
    (dict(use_sliding_window=False), [0, 1, 1], None),
])
def test_smollm3_layers_without_rotation_and_their_windows_as_transformers_fills_them(change, rope_local, windows):
    """A config without layer_types (or without no_rope_layers): the layers without
    rotation, and the windows in them, where transformers' SmolLM3Config puts them"""
    family, kw = CONFIGS["smollm3_windows"]
    cfg = dict(kw, model_type=family, **change)
    hf_cfg = transformers.SmolLM3Config(**cfg)
    assert [1 - f for f in hf_cfg.no_rope_layers] == rope_local
    assert hf_cfg.layer_types == ["sliding_attention" if w else "full_attention" for w in (windows or [0] * 3)]
    model = ms.Model.from_config(cfg)
    assert model.arch["rope_local_layers"] == rope_local
    assert model.arch.get("attn_windows") == windows
    assert not model.arch["rope_inv_freq_local"].any()


def test_smollm3_bad_no_rope_layers_are_refused_by_name():
    family, kw = CONFIGS["smollm3_nope"]
    for bad in ([1, 0], [1, 0, 2, 1], "1010"):
        with pytest.raises(ValueError, match="no_rope_layers must be a list of 4 flags 0 or 1"):
            ms.Model.from_config(dict(kw, model_type=family, no_rope_layers=bad))


def test_ministral_without_layer_types_slides_in_every_layer():
    """transformers' MinistralConfig without layer_types: every layer sliding when the
    model has a window, none without one"""
    family, kw = CONFIGS["ministral_layers"]
    cfg = {k: v for k, v in kw.items() if k != "layer_types"}
    assert transformers.MinistralConfig(**cfg).layer_types == ["sliding_attention"] * 3
    assert ms.Model.from_config(dict(cfg, model_type=family)).arch["attn_windows"] == [3, 3, 3]
    assert "attn_windows" not in ms.Model.from_config(dict(cfg, model_type=family, sliding_window=None)).arch


@pytest.mark.parametrize("change, rope_local, windows", [
    (dict(), [0, 0, 0, 1], [3, 3, 3, 0]),
    (dict(sliding_window_pattern=2), [0, 1, 0, 1], [3, 0, 3, 0]),
    (dict(sliding_window=None), None, None),
])
def test_exaone4_layers_as_transformers_fills_them(change, rope_local, windows):
    """A config without layer_types: the sliding layers, and (with a window) the full
    layers without rotary, where transformers' Exaone4Config puts them (without a window
    its fill-in divides by zero: every layer full attention, rotating, as its model runs
    a config that lists them)"""
    family, kw = CONFIGS["exaone4_hybrid"]
    cfg = dict(kw, model_type=family, **change)
    if windows:
        kinds = transformers.Exaone4Config(**cfg).layer_types
        assert kinds == ["sliding_attention" if w else "full_attention" for w in windows]
    model = ms.Model.from_config(cfg)
    assert model.arch.get("rope_local_layers") == rope_local
    assert model.arch.get("attn_windows") == windows


def test_exaone4_pattern_strings_are_refused_by_name():
    family, kw = CONFIGS["exaone4_hybrid"]
    with pytest.raises(ValueError, match="sliding_window_pattern 'LLLG' without layer_types is not supported"):
        ms.Model.from_config(dict(kw, model_type=family, sliding_window_pattern="LLLG"))
