"""Folders as the classic checkpoints ship: PyTorch's pytorch_model.bin (read without
PyTorch, against torch.load and the same weights in safetensors), and GPT-2's
tokenizer as vocab.json + merges.txt (against transformers' GPT2Tokenizer)."""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from mechscope.torch_file import read_pytorch_bin
from test_architectures import make_hf
from test_gguf import varied_strings


@pytest.mark.parametrize("name", ["neo_local", "opt_relu", "llama_gqa3", "neox_parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pytorch_model_bin_equals_safetensors(tmp_path, name, dtype):
    """the same weights saved both ways load to the same model (2-byte matrices kept
    2-byte either way); tied weights share one storage in the .bin"""
    hf = make_hf(name).to(dtype)
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    hf.save_pretrained(tmp_path / "st")
    assert sorted(p.name for p in (tmp_path / "bin").iterdir() if "model" in p.name) == ["pytorch_model.bin"]
    a, b = ms.Model.from_pretrained(tmp_path / "bin"), ms.Model.from_pretrained(tmp_path / "st")
    assert a._weights.keys() == b._weights.keys()
    for k in a._weights:
        assert a._weights[k].dtype == b._weights[k].dtype, k
        np.testing.assert_array_equal(a._weights[k].view(np.uint8), b._weights[k].view(np.uint8), err_msg=k)
    tokens = np.random.default_rng(1).integers(0, a.d_vocab, (2, 9))
    np.testing.assert_array_equal(a.run(tokens).logits, b.run(tokens).logits)


def test_sharded_pytorch_model_bin(tmp_path):
    hf = make_hf("opt_relu")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="20KB")
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").exists()
    assert len(list((tmp_path / "bin").glob("pytorch_model-*.bin"))) > 2
    model = ms.Model.from_pretrained(tmp_path / "bin")
    tokens = np.random.default_rng(2).integers(0, model.d_vocab, (2, 7))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=1e-4, rtol=0)
    os.remove(sorted((tmp_path / "bin").glob("pytorch_model-*.bin"))[1])
    with pytest.raises(ValueError, match="listed in the index is missing"):
        ms.Model.from_pretrained(tmp_path / "bin")


