"""Extraction benchmark: mechscope.extract against the loops people write today.

On a random-weight GPT-2-small checkpoint, same prompts, same batch, same threads:

1. extract's tokens/s against a plain loop of model.run over the same batches (the
   last block's residual stream requested): the cost of extract's bookkeeping, goal
   >= 0.9x; and against model.run with logits="last" (what a run costs with its
   unembedding);
2. the early exit: only block L of N requested, the speedup over requesting block N
   (expected close to N / L);
3. against TransformerLens's run_with_cache with names_filter in a Python loop over
   the batches (no weight processing; goal >= 3x);
4. prompts of mixed lengths: batches sorted by length (bucketing) against input order;
5. peak resident memory of extracting 1,000 and 20,000 prompts to a folder (the demo
   model, every position, a generator as input; each in a fresh process): flat.

    python -m mechscope.bench extract [--threads N] [--prompts 32] [--length 64] [--batch 8]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import mechscope as ms

from . import common


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per timed pass (default 32)")
    parser.add_argument("--length", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[1000, 20000],
                        help="dataset sizes whose peak memory is measured (default 1000 20000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of part 1 (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run_loop(model, tokens, batch, site, logits=None):
    """What a user writes with model.run: one call per batch, the site's last position kept."""
    out = []
    for a in range(0, len(tokens), batch):
        r = model.run(tokens[a:a + batch], cache=site, logits=logits)
        out.append(r.cache[site][:, -1])
    return np.concatenate(out)


def interleaved_rounds(fns, rounds):
    """Seconds of every call, {name: [rounds]}: one warm-up call each, then rounds in
    which each function runs once in turn (a busy spell of the machine falls on all)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def tl_loop(tl, tokens, batch, site):
    """What a TransformerLens user writes: run_with_cache with a names_filter per batch."""
    import torch

    out = []
    with torch.inference_mode():
        for a in range(0, len(tokens), batch):
            _, cache = tl.run_with_cache(torch.as_tensor(tokens[a:a + batch]), names_filter=lambda n: n == site)
            out.append(cache[site][:, -1].numpy())
    return np.concatenate(out)


# Extracts n prompts of the demo model (every position, two sites) from a generator to
# a folder, in a fresh process; prints the peak resident memory (VmHWM) and the time.
_MEMORY_PROBE = r"""
import json, sys, time
import numpy as np
import mechscope as ms

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

n, folder = int(sys.argv[1]), sys.argv[2]
model = ms.Model.from_pretrained(ms.demo.DEMO_DIR)
def prompts():
    rng = np.random.default_rng(0)
    for i in range(n):
        yield rng.integers(2, model.d_vocab, 15)
before = status_kib("VmHWM")
start = time.perf_counter()
acts = ms.extract(model, prompts(), ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"], positions="all",
                  batch_size=64, out=folder, progress=False)
seconds = time.perf_counter() - start
size = sum(np.asarray(acts[s]).nbytes for s in acts)
print(json.dumps({"before": before * 1024, "peak": status_kib("VmHWM") * 1024, "seconds": seconds,
                  "rows": len(acts.index), "bytes": size}))
