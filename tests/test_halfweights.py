"""2-byte weights: bfloat16 / float16 matrices stay 2 bytes in memory and are widened
inside the products. The same checkpoint loaded 2-byte and widened to float32 at
load must give the same logits and sites (1e-5), and so must sweeps, metrics,
tracing and extraction; the conversions are exact for every finite number."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from mechscope import _dtypes
from conftest import assert_same_at_any_thread_count
from test_architectures import make_hf

EXACT = 1e-5

GPT2 = ("gpt2", dict(n_embd=48, n_head=4, n_layer=2, vocab_size=97, n_positions=40, tie_word_embeddings=False))
FAMILIES = {
    "llama": ("llama", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                            intermediate_size=50, vocab_size=101, max_position_embeddings=64)),
    "qwen2_tied": ("qwen2", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=44, vocab_size=83,
                                 max_position_embeddings=64, tie_word_embeddings=True)),
    "neox": ("gpt_neox", dict(hidden_size=36, num_attention_heads=3, num_hidden_layers=2, intermediate_size=52,
                              vocab_size=95, max_position_embeddings=64, rotary_pct=0.5)),
}


def hf_model(name):
    if name == "gpt2":
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="eager", **GPT2[1])).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "ln" in pname or "bias" in pname else 0.3))
        return hf
    return make_hf(None, spec=FAMILIES[name])


def assert_same_runs(half, wide, tokens, mask=None):
    a = half.run(tokens, attention_mask=mask, cache="*")
    b = wide.run(tokens, attention_mask=mask, cache="*")
    np.testing.assert_allclose(a.logits, b.logits, atol=EXACT, rtol=0)
    assert a.cache.keys() == b.cache.keys()
    for site in a.cache:
        np.testing.assert_allclose(a.cache[site], b.cache[site], atol=EXACT, rtol=0, err_msg=site)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2"] + sorted(FAMILIES))
def test_half_checkpoint_equals_its_float32_widening(name, dtype, tmp_path):
    hf_model(name).to(dtype).save_pretrained(tmp_path)
    half = ms.Model.from_pretrained(tmp_path)
    wide = ms.Model.from_pretrained(tmp_path, dtype="float32")
    kind = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert half.dtype == kind and wide.dtype == "float32"
    for key, a in half._core_weights.items():  # matrices 2 bytes; norms, biases, wpe float32
        is_matrix = key in ("embed", "unembed") or ".w_" in key
        assert a.dtype.itemsize == (2 if is_matrix else 4), key
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, half.d_vocab, (3, 9))
    mask = np.ones_like(tokens)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    assert_same_runs(half, wide, tokens, mask)
    assert_same_runs(half, wide, tokens[:1, :1])  # length 1


def test_half_checkpoint_matches_transformers(tmp_path):
    """bf16 weights computed in float32 are HF's bf16 checkpoint loaded in float32"""
    hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    model = ms.Model.from_pretrained(tmp_path)
    tokens = np.random.default_rng(3).integers(0, model.d_vocab, (2, 7))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def wide_pair():
    """A bf16 model large enough that its products are cut into many column panels
    shared by two threads, and the same weights widened to float32."""
    cfg = dict(model_type="llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, intermediate_size=704, vocab_size=3001, max_position_embeddings=128,
               initializer_range=0.1)
    half = ms.Model.from_config(cfg, dtype="bfloat16", seed=3)
    wide = ms.Model.from_arrays(cfg, {k: _dtypes.to_float32(v) for k, v in half._weights.items()})
    return half, wide


def test_panels_and_threads(wide_pair):
    half, wide = wide_pair
    assert half.dtype == "bfloat16"
    tokens = np.random.default_rng(0).integers(0, 3001, (2, 100))
    old = ms.get_num_threads()
    try:
        for n in (1, 2):
            ms.set_num_threads(n)
            np.testing.assert_allclose(half.run(tokens, logits="all").logits, wide.run(tokens, logits="all").logits,
                                       atol=EXACT, rtol=0)
    finally:
        ms.set_num_threads(old)


