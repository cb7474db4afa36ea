"""ms.weights: TransformerLens's weight names and shapes, and composition scores, against
TransformerLens (no weight processing) for every block kind, and the definition computed
the slow way."""
import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import tl_model_from_hf
from test_architectures import CONFIGS, make_hf, tl_from_hf

torch.set_grad_enabled(False)

FAMILIES = ["llama_gqa3", "gemma_gqa", "phi3_partial_tied", "phi_parallel", "gptj_adjacent", "neox_parallel",
            "opt_relu", "neo_local"]


def _models(name, hf_models):
    """(mechscope model, TransformerLens model) with the same weights"""
    if name == "gpt2":
        hf = hf_models["odd30_gelu_new"]
        return ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}), tl_model_from_hf(hf)
    hf = make_hf(name)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    return model, tl_from_hf(hf, CONFIGS[name][0])


@pytest.mark.parametrize("processed", [False, True], ids=["as_loaded", "processed"])
@pytest.mark.parametrize("name", ["gpt2"] + FAMILIES + ["gemma2_softcap", "neox_sequential"])
def test_weights_and_composition_scores_match_transformer_lens(name, processed, hf_models):
    """every name TransformerLens has, its shape and values (grouped keys and values
    repeated per query head, Gemma's embedding scaled, zeros for absent biases), and
    the Q-, K- and V-composition scores of every pair of heads; processed: against
    TransformerLens's default processing (norms folded, writing weights and the
    unembedding centred, value biases folded)"""
    model, tl = _models(name, hf_models)
    if processed:
        tl.process_weights_()
    for key in ms.weights.NAMES:
        if key == "W_pos" and model.arch["rotary_dim"] or key == "W_gate" and not model.arch["gated_mlp"]:
            with pytest.raises(ValueError, match=key):
                ms.weights.get(model, key, processed=processed)
            continue
        want = getattr(tl, key)
        got = ms.weights.get(model, key, processed=processed)
        assert got.shape == tuple(want.shape), key
        if processed:  # (float64 inside, float32 in TransformerLens)
            np.testing.assert_allclose(got, want.numpy(), atol=2e-6, rtol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want.numpy(), err_msg=key)
    if processed:
        raw = ms.weights.get(model, "W_Q")
        assert np.abs(ms.weights.get(model, "W_Q", processed=True) - raw).max() > 1e-2  # the norm folded in
    for kind in "QKV":
        got = ms.weights.composition_scores(model, kind, processed=processed)
        want = tl.all_composition_scores(kind).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=kind)
        assert got[0, :, 1:].min() > 0.01  # (O(1) random weights compose a little everywhere)


def test_composition_scores_equal_the_definition():
    """||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F) with the full d_model x d_model matrices,
    in float64, for every pair of heads (grouped keys and values: each query head's
    own key/value head)"""
    hf = make_hf("llama_gqa3", seed=3)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    W = {k: ms.weights.get(model, k).astype(np.float64) for k in ("W_Q", "W_K", "W_V", "W_O")}
    L, H = model.n_layers, model.n_heads
    right = {"Q": lambda l, h: W["W_Q"][l, h] @ W["W_K"][l, h].T, "K": lambda l, h: W["W_K"][l, h] @ W["W_Q"][l, h].T,
             "V": lambda l, h: W["W_V"][l, h] @ W["W_O"][l, h]}
    fro = np.linalg.norm
    for kind, m in right.items():
        got = ms.weights.composition_scores(model, kind.lower())
        want = np.zeros((L, H, L, H))
        for l1 in range(L):
            for h1 in range(H):
                ov = W["W_V"][l1, h1] @ W["W_O"][l1, h1]
                for l2 in range(l1 + 1, L):
                    for h2 in range(H):
                        want[l1, h1, l2, h2] = fro(ov @ m(l2, h2)) / (fro(ov) * fro(m(l2, h2)))
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=kind)


