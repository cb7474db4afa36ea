"""Shared fixtures and helpers for the mechscope test-suite.

Every model is built here from a seed (no network): a tiny transformers
GPT2LMHeadModel whose weights are re-drawn at a larger scale than HF's init
(std 0.02 gives nearly uniform attention and would hide scaling bugs), saved
with save_pretrained, and used as the fp32 eager reference.
"""
import copy
import os

import numpy as np
import pytest
import torch
import transformers

torch.set_grad_enabled(False)
transformers.logging.set_verbosity_error()

ATOL = 1e-4

# Configurations covering the acceptance criteria: odd head/model sizes,
# 1-4 layers, each activation, inverse-layer-idx scaling, n_inner, untied
# unembedding, a non-default epsilon.
CONFIGS = {
    "odd30_gelu_new": dict(n_embd=30, n_head=5, n_layer=2, vocab_size=97, n_positions=40,
                           activation_function="gelu_new"),
    "odd21_gelu_invscale": dict(n_embd=21, n_head=3, n_layer=3, vocab_size=211, n_positions=33,
                                activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
    "relu_inner_untied": dict(n_embd=32, n_head=4, n_layer=1, vocab_size=150, n_positions=48,
                              activation_function="relu", n_inner=50, tie_word_embeddings=False),
    "deep4_eps": dict(n_embd=48, n_head=6, n_layer=4, vocab_size=300, n_positions=64,
                      activation_function="gelu_new", n_inner=72, layer_norm_epsilon=1e-3,
                      scale_attn_by_inverse_layer_idx=True),
}


def gpt2_config(**kw):
    kw.setdefault("bos_token_id", kw.get("vocab_size", 100) - 1)
    kw.setdefault("eos_token_id", kw.get("vocab_size", 100) - 1)
    return transformers.GPT2Config(attn_implementation="eager", **kw)


def make_hf_model(config_kwargs, seed=0):
    """fp32 eager GPT2LMHeadModel with O(1)-scale random weights.

    Matrices get std ~ 1/sqrt(fan_in) so activations stay O(1) at every width
    (large activations would only measure fp32 rounding, not correctness).
    """
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(gpt2_config(**config_kwargs))
    g = torch.Generator().manual_seed(seed + 1)
    d = model.config.n_embd
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_cross_attn.weight")):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            p.copy_(3 / d**0.5 * torch.randn(p.shape, generator=g))
        else:  # Conv1D weights are [in, out]
            p.copy_(1.4 / p.shape[0]**0.5 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def save_hf(model, folder, dtype=None, **kw):
    """save_pretrained (safetensors); dtype casts a copy first (fp16/bf16 checkpoints)."""
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    m.save_pretrained(folder, safe_serialization=True, **kw)
    return str(folder)


def upcast_reference(model, dtype):
    """The fp32 model whose weights are exactly what a `dtype` checkpoint holds."""
    return copy.deepcopy(model).to(dtype).to(torch.float32).eval()


def positions_from_mask(mask):
    """What HF generate does: positions count real tokens only."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)


def hf_run(model, tokens, mask=None):
    """HF eager fp32 forward -> dict of numpy arrays (logits, hidden, attn)."""
    tokens = np.asarray(tokens)
    if mask is None:
        mask = np.ones_like(tokens)
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions_from_mask(mask), dtype=torch.long),
                output_hidden_states=True, output_attentions=True)
    return dict(logits=out.logits.numpy(),
                hidden=[h.numpy() for h in out.hidden_states],
                attn=[a.numpy() for a in out.attentions])


def random_tokens(rng, vocab, batch, pos):
    return rng.integers(0, vocab, size=(batch, pos), dtype=np.int64)


def _blas_sums_do_not_depend_on_tiles():
    """Whether the BLAS mechscope links computes each element of a product with the same
    sums however the product is cut into tiles (mechscope cuts products by thread
    count, each tile one BLAS call). True of OpenBLAS's AVX-512 kernels; its Haswell
    (AVX2) kernels sum a tile's edge blocks in another order, so there the values of
    different thread counts agree to rounding only."""
    import ctypes
    import scipy_openblas32
    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so"))
    lib.scipy_openblas_set_num_threads(1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(512, 128)).astype(np.float32)
    b = rng.normal(size=(128, 384)).astype(np.float32)

    def product(rows, cols, out):  # out[rows, cols] = a[rows] @ b[:, cols], row-major
        x, w, o = a[rows], b[:, cols], out[rows, cols]
        lib.scipy_cblas_sgemm(101, 111, 111, x.shape[0], w.shape[1], 128, ctypes.c_float(1.0),
                              ctypes.c_void_p(x.ctypes.data), 128, ctypes.c_void_p(w.ctypes.data), 384,
                              ctypes.c_float(0.0), ctypes.c_void_p(o.ctypes.data), 384)

    whole, cut = np.zeros((512, 384), np.float32), np.zeros((512, 384), np.float32)
    product(slice(None), slice(None), whole)
    for rows in (slice(0, 256), slice(256, None)):
        for cols in (slice(0, 192), slice(192, None)):
            product(rows, cols, cut)
    return bool(np.array_equal(whole, cut))


BLAS_TILES_EXACT = _blas_sums_do_not_depend_on_tiles()


def assert_same_at_any_thread_count(actual, expected, err_msg=""):
    """Values of two thread counts: identical where the BLAS's sums do not depend on
    how a product is cut (BLAS_TILES_EXACT), else equal to float32 rounding (1e-5 of
    the largest value)."""
    if BLAS_TILES_EXACT:
        np.testing.assert_array_equal(actual, expected, err_msg=err_msg)
    else:
        actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        scale = max(float(np.abs(expected).max()), 1e-30)
        assert np.abs(actual - expected).max() <= 1e-5 * scale, (err_msg, np.abs(actual - expected).max(), scale)


def assert_close(actual, expected, atol=ATOL, what="", rtol=0.0):
    """Shape must match exactly; values within atol + rtol*|expected| (±inf must coincide)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def hf_models():
    """name -> fp32 HF reference model (built once)."""
    return {name: make_hf_model(kw, seed=i) for i, (name, kw) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="session")
def hf_dirs(hf_models, tmp_path_factory):
    """name -> folder written by save_pretrained (fp32, single file)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf(m, root / name) for name, m in hf_models.items()}


@pytest.fixture(scope="session")
def ms():
    import mechscope
    return mechscope


@pytest.fixture(scope="session")
def ms_models(ms, hf_dirs):
    """name -> mechscope model loaded from the HF folder."""
    return {name: ms.Model.from_pretrained(d) for name, d in hf_dirs.items()}


@pytest.fixture(scope="session")
def small(hf_models, hf_dirs, ms_models):
    """One (hf, folder, mechscope) triple for tests that need just a model."""
    name = "odd30_gelu_new"
    return hf_models[name], hf_dirs[name], ms_models[name]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------- TransformerLens

def tl_model_from_hf(hf_model, cls=None):
    """HookedTransformer (or its subclass `cls`) with the HF model's exact weights and
    NO processing.

    TL's from_pretrained only knows official names (and would go to the hub),
    so the config is built by hand, mirroring TL's own GPT2LMHeadModel mapping
    (loading_from_pretrained.convert_hf_model_config), and the weights go
    through TL's GPT-2 converter.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size, act_fn=c.activation_function,
        use_attn_scale=True, scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        normalization_type="LN", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", dtype=torch.float32, device="cpu",
    )
    tl = (cls or HookedTransformer)(cfg)
    state = convert_gpt2_weights(hf_model, cfg)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval()


def tl_run(tl, tokens):
    """(logits, ordered cache dict of numpy arrays)."""
    logits, cache = tl.run_with_cache(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return logits.numpy(), {k: v.numpy() for k, v in cache.items()}


# ------------------------------------------------------- hypothesis

# Property-based tests (test_properties.py). "ci" (the default): a bounded number
# of examples per test, so the suite's time is predictable (derandomize would turn
# off the example database, which replays failures first); "campaign"
# (HYPOTHESIS_PROFILE=campaign): a long random search. Both keep failing examples
# in tests/hypothesis-db, committed, so that a bug once found is replayed first.
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

_DB = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), "hypothesis-db"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, deadline=None, database=_DB,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("campaign", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "8000")),
                          derandomize=False, deadline=None, database=_DB, suppress_health_check=_QUIET,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter):
    """The number of engine calls the property-based tests made (for campaigns)."""
    import sys
    props = sys.modules.get("test_properties")
    if props is not None and any(props.CALLS.values()):
        terminalreporter.write_line(f"property-based tests: {props.CALLS['runs']} runs, "
                                    f"{props.CALLS['sweeps']} sweeps")
