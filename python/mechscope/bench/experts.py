"""Mixture-of-experts benchmark: a random Mixtral-style model (8 layers, 8 experts, 2 per
token, d_model 512, 133 M parameters) saved with transformers' save_pretrained and
loaded by both, on the same tokens and threads:

1. the forward pass (logits at every position) vs HuggingFace's MixtralForCausalLM
   (fp32, eager attention), with the largest logit difference;
2. every single-expert removal (ms.experts.ablate: 64 removals, each the router
   probability of one expert at one layer set to 0 at every position, a logit
   difference at the last token) vs HuggingFace with a forward hook on that layer's
   router setting the expert's logit to -inf, one run per removal; with the largest
   difference between the two grids.

    python -m mechscope.bench experts [--threads N] [--batch 4] [--pos 64]
"""
import argparse
import tempfile
import time

import numpy as np

import mechscope as ms

from . import common

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, num_local_experts=8,
              num_experts_per_tok=2, rope_theta=1e4)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=64)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ms.set_num_threads(args.threads)
    common.print_header("mixture of experts: forward pass and expert removals vs HuggingFace",
                        [f"threads: {args.threads} (torch and mechscope); tokens {args.batch} x {args.pos}; "
                         f"config {CONFIG}"])
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(attn_implementation="eager", **CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = ms.Model.from_pretrained(folder)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"parameters: {n_params / 1e6:.0f} M")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG["vocab_size"], (args.batch, args.pos))
    t_tokens = torch.as_tensor(tokens)

    # 1. the forward pass
    want = hf(t_tokens).logits.numpy()
    got = model.run(tokens, logits="all").logits
    times, counts = common.time_interleaved({"mechscope": lambda: model.run(tokens, logits="all"),
                                             "hf": lambda: hf(t_tokens)})
    print(f"\nforward, logits at every position ({counts['hf']} rounds): mechscope {times['mechscope']:.3f} s, "
          f"HuggingFace {times['hf']:.3f} s: {times['hf'] / times['mechscope']:.2f}x; "
          f"largest logit difference {np.abs(got - want).max():.1e}")

    # 2. every single-expert removal
    correct, wrong = rng.integers(0, CONFIG["vocab_size"], (2, args.batch))
    metric = ms.metrics.LogitDiff(correct, wrong)
    start = time.perf_counter()
    grid = ms.experts.ablate(model, tokens, metric, progress=False)
    ours = time.perf_counter() - start
    rows = torch.arange(args.batch)
    theirs = np.zeros_like(grid)
    start = time.perf_counter()
    for layer, moe in enumerate(block.block_sparse_moe for block in hf.model.layers):
        for e in range(CONFIG["num_local_experts"]):
            def drop(module, inputs, out, e=e):
                out[:, e] = -torch.inf
            handle = moe.gate.register_forward_hook(drop)
            try:
                logits = hf(t_tokens).logits[:, -1]
            finally:
                handle.remove()
            theirs[layer, e] = float((logits[rows, correct] - logits[rows, wrong]).mean())
    hf_time = time.perf_counter() - start
    print(f"every expert removed in turn ({grid.size} removals): mechscope {ours:.2f} s (one sweep), "
          f"HuggingFace hooks {hf_time:.2f} s (one run each): {hf_time / ours:.1f}x; "
          f"largest difference {np.abs(grid - theirs).max():.1e}")
    return 0
