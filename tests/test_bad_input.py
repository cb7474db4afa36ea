"""Bad input gives ValueError/TypeError naming the culprit, before any work, and never a crash."""
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import CONFIGS, assert_close, hf_run, make_hf_model, random_tokens, save_hf

BAD = (ValueError, TypeError)
VOCAB, N_CTX = CONFIGS["odd30_gelu_new"]["vocab_size"], CONFIGS["odd30_gelu_new"]["n_positions"]
GOOD = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(autouse=True)
def model_survives(small):
    """After every bad call the same model still gives the same answer."""
    _, _, model = small
    before = model.run(GOOD).logits
    yield
    assert_close(model.run(GOOD).logits, before, atol=0)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """A name lookup must never find a real cache or the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------ run()

@pytest.mark.parametrize("tokens, match", [
    ([[1, -1, 2]], "tokens"),                               # negative id
    ([[1, VOCAB, 2]], "tokens"),                            # id == vocab
    ([[1, 2**40, 2]], "tokens"),                            # would wrap in int32
    (np.array([[1.0, 2.0]]), "tokens"),                     # float
    (np.array([[1.5, 2.0]], dtype=np.float32), "tokens"),
    (np.zeros((1, 2, 3), dtype=np.int64), "tokens"),        # 3-D
    (np.zeros((1, 0), dtype=np.int64), "tokens"),           # empty
    (np.array([[True, False]]), "tokens"),                  # bool is not an id
    (np.ones((1, N_CTX + 1), dtype=np.int64), "tokens|n_ctx|n_positions"),
    (np.ones(N_CTX + 1, dtype=np.int64), "tokens|n_ctx|n_positions"),
])
def test_bad_tokens(small, tokens, match):
    _, _, model = small
    with pytest.raises(BAD, match=match):
        model.run(tokens)


def test_text_without_tokenizer(small):
    _, _, model = small
    assert model.tokenizer is None
    with pytest.raises(BAD, match="tokenizer"):
        model.run("hello")


@pytest.mark.parametrize("mask", [
    np.ones((2, 4), dtype=np.int64),             # too short
    np.ones((1, 5), dtype=np.int64),             # wrong batch
    np.ones((2, 5, 1), dtype=np.int64),          # wrong rank
    np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]),  # a row with no real token
])
def test_bad_attention_mask(small, mask):
    _, _, model = small
    with pytest.raises(BAD, match="attention_mask"):
        model.run(np.ones((2, 5), dtype=np.int64), attention_mask=mask)


@pytest.mark.parametrize("cache", [
    "blocks.0.hook_nonsense",
    "blocks.2.hook_resid_pre",        # layer does not exist (2 layers)
    "blocks.*.hook_nothing_matches",
    ["hook_embed", "ln_final.hook_bogus"],  # one bad name in a list spoils it
])
def test_unknown_sites(small, cache):
    _, _, model = small
    with pytest.raises(BAD, match="cache|site"):
        model.run(GOOD, cache=cache)


@pytest.mark.parametrize("logits", ["first", [GOOD.shape[1]], [0, 99]])
def test_bad_logits_argument(small, logits):
    _, _, model = small
    with pytest.raises(BAD, match="logits"):
        model.run(GOOD, logits=logits)


@pytest.fixture
def budget(ms):
    saved = ms.get_memory_budget()
    yield
    ms.set_memory_budget(saved)
    assert ms.get_memory_budget() == saved


def test_memory_budget(ms, small, budget):
    """Refused before work when the requested cache + logits exceed the budget."""
    _, _, model = small
    tokens = np.ones((8, N_CTX), dtype=np.int64)
    full = model.run(tokens, cache=model.site_names)
    need = full.logits.nbytes + sum(v.nbytes for v in full.cache.values())  # ~2.7 MB
    ms.set_memory_budget(need // 2)
    assert ms.get_memory_budget() == need // 2
    with pytest.raises(ValueError, match="memory|budget"):
        model.run(tokens, cache=model.site_names)
    # logits alone (8 * 40 * 97 * 4 = 124 KB) and a small cache fit
    out = model.run(tokens, cache="blocks.0.hook_resid_pre")
    assert_close(out.logits, full.logits, atol=0)
    ms.set_memory_budget(full.logits.nbytes // 2)
    with pytest.raises(ValueError, match="memory|budget"):
        model.run(tokens)


# ---------------------------------------------------------------- loading

@pytest.fixture
def ckpt(small, tmp_path):
    """A private copy of a good checkpoint folder, to break."""
    _, folder, _ = small
    return str(shutil.copytree(folder, tmp_path / "ckpt"))


def st_path(folder):
    return os.path.join(folder, "model.safetensors")


def rewrite_tensors(folder, edit):
    tensors = load_file(st_path(folder))
    edit(tensors)
    save_file(tensors, st_path(folder), metadata={"format": "pt"})


def test_missing_folder(ms, tmp_path):
    missing = tmp_path / "no_such_model_dir"
    with pytest.raises(BAD, match="no_such_model_dir"):
        ms.Model.from_pretrained(str(missing))


def test_unknown_name_not_in_cache(ms):
    with pytest.raises(BAD, match="not-cached-org/not-cached-model"):
        ms.Model.from_pretrained("not-cached-org/not-cached-model")


def test_missing_config(ms, ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(BAD, match="config.json"):
        ms.Model.from_pretrained(ckpt)


def test_config_not_json(ms, ckpt):
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(BAD, match="config.json"):
        ms.Model.from_pretrained(ckpt)


def test_missing_weights_file(ms, ckpt):
    os.remove(st_path(ckpt))
    with pytest.raises(BAD, match="safetensors"):
        ms.Model.from_pretrained(ckpt)


@pytest.mark.parametrize("keep", [0.0, 0.002, 0.5, 0.999])
def test_truncated_weights(ms, ckpt, keep):
    size = os.path.getsize(st_path(ckpt))
    with open(st_path(ckpt), "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(BAD, match="safetensors"):
        ms.Model.from_pretrained(ckpt)


def test_header_longer_than_file(ms, ckpt):
    size = os.path.getsize(st_path(ckpt))
    with open(st_path(ckpt), "r+b") as f:
        f.write(struct.pack("<Q", size * 4))
    with pytest.raises(BAD, match="safetensors"):
        ms.Model.from_pretrained(ckpt)


def test_tensor_offsets_past_end(ms, ckpt):
    """A well-formed header whose data_offsets point beyond the file."""
    raw = open(st_path(ckpt), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4096, end + 4096]  # same size, shifted past the end
    text = json.dumps(header).encode()
    with open(st_path(ckpt), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(BAD, match="safetensors|" + name.split(".")[-2]):
        ms.Model.from_pretrained(ckpt)


def test_garbage_header(ms, ckpt):
    raw = bytearray(open(st_path(ckpt), "rb").read())
    raw[8] = ord("X")  # the JSON no longer parses
    open(st_path(ckpt), "wb").write(raw)
    with pytest.raises(BAD, match="safetensors"):
        ms.Model.from_pretrained(ckpt)


def test_tensor_shape_mismatch(ms, ckpt):
    def edit(t):
        t["transformer.h.1.mlp.c_fc.bias"] = np.zeros(121, dtype=np.float32)  # config says 120
    rewrite_tensors(ckpt, edit)
    with pytest.raises(BAD, match="c_fc"):
        ms.Model.from_pretrained(ckpt)


def test_missing_tensor(ms, ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(BAD, match="ln_2"):
        ms.Model.from_pretrained(ckpt)


def test_config_disagrees_with_weights(ms, ckpt):
    path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(path))
    cfg["n_layer"] = 3  # the file only holds blocks 0 and 1
    json.dump(cfg, open(path, "w"))
    with pytest.raises(BAD, match=r"h\.2|n_layer"):
        ms.Model.from_pretrained(ckpt)


def test_nan_in_weights(ms, ckpt):
    def edit(t):
        t["transformer.h.0.attn.c_proj.weight"][3, 4] = np.nan
    rewrite_tensors(ckpt, edit)
    with pytest.raises(BAD, match="c_proj"):
        ms.Model.from_pretrained(ckpt)


def test_nan_in_arrays(ms, small):
    hf, _, _ = small
    arrays = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    arrays["transformer.wpe.weight"][0, 0] = np.nan
    with pytest.raises(BAD, match="wpe"):
        ms.Model.from_arrays(hf.config.to_dict(), arrays)


# ------------------------------------------------------- config fields

def base_config():
    return dict(CONFIGS["odd30_gelu_new"], bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("field, value", [
    ("activation_function", "no_such_activation"),
    ("n_head", 7),               # 30 is not divisible by 7
    ("vocab_size", 0),
])
def test_invalid_config_field(ms, field, value):
    with pytest.raises(BAD, match=field):
        ms.Model.from_config(dict(base_config(), **{field: value}))


@pytest.mark.parametrize("field, value", [
    ("reorder_and_upcast_attn", True),
    ("scale_attn_weights", False),
    ("add_cross_attention", True),
    ("activation_function", "silu"),
    ("activation_function", "gelu_pytorch_tanh"),
])
def test_config_field_supported_or_refused_by_name(ms, tmp_path, rng, field, value):
    """Either mechscope implements the field exactly as HF does, or it refuses it, naming it.

    A silently ignored field would pass neither branch.
    """
    hf = make_hf_model(dict(base_config(), **{field: value}), seed=5)
    folder = save_hf(hf, tmp_path / field)
    try:
        model = ms.Model.from_pretrained(folder)
    except BAD as e:
        assert field in str(e), f"error does not name {field}: {e}"
        return
    tokens = random_tokens(rng, VOCAB, 2, 12)
    assert_close(model.run(tokens).logits, hf_run(hf, tokens)["logits"], what=f"{field}={value}")
