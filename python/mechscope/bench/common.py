"""Helpers shared by the benchmarks: the header, timing, the machine's sgemm and FMA peaks,
the GPT-2 FLOP count and the memory cost of loading a checkpoint."""
import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import scipy_openblas32

import mechscope as ms
from mechscope import _core, _runtime


def default_threads():
    """All cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def print_header(title, extra_lines=()):
    """What a reader needs to judge the figures: when, which BLAS and kernels, threads."""
    print(f"== mechscope benchmark: {title}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    ms.show_config()
    for line in extra_lines:
        print(line)
    print()


def time_median(fn, budget_s=2.0, min_repeats=3, max_repeats=25):
    """Median wall time of ``fn()`` in seconds, and the list of timings.

    One warm-up call first (first-touch page faults, BLAS buffers, lazy init), and its
    time sets the number of repeats: as many as fit in ``budget_s``, so small shapes
    get many repeats (their timings are noisy) and big ones few (they are steady and
    slow)."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_interleaved(fns, budget_s=6.0, min_rounds=3, max_rounds=25, warmups=1):
    """Median wall time in seconds of each of ``fns`` ({name: fn}), and the number of
    timed calls each. ``warmups`` (at least 1) untimed calls each (the last sets the
    number of rounds), then rounds in which every function runs once in turn, so that a slow
    spell of the machine falls on all of them alike."""
    for _ in range(max(1, warmups)):
        warm = 0.0
        for fn in fns.values():
            start = time.perf_counter()
            fn()
            warm += time.perf_counter() - start
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(warm, 1e-9))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, {name: len(t) for name, t in times.items()}


# ---------------------------------------------------------------- the model

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def save_random_gpt2(folder, seed, config=GPT2_SMALL):
    """Write a GPT-2-small-sized checkpoint with random (HF-initialised) weights.

    Random weights cost the same to run as trained ones and need no download."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config))
    model.save_pretrained(folder)  # config.json + model.safetensors (tied unembedding stored once)


# ---------------------------------------------------------------- sgemm peak

_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111


def _openblas():
    """The very OpenBLAS library mechscope's core is linked to (the scipy-openblas32
    wheel), so the peak is that of the BLAS mechscope runs on, with its thread setting."""
    path = os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so")
    lib = ctypes.CDLL(path)
    # scipy-openblas32 prefixes every symbol with "scipy_"
    sgemm = lib.scipy_cblas_sgemm
    sgemm.restype = None
    sgemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    get_threads = lib.scipy_openblas_get_num_threads
    get_threads.restype = ctypes.c_int
    return sgemm, get_threads


def _openblas_set_threads():
    path = os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so")
    fn = ctypes.CDLL(path).scipy_openblas_set_num_threads
    fn.restype, fn.argtypes = None, [ctypes.c_int]
    return fn


def sgemm_gflops(m, k, n, repeats=3):
    """Best GFLOP/s of C[m,n] = A[m,k] @ B[k,n] in float32, row-major, over ``repeats``
    timed calls after one warm-up. Best, not median: the peak is what the hardware
    and BLAS can do, and the slower calls only add noise from the rest of the machine."""
    sgemm, _ = _openblas()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)

    def call():
        sgemm(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k, 1.0,
              a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)

    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best / 1e9


def measure_sgemm_peak(shapes=((2048, 768, 3072), (4096, 4096, 4096))):
    """Print sgemm GFLOP/s on large shapes and return the best: the peak that FLOP
    rates are compared with, with OpenBLAS's own threads (as many as
    ms.get_num_threads()). mechscope itself calls the BLAS single-threaded and
    shares the panels of a product among its own threads; the BLAS is set back to
    one thread afterwards."""
    _, get_threads = _openblas()
    set_threads = _openblas_set_threads()
    set_threads(ms.get_num_threads())
    try:
        print(f"sgemm peak (scipy_cblas_sgemm of the BLAS above, {get_threads()} threads, best of 3):")
        rates = []
        for m, k, n in shapes:
            rate = sgemm_gflops(m, k, n)
            rates.append(rate)
            print(f"  M={m:5d} K={k:5d} N={n:5d}: {rate:7.1f} GFLOP/s")
    finally:
        set_threads(1)
    peak = max(rates)
    print(f"  peak: {peak:.1f} GFLOP/s")
    print()
    return peak


def measure_fma_peak(sgemm_peak):
    """Print and return the multiply-add peak: GFLOP/s of fused multiply-adds on
    registers alone (no memory), on ms.get_num_threads() threads, measured by the core
    (best of 5 runs of at least 50 ms), and how much of it sgemm reaches (sgemm_peak,
    GFLOP/s). No product, sgemm's included, can run faster."""
    gflops, instructions = _core.fma_peak()
    print(f"FMA peak ({instructions}, {ms.get_num_threads()} threads, registers only, best of 5): "
          f"{gflops:.1f} GFLOP/s")
    print(f"  the sgemm peak is {100 * sgemm_peak / gflops:.0f}% of it")
    if _runtime._blas_coretype_env:
        print(f"  (OpenBLAS runs the kernels OPENBLAS_CORETYPE={_runtime._blas_coretype_env} names, not its own "
              "choice for this CPU: the header names both)")
    print()
    return gflops


