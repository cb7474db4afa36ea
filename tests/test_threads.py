"""Thread safety and thread-count independence."""
import threading

import numpy as np
import pytest

from conftest import assert_close, hf_run, make_hf_model, random_tokens, save_hf

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
    import subprocess
    import sys
    hf = make_hf_model(dict(n_embd=64, n_head=2, n_layer=2, vocab_size=90, n_positions=80), seed=12)
    folder = save_hf(hf, tmp_path / "m")
    tokens = np.random.default_rng(2).integers(0, 90, (3, 70))
    np.save(tmp_path / "tokens.npy", tokens)
    script = ("import sys, numpy as np, mechscope as ms\n"
              "m = ms.Model.from_pretrained(sys.argv[1])\n"
              "np.save(sys.argv[2], m.run(np.load(sys.argv[3]), logits='all').logits)\n"
              "ms.show_config()\n")
    env = dict(__import__("os").environ, MECHSCOPE_GENERIC_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", script, folder, str(tmp_path / "out.npy"), str(tmp_path / "tokens.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generic attention kernels" in done.stdout
    assert_close(np.load(tmp_path / "out.npy"), hf_run(hf, tokens)["logits"])