def test_views_offsets_and_dtypes_equal_torch_load(tmp_path):
    """tensors that are views of a larger storage (an offset, a transpose, a strided
    slice, one storage under two names) come back as torch.load gives them; integer
    tensors are kept as empty arrays of their dtype (not weights); only wanted names
    are read"""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"whole": base, "transposed": base.T, "rows": base[2:4], "strided": base[:, ::3],
             "again": base, "half": torch.linspace(-2, 2, 7).half(), "bf16": torch.linspace(-3, 3, 5).bfloat16(),
             "double": torch.tensor([1.5, -2.25], dtype=torch.float64), "count": torch.arange(4),
             "scalar": torch.tensor(0.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    got = read_pytorch_bin(str(path))
    for name, t in state.items():
        if name == "count":
            assert got[name].dtype == np.int64 and got[name].size == 0
            continue
        want = t.float().numpy()
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    kept = read_pytorch_bin(str(path), keep_half=True)
    assert kept["half"].dtype == np.float16 and kept["bf16"].dtype.names == ("bfloat16",)
    assert set(read_pytorch_bin(str(path), wanted=lambda n: n.startswith("t"))) == {"transposed"}
    # a module's own state_dict (an OrderedDict carrying _metadata), as torch.save writes it
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(module.state_dict(), tmp_path / "module.bin")
    got = read_pytorch_bin(str(tmp_path / "module.bin"))
    assert set(got) == set(module.state_dict())
    np.testing.assert_array_equal(got["0.weight"], module[0].weight.detach().numpy())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _zipped(tmp_path, pickled, data=None):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        for key, raw in (data or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return str(path)


def test_bad_pytorch_files_are_refused_by_name(tmp_path):
    # a pickle that would run code: refused before anything runs
    with pytest.raises(ValueError, match="refusing the pickled name posix.system|refusing the pickled name os.system"):
        read_pytorch_bin(_zipped(tmp_path, pickle.dumps({"w": _Evil()}, protocol=2)))
    # not a state dict
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_pytorch_bin(_zipped(tmp_path, pickle.dumps([1, 2], protocol=2)))
    with pytest.raises(ValueError, match="'w' is not a tensor"):
        read_pytorch_bin(_zipped(tmp_path, pickle.dumps({"w": 3}, protocol=2)))
    # a damaged pickle
    with pytest.raises(ValueError, match="its pickle cannot be read"):
        read_pytorch_bin(_zipped(tmp_path, b"\x80\x02}q\x00(X"))
    # not a zip archive (PyTorch's format before 1.6, or anything else)
    (tmp_path / "old.bin").write_bytes(b"\x80\x02\x8a\x0alegacy" * 10)
    with pytest.raises(ValueError, match="not a zip archive"):
        read_pytorch_bin(str(tmp_path / "old.bin"))
    # a storage shorter than its tensors, and one missing from the archive
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4, 4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pickled = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    with pytest.raises(ValueError, match="storage 0 holds 20 bytes, 64 expected"):
        read_pytorch_bin(_zipped(tmp_path, pickled, {"0": b"\0" * 20}))
    with pytest.raises(ValueError, match="storage 0 is missing"):
        read_pytorch_bin(_zipped(tmp_path, pickled))


def test_a_folder_without_weights_is_refused(tmp_path):
    make_hf("opt_relu").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no model.safetensors, pytorch_model.bin"):
        ms.Model.from_pretrained(tmp_path)


# ---- GPT-2's tokenizer files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """vocab.json and merges.txt of a byte-level BPE of 700 tokens learned from varied
    text (several scripts, code, digits, whitespace), with <|endoftext|>"""
    from tokenizers import ByteLevelBPETokenizer
    folder = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(varied_strings(4000, seed=1) * 3, vocab_size=700, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    return folder


@pytest.mark.parametrize("add_prefix_space", [False, True])
def test_vocab_and_merges_tokenize_as_gpt2_tokenizer(tmp_path, bpe_files, add_prefix_space):
    """a model folder with GPT-2's two tokenizer files (no tokenizer.json) tokenizes
    3,000 varied strings as transformers' GPT2Tokenizer does, <|endoftext|> kept whole;
    decoding gives the text back"""
    ref = transformers.GPT2Tokenizer(str(bpe_files / "vocab.json"), str(bpe_files / "merges.txt"),
                                     add_prefix_space=add_prefix_space)
    hf = make_hf(None, spec=("gpt_neo", dict(hidden_size=32, num_heads=4, num_layers=2, vocab_size=700,
                                             max_position_embeddings=32, attention_types=[[["global"], 2]])))
    hf.save_pretrained(tmp_path)
    ref.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    model = ms.Model.from_pretrained(tmp_path)
    strings = varied_strings(3000)
    want = [ref.encode(s, add_special_tokens=False) for s in strings]
    got = [model.tokenizer.encode(s) for s in strings]
    bad = [s for s, a, b in zip(strings, got, want) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    assert sum(map(len, got)) > 5 * len(strings)
    eot = ref.convert_tokens_to_ids("<|endoftext|>")
    assert model.tokenizer.encode("a<|endoftext|>b").count(eot) == 1
    assert model.tokenizer.bos_token_id == eot
    for s in strings[:300]:
        assert model.tokenizer.decode(model.tokenizer.encode(s)) == ref.decode(ref.encode(s))
    np.testing.assert_array_equal(model.to_tokens("Hello world", prepend_bos=False)[0],
                                  ref.encode("Hello world"))
    # an older folder: the special tokens named only as bos / eos / unk
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink()
    again = ms.Model.from_pretrained(tmp_path).tokenizer
    assert again.encode("a<|endoftext|>b") == model.tokenizer.encode("a<|endoftext|>b")


def test_malformed_merges_are_refused(tmp_path, bpe_files):
    make_hf("opt_relu").save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")  # "ab" is not in the vocabulary
    with pytest.raises(ValueError, match="vocab.json and merges.txt cannot be read as byte-level BPE"):
        ms.Model.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["added_tokens_decoder", "added_tokens.json"])
def test_added_tokens_tokenize_as_gpt2_tokenizer(tmp_path, bpe_files, layout):
    """tokens a GPT-2 tokenizer folder adds beyond vocab.json (special and not) are kept
    whole with the folder's ids, as transformers' GPT2Tokenizer keeps them; from the
    config's added_tokens_decoder or from the older added_tokens.json"""
    ref = transformers.GPT2Tokenizer(str(bpe_files / "vocab.json"), str(bpe_files / "merges.txt"))
    ref.add_tokens(["<pad>", "[SEP]"], special_tokens=True)
    ref.add_tokens(["dogs", " wug"])
    ref.pad_token = "<pad>"
    hf = make_hf(None, spec=("gpt_neo", dict(hidden_size=32, num_heads=4, num_layers=2, vocab_size=len(ref),
                                             max_position_embeddings=32, attention_types=[[["global"], 2]])))
    hf.save_pretrained(tmp_path)
    ref.save_pretrained(tmp_path)
    if layout == "added_tokens.json":
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        config["additional_special_tokens"] = ["[SEP]"]
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        ref = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    pieces = ["<pad>", "[SEP]", "dogs", " wug", "wug", "hot dogs!", " <pad> ", "<|endoftext|>"]
    strings = ["".join(rng.choice(pieces, 3)) + s + rng.choice(pieces) for s in varied_strings(500)]
    want = [ref.encode(s, add_special_tokens=False) for s in strings]
    got = [model.tokenizer.encode(s) for s in strings]
    bad = [s for s, a, b in zip(strings, got, want) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    new_ids = {ref.convert_tokens_to_ids(t) for t in ("<pad>", "[SEP]", "dogs", " wug")}
    assert new_ids == set(range(700, 704))
    assert sum(i in new_ids for row in got for i in row) > 500
    assert model.tokenizer.pad_token_id == ref.pad_token_id
    assert model.to_string(model.to_tokens("a[SEP] wug", prepend_bos=False)[0]) == "a[SEP] wug"
    # ids with a gap after the vocabulary cannot be given: refused by name
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 700, "[SEP]": 702}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="added token '\\[SEP\\]' has id 702 in the folder but would get 701"):
        ms.Model.from_pretrained(tmp_path)
