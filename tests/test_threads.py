"""Thread safety and thread-count independence."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import (BLAS_TILES_EXACT, assert_close, assert_same_at_any_thread_count, hf_run, make_hf_model,
                      random_tokens, save_hf)

# big enough that OpenBLAS really splits its GEMMs over 2 threads (M = 8*64 tokens)
BIG = dict(n_embd=128, n_head=4, n_layer=2, vocab_size=500, n_positions=64, activation_function="gelu_new")


@pytest.fixture(scope="module")
def big(ms, tmp_path_factory):
    hf = make_hf_model(BIG, seed=11)
    return hf, ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("big") / "m"))


@pytest.fixture
def restore_threads(ms):
    saved = ms.get_num_threads()
    yield
    ms.set_num_threads(saved)


def test_get_reflects_set(ms, restore_threads):
    assert ms.get_num_threads() >= 1
    for n in (1, 2, 1, 3):
        ms.set_num_threads(n)
        assert ms.get_num_threads() == n


def test_fma_peak_measures_on_any_thread_count(ms, restore_threads):
    """The benchmarks' multiply-add peak: a finite rate from the widest FMA the CPU has."""
    from mechscope import _core

    for n in (1, 2, 3):
        ms.set_num_threads(n)
        gflops, instructions = _core.fma_peak()
        assert np.isfinite(gflops) and gflops > 0.0
        assert instructions in ("AVX-512 FMA", "AVX2 FMA", "multiply-add, 4 lanes")


def test_one_and_two_threads_agree(ms, big, restore_threads, rng):
    hf, model = big
    tokens = random_tokens(rng, 500, 8, 64)
    mask = np.ones_like(tokens)
    mask[3, :20] = 0  # some left padding too
    results = {}
    for n in (1, 2):
        ms.set_num_threads(n)
        results[n] = model.run(tokens, attention_mask=mask, cache=model.site_names)
    # OpenBLAS sums in a different order with 2 threads: a few ulps, so 1e-5 is
    # taken relative to the value (1e-5 absolute is ~20 ulps at |x| = 8)
    assert_close(results[1].logits, results[2].logits, atol=1e-5, rtol=1e-5, what="logits")
    for site in model.site_names:
        assert_close(results[1].cache[site], results[2].cache[site], atol=1e-5, rtol=1e-5, what=site)
    # and both are right
    real = mask[0].astype(bool)
    assert_close(results[2].logits[0, real], hf_run(hf, tokens[:1])["logits"][0])