"""


def measure_memory(n, folder):
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), folder], check=True,
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=()):
    args = parse_args(list(argv))
    os.environ["TQDM_DISABLE"] = "1"
    from importlib.metadata import version

    import torch

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    P, T, B = args.prompts, args.length, args.batch
    common.print_header("extract", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformer_lens {version('transformer_lens')}",
        f"model: GPT-2 small shape {common.GPT2_SMALL}, random weights (seed {args.seed}), fp32",
        f"data: {P} prompts x {T} tokens, batches of {B}; the last position of each prompt is kept",
    ])
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
        common.save_random_gpt2(folder, args.seed)
        model = ms.Model.from_pretrained(folder)
        from .patch import tl_from_hf

        tl = tl_from_hf(folder)
        N = model.n_layers
        tokens = rng.integers(0, model.d_vocab, (P, T))
        prompts = list(tokens)
        last = f"blocks.{N - 1}.hook_resid_post"
        n_tok = P * T

        def ex(site, data=prompts, **kw):
            return lambda: ms.extract(model, data, site, batch_size=B, progress=False, **kw)

        # the values first: all of them are the same numbers
        ref = run_loop(model, tokens, B, last)
        diff_ex = float(np.abs(np.asarray(ex(last)()[last]) - ref).max())
        diff_tl = float(np.abs(tl_loop(tl, tokens, B, last) - ref).max())

        print("1. extraction against a loop of model.run over the same batches (last block requested)")
        fns = {"extract": ex(last), "run": lambda: run_loop(model, tokens, B, last),
               "run_logits": lambda: run_loop(model, tokens, B, last, logits="last")}
        rounds = interleaved_rounds(fns, args.rounds)
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        best = {k: float(np.min(v)) for k, v in rounds.items()}
        print(f"  {'':<34} {'tokens/s (median)':>17} {'extract/it':>10}   {'(best round)':>12} {'extract/it':>10}")
        for k, label in (("extract", "ms.extract"), ("run", "model.run loop, cache only"),
                         ("run_logits", "model.run loop, + logits='last'")):
            print(f"  {label:<34} {n_tok / med[k]:17.0f} {med[k] / med['extract']:10.3f}x  "
                  f"{n_tok / best[k]:12.0f} {best[k] / best['extract']:10.3f}x")
        print(f"  goal: extract >= 0.9x model.run; {args.rounds} interleaved rounds; "
              f"max |extract - run| = {diff_ex:.2e}")
        print()

        print(f"2. early exit: only block L of {N} requested (blocks.L-1.hook_resid_post), against block {N}")
        fns = {L: ex(f"blocks.{L - 1}.hook_resid_post") for L in (1, 3, 6, N)}
        times_l, _ = common.time_interleaved(fns, budget_s=15.0, min_rounds=3, max_rounds=7)
        for L in (1, 3, 6, N):
            print(f"  L = {L:2d}: {n_tok / times_l[L]:8.0f} tokens/s   speedup {times_l[N] / times_l[L]:5.2f}x "
                  f"(N/L = {N / L:5.2f})")
        print()

        print("3. against TransformerLens run_with_cache(names_filter=...) in a loop over the batches")
        times_tl, reps_tl = common.time_interleaved({"extract": ex(last), "tl": lambda: tl_loop(tl, tokens, B, last)},
                                                    budget_s=20.0, min_rounds=3, max_rounds=5)
        for L in (N, 3):
            site = f"blocks.{L - 1}.hook_resid_post"
            if L != N:
                times_tl = common.time_interleaved({"extract": ex(site), "tl": lambda: tl_loop(tl, tokens, B, site)},
                                                   budget_s=15.0, min_rounds=3, max_rounds=5)[0]
            print(f"  {site:<26} ms.extract {n_tok / times_tl['extract']:7.0f} tokens/s, TransformerLens "
                  f"{n_tok / times_tl['tl']:7.0f} tokens/s: {times_tl['tl'] / times_tl['extract']:5.2f}x (goal >= 3x)")
        print(f"  (max |extract - TransformerLens| at {last}: {diff_tl:.2e})")
        print()

        print("4. prompts of mixed lengths (8 .. 2 x the length above): batches by length vs in input order")
        lengths = rng.integers(8, 2 * T + 1, P)
        mixed = [rng.integers(0, model.d_vocab, n) for n in lengths]
        times_b, _ = common.time_interleaved({"bucket": ex(last, mixed, bucket=True),
                                              "input order": ex(last, mixed, bucket=False)},
                                             budget_s=15.0, min_rounds=3, max_rounds=5)
        real = int(lengths.sum())
        for k in ("bucket", "input order"):
            print(f"  {k:<12} {real / times_b[k]:8.0f} real tokens/s")
        print(f"  bucketing speedup: {times_b['input order'] / times_b['bucket']:.2f}x")
        print()

    print("5. peak resident memory, extracting to a folder from a generator (demo model, every position "
          "of 15-token prompts, two sites; fresh process each)")
    mib = 2.0 ** 20
    for n in args.memory_sizes:
        with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
            m = measure_memory(n, folder)
        print(f"  {n:6d} prompts: {m['rows']:7d} rows, output {m['bytes'] / mib:7.1f} MiB on disk, "
              f"peak RSS {m['peak'] / mib:6.1f} MiB (before the extraction {m['before'] / mib:6.1f} MiB), "
              f"{m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
