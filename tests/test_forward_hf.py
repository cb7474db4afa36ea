"""mechscope vs HF transformers (eager, fp32) on the same saved weights.

HF output_hidden_states[i] (i < n_layer) is the input of block i, i.e.
blocks.i.hook_resid_pre; the LAST hidden state is after ln_f, i.e.
ln_final.hook_normalized. output_attentions[L] is blocks.L.attn.hook_pattern.
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import CONFIGS, assert_close, hf_run, random_tokens, save_hf, upcast_reference

HF_SITES = ["blocks.*.hook_resid_pre", "blocks.*.attn.hook_pattern", "ln_final.hook_normalized"]


def hf_site_names(n_layers):
    return ({f"blocks.{l}.hook_resid_pre" for l in range(n_layers)}
            | {f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)}
            | {"ln_final.hook_normalized"})


def compare_to_hf(model, hf, tokens, mask=None):
    """Every real token of every row: logits, hidden states, patterns."""
    tokens = np.asarray(tokens)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
    out = model.run(tokens, attention_mask=mask, cache=HF_SITES)
    ref = hf_run(hf, tokens, mask)
    n_layers = hf.config.n_layer
    assert set(out.cache.keys()) == hf_site_names(n_layers)
    assert out.logits.dtype == np.float32
    for b in range(tokens.shape[0]):
        real = mask[b].astype(bool)
        assert_close(out.logits[b, real], ref["logits"][b, real], what=f"logits row {b}")
        for l in range(n_layers):
            assert_close(out.cache[f"blocks.{l}.hook_resid_pre"][b, real], ref["hidden"][l][b, real],
                         what=f"resid_pre {l} row {b}")
            # real queries against all keys: padded keys must get 0 weight
            assert_close(out.cache[f"blocks.{l}.attn.hook_pattern"][b][:, real],
                         ref["attn"][l][b][:, real], what=f"pattern {l} row {b}")
        assert_close(out.cache["ln_final.hook_normalized"][b, real], ref["hidden"][-1][b, real],
                     what=f"ln_final row {b}")
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_context_batch(name, hf_models, ms_models, rng):
    hf, model = hf_models[name], ms_models[name]
    n_ctx, vocab = CONFIGS[name]["n_positions"], CONFIGS[name]["vocab_size"]
    tokens = random_tokens(rng, vocab, 3, n_ctx)
    tokens[0, :3] = [0, vocab - 1, vocab - 1]  # the extreme ids
    compare_to_hf(model, hf, tokens)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_short_sequence(name, hf_models, ms_models, rng):
    hf, model = hf_models[name], ms_models[name]
    compare_to_hf(model, hf, random_tokens(rng, CONFIGS[name]["vocab_size"], 2, 5))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_length_one(name, hf_models, ms_models):
    hf, model = hf_models[name], ms_models[name]
    out = compare_to_hf(model, hf, [[7]])
    assert out.logits.shape == (1, 1, CONFIGS[name]["vocab_size"])
    # a single-token pattern is exactly 1
    assert_close(out.cache["blocks.0.attn.hook_pattern"], np.ones((1, hf.config.n_head, 1, 1)))


def test_model_attributes(hf_models, ms_models):
    for name, model in ms_models.items():
        c = CONFIGS[name]
        assert (model.n_layers, model.n_heads, model.d_model, model.d_head, model.d_vocab, model.n_ctx) == (
            c["n_layer"], c["n_head"], c["n_embd"], c["n_embd"] // c["n_head"], c["vocab_size"], c["n_positions"])
        assert model.d_mlp == (c.get("n_inner") or 4 * c["n_embd"])
        assert model.config["n_embd"] == c["n_embd"]


def test_one_dim_tokens_are_batch_one(small, rng):
    hf, _, model = small
    tokens = random_tokens(rng, 97, 1, 9)
    one_d = model.run(tokens[0]).logits
    assert one_d.shape == (1, 9, 97)
    assert_close(one_d, model.run(tokens).logits, atol=0)
    assert_close(one_d, hf_run(hf, tokens)["logits"])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_any_integer_dtype(small, dtype):
    _, _, model = small
    tokens = np.array([[1, 5, 96, 0, 42]], dtype=np.int64)
    expected = model.run(tokens).logits
    assert_close(model.run(tokens.astype(dtype)).logits, expected, atol=0, what=str(dtype))
    # plain python lists too
    assert_close(model.run(tokens.tolist()).logits, expected, atol=0)


def test_non_contiguous_inputs(ms_models, rng):
    model = ms_models["deep4_eps"]
    wide = random_tokens(rng, 300, 3, 20)
    tokens, mask = wide[:, ::2], np.ones((3, 20), dtype=np.int64)[:, ::2]
    mask[1, :4] = 0
    want = model.run(np.ascontiguousarray(tokens), attention_mask=np.ascontiguousarray(mask)).logits
    assert_close(model.run(tokens, attention_mask=mask).logits, want, atol=0)
    assert_close(model.run(np.asfortranarray(tokens), attention_mask=np.asfortranarray(mask)).logits,
                 want, atol=0)


def test_results_are_fresh_arrays(ms_models, rng):
    """A later run must not overwrite an earlier result, nor touch the inputs."""
    model = ms_models["deep4_eps"]
    a, b = random_tokens(rng, 300, 2, 10), random_tokens(rng, 300, 2, 10)
    a_copy = a.copy()
    mask = np.ones_like(a)
    first = model.run(a, attention_mask=mask, cache="blocks.1.*")
    saved = {k: v.copy() for k, v in first.cache.items()}, first.logits.copy()
    model.run(b, attention_mask=mask, cache="blocks.1.*")
    for k, v in saved[0].items():
        assert_close(first.cache[k], v, atol=0, what=k)
    assert_close(first.logits, saved[1], atol=0)
    assert np.array_equal(a, a_copy) and np.array_equal(mask, np.ones_like(a))


# ------------------------------------------------------------------ padding

def padded_batch(rng, vocab, lengths, side, width=None):
    """Rows of the given real lengths, LEFT or RIGHT padded with junk ids."""
    width = width or max(lengths)
    seqs = [rng.integers(0, vocab, n) for n in lengths]
    tokens = rng.integers(0, vocab, (len(lengths), width))  # junk under the padding
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        tokens[b, sl] = s
        mask[b, sl] = 1
    return seqs, tokens, mask


def real_part(site, value, b, real):
    """Row b of a cached site restricted to its real tokens."""
    if site.endswith(("hook_attn_scores", "hook_pattern")):  # [b, head, q, k]
        return value[b][:, real][:, :, real]
    return value[b, real]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["deep4_eps", "odd21_gelu_invscale"])
def test_padding_matches_hf_and_unpadded(name, side, hf_models, ms_models, rng):
    hf, model = hf_models[name], ms_models[name]
    seqs, tokens, mask = padded_batch(rng, CONFIGS[name]["vocab_size"], [11, 6, 1, 9], side)
    compare_to_hf(model, hf, tokens, mask)
    out = model.run(tokens, attention_mask=mask, cache=model.site_names)
    # each row's real tokens equal that sequence run alone (by mechscope and by HF), at every site
    for b, s in enumerate(seqs):
        real = mask[b].astype(bool)
        alone = model.run(s[None], cache=model.site_names)
        assert_close(out.logits[b, real], alone.logits[0], what=f"row {b} vs alone")
        assert_close(out.logits[b, real], hf_run(hf, s[None])["logits"][0], what=f"row {b} vs HF alone")
        for site in model.site_names:
            assert_close(real_part(site, out.cache[site], b, real), alone.cache[site][0],
                         what=f"{site} row {b} vs alone")


@pytest.mark.parametrize("dtype", [bool, np.int32, np.uint8])
def test_mask_dtypes(dtype, ms_models, rng):
    model = ms_models["deep4_eps"]
    _, tokens, mask = padded_batch(rng, 300, [6, 2], "left")
    want = model.run(tokens, attention_mask=mask).logits
    assert_close(model.run(tokens, attention_mask=mask.astype(dtype)).logits, want, atol=0, what=str(dtype))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_in_cache(side, ms_models, rng):
    """Contract: cached values at padded positions are 0; masked scores -inf, masked pattern 0."""
    model = ms_models["deep4_eps"]
    _, tokens, mask = padded_batch(rng, 300, [8, 3, 5], side)
    out = model.run(tokens, attention_mask=mask, cache=model.site_names)
    pad = ~mask.astype(bool)
    for name, value in out.cache.items():
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            continue
        assert np.all(value[pad] == 0), f"{name} not zero at padded positions"
    causal = np.tril(np.ones((8, 8), dtype=bool))
    for l in range(model.n_layers):
        scores = out.cache[f"blocks.{l}.attn.hook_attn_scores"]
        pattern = out.cache[f"blocks.{l}.attn.hook_pattern"]
        for b in range(3):
            real = mask[b].astype(bool)
            allowed = causal & real[None, :] & real[:, None]  # [q, k]
            q_real = real
            # real query rows: disallowed keys are -inf / 0, allowed ones finite
            assert np.all(np.isneginf(scores[b][:, q_real][:, ~allowed[q_real]]))
            assert np.all(np.isfinite(scores[b][:, q_real][:, allowed[q_real]]))
            assert np.all(pattern[b][:, ~allowed] == 0), "pattern not 0 at masked entries"
            assert_close(pattern[b][:, q_real].sum(-1), np.ones((model.n_heads, q_real.sum())))


# ------------------------------------------------------------------ logits=

@pytest.mark.parametrize("side", [None, "left", "right"])
def test_logits_last(side, ms_models, hf_models, rng):
    model, hf = ms_models["odd21_gelu_invscale"], hf_models["odd21_gelu_invscale"]
    if side is None:
        tokens = random_tokens(rng, 211, 3, 7)
        mask = np.ones_like(tokens)
    else:
        _, tokens, mask = padded_batch(rng, 211, [7, 2, 5], side)
    full = model.run(tokens, attention_mask=mask).logits
    last = model.run(tokens, attention_mask=mask, logits="last").logits
    assert last.shape == (3, 211)
    last_real = [np.nonzero(row)[0][-1] for row in mask]
    expected = np.stack([full[b, p] for b, p in enumerate(last_real)])
    assert_close(last, expected, atol=1e-5)
    ref = hf_run(hf, tokens, mask)["logits"]
    assert_close(last, np.stack([ref[b, p] for b, p in enumerate(last_real)]))


def test_logits_positions(ms_models, rng):
    model = ms_models["odd21_gelu_invscale"]
    tokens = random_tokens(rng, 211, 2, 9)
    full = model.run(tokens).logits
    out = model.run(tokens, logits=[0, 4, 8, 4]).logits
    assert out.shape == (2, 4, 211)
    assert_close(out, full[:, [0, 4, 8, 4]], atol=1e-5)


def test_logits_none_still_caches(ms_models, rng):
    model = ms_models["odd21_gelu_invscale"]
    tokens = random_tokens(rng, 211, 2, 6)
    out = model.run(tokens, logits=None, cache="ln_final.hook_normalized")
    assert out.logits is None
    assert_close(out.cache["ln_final.hook_normalized"],
                 model.run(tokens, cache="ln_final.hook_normalized").cache["ln_final.hook_normalized"], atol=0)


def test_no_cache_requested_is_empty(ms_models, rng):
    out = ms_models["odd21_gelu_invscale"].run(random_tokens(rng, 211, 1, 4))
    assert len(out.cache or {}) == 0


# ------------------------------------------------------- checkpoint formats

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(dtype, ms, hf_models, tmp_path, rng):
    """Weights stored in fp16/bf16; mechscope computes in fp32 on the upcast weights."""
    hf = hf_models["deep4_eps"]
    folder = save_hf(hf, tmp_path / "half", dtype=dtype)
    model = ms.Model.from_pretrained(folder)
    ref = upcast_reference(hf, dtype)
    tokens = random_tokens(rng, 300, 2, 20)
    compare_to_hf(model, ref, tokens)
    # and the rounding really happened (otherwise this test proves nothing)
    assert np.abs(hf_run(hf, tokens)["logits"] - model.run(tokens).logits).max() > 1e-4


def test_sharded_checkpoint(ms, hf_models, tmp_path, rng):
    hf = hf_models["deep4_eps"]
    folder = save_hf(hf, tmp_path / "sharded", max_shard_size="20KB")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    model = ms.Model.from_pretrained(folder)
    compare_to_hf(model, hf, random_tokens(rng, 300, 2, 13))


def test_sharded_untied_checkpoint(ms, hf_models, tmp_path, rng):
    """lm_head.weight lives in its own shard when embeddings are untied."""
    hf = hf_models["relu_inner_untied"]
    folder = save_hf(hf, tmp_path / "sharded_untied", max_shard_size="10KB")
    assert "lm_head.weight" in json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    compare_to_hf(ms.Model.from_pretrained(folder), hf, random_tokens(rng, 150, 2, 13))