def test_processed_weights_keep_the_model_s_function(small, rng):
    """a GPT-2 run from the processed weights (LayerNorm without scale and bias, as
    TransformerLens's LNPre) gives the same log-probabilities as the model's own run"""
    _, _, model = small
    W = {k: ms.weights.get(model, k, processed=True).astype(np.float64) for k in ms.weights.NAMES if k != "W_gate"}
    tokens = rng.integers(0, model.d_vocab, (2, 7))
    eps = model.arch["ln_eps"]

    def norm(x):
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    x = W["W_E"][tokens] + W["W_pos"][:7]
    T = 7
    causal = np.tril(np.ones((T, T), bool))
    for layer in range(model.n_layers):
        h = norm(x)
        q = np.einsum("btc,hcd->bhtd", h, W["W_Q"][layer]) + W["b_Q"][layer][None, :, None]
        k = np.einsum("btc,hcd->bhtd", h, W["W_K"][layer]) + W["b_K"][layer][None, :, None]
        v = np.einsum("btc,hcd->bhtd", h, W["W_V"][layer]) + W["b_V"][layer][None, :, None]
        scores = np.where(causal, q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        x = x + np.einsum("bhtd,hdc->btc", pattern @ v, W["W_O"][layer]) + W["b_O"][layer]
        pre = norm(x) @ W["W_in"][layer] + W["b_in"][layer]
        post = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))  # gelu_new
        x = x + post @ W["W_out"][layer] + W["b_out"][layer]
    logits = norm(x) @ W["W_U"] + W["b_U"]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = model.run(tokens).logits.astype(np.float64)
    want = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) - want.max(-1, keepdims=True)
    np.testing.assert_allclose(log_probs, want, atol=2e-4, rtol=0)


def test_bad_requests_are_refused_by_name():
    hf = make_hf("llama_gqa3")
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    with pytest.raises(ValueError, match="name: expected one of W_E.*got 'W_QK'"):
        ms.weights.get(model, "W_QK")
    with pytest.raises(ValueError, match="W_pos exists only in models with learned positions"):
        ms.weights.get(model, "W_pos")
    with pytest.raises(ValueError, match="kind: expected 'Q', 'K' or 'V', got 'O'"):
        ms.weights.composition_scores(model, "O")
    moe = ms.Model.from_config(dict(model_type="mixtral", hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=11,
                                    num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=8))
    with pytest.raises(ValueError, match="W_in of a mixture of experts"):
        ms.weights.get(moe, "W_in")
    assert ms.weights.get(moe, "W_Q").shape == (1, 2, 16, 8)
    olmo = make_hf("olmo2_post_norms")
    olmo = ms.Model.from_arrays(olmo.config, {k: v.numpy() for k, v in olmo.state_dict().items()})
    with pytest.raises(ValueError, match="no norms before its attention"):
        ms.weights.get(olmo, "W_Q", processed=True)


def test_composition_plot(tmp_path):
    hf = make_hf("neox_parallel")
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    fig = ms.plot.composition(ms.weights.composition_scores(model, "K"), title="K-composition")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[:4] == ["L0H0", "L0H1", "L0H2", "L1H0"] and len(labels) == model.n_layers * model.n_heads
    fig.savefig(tmp_path / "k.png")
    with pytest.raises(ValueError, match=r"scores: expected \[layer, head, layer, head\]"):
        ms.plot.composition(np.zeros((2, 3, 3, 2)))