def run_concurrently(jobs, repeats):
    """Start every job at once (barrier), each `repeats` times; return the errors."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def worker(job):
        try:
            barrier.wait()
            for _ in range(repeats):
                job()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_two_python_threads_same_model(ms, big, restore_threads, rng):
    _, model = big
    ms.set_num_threads(2)
    inputs = [
        (random_tokens(rng, 500, 4, 64), None, "blocks.*.hook_resid_post"),
        (random_tokens(rng, 500, 3, 17), np.array([[0] * 5 + [1] * 12, [1] * 17, [1] * 9 + [0] * 8]),
         "blocks.1.attn.hook_pattern"),
    ]
    expected = [model.run(t, attention_mask=m, cache=c) for t, m, c in inputs]

    def job_for(i):
        tokens, mask, cache = inputs[i]

        def job():
            out = model.run(tokens, attention_mask=mask, cache=cache)
            assert_close(out.logits, expected[i].logits, atol=1e-6, what=f"thread {i} logits")
            assert set(out.cache.keys()) == set(expected[i].cache.keys())
            for k in out.cache.keys():
                assert_close(out.cache[k], expected[i].cache[k], atol=1e-6, what=f"thread {i} {k}")
        return job

    assert run_concurrently([job_for(0), job_for(1)], repeats=25) == []


def test_threads_on_different_models_and_errors(ms, big, ms_models, rng):
    """Concurrent runs of two models, one thread also hitting errors, stay correct."""
    _, model = big
    other = ms_models["odd21_gelu_invscale"]
    t_big, t_other = random_tokens(rng, 500, 2, 30), random_tokens(rng, 211, 3, 33)
    want_big, want_other = model.run(t_big).logits, other.run(t_other, logits="last").logits

    def job_big():
        assert_close(model.run(t_big).logits, want_big, atol=1e-6)

    def job_other():
        assert_close(other.run(t_other, logits="last").logits, want_other, atol=1e-6)
        with pytest.raises((ValueError, TypeError)):
            other.run([[211]])

    assert run_concurrently([job_big, job_other, job_big], repeats=20) == []


def test_generic_kernels_match_hf(tmp_path):
    """The plain-loop attention kernels (used where the CPU has no AVX-512) give the
    same values as the AVX-512 ones and as HF: run in a process that asks for them."""
    hf = make_hf_model(dict(n_embd=64, n_head=2, n_layer=2, vocab_size=90, n_positions=80), seed=12)
    folder = save_hf(hf, tmp_path / "m")
    tokens = np.random.default_rng(2).integers(0, 90, (3, 70))
    np.save(tmp_path / "tokens.npy", tokens)
    script = ("import sys, numpy as np, mechscope as ms\n"
              "m = ms.Model.from_pretrained(sys.argv[1])\n"
              "np.save(sys.argv[2], m.run(np.load(sys.argv[3]), logits='all').logits)\n"
              "ms.show_config()\n")
    env = dict(os.environ, MECHSCOPE_GENERIC_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", script, folder, str(tmp_path / "out.npy"), str(tmp_path / "tokens.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generic attention kernels" in done.stdout
    assert_close(np.load(tmp_path / "out.npy"), hf_run(hf, tokens)["logits"])


def test_blas_single_threaded_and_thread_counts_agree_exactly(ms, big, restore_threads, rng):
    """The fix for runs under load (issue: 2 threads 11-19x slower than 1 on a busy
    machine): OpenBLAS's own threads wait for each other inside every product, so
    the BLAS is kept single-threaded and mechscope shares the panels of a product
    among its own threads, which never wait for a thread that has not started (the
    forward benchmark prints the loaded case). Each panel is the same BLAS call
    whatever the thread count, so 1, 2 and 3 threads give identical values (where the
    BLAS's sums do not depend on the tile: BLAS_TILES_EXACT; else equal to rounding)."""
    import ctypes
    import scipy_openblas32
    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so"))
    _, model = big
    tokens = random_tokens(rng, 500, 8, 64)
    results = []
    for n in (1, 2, 3):
        ms.set_num_threads(n)
        assert lib.scipy_openblas_get_num_threads() == 1
        results.append(model.run(tokens, cache="blocks.1.hook_resid_post"))
    for r in results[1:]:
        assert_same_at_any_thread_count(r.logits, results[0].logits)
        assert_same_at_any_thread_count(r.cache["blocks.1.hook_resid_post"],
                                        results[0].cache["blocks.1.hook_resid_post"])


def test_gradients_do_not_depend_on_the_thread_count(ms, big, restore_threads, rng):
    """A gradient run's products are the same BLAS calls whatever the thread count,
    and its sums over rows (norm weights, biases) give each column to one thread,
    which adds the rows in order: 1 to 4 threads give identical gradients (with 2 or
    more a layer's input- and weight-gradient products share the threads, with odd and
    even counts cut differently), and the gradient norm clipping uses is the same too
    (where the BLAS's sums do not depend on the tile: BLAS_TILES_EXACT; else equal to
    rounding)."""
    from mechscope._runtime import _core
    _, model = big
    tokens = random_tokens(rng, 500, 8, 64)  # 512 tokens x 128: the passes are split over threads
    results = []
    for n in (1, 2, 3, 4):
        ms.set_num_threads(n)
        results.append(model.grad(tokens, "cross_entropy", sites=["blocks.0.hook_resid_pre"], weights=True,
                                  progress=False))
        norm = _core.sum_of_squares(list(results[-1].weights.values()))
        if n == 1:
            first_norm = norm
        assert_same_at_any_thread_count(norm, first_norm)
    for r in results[1:]:
        assert_same_at_any_thread_count(r.value, results[0].value)
        assert_same_at_any_thread_count(r.sites["blocks.0.hook_resid_pre"], results[0].sites["blocks.0.hook_resid_pre"])
        for name, g in results[0].weights.items():
            assert_same_at_any_thread_count(r.weights[name], g, err_msg=name)
    # the norm is the float64 sum of squares of every element
    want = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in results[0].weights.values())
    assert abs(first_norm - want) <= 1e-12 * want


