"""Mediation benchmark: natural indirect and direct effects of every MLP neuron of one
middle layer, mechscope's sweeps against TransformerLens hooks.

Both run the same random-weight GPT-2-small checkpoint (TransformerLens with no weight
processing), 32 prompt pairs of 16 tokens that differ at two positions, the mediator
each neuron of blocks.6.mlp.hook_post at the last position, the outcome the logit
difference of two answers per pair at the last position. For each neuron:
NIE needs y(control, neuron from treated), NDE y(treated, neuron from control).

mechscope: ms.mediation.natural_effects, two sweeps (one per direction) over all
3,072 neurons, in a fresh process that also reports its peak memory; a second fresh
process does the same for 384 neurons, to show that memory does not grow with the
unit count. TransformerLens: one forward pass of the 32 prompts per neuron and
direction with a hook writing the neuron's value (the usual way), timed on a random
subset of neurons and scaled to all of them; the output says so and checks that
both give the same effects on that subset.

    python -m mechscope.bench mediation [--threads N] [--tl-neurons 8]
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

PAIRS, TOKENS, LAYER = 32, 16, 6


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench mediation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--tl-neurons", type=int, default=8,
                        help="neurons TransformerLens is timed on (default 8)")
    parser.add_argument("--memory-units", type=int, nargs="+", default=[384, 3072],
                        help="unit counts of the fresh-process runs (the largest is the timed one)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_pairs(seed, vocab):
    """Treated prompts, controls differing at two positions, and two answers per pair."""
    rng = np.random.default_rng(seed)
    treated = rng.integers(0, vocab, (PAIRS, TOKENS))
    control = treated.copy()
    control[:, [4, 9]] = (treated[:, [4, 9]] + 1 + rng.integers(0, vocab - 1, (PAIRS, 2))) % vocab
    return treated, control, rng.integers(0, vocab, PAIRS), rng.integers(0, vocab, PAIRS)


# Runs natural_effects over the first n neurons in a fresh process: its wall time and
# its peak memory over the state before (model loaded, prompts made). VmHWM is the
# high-water mark of this process's resident memory (it starts afresh at exec).
_PROBE = r"""
import json, sys, time
import numpy as np
import mechscope as ms
from mechscope.bench.mediation import make_pairs, LAYER, TOKENS
folder, n, threads, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ms.set_num_threads(threads)
model = ms.Model.from_pretrained(folder)
treated, control, correct, wrong = make_pairs(seed, model.d_vocab)
metric = ms.metrics.LogitDiff(correct, wrong)
units = ms.mediation.neurons(model, LAYER, pos=TOKENS - 1)[:n]
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
before = peak()
start = time.perf_counter()
eff = ms.mediation.natural_effects(model, treated, control, units, metric, progress=False)
seconds = time.perf_counter() - start
after = peak()
print(json.dumps({"seconds": seconds, "before": before, "after": after, "units": len(units),
                  "result_bytes": int(eff.y_control_treated_unit.nbytes * 2)}))