def test_stacked_matrices_are_held_once(wide_pair):
    half, _ = wide_pair
    qkv = half._core_weights["blocks.0.attn.w_qkv"]
    for part in ("q_proj", "k_proj", "v_proj"):
        assert np.shares_memory(half._weights[f"layers.0.self_attn.{part}.weight"], qkv)
    assert np.shares_memory(half._weights["layers.1.mlp.up_proj.weight"], half._core_weights["blocks.1.mlp.w_in"])
    matrices = sum(a.nbytes for k, a in half._core_weights.items() if k in ("embed", "unembed") or ".w_" in k)
    n = sum(int(np.prod(a.shape)) for k, a in half._core_weights.items() if k in ("embed", "unembed") or ".w_" in k)
    assert matrices == 2 * n


def test_sweeps_metrics_and_tracing(wide_pair):
    half, wide = wide_pair
    rng = np.random.default_rng(1)
    clean, corrupt = rng.integers(0, 3001, (2, 2, 8))
    for metric in (ms.metrics.LogitDiff([5, 9], [7, 11]), ms.metrics.LogProb([5, 9])):
        grids = []
        for m in (half, wide):
            cache = m.run(clean, cache="blocks.*.hook_resid_pre").cache
            grids.append(ms.patching.resid_pre(m, corrupt, cache, metric=metric))
        np.testing.assert_allclose(grids[0], grids[1], atol=EXACT, rtol=0)
    prompt = rng.integers(0, 3001, 6)
    assert ms.tracing.embedding_std(half, [prompt[:2]]) == pytest.approx(
        ms.tracing.embedding_std(wide, [prompt[:2]]), abs=1e-12)
    t = [ms.tracing.trace(m, prompt, (1, 3), samples=3) for m in (half, wide)]
    np.testing.assert_allclose(t[0].scores, t[1].scores, atol=EXACT, rtol=0)


def test_extraction_and_fingerprint(wide_pair, tmp_path):
    half, wide = wide_pair
    data = [np.random.default_rng(i).integers(0, 3001, 5 + i) for i in range(4)]
    a = ms.extract(half, data, ["blocks.1.hook_resid_post"], out=tmp_path / "a")
    b = ms.extract(wide, data, ["blocks.1.hook_resid_post"], out=tmp_path / "b")
    np.testing.assert_allclose(np.asarray(a["blocks.1.hook_resid_post"]), np.asarray(b["blocks.1.hook_resid_post"]),
                               atol=EXACT, rtol=0)
    from mechscope.store import model_fingerprint
    assert model_fingerprint(half) != model_fingerprint(wide)  # the stored numbers differ in kind


def _finite_patterns(kind):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp = 0x7C00 if kind == "float16" else 0x7F80
    return bits[(bits & exp) != exp]


_WIDEN_SCRIPT = """
import sys, numpy as np, mechscope as ms
from mechscope import _dtypes
kind, out = sys.argv[1], sys.argv[2]
bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
exp = 0x7C00 if kind == "float16" else 0x7F80
bits = bits[(bits & exp) != exp]
C = 64
V = bits.size // C
embed = bits[:V * C].reshape(V, C)
embed = embed.view(np.float16) if kind == "float16" else _dtypes.as_bfloat16(embed)
cfg = dict(model_type="llama", hidden_size=C, num_attention_heads=2, num_hidden_layers=1,
           intermediate_size=8, vocab_size=V, max_position_embeddings=V, tie_word_embeddings=True)
m = ms.Model.from_config(cfg, dtype=kind)
arrays = dict(m._weights, **{"embed_tokens.weight": embed})
m = ms.Model.from_arrays(cfg, arrays)
assert m.dtype == kind
np.save(out, m.run(np.arange(V)[None], cache="hook_embed", logits=None).cache["hook_embed"][0])
"""


