"""Training-step benchmark: mechscope against PyTorch on a GPT-2-small-sized model, or on
the small models mechanisms are studied in (the demo model's size, the addition study's).

One training step = forward + backward of the mean next-token cross-entropy on a
(batch, pos) block of tokens, global-norm gradient clipping, and an AdamW update of
every weight. mechscope: ms.Model.grad(weights=True) in C, then the gradient norm and
one C pass of clipped AdamW, as ms.train.fit does it. PyTorch: HF GPT2LMHeadModel in train mode without
dropout, loss.backward(), clip_grad_norm_, torch.optim.AdamW (its default foreach
implementation), with HF's eager attention (the plain matmul + softmax mechscope
computes) and with its default SDPA attention; also, for reference, SDPA under bf16
autocast (mixed precision: bf16 products, not the same numbers, so it is timed but not
compared for agreement, and it is not what the fp32 ratios mean). Same random weights,
tokens and thread count; the fp32 timings are interleaved (each round runs every fp32
contender once, at least 5 rounds) so a slow spell of a shared machine falls on all
alike, and the bf16 reference, several times slower, is timed after them (twice) so that
it does not take the rounds' budget (and only on a CPU with bf16 instructions); the first losses are compared so that the times
compare like with like.

Small models spend little of a step in matrix products: there a step is bound by the
work around them (attention, norms, the optimizer) and by per-operation overhead, so the
ratio to PyTorch says more about those than about the products.

    python -m mechscope.bench train [--threads N] [--size gpt2-small|demo|addition] [--shape 8x128]
"""
import argparse
import resource
import statistics
import tempfile
import time

import numpy as np

import mechscope as ms
from mechscope import _runtime, train

from . import common

# name: (GPT-2 configuration, default BATCHxPOS, what it is)
SIZES = {
    "gpt2-small": (common.GPT2_SMALL, "8x128", "GPT-2 small size"),
    # ms.demo's model: 4 layers of width 128, its 118-token vocabulary, trained at 64 x 32
    "demo": (dict(n_layer=4, n_embd=128, n_head=4, vocab_size=118, n_positions=32), "64x32",
             "the demo model's size"),
    # scripts/addition_study.py's "medium": digits, '+', '=' and two specials; 64 x 16
    "addition": (dict(n_layer=3, n_embd=128, n_head=4, vocab_size=14, n_positions=20), "64x16",
                 "the addition study's medium size"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-small",
                        help="the model's size (default gpt2-small)")
    parser.add_argument("--shape", default=None,
                        help="BATCHxPOS of one step (default: the size's, 8x128 for gpt2-small)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed fp32 rounds (default 60; at least 5 rounds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc's malloc to serve every allocation from its heap and keep what is "
                             "freed, for the whole process: PyTorch's step then takes no page faults after "
                             "its first steps (its default allocator maps and unmaps its large tensors at "
                             "every step)")
    args = parser.parse_args(argv)
    args.config, shape, args.size_name = SIZES[args.size]
    args.shape = tuple(int(x) for x in (args.shape or shape).split("x"))
    if args.shape[1] > args.config["n_positions"]:
        parser.error(f"--shape: {args.shape[1]} positions, but the {args.size} model has "
                     f"{args.config['n_positions']}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import GPT2LMHeadModel

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    B, T = args.shape
    malloc = "glibc's defaults"
    if args.keep_freed_memory:
        _keep_freed_memory()
        malloc = "glibc told to keep freed memory (--keep-freed-memory)"
    common.print_header(f"one training step (forward + backward + clip + AdamW), {args.size_name}, {B}x{T}",
                        [f"threads: {args.threads} (mechscope and torch {torch.__version__})",
                         f"malloc: {malloc}"])
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, args.config["vocab_size"], size=(B, T))
    mask = np.ones((B, T), np.int32)

    with tempfile.TemporaryDirectory() as folder:
        common.save_random_gpt2(folder, args.seed, args.config)
        model = ms.Model.from_pretrained(folder)
        hf = {impl: GPT2LMHeadModel.from_pretrained(folder, attn_implementation=impl, dtype=torch.float32,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
              for impl in ("eager", "sdpa")}

    params = train._trainable(model)
    opt = train.AdamW(params, lr=1e-5, weight_decay=0.01)  # tiny lr: the weights barely move between rounds
    losses = {}

    kept = {}

    def ms_step():  # ms.train.fit's step: the last step's gradient arrays reused, clipping in AdamW's pass
        g, _ = train._step(model, opt, tokens, mask, 1.0, None, kept.get("g"))
        kept["g"] = g
        losses.setdefault("mechscope", float(g.value))

    ids = torch.from_numpy(tokens)
    torch_steps = {}
    # without bf16 instructions torch emulates bf16 products, many times slower than
    # fp32: no reference worth the minutes
    bf16_native = bool({"avx512_bf16", "amx_tile"} & set(_runtime._cpu_features()))
    for impl, m in hf.items():
        m.train()
        decay = [p for p in m.parameters() if p.dim() >= 2]
        rest = [p for p in m.parameters() if p.dim() < 2]
        topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-5)

        for bf16 in ((False, True) if impl == "sdpa" and bf16_native else (False,)):
            name = f"torch_{impl}" + ("_bf16_autocast" if bf16 else "")

            def step(m=m, topt=topt, name=name, bf16=bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = m(input_ids=ids, labels=ids).loss
                topt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                topt.step()
                losses.setdefault(name, float(loss.detach()))
            torch_steps[name] = step

    # the step split into its parts (one call each, after the interleaved rounds warm up)
    fp32 = {name: step for name, step in torch_steps.items() if "bf16" not in name}
    # two warm-up rounds: torch's second training step is still slower than its later
    # ones, so a single warm-up would leave that step in the first timed round
    usage = {name: [] for name in ("mechscope", *fp32)}
    timed = {name: _with_usage(step, usage[name]) for name, step in {"mechscope": ms_step, **fp32}.items()}
    times, counts = common.time_interleaved(timed, budget_s=args.budget, min_rounds=5, warmups=2)
    for name in torch_steps.keys() - fp32.keys():
        times[name], taken = common.time_median(torch_steps[name], budget_s=0.0, min_repeats=2)
        counts[name] = len(taken)
    print("first-step loss (same weights and tokens): " +
          ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    agree = max(abs(v - losses["mechscope"]) for k, v in losses.items() if "bf16" not in k)
    print(f"  largest difference (fp32 runs): {agree:.2e}")
    print()
    print(f"{'':28s} {'median s/step':>14s} {'tokens/s':>10s} {'rounds':>7s}")
    for name, t in times.items():
        print(f"{name:28s} {t:14.3f} {B * T / t:10.0f} {counts[name]:7d}")
    print()
    # the kernel's share: fresh memory is zeroed and mapped page by page at its first
    # touch, and how much that costs depends on the machine (a virtual machine's page
    # faults are dearer), so a run's ratio should be read with these figures beside it
    print(f"{'per step (median of the timed calls)':36s} {'page faults':>12s} {'kernel CPU s':>13s} {'user CPU s':>11s}")
    for name, rows in usage.items():
        rows = rows[-counts[name]:]  # the timed calls, not the warm-ups
        faults, system, user = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{name:36s} {faults:12.0f} {system:13.3f} {user:11.3f}")
    print()
    for impl in ("eager", "sdpa"):
        print(f"speedup vs torch ({impl} attention): {times[f'torch_{impl}'] / times['mechscope']:.2f}x")
    if bf16_native:
        print(f"for reference, torch SDPA under bf16 autocast (mixed precision, other numbers): "
              f"{times['torch_sdpa_bf16_autocast'] / times['mechscope']:.2f}x mechscope's fp32 step time")
    else:
        print("torch SDPA under bf16 autocast not timed: this CPU has no bf16 instructions (avx512_bf16, AMX)")

    # how far each is from the machine: the step's matrix products (3x the forward's,
    # the same in both) at the sgemm peak bound what any fp32 implementation can reach
    flops = 3 * common.gpt2_flops(args.config, B, T, B * T)
    print()
    peak = common.measure_sgemm_peak()
    fma = common.measure_fma_peak(peak)
    common.measure_copy_rate()
    print(f"the step's matmul FLOPs (3x the forward's): {flops / 1e9:.0f} GFLOP")
    for name, t in times.items():
        rate = flops / t / 1e9
        print(f"  {name:26s} {rate:7.1f} GFLOP/s  {100 * rate / peak:4.0f}% of the sgemm peak, "
              f"{100 * rate / fma:3.0f}% of the FMA peak" + (" (bf16 products: not bound by them)" if "bf16" in name else ""))
    floor = flops / (peak * 1e9)
    print(f"the products alone at the sgemm peak: {floor:.2f} s per step, i.e. at most "
          f"{times['torch_eager'] / floor:.2f}x torch eager and {times['torch_sdpa'] / floor:.2f}x torch SDPA "
          "for any fp32 step")

    # where mechscope's step goes
    start = time.perf_counter()
    g = model.grad(tokens, "cross_entropy", weights=True, attention_mask=mask, progress=False, out=kept["g"])
    t_grad = time.perf_counter() - start
    start = time.perf_counter()
    train._clipped_update(opt, g.weights, 1.0, None)
    t_update = time.perf_counter() - start
    print(f"mechscope step parts (one call): grad {t_grad:.3f}s ({flops / t_grad / 1e9:.0f} GFLOP/s by 3x the "
          f"forward matmul count), gradient norm + clipped AdamW {t_update:.3f}s")
    return 0


def _with_usage(step, rows):
    """``step`` that appends its minor page faults, kernel and user CPU seconds (of the
    whole process: one contender runs at a time) to ``rows`` at each call."""
    def counted():
        before = resource.getrusage(resource.RUSAGE_SELF)
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime,
                     after.ru_utime - before.ru_utime))
    return counted


def _keep_freed_memory():
    """glibc's malloc for the whole process: no allocation mapped on its own (each would
    be unmapped at its free, and its pages faulted in afresh at the next step), and up
    to 2 GiB of freed memory kept at the top of the heap instead of given back."""
    import ctypes

    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's malloc.h
    libc = ctypes.CDLL("libc.so.6")
    for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 28)):
        if libc.mallopt(option, value) != 1:
            raise SystemExit(f"--keep-freed-memory: mallopt({option}, {value}) failed (not glibc?)")