def test_two_threads_pinned_to_one_core(tmp_path):
    """Two threads on one core (what a busy machine amounts to) give the one-thread
    values (to rounding where the BLAS's sums depend on the tile); the pinned child also
    runs concurrent Python threads."""
    script = ("import os, threading, numpy as np, mechscope as ms\n"
              "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
              "m = ms.Model.from_config(dict(n_layer=2, n_embd=128, n_head=4, vocab_size=300, n_positions=64))\n"
              "t = np.random.default_rng(0).integers(0, 300, (4, 64))\n"
              "ms.set_num_threads(1); want = m.run(t).logits\n"
              "ms.set_num_threads(2)\n"
              "got = [None] * 3\n"
              "def job(i): got[i] = [m.run(t).logits for _ in range(5)]\n"
              "ts = [threading.Thread(target=job, args=(i,)) for i in range(3)]\n"
              "[x.start() for x in ts]; [x.join() for x in ts]\n"
              "print(max(float(np.abs(g - want).max() / np.abs(want).max()) for r in got for g in r))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    worst = float(done.stdout.split()[-1])  # the largest difference, relative to the largest logit
    assert worst == 0.0 if BLAS_TILES_EXACT else worst <= 1e-5, worst


@pytest.mark.parametrize("family", ["gpt2", "gpt2_wide", "llama"])
def test_few_rows_products_match_hf_and_the_blas(ms, restore_threads, tmp_path, family):
    """Products of at most 16 rows (AVX-512) are dot products from the weight's rows
    when it is stored [out, in] (GPT-2's unembedding; every product of a Llama model),
    and combinations of its rows when it is stored [in, out] (GPT-2's layers); more
    rows, or MECHSCOPE_GENERIC_KERNELS=1, go to the BLAS. Odd widths (52 and 36
    inputs: a 4-wide tail after 16-wide steps, a block of 20 after one of 32; 151
    logits: not a multiple of 4 columns; 156 and 52 outputs: a last block of 28 or 20
    of 32 columns) at 1 to 40 rows: the same logits as HF and as the BLAS path, and
    bit-identical at 1 and 2 threads where the BLAS's sums do not depend on the tile
    (gpt2_wide: layers wide enough that 2 threads share each product's columns)."""
    import torch
    from test_architectures import make_hf
    if family == "gpt2":
        hf = make_hf_model(dict(n_embd=52, n_head=2, n_layer=2, vocab_size=151, n_positions=40), seed=13)
    elif family == "gpt2_wide":
        hf = make_hf_model(dict(n_embd=260, n_head=4, n_layer=1, vocab_size=151, n_positions=40), seed=13)
    else:
        hf = make_hf(None, seed=13, spec=("llama", dict(hidden_size=52, num_attention_heads=2, num_key_value_heads=1,
                                                        num_hidden_layers=2, intermediate_size=36, vocab_size=151,
                                                        max_position_embeddings=40, tie_word_embeddings=False)))
    folder = save_hf(hf, tmp_path / "m")
    model = ms.Model.from_pretrained(folder)
    rng = np.random.default_rng(3)
    shapes = [(1, 1), (1, 3), (2, 8), (1, 17), (2, 20)]  # 1, 3, 16, 17, 40 rows
    for i, shape in enumerate(shapes):
        np.save(tmp_path / f"tokens{i}.npy", random_tokens(rng, 151, *shape))
    script = ("import sys, numpy as np, mechscope as ms\n"
              "m = ms.Model.from_pretrained(sys.argv[1])\n"
              "for i in range(int(sys.argv[2])):\n"
              "    t = np.load(f'{sys.argv[3]}/tokens{i}.npy')\n"
              "    np.save(f'{sys.argv[3]}/blas{i}.npy', m.run(t).logits)\n")
    env = dict(os.environ, MECHSCOPE_GENERIC_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", script, folder, str(len(shapes)), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for i, shape in enumerate(shapes):
        tokens = np.load(tmp_path / f"tokens{i}.npy")
        runs = []
        for n in (1, 2):
            ms.set_num_threads(n)
            runs.append(model.run(tokens).logits)
        assert_same_at_any_thread_count(runs[0], runs[1])
        with torch.no_grad():
            want = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
        assert_close(runs[0], want, what=f"{shape} vs HF")
        assert_close(runs[0], np.load(tmp_path / f"blas{i}.npy"), atol=1e-5, what=f"{shape} vs the BLAS path")
