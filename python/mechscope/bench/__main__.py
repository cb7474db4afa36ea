"""``python -m mechscope.bench [NAME] [options]``: list the benchmarks or run one.

Adding a benchmark is one entry in BENCHMARKS: a module of this package with a
``main(argv)``. Modules are imported only when run, so listing stays instant and one
benchmark's heavy imports (torch, transformers) do not burden another.
"""
import importlib
import sys

# name -> (module defining main(argv), one-line description)
BENCHMARKS = {
    "forward": ("mechscope.bench.forward",
                "GPT-2-small forward pass vs HuggingFace, FLOP rate vs sgemm and FMA peaks, load memory"),
    "patch": ("mechscope.bench.patch",
              "patching sweeps on GPT-2 small vs TransformerLens's patching functions, sweep memory"),
    "mediation": ("mechscope.bench.mediation",
                  "NIE and NDE of 3,072 MLP neurons on GPT-2 small vs TransformerLens hooks, memory vs unit count"),
    "extract": ("mechscope.bench.extract",
                "activation extraction vs model.run and TransformerLens loops, early exit, memory"),
    "attribution": ("mechscope.bench.attribution",
                    "attribution patching vs exact sweeps: Spearman per function on demo IOI (AtP, AtP*, "
                    "GradDrop), attn_head_out_by_pos time"),
    "das": ("mechscope.bench.das",
            "DAS fit on SmolLM2-135M: each step from the site's block vs from the embedding"),
    "generate": ("mechscope.bench.generate",
                 "greedy generation with the key/value cache vs rerunning every step vs HuggingFace's generate"),
    "experts": ("mechscope.bench.experts",
                "a Mixtral-style model: forward pass and every expert removal vs HuggingFace"),
    "sae": ("mechscope.bench.sae",
            "sparse-autoencoder features, spliced loss and attribution vs SAELens's HookedSAETransformer"),
    "train": ("mechscope.bench.train",
              "one training step (forward + backward + AdamW) vs PyTorch: GPT-2 small size, or --size demo / addition"),
}


def list_benchmarks():
    print("usage: python -m mechscope.bench NAME [options]   (NAME --help for its options)")
    print("benchmarks:")
    width = max(len(name) for name in BENCHMARKS)
    for name, (_, description) in BENCHMARKS.items():
        print(f"  {name:<{width}}  {description}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        list_benchmarks()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}", file=sys.stderr)
        list_benchmarks()
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