def measure_copy_rate(mib=256, repeats=5):
    """Print and return the machine's memory copy rate in GB/s (bytes read + written):
    one thread copying a float32 array of ``mib`` MiB, far larger than the caches, with
    NumPy; best and median of ``repeats`` copies after one warm-up, so that a run's
    timings can be read beside the memory speed of the moment."""
    src = np.ones(mib * 2**18, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    best, median = max(rates), statistics.median(rates)
    print(f"memory copy rate (NumPy, 1 thread, {mib} MiB, read + written): best {best:.1f} GB/s, "
          f"median {median:.1f} GB/s of {repeats}")
    print()
    return best


# ---------------------------------------------------------------- FLOP count

GPT2_FLOP_FORMULA = (
    "matmul FLOPs per forward = tokens * n_layer * (2*(4*d*d + 2*d*d_mlp) + 2*2*pos*d)"
    " + logit_rows * 2*d*vocab\n"
    "  (tokens = batch*pos; the attention term counts the full pos x pos square of QK^T and"
    " pattern@V, masked half included;\n"
    "   logit_rows = batch*pos for logits='all', batch for 'last'; layer norms, softmax,"
    " GELU and biases not counted)")


def gpt2_flops(cfg, batch, pos, logit_rows):
    """Matmul FLOPs of one GPT-2 forward pass, by GPT2_FLOP_FORMULA."""
    d, vocab = cfg["n_embd"], cfg["vocab_size"]
    d_mlp = cfg.get("n_inner") or 4 * d
    per_token_layer = 2 * (4 * d * d + 2 * d * d_mlp) + 2 * 2 * pos * d
    return batch * pos * cfg["n_layer"] * per_token_layer + logit_rows * 2 * d * vocab


# ---------------------------------------------------------------- load memory

# Runs in a fresh interpreter so that nothing but mechscope and NumPy has been loaded.
# VmHWM is the peak resident memory of this process's address space, which starts
# afresh at exec (unlike ru_maxrss, which Linux carries over from the parent), so
# its rise during the load is the load's peak cost, temporaries included.
_LOAD_PROBE = r"""
import json, sys
import mechscope as ms

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

peak0, rss0 = status_kib("VmHWM"), status_kib("VmRSS")
model = ms.Model.from_pretrained(sys.argv[1])
peak1, rss1 = status_kib("VmHWM"), status_kib("VmRSS")
print(json.dumps({"peak_before": peak0 * 1024, "peak_after": peak1 * 1024,
                  "rss_before": rss0 * 1024, "rss_after": rss1 * 1024}))
"""


def measure_load_memory(folder):
    """Peak and resident memory (bytes) before and after ms.Model.from_pretrained(folder),
    measured in a fresh subprocess."""
    result = subprocess.run([sys.executable, "-c", _LOAD_PROBE, folder],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_load_memory(folder, target=1.3):
    """Print the memory cost of loading ``folder`` as a multiple of its weights file."""
    weights = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(weights)
    mem = measure_load_memory(folder)
    peak = mem["peak_after"] - mem["peak_before"]
    resident = mem["rss_after"] - mem["rss_before"]
    mib = 2.0 ** 20
    print("memory of ms.Model.from_pretrained (fresh process, VmHWM and VmRSS):")
    print(f"  model.safetensors:      {size / mib:8.1f} MiB")
    print(f"  peak RSS before/after:  {mem['peak_before'] / mib:8.1f} / {mem['peak_after'] / mib:.1f} MiB")
    print(f"  peak RSS increase:      {peak / mib:8.1f} MiB = {peak / size:.3f} x file size"
          f" (target <= {target} x)")
    print(f"  resident RSS increase:  {resident / mib:8.1f} MiB = {resident / size:.3f} x file size")
    print()
    return mem


# ---------------------------------------------------------------- a loaded machine

_BUSY = "while True: pass"


def time_under_load(fn, n_busy, threads, repeats=15):
    """Median time (s) of fn() with mechscope on each of ``threads`` while ``n_busy``
    other processes keep the cores busy (as on a shared machine). {threads: time}."""
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(n_busy)]
    saved = ms.get_num_threads()
    try:
        time.sleep(0.5)  # let them take the cores
        out = {}
        for n in threads:
            ms.set_num_threads(n)
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[n] = statistics.median(times)
        return out
    finally:
        ms.set_num_threads(saved)
        for p in busy:
            p.kill()
            p.wait()


def print_loaded(model, threads, shapes=((1, 16), (1, 128))):
    """Small runs with 1 thread and with ``threads`` while as many busy processes as
    cores compete for the machine: more threads must not make them slower by more
    than the competition itself does."""
    cores = default_threads()
    rng = np.random.default_rng(0)
    print(f"under load ({cores} busy processes on {cores} cores), logits='last', median of 15:")
    for batch, pos in shapes:
        tokens = rng.integers(0, model.d_vocab, (batch, pos))
        t = time_under_load(lambda: model.run(tokens, logits="last"), cores, sorted({1, threads}))
        line = f"  {batch} x {pos}: " + ", ".join(f"{n} thread{'s' * (n > 1)} {t[n] * 1e3:.1f} ms" for n in sorted(t))
        if threads > 1:
            line += f"  ({threads} threads / 1 thread = {t[threads] / t[1]:.2f}x)"
        print(line)
    print()