@pytest.mark.parametrize("generic", ["0", "1"])
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_every_finite_number_widens_exactly(kind, generic, tmp_path):
    """the embedding lookup widens with the same kernel as the products: every
    finite 2-byte number, with the CPU's conversion instructions and the C loop"""
    env = dict(os.environ, MECHSCOPE_GENERIC_KERNELS=generic)
    out = tmp_path / "embed.npy"
    done = subprocess.run([sys.executable, "-c", _WIDEN_SCRIPT, kind, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = np.load(out).reshape(-1)
    bits = _finite_patterns(kind)[:got.size]
    want = bits.view(np.float16).astype(np.float32) if kind == "float16" else _dtypes.to_float32(_dtypes.as_bfloat16(bits))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit (signed zeros too)


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 3
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(_dtypes.from_float32(x, "bfloat16").view(np.uint16), want)


def test_bad_input(tmp_path):
    hf = hf_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight has a non-finite value"):
        ms.Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        ms.Model.from_pretrained(tmp_path, dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        ms.Model.from_config(FAMILIES["llama"][1] | {"model_type": "llama"}, dtype="int8")


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_gguf_half_tensors_stay_half(kind, tmp_path):
    from test_gguf import write_gguf
    spec = ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                          intermediate_size=96, vocab_size=120, max_position_embeddings=64, rope_theta=10000.0,
                          rms_norm_eps=1e-5))
    path = tmp_path / f"m.{kind}.gguf"
    write_gguf(make_hf(None, seed=4, spec=spec), path, kind, np.random.default_rng(2))
    half = ms.Model.from_pretrained(path)
    wide = ms.Model.from_pretrained(path, dtype="float32")
    assert half.dtype == {"F16": "float16", "BF16": "bfloat16"}[kind] and wide.dtype == "float32"
    tokens = np.random.default_rng(1).integers(0, 120, (2, 7))
    assert_same_runs(half, wide, tokens)


@pytest.mark.parametrize("rows", [5, 40])
def test_few_rows_through_wide_matrices(rows):
    """fewer than 32 rows through matrices of >= 4096 inputs go in blocks of 16
    columns, float32 and 2-byte alike: the same sums, whatever the thread count (to
    rounding where the BLAS's sums depend on how a product is cut)"""
    cfg = dict(model_type="llama", hidden_size=4096, head_dim=64, num_attention_heads=2, num_key_value_heads=1,
               num_hidden_layers=1, intermediate_size=72, vocab_size=150, max_position_embeddings=64,
               initializer_range=0.05)
    half = ms.Model.from_config(cfg, dtype="float16", seed=2)
    wide = ms.Model.from_arrays(cfg, {k: _dtypes.to_float32(v) for k, v in half._weights.items()})
    tokens = np.random.default_rng(0).integers(0, 150, (1, rows))
    old = ms.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            ms.set_num_threads(n)
            a = half.run(tokens, cache="*")
            b = wide.run(tokens, cache="*")
            np.testing.assert_allclose(a.logits, b.logits, atol=EXACT, rtol=0)
            for site in a.cache:
                np.testing.assert_allclose(a.cache[site], b.cache[site], atol=EXACT, rtol=0, err_msg=site)
            outs.append(a.logits)
        assert_same_at_any_thread_count(outs[0], outs[1])
    finally:
        ms.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradients_of_two_byte_models(name, dtype, tmp_path):
    """A 2-byte model's gradients are those of its exact float32 widening (through a
    float32 twin made at the first call and kept), and its own metric is the value."""
    hf_model(name).to(dtype).save_pretrained(tmp_path)
    half = ms.Model.from_pretrained(tmp_path)
    wide = ms.Model.from_pretrained(tmp_path, dtype="float32")
    assert half.dtype != "float32"
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, half.d_vocab, (3, 8))
    mask = np.ones_like(tokens)
    mask[2, :3] = 0
    metric = ms.metrics.LogitDiff([5, 6, 7], [1, 2, 3])
    sites = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    for scalar in (metric, "cross_entropy"):
        a = half.grad(tokens, scalar, sites=sites, weights=True, attention_mask=mask)
        b = wide.grad(tokens, scalar, sites=sites, weights=True, attention_mask=mask)
        assert a.value == b.value
        assert a.weights.keys() == b.weights.keys()
        for n in a.weights:
            np.testing.assert_array_equal(a.weights[n], b.weights[n], err_msg=n)
        for n in sites:
            np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    twin = half._grad_core
    half.grad(tokens, metric, sites=sites, attention_mask=mask)
    assert half._grad_core is twin  # widened once
    # the metric per row is the 2-byte model's own, as its forward pass computes it
    np.testing.assert_allclose(half.grad(tokens, metric, attention_mask=mask).metric,
                               metric.per_row(half, tokens, attention_mask=mask), rtol=1e-5, atol=1e-5)