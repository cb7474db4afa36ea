"""Patching benchmark: mechscope's sweeps against TransformerLens's patching functions.

Both run the same random-weight GPT-2-small checkpoint (TransformerLens with no weight
processing) on the same clean and corrupted prompts, with the same thread count and
the same metric (the logit difference at the last position, averaged over the batch).
TransformerLens runs one forward pass of the whole batch per patch, so it is timed on
a random subset of its patches and its time scaled by the patch count; the output
says so, and checks that both give the same values on that subset.

Two corruptions are measured: the corrupted prompts differ from the clean ones at two
positions (as in indirect-object or factual-recall datasets), and at every position
(no patch can be skipped: the worst case for mechscope). Then the peak memory of each
sweep, each in a fresh process.

    python -m mechscope.bench patch [--threads N] [--tl-patches 24]
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

# (mechscope function, TransformerLens activation name, patch setter, index axes, prompt length)
SWEEPS = [
    ("resid_pre", "resid_pre", "layer_pos_patch_setter", ("layer", "pos"), 20),
    ("attn_head_out_by_pos", "z", "layer_pos_head_vector_patch_setter", ("layer", "pos", "head"), 20),
    ("attn_head_pattern_dest_src_pos", "pattern", "layer_head_dest_src_pos_pattern_patch_setter",
     ("layer", "head_index", "dest_pos", "src_pos"), 10),
]
BATCH = 8


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench patch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--tl-patches", type=int, default=24,
                        help="patches TransformerLens is timed on, per sweep (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tl_from_hf(folder, cls=None):
    """HookedTransformer (or its subclass `cls`) with the checkpoint's exact weights and
    no processing."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", dtype=torch.float32, device="cpu")
    tl = (cls or HookedTransformer)(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval()


def make_prompts(rng, vocab, length, changed):
    """Clean prompts and corrupted ones differing at `changed` positions (all if None)."""
    clean = rng.integers(0, vocab, (BATCH, length))
    corrupted = clean.copy()
    where = np.arange(length) if changed is None else np.array([length // 2 - 2, length // 2 + 1][:changed])
    corrupted[:, where] = (clean[:, where] + 1 + rng.integers(0, vocab - 1, (BATCH, where.size))) % vocab
    return clean, corrupted


def time_tl(tl, tl_cache, corrupted, answers, name, act, setter, axes, n_sub, rng):
    """Seconds per patch of TransformerLens's generic_activation_patch, on n_sub random
    patches of the full grid; and (indices, values) of those patches."""
    import pandas as pd
    import torch
    from transformer_lens import patching as tl_patching

    correct, wrong = answers
    rows = torch.arange(BATCH)

    def metric(logits):
        return (logits[rows, -1, correct] - logits[rows, -1, wrong]).mean()

    sizes = {"layer": tl.cfg.n_layers, "pos": corrupted.shape[1], "head": tl.cfg.n_heads,
             "head_index": tl.cfg.n_heads, "dest_pos": corrupted.shape[1], "src_pos": corrupted.shape[1]}
    grid = np.array(list(np.ndindex(*[sizes[a] for a in axes])))
    pick = grid[rng.choice(len(grid), size=min(n_sub, len(grid)), replace=False)]
    index_df = pd.DataFrame(pick, columns=list(axes))
    tokens = torch.as_tensor(corrupted)
    start = time.perf_counter()
    with torch.inference_mode():
        values = tl_patching.generic_activation_patch(
            tl, tokens, tl_cache, metric, getattr(tl_patching, setter), act, index_df=index_df).numpy()
    return (time.perf_counter() - start) / len(pick), len(grid), pick, values


# Runs one sweep in a fresh process and prints its peak memory over the state
# before the sweep (model loaded, clean cache made): VmHWM is the high-water mark of
# resident memory of this process (it starts afresh at exec).
_MEMORY_PROBE = r"""
import json, sys
import numpy as np
import mechscope as ms
folder, name, length, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ms.set_num_threads(threads)
model = ms.Model.from_pretrained(folder)
rng = np.random.default_rng(0)
clean = rng.integers(0, model.d_vocab, (8, length))
corrupted = (clean + 1) % model.d_vocab
cache = model.run(clean, cache=model.site_names, logits=None).cache
metric = ms.metrics.LogitDiff(np.arange(8), np.arange(8) + 8)
metric.evaluate(model, corrupted)
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
before = peak()
out = getattr(ms.patching, name)(model, corrupted, cache, metric, progress=False)
after = peak()
print(json.dumps({"before": before, "after": after, "patches": int(out.size),
                  "cache": int(sum(v.nbytes for v in cache.values()))}))
"""


def main(argv=()):
    args = parse_args(list(argv))
    # TransformerLens's own progress bars would drown the table
    os.environ["TQDM_DISABLE"] = "1"
    started = time.perf_counter()
    from importlib.metadata import version

    import torch

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    common.print_header("patch", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformer_lens {version('transformer_lens')}",
        f"model: GPT-2 small shape {common.GPT2_SMALL}, random weights (seed {args.seed}), fp32; "
        f"batch of {BATCH} prompts",
        "metric: logit difference at the last position, batch mean (mechscope: in C; TransformerLens: torch)",
    ])
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
        common.save_random_gpt2(folder, args.seed)
        model = ms.Model.from_pretrained(folder)
        tl = tl_from_hf(folder)
        answers = (rng.integers(0, model.d_vocab, BATCH), rng.integers(0, model.d_vocab, BATCH))
        metric = ms.metrics.LogitDiff(*answers)
        header = (f"{'sweep':<31} {'prompts':>7} {'corrupted':>9} {'patches':>7} | {'TL s/patch':>10} "
                  f"{'TL total s':>10} | {'ms total s':>10} | {'speedup':>7} | {'max|diff|':>9}")
        print(header)
        print("-" * len(header))
        for name, act, setter, axes, length in SWEEPS:
            for changed in (2, None):
                clean, corrupted = make_prompts(rng, model.d_vocab, length, changed)
                ms_cache = model.run(clean, cache=model.site_names, logits=None).cache
                with torch.inference_mode():
                    _, tl_cache = tl.run_with_cache(torch.as_tensor(clean))
                tl_per_patch, n_patches, pick, tl_values = time_tl(
                    tl, tl_cache, corrupted, answers, name, act, setter, axes, args.tl_patches, rng)
                fn = getattr(ms.patching, name)
                seconds, _ = common.time_median(lambda: fn(model, corrupted, ms_cache, metric, progress=False),
                                                budget_s=2.0, min_repeats=1, max_repeats=3)
                ours = fn(model, corrupted, ms_cache, metric, progress=False)
                diff = float(np.abs(ours[tuple(pick.T)] - tl_values).max())
                tl_total = tl_per_patch * n_patches
                print(f"{name:<31} {f'{BATCH}x{length}':>7} {'2 pos' if changed else 'all pos':>9} {n_patches:>7} | "
                      f"{tl_per_patch:>10.4f} {tl_total:>10.1f} | {seconds:>10.3f} | "
                      f"{tl_total / seconds:>6.1f}x | {diff:>9.2e}")
        print()
        print(f"TransformerLens is timed on {args.tl_patches} random patches of each sweep; "
              "'TL total s' = seconds per patch x patches.")
        print("max|diff| compares the two on those patches.")
        print()
        print("peak memory of one sweep (fresh process each; over the state before the sweep):")
        for name, _, _, _, length in SWEEPS:
            probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, folder, name, str(length), str(args.threads)],
                                   check=True, capture_output=True, text=True)
            m = json.loads(probe.stdout.strip().splitlines()[-1])
            mib = 2.0 ** 20
            print(f"  {name:<31} {m['patches']:>6} patches: peak RSS +{(m['after'] - m['before']) / mib:7.1f} MiB "
                  f"(clean cache {m['cache'] / mib:.1f} MiB, result {m['patches'] * 4 / 1024:.1f} KiB)")
    print()
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    return 0
