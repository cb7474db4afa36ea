"""Forward-pass benchmark: mechscope against HuggingFace transformers on GPT-2 small.

Both run the same random-weight GPT-2-small checkpoint (fp32) on the same tokens with
the same thread count. Prints, per input shape, the median times, the speedups
(HF time / mechscope time) and mechscope's matmul FLOP rate against the sgemm peak of
the BLAS it runs on; the memory cost of loading the checkpoint; and small runs with 1
and N threads while busy processes compete for every core (a shared machine).

    python -m mechscope.bench forward [--threads N] [--shapes 1x16,1x128,8x128,1x1024]
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
    args = parser.parse_args(argv)
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


def main(argv=()):
    args = parse_args(list(argv))
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
