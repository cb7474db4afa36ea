"""The per-family weight tables of mechscope.architectures, read both ways: loading
(HF arrays -> the core's weights) and gradients (the core's -> HF names) are inverse,
and the core's messages name weights as HuggingFace does."""
import numpy as np
import pytest

import mechscope as ms
from mechscope import architectures

GPT2 = dict(model_type="gpt2", n_layer=2, n_embd=12, n_head=3, vocab_size=19, n_positions=10)
LLAMA = dict(model_type="llama", hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=17, max_position_embeddings=16)
NEOX = dict(model_type="gpt_neox", hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=13, max_position_embeddings=16, rotary_pct=0.5)
CONFIGS = {"gpt2": GPT2, "gpt2_untied": dict(GPT2, tie_word_embeddings=False),
           "llama_biases": dict(LLAMA, attention_bias=True, mlp_bias=True),
           "qwen2_tied": dict(LLAMA, model_type="qwen2", tie_word_embeddings=True),
           "neox": NEOX, "neox_tied_nobias": dict(NEOX, tie_word_embeddings=True, attention_bias=False)}


def _arrays(arch, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in architectures.hf_shapes(arch).items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_come_back_where_the_weights_came_from(name):
    # read as gradients, the core's weights must return to the HF arrays they were
    # made of: the stacks split at the right rows, GPT-NeoX's heads regrouped back
    _, arch = architectures.normalize(CONFIGS[name])
    hf = _arrays(arch)
    core = architectures.core_weights(arch, dict(hf))
    core.pop("rope_inv_freq", None)
    back = architectures.hf_gradients(arch, {k: np.array(v) for k, v in core.items()})
    assert set(back) == set(hf)
    tied_neox = arch["family"] == "gpt_neox" and arch["tied"]
    for n, a in hf.items():
        # a tied GPT-NeoX core reads the embedding twice (in and out): both gradients add up
        want = 2 * a if tied_neox and n == "embed_in.weight" else a
        np.testing.assert_array_equal(back[n], want, err_msg=n)


def test_neox_heads_are_regrouped_for_the_core():
    # HF's fused rows are [head, q|k|v, d_head]; the core's first C rows must be every head's q
    _, arch = architectures.normalize(NEOX)
    hf = _arrays(arch, seed=1)
    core = architectures.core_weights(arch, dict(hf))
    H, C = arch["n_heads"], arch["d_model"]
    fused = hf["layers.1.attention.query_key_value.weight"].reshape(H, 3, C // H, C)
    np.testing.assert_array_equal(core["blocks.1.attn.w_qkv"][:C], fused[:, 0].reshape(C, C))
    np.testing.assert_array_equal(core["blocks.1.attn.w_qkv"][2 * C:], fused[:, 2].reshape(C, C))


@pytest.mark.parametrize("config, hf_name", [
    (GPT2, "h.1.ln_1.weight"), (GPT2, "h.0.attn.c_attn.bias"),
    (LLAMA, "layers.1.input_layernorm.weight"), (LLAMA, "layers.0.self_attn.k_proj.weight"),
    (LLAMA, "layers.0.mlp.gate_proj.weight"), (NEOX, "layers.0.post_attention_layernorm.bias"),
])
def test_the_core_names_a_bad_weight_by_its_hf_name(config, hf_name):
    _, arch = architectures.normalize(config)
    hf = _arrays(arch, seed=2)
    hf[hf_name][-1] = np.nan
    with pytest.raises(ValueError, match=rf"weights: {hf_name.replace('.', '[.]')} has a non-finite value"):
        ms.Model.from_arrays(config, hf)
