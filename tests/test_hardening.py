"""A loaded model survives its checkpoint being rewritten; float attention masks;
checkpoints and configs that used to hang, take seconds or be half-ignored."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import CONFIGS, assert_close, make_hf_model, random_tokens, save_hf

CFG = CONFIGS["odd30_gelu_new"]

# ------------------------------------------------- checkpoint rewritten while loaded

CHILD = r"""
import os, sys
import numpy as np
import mechscope as ms
sys.path.insert(0, sys.argv[2])
from conftest import make_hf_model, save_hf, CONFIGS

folder = sys.argv[1]
weights = os.path.join(folder, "model.safetensors")
model = ms.Model.from_pretrained(folder)
tokens = np.arange(12).reshape(2, 6) % 97
before = model.run(tokens).logits

# 1. truncated in place (what an interrupted save leaves)
with open(weights, "r+b") as f:
    f.truncate(100)
print("truncated", np.array_equal(model.run(tokens).logits, before), flush=True)

# 2. save_pretrained of different weights into the same folder (retrain, save, go on)
save_hf(make_hf_model(CONFIGS["odd30_gelu_new"], seed=77), folder)
print("rewritten", np.array_equal(model.run(tokens).logits, before), flush=True)
sweep = ms.patching.resid_pre(model, tokens, model.run(tokens[::-1], cache="blocks.*.hook_resid_pre").cache,
                              ms.metrics.LogitDiff(1, 2))
print("sweep", bool(np.isfinite(sweep).all()), flush=True)

# and loading again gives the new weights
print("reloaded", not np.allclose(ms.Model.from_pretrained(folder).run(tokens).logits, before), flush=True)
"""


def test_checkpoint_rewritten_while_loaded(tmp_path):
    """The model keeps the weights it loaded (the README says so): no SIGBUS, no
    silent change, whether the file is truncated or rewritten by save_pretrained."""
    folder = save_hf(make_hf_model(CFG, seed=5), tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", CHILD, folder, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (negative: killed by signal {-done.returncode})\n{done.stderr}"
    assert done.stdout.split() == ["truncated", "True", "rewritten", "True", "sweep", "True", "reloaded", "True"]


# ------------------------------------------------------------------ attention masks

@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int8, np.uint8, bool])
def test_attention_mask_any_real_dtype(ms, small, rng, dtype):
    _, _, model = small
    tokens = random_tokens(rng, 97, 2, 7)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    want = model.run(tokens, attention_mask=mask).logits
    assert_close(model.run(tokens, attention_mask=mask.astype(dtype)).logits, want, atol=0)
    assert_close(model.run(tokens, attention_mask=np.ones((2, 7), dtype)).logits, model.run(tokens).logits, atol=0)
    # sweeps and metrics take them too
    metric = ms.metrics.LogitDiff(1, 2)
    assert metric.evaluate(model, tokens, mask.astype(dtype)) == metric.evaluate(model, tokens, mask)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, np.nan, np.inf, 1 + 1e-7])
def test_attention_mask_other_values_refused(ms, small, rng, bad):
    _, _, model = small
    tokens = random_tokens(rng, 97, 2, 7)
    mask = np.ones((2, 7), np.float64)
    mask[0, 0] = bad
    with pytest.raises(ValueError, match="attention_mask.*exactly 0"):
        model.run(tokens, attention_mask=mask)
    with pytest.raises(TypeError, match="attention_mask"):
        model.run(tokens, attention_mask=np.ones((2, 7), np.complex64))


# ------------------------------------------------------------ checkpoints and configs

def test_fifo_checkpoint_refused_without_hanging(ms, tmp_path):
    """A FIFO named model.safetensors (or config.json) would block a read forever."""
    folder = save_hf(make_hf_model(CFG, seed=6), tmp_path / "m")
    for name in ("model.safetensors", "config.json"):
        path = os.path.join(folder, name)
        saved = path + ".saved"
        os.rename(path, saved)
        os.mkfifo(path)
        result = {}

        def load():
            try:
                ms.Model.from_pretrained(folder)
            except ValueError as e:
                result["error"] = str(e)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        t.join(timeout=60)
        hung = t.is_alive()
        if hung:  # let the blocked open finish, so the thread ends
            with open(path, "wb"):
                pass
        os.remove(path)
        os.rename(saved, path)
        assert not hung, f"from_pretrained blocked on a FIFO {name}"
        assert "not a regular file" in result.get("error", ""), result


def test_absurd_n_layer_refused_at_once(ms, tmp_path):
    """Sizes are checked before anything is built or read: no seconds, no GiB."""
    folder = save_hf(make_hf_model(CFG, seed=7), tmp_path / "m")
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for n_layer in (10**6, 50000):
        with open(config_path, "w") as f:
            json.dump(dict(config, n_layer=n_layer), f)
        start = time.perf_counter()
        with pytest.raises(ValueError, match="n_layer"):
            ms.Model.from_pretrained(folder)
        assert time.perf_counter() - start < 30  # a hang guard, not a timing: it used to take minutes
    for bad in (dict(CFG, n_layer=10**6), dict(CFG, n_layer=40000, n_embd=4096, n_head=32),
                dict(CFG, vocab_size=10**12)):
        with pytest.raises(ValueError, match="n_layer|GiB"):
            ms.Model.from_config(bad)


def test_unknown_config_keys_refused_by_name(ms):
    for key in ("n_layers", "hidden_size", "num_attention_heads"):
        with pytest.raises(ValueError, match=f"unknown key.*'{key}'"):
            ms.Model.from_config(dict(CFG, **{key: 2}))
        with pytest.raises(ValueError, match=f"'{key}'"):
            ms.Model.from_arrays(dict(CFG, **{key: 2}), ms.Model.from_config(CFG)._weights)
    with pytest.raises(ValueError, match="pruned_heads"):
        ms.Model.from_config(dict(CFG, pruned_heads={0: [1]}))
    # every key HuggingFace itself writes is known
    import transformers
    ms.Model.from_config(transformers.GPT2Config(**CFG).to_dict())


def test_unknown_config_key_in_checkpoint_warned(ms, tmp_path):
    """A config.json with a stray key loads (HuggingFace ignores it too), with a warning naming it."""
    folder = save_hf(make_hf_model(CFG, seed=8), tmp_path / "m")
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, hidden_size=30), f)
    with pytest.warns(UserWarning, match="'hidden_size'"):
        ms.Model.from_pretrained(folder)


def test_unused_tensors_refused_by_name(ms, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = save_hf(make_hf_model(CFG, seed=9), tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    save_file(dict(tensors, **{"score.weight": np.ones((2, 30), np.float32),
                               "position_ids": np.arange(4, dtype=np.int64)}), path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not use: position_ids, score.weight"):
        ms.Model.from_pretrained(folder)
    arrays = dict(ms.Model.from_config(CFG)._weights, **{"h.2.ln_1.weight": np.ones(30, np.float32)})
    with pytest.raises(ValueError, match="does not use: h.2.ln_1.weight"):
        ms.Model.from_arrays(CFG, arrays)
    # the causal-mask buffers of old checkpoints are not weights, and not unused
    arrays = dict(ms.Model.from_config(CFG)._weights, **{"h.0.attn.bias": np.ones((1, 1, 40, 40), np.float32)})
    ms.Model.from_arrays(CFG, arrays)