"""


def tl_effects(tl, treated, control, correct, wrong, neurons):
    """NIE and NDE of the given neurons with TransformerLens hooks, one forward pass of
    the batch per neuron and direction. -> (nie [k, pairs], nde [k, pairs], seconds of
    the two cached runs, seconds of the per-neuron runs)."""
    import torch

    name = f"blocks.{LAYER}.mlp.hook_post"
    rows = torch.arange(PAIRS)
    t, c = torch.as_tensor(treated), torch.as_tensor(control)

    def metric(logits):
        return (logits[rows, -1, correct] - logits[rows, -1, wrong]).numpy().astype(np.float64)

    start = time.perf_counter()
    with torch.inference_mode():
        logits_t, cache_t = tl.run_with_cache(t, names_filter=name)
        logits_c, cache_c = tl.run_with_cache(c, names_filter=name)
        y_t, y_c = metric(logits_t), metric(logits_c)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        nie, nde = [], []
        for i in neurons:
            for tokens, source, out in ((c, cache_t[name], nie), (t, cache_c[name], nde)):
                def hook(act, hook, i=i, source=source):
                    act[:, -1, i] = source[:, -1, i]
                    return act
                out.append(metric(tl.run_with_hooks(tokens, fwd_hooks=[(name, hook)])) - y_c)
    return np.array(nie), np.array(nde), setup, time.perf_counter() - start


def main(argv=()):
    args = parse_args(list(argv))
    os.environ["TQDM_DISABLE"] = "1"
    started = time.perf_counter()
    from importlib.metadata import version

    import torch

    from .patch import tl_from_hf

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    common.print_header("mediation", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformer_lens {version('transformer_lens')}",
        f"model: GPT-2 small shape {common.GPT2_SMALL}, random weights (seed {args.seed}), fp32",
        f"{PAIRS} prompt pairs x {TOKENS} tokens (differing at 2 positions); mediators: every neuron of "
        f"blocks.{LAYER}.mlp.hook_post at the last position; outcome: logit difference at the last position",
        f"load average at start: {os.getloadavg()[0]:.2f} (other work on the machine slows both sides)",
    ])
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
        common.save_random_gpt2(folder, args.seed)
        model = ms.Model.from_pretrained(folder)
        tl = tl_from_hf(folder)
        treated, control, correct, wrong = make_pairs(args.seed, model.d_vocab)
        n_units = model.d_mlp
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(n_units, size=min(args.tl_neurons, n_units), replace=False))

        # TransformerLens on a subset, and mechscope on the same neurons for the values
        tl_nie, tl_nde, tl_setup, tl_seconds = tl_effects(tl, treated, control, correct, wrong, pick)
        units = [ms.mediation.neurons(model, LAYER, pos=TOKENS - 1)[i] for i in pick]
        eff = ms.mediation.natural_effects(model, treated, control, units, ms.metrics.LogitDiff(correct, wrong),
                                           progress=False)
        diff = max(np.abs(eff.nie - tl_nie).max(), np.abs(eff.nde - tl_nde).max())
        scale = max(np.abs(tl_nie).max(), np.abs(tl_nde).max())
        tl_total = tl_setup + tl_seconds / len(pick) * n_units

        # mechscope on every neuron (and fewer), each in a fresh process
        runs = []
        for n in sorted(args.memory_units):
            probe = subprocess.run([sys.executable, "-c", _PROBE, folder, str(n), str(args.threads), str(args.seed)],
                                   check=True, capture_output=True, text=True)
            runs.append(json.loads(probe.stdout.strip().splitlines()[-1]))
        full = runs[-1]
        ms_total = full["seconds"] / full["units"] * n_units

        print(f"TransformerLens: {tl_seconds:.1f} s for {len(pick)} random neurons x 2 directions "
              f"({tl_seconds / len(pick):.2f} s per neuron) + {tl_setup:.1f} s for the two cached runs; "
              f"scaled to {n_units} neurons: {tl_total:.0f} s")
        print(f"mechscope:       {full['seconds']:.1f} s for {full['units']} neurons x 2 directions"
              + ("" if full["units"] == n_units else f", scaled to {n_units}: {ms_total:.0f} s"))
        print(f"speedup:         {tl_total / ms_total:.1f}x  (NIE and NDE of all {n_units} neurons)")
        print(f"agreement:       max |mechscope - TransformerLens| over the {len(pick)} neurons' NIE and NDE "
              f"of every pair: {diff:.2e} (largest effect {scale:.2e})")
        print()
        print("peak memory of natural_effects (fresh process each; over the state before the call):")
        mib = 2.0 ** 20
        for r in runs:
            print(f"  {r['units']:>5} neurons: peak RSS +{(r['after'] - r['before']) / mib:7.1f} MiB, "
                  f"{r['seconds']:6.1f} s (per-example results {r['result_bytes'] / mib:.2f} MiB)")
    print()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    return 0
