"""Constructors, the local HF cache lookup, show_config, tokenizer helpers."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers

from conftest import CONFIGS, assert_close, hf_run, random_tokens

CFG = CONFIGS["odd30_gelu_new"]  # vocab 97, n_ctx 40, bos/eos = 96


# ------------------------------------------------------------ from_config

def test_from_config_seeded(ms, rng):
    tokens = random_tokens(rng, 97, 2, 10)
    run = lambda m: m.run(tokens).logits
    a = run(ms.Model.from_config(CFG, seed=3))
    assert_close(run(ms.Model.from_config(CFG, seed=3)), a, atol=0)
    assert np.abs(run(ms.Model.from_config(CFG, seed=4)) - a).max() > 1e-3
    # the default seed is 0, and a GPT2Config object works like its dict
    assert_close(run(ms.Model.from_config(CFG)), run(ms.Model.from_config(CFG, seed=0)), atol=0)
    gpt2_config = transformers.GPT2Config(**CFG)
    assert_close(run(ms.Model.from_config(gpt2_config, seed=3)), a, atol=0)


def test_from_config_hf_style_init(ms, rng):
    """N(0, 0.02) embeddings; LayerNorm weight 1 and bias 0."""
    model = ms.Model.from_config(dict(CFG, vocab_size=400, n_positions=64), seed=1)
    assert (model.d_vocab, model.n_ctx) == (400, 64)
    tokens = np.arange(400).reshape(8, 50) % 400
    c = model.run(tokens, cache=["hook_embed", "hook_pos_embed", "blocks.0.*"], logits=None).cache
    assert 0.017 < c["hook_embed"].std() < 0.023
    assert abs(c["hook_embed"].mean()) < 0.002
    assert 0.017 < c["hook_pos_embed"].std() < 0.023
    x = c["blocks.0.hook_resid_pre"]
    centred = x - x.mean(-1, keepdims=True)
    assert_close(c["blocks.0.ln1.hook_normalized"], centred / c["blocks.0.ln1.hook_scale"], atol=1e-4)


# ------------------------------------------------------------ from_arrays

def state_arrays(hf):
    return {k: v.numpy().copy() for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("name, variant", [
    ("odd30_gelu_new", "as_is"), ("odd30_gelu_new", "no_prefix"), ("odd30_gelu_new", "fortran_order"),
    ("odd30_gelu_new", "no_lm_head"),  # tied: lm_head.weight is wte, files omit it
    ("relu_inner_untied", "as_is"), ("relu_inner_untied", "no_prefix"),
])
def test_from_arrays_roundtrip(ms, hf_models, ms_models, rng, name, variant):
    hf = hf_models[name]
    arrays = state_arrays(hf)
    if variant == "no_prefix":
        arrays = {k.removeprefix("transformer."): v for k, v in arrays.items()}
    elif variant == "no_lm_head":
        del arrays["lm_head.weight"]
    elif variant == "fortran_order":
        arrays = {k: np.asfortranarray(v) for k, v in arrays.items()}
    model = ms.Model.from_arrays(hf.config.to_dict(), arrays)
    tokens = random_tokens(rng, CONFIGS[name]["vocab_size"], 2, 15)
    assert_close(model.run(tokens).logits, hf_run(hf, tokens)["logits"])
    assert_close(model.run(tokens).logits, ms_models[name].run(tokens).logits, atol=1e-5)


def test_from_arrays_untied_requires_lm_head(ms, hf_models):
    hf = hf_models["relu_inner_untied"]
    arrays = state_arrays(hf)
    del arrays["lm_head.weight"]
    with pytest.raises((ValueError, TypeError), match="lm_head"):
        ms.Model.from_arrays(hf.config.to_dict(), arrays)


def test_from_arrays_float64(ms, hf_models, rng):
    """float64 arrays (numpy's default) are accepted and rounded to fp32."""
    hf = hf_models["odd30_gelu_new"]
    tokens = random_tokens(rng, 97, 1, 8)
    arrays = {k: v.astype(np.float64) for k, v in state_arrays(hf).items()}
    assert_close(ms.Model.from_arrays(hf.config.to_dict(), arrays).run(tokens).logits,
                 hf_run(hf, tokens)["logits"])


# ---------------------------------------------------- local HF hub cache

def fake_hub_cache(hub, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out like huggingface_hub does: blobs/, snapshots/<rev>/ symlinks, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for i, fname in enumerate(sorted(os.listdir(folder))):
        blob = repo / "blobs" / f"{revision[:8]}{i:032x}"
        shutil.copy(os.path.join(folder, fname), blob)
        os.symlink(os.path.relpath(blob, snap), snap / fname)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("repo_id", ["toyorg/toy-gpt2", "toy-gpt2"])
def test_name_found_via_hf_home(ms, hf_models, hf_dirs, hub_env, rng, repo_id):
    fake_hub_cache(hub_env / "home" / "hub", repo_id, hf_dirs["odd21_gelu_invscale"])
    model = ms.Model.from_pretrained(repo_id)
    tokens = random_tokens(rng, 211, 2, 9)
    assert_close(model.run(tokens).logits, hf_run(hf_models["odd21_gelu_invscale"], tokens)["logits"])


def test_name_found_via_hf_hub_cache_and_refs_main(ms, hf_models, hf_dirs, hub_env, monkeypatch, rng):
    hub = hub_env / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # an older snapshot of a different model must be ignored: refs/main decides
    fake_hub_cache(hub, "toyorg/toy", hf_dirs["odd30_gelu_new"], revision="a" * 40)
    fake_hub_cache(hub, "toyorg/toy", hf_dirs["deep4_eps"], revision="b" * 40)
    (hub / "models--toyorg--toy" / "refs" / "main").write_text("b" * 40)
    model = ms.Model.from_pretrained("toyorg/toy")
    assert model.n_layers == 4
    tokens = random_tokens(rng, 300, 1, 9)
    assert_close(model.run(tokens).logits, hf_run(hf_models["deep4_eps"], tokens)["logits"])


def test_revision_picks_a_branch_or_commit(ms, hf_models, hf_dirs, hub_env, rng):
    """revision=: a branch the cache has a ref for (as Pythia's training checkpoints,
    'step1000'), or a commit hash; one it does not hold is refused with the refs it has,
    never replaced by another snapshot"""
    hub = hub_env / "home" / "hub"
    fake_hub_cache(hub, "toyorg/pythia", hf_dirs["odd30_gelu_new"], revision="a" * 40)
    repo = fake_hub_cache(hub, "toyorg/pythia", hf_dirs["deep4_eps"], revision="b" * 40)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "step1000").write_text("b" * 40)
    assert ms.Model.from_pretrained("toyorg/pythia").n_layers == hf_models["odd30_gelu_new"].config.n_layer
    model = ms.Model.from_pretrained("toyorg/pythia", revision="step1000")
    assert model.n_layers == 4
    tokens = random_tokens(rng, 300, 1, 9)
    assert_close(model.run(tokens).logits, hf_run(hf_models["deep4_eps"], tokens)["logits"])
    assert ms.Model.from_pretrained("toyorg/pythia", revision="b" * 40).n_layers == 4
    with pytest.raises(ValueError, match="'step2000' of toyorg/pythia is not in the local HuggingFace cache.*"
                                         "its refs: main, step1000"):
        ms.Model.from_pretrained("toyorg/pythia", revision="step2000")
    with pytest.raises(ValueError, match="revision: expected a branch"):
        ms.Model.from_pretrained("toyorg/pythia", revision="../../etc")
    with pytest.raises(ValueError, match="which is not a model name"):
        ms.Model.from_pretrained(hf_dirs["deep4_eps"], revision="main")


@pytest.mark.parametrize("asked, cached", [
    ("gpt2-small", "openai-community/gpt2"), ("gpt2-xl", "openai-community/gpt2-xl"),
    ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"), ("tiny-stories-33M", "roneneldan/TinyStories-33M"),
    ("tiny-stories-2L-33M", "roneneldan/TinyStories-2Layers-33M"),
    ("tiny-stories-instruct-1L-21M", "roneneldan/TinyStories-Instuct-1Layer-21M"),  # (its spelling)
    ("tiny-stories-instruct-2L-33M", "roneneldan/TinyStories-Instruct-2Layers-33M"),
    ("opt-125m", "facebook/opt-125m"), ("gpt-neo-125M", "EleutherAI/gpt-neo-125m"),  # cached in lower case
    ("distilgpt2", "distilbert/distilgpt2"),
])
def test_short_and_legacy_names_find_the_cached_repository(ms, hf_dirs, hub_env, asked, cached):
    """TransformerLens's short names and the classic names HuggingFace now keeps under
    organisations find the repository in the cache, whatever case the cache spells it in"""
    fake_hub_cache(hub_env / "home" / "hub", cached, hf_dirs["deep4_eps"])
    assert ms.Model.from_pretrained(asked).n_layers == 4


def test_a_name_not_in_the_cache_names_where_it_looked(ms, hub_env):
    with pytest.raises(ValueError, match="looked for pythia-160m, EleutherAI/pythia-160m"):
        ms.Model.from_pretrained("pythia-160m")
    with pytest.raises(ValueError, match="'nobody/nothing' is neither a folder nor a model in the local "
                                         "HuggingFace cache \\(mechscope never downloads"):
        ms.Model.from_pretrained("nobody/nothing")


def test_path_wins_over_name(ms, hf_dirs, hub_env, monkeypatch):
    """An existing folder is loaded as a folder even if it could be a repo id."""
    monkeypatch.chdir(hub_env)
    shutil.copytree(hf_dirs["relu_inner_untied"], hub_env / "org" / "model")
    model = ms.Model.from_pretrained("org/model")
    assert model.n_layers == 1


# ------------------------------------------------------------ show_config

def test_show_config(ms, capsys):
    """Printed through Python (so notebooks show it): the BLAS and the thread count."""
    saved = ms.get_num_threads()
    try:
        for n in (1, 2):
            ms.set_num_threads(n)
            ms.show_config()
            text = capsys.readouterr().out.lower()
            assert "blas" in text and "openblas" in text
            counts = re.findall(r"(?<![\w])threads?\s*[:=]\s*(\d+)", text)  # not max_threads=64
            assert counts and int(counts[0]) == n, text
    finally:
        ms.set_num_threads(saved)


def _kernels_line(coretype):
    """show_config's BLAS-kernels line in a fresh interpreter (OpenBLAS reads
    OPENBLAS_CORETYPE once, when it loads), with the variable set or not."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    done = subprocess.run([sys.executable, "-c", "import mechscope as ms; ms.show_config()"], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return next(line for line in done.stdout.splitlines() if line.startswith("BLAS kernels:"))


def test_show_config_names_kernels_set_by_the_environment():
    """OPENBLAS_CORETYPE replaces OpenBLAS's choice of kernels for the CPU: show_config
    says so, and names the choice OpenBLAS makes without it (which the benchmarks'
    sgemm and FMA peaks otherwise leave unexplained)."""
    own = _kernels_line(None)
    assert own.endswith("(chosen at run time for this CPU)"), own
    own_name = own.split(":", 1)[1].split("(")[0].strip()
    forced = _kernels_line("Sandybridge")
    assert forced == (f"BLAS kernels: Sandybridge (set by OPENBLAS_CORETYPE=Sandybridge in the environment; "
                      f"OpenBLAS's own choice for this CPU: {own_name})"), forced


# --------------------------------------------------------------- tokenizer

class CharTokenizer:
    """Character-level toy with the HF encode/decode API: ' '..'~' -> 0..94."""

    def __init__(self, bos_token_id=95):
        self.bos_token_id = bos_token_id

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) - 32 for ch in text]

    def decode(self, ids, **kwargs):
        ids = [int(i) for i in np.atleast_1d(ids)]
        return "".join("<bos>" if i == self.bos_token_id else "<eos>" if i == 96 else chr(i + 32)
                       for i in ids)


@pytest.fixture
def tok_model(ms, hf_dirs):
    return ms.Model.from_pretrained(hf_dirs["odd30_gelu_new"], tokenizer=CharTokenizer())


def ids(text):
    return [ord(ch) - 32 for ch in text]


def test_to_tokens(tok_model):
    t = tok_model.to_tokens("Hi!")
    assert t.dtype == np.int64
    assert t.tolist() == [[95] + ids("Hi!")]
    assert tok_model.to_tokens("Hi!", prepend_bos=False).tolist() == [ids("Hi!")]
    assert tok_model.to_tokens(["ab", "cd"]).tolist() == [[95] + ids("ab"), [95] + ids("cd")]


def test_bos_falls_back_to_config(ms, hf_dirs):
    model = ms.Model.from_pretrained(hf_dirs["odd30_gelu_new"], tokenizer=CharTokenizer(bos_token_id=None))
    assert model.config["bos_token_id"] == 96
    assert model.to_tokens("ab").tolist() == [[96] + ids("ab")]


def test_to_str_tokens(tok_model):
    assert tok_model.to_str_tokens(np.array([95] + ids("ok"))) == ["<bos>", "o", "k"]
    assert tok_model.to_str_tokens(ids("a b")) == ["a", " ", "b"]
    assert tok_model.to_str_tokens("ok") == ["<bos>", "o", "k"]  # like TL: bos prepended
    # like TL: a list of texts gives a list each, one token a list of one
    assert tok_model.to_str_tokens(["ok", "abc"], prepend_bos=False) == [["o", "k"], ["a", "b", "c"]]
    assert tok_model.to_str_tokens(np.int64(ids("z")[0])) == ["z"]
    with pytest.raises(ValueError, match="expected one sequence"):
        tok_model.to_str_tokens(np.zeros((2, 3), int))


def test_token_helpers_as_transformer_lens(tok_model):
    """to_string, to_single_token and get_token_position, as TransformerLens's"""
    assert tok_model.to_string(ids("Hi!")) == "Hi!"
    assert tok_model.to_string(np.array([ids("ab"), ids("cd")])) == ["ab", "cd"]
    assert tok_model.to_single_token("x") == ids("x")[0]
    with pytest.raises(ValueError, match="'xy' is 2 tokens \\(\\['x', 'y'\\]\\), not one"):
        tok_model.to_single_token("xy")
    # "abcab": with the bos first, "b" at 2 and 5
    assert tok_model.get_token_position("b", "abcab") == 2
    assert tok_model.get_token_position("b", "abcab", mode="last") == 5
    assert tok_model.get_token_position("b", "abcab", prepend_bos=False) == 1
    assert tok_model.get_token_position(ids("c")[0], np.array([ids("abcab")])) == 2
    with pytest.raises(ValueError, match="is not in the input"):
        tok_model.get_token_position("z", "abc")
    with pytest.raises(ValueError, match="mode: expected 'first' or 'last'"):
        tok_model.get_token_position("a", "abc", mode="middle")
    with pytest.raises(ValueError, match="expected one sequence"):
        tok_model.get_token_position("a", np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="expected integer ids"):
        tok_model.to_string(np.zeros((2, 2, 2), int))


def test_a_transformers_tokenizer_gets_one_bos(ms, hf_dirs):
    """a transformers tokenizer (or a `tokenizers` one) given as tokenizer=: one BOS
    first, as TransformerLens puts it, whether the tokenizer adds one itself (Llama's)
    or not (GPT-2's)"""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, **{ch: i + 1 for i, ch in enumerate("abc ")}}
    adds_bos = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    adds_bos.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    for backend, own_bos in ((adds_bos, [0]), (Tokenizer(models.BPE(vocab=vocab, merges=[])), [])):
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
        assert tok.encode("ab c") == own_bos + [1, 2, 4, 3]
        model = ms.Model.from_pretrained(hf_dirs["odd30_gelu_new"], tokenizer=tok)
        assert model.to_tokens("ab c").tolist() == [[0, 1, 2, 4, 3]]
        assert model.to_tokens("ab c", prepend_bos=False).tolist() == [[1, 2, 4, 3]]
        assert model.to_single_token("b") == 2
        assert model.to_str_tokens("ab") == ["<s>", "a", "b"]
        # the library's own Tokenizer object too (it names no BOS: the config's, 96)
        raw = ms.Model.from_pretrained(hf_dirs["odd30_gelu_new"], tokenizer=backend)
        assert backend.encode("ab c").ids == own_bos + [1, 2, 4, 3]
        assert raw.to_tokens("ab c").tolist() == [[96, 1, 2, 4, 3]]


def test_run_text(tok_model, hf_models):
    assert tok_model.tokenizer is not None
    want = tok_model.run(tok_model.to_tokens("Hello")).logits
    assert_close(tok_model.run("Hello").logits, want, atol=0)
    assert_close(want, hf_run(hf_models["odd30_gelu_new"], tok_model.to_tokens("Hello"))["logits"])
    batch = tok_model.run(["abc", "xyz"], logits="last").logits
    assert batch.shape == (2, 97)
    assert_close(batch[1], tok_model.run("xyz").logits[0, -1], atol=1e-5)