def test_smollm2_previous_token_head_writes_what_its_induction_heads_keys_read():
    """On the real model, weights alone find the induction circuit: for each of
    SmolLM2's three strongest induction heads (by their patterns on repeated random
    tokens), the earlier head whose output its keys read most (K-composition, of the
    135-162 heads before it) is the model's strongest previous-token head"""
    model = ms.Model.from_pretrained("smollm2")
    tokens = ms.heads.repeated_tokens(model, 50, batch=4, seed=0)
    induction = ms.heads.detect(model, tokens, "induction_head")
    previous = ms.heads.detect(model, tokens, "previous_token_head")
    k_comp = ms.weights.composition_scores(model, "K")
    strongest_previous = np.unravel_index(previous.argmax(), previous.shape)
    assert previous[strongest_previous] > 0.8
    for flat in np.argsort(-induction.ravel())[:3]:
        layer, head = np.unravel_index(flat, induction.shape)
        assert induction[layer, head] > 0.3
        earlier = k_comp[:layer, :, layer, head]
        assert np.unravel_index(earlier.argmax(), earlier.shape) == strongest_previous
        assert earlier.max() > 3 * np.median(earlier)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa3", "neox_parallel"])
def test_copying_scores_equal_transformer_lens_eigenvalues(name, hf_models):
    """sum / sum of moduli of the eigenvalues of W_E W_V W_O W_U, against
    TransformerLens's FactoredMatrix eigenvalues of the same product"""
    model, tl = _models(name, hf_models)
    got = ms.weights.copying_scores(model)
    full = tl.W_E @ tl.OV @ tl.W_U
    eig = full.eigenvalues.numpy().astype(np.complex128)  # [layer, head, d_head]
    want = eig.sum(-1).real / np.abs(eig).sum(-1)
    assert got.shape == (model.n_layers, model.n_heads)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_copying_scores_equal_the_definition():
    """the full [vocab, vocab] circuit's eigenvalues, in float64, on a model of 40
    tokens; a head made to copy (W_O = pinv of W_E W_V, W_U = W_E^T) scores 1"""
    model = ms.Model.from_config(dict(model_type="gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=40,
                                      n_positions=8, tie_word_embeddings=False), seed=3)
    W = {k: ms.weights.get(model, k).astype(np.float64) for k in ("W_E", "W_V", "W_O", "W_U")}
    want = np.zeros((2, 2))
    for layer in range(2):
        for head in range(2):
            eig = np.linalg.eigvals(W["W_E"] @ W["W_V"][layer, head] @ W["W_O"][layer, head] @ W["W_U"])
            want[layer, head] = eig.sum().real / np.abs(eig).sum()
    np.testing.assert_allclose(ms.weights.copying_scores(model), want, atol=1e-8, rtol=0)
    # a head made to copy: with W_O = (W_E W_V)^+ W_E and W_U = W_E^T its circuit is
    # W_E W_V (W_E W_V)^+ W_E W_E^T, a projection times a positive semidefinite matrix
    w = model._core_weights
    ev = W["W_E"] @ W["W_V"][0, 0]                                                 # [vocab, d_head]
    w["blocks.0.attn.w_o"][:8] = (np.linalg.pinv(ev) @ W["W_E"]).astype(np.float32)  # head 0's rows ([in, out])
    w["unembed"][:] = W["W_E"].astype(np.float32)                                  # stored [vocab, d_model]
    assert ms.weights.copying_scores(model)[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa3"])
def test_each_head_s_output_is_transformer_lens_hook_result(name, hf_models):
    """TransformerLens's hook_result (use_attn_result=True) is z times W_O per head:
    the README's recipe from the cached attn.hook_z and ms.weights.get(model, "W_O")"""
    model, tl = _models(name, hf_models)
    tl.cfg.use_attn_result = True
    tokens = np.random.default_rng(2).integers(0, model.d_vocab, size=(2, 9))
    cache = tl.run_with_cache(torch.as_tensor(tokens))[1]
    out = model.run(tokens, cache="blocks.*.attn.hook_z", logits=None)
    W_O = ms.weights.get(model, "W_O")  # [layer, head, d_head, d_model]
    for layer in range(model.n_layers):
        result = np.einsum("bphd,hdm->bphm", out.cache["z", layer], W_O[layer])
        np.testing.assert_allclose(result, cache["result", layer].numpy(), atol=1e-4, rtol=0)
