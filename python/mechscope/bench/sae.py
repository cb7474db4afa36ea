"""Sparse-autoencoder benchmark: ms.sae against SAELens's HookedSAETransformer.

A GPT-2-small-sized model (random weights) and an SAE of GPT-2 small's residual-stream
size (24,576 features at blocks.6.hook_resid_pre, random weights, about 2% of them
active per token), both in mechscope and in SAELens on TransformerLens with the same
weights and no weight processing. Three tasks on the same (batch, pos) tokens, with
the same thread count, timed interleaved (each round runs every contender once):

- features: every feature at every token. mechscope: one run to the site (the C core
  stops after the last block it needs), then NumPy's product; SAELens:
  run_with_cache_with_saes with stop_at_layer after the site's block.
- reconstruction loss: the cross-entropy clean, with the SAE spliced in and with the
  site zero-ablated (three figures each: SAELens's three runs, mechscope's
  reconstruction_loss).
- attribution: -f * dmetric/df for every feature and token with the SAE's error kept
  (the logit difference of two tokens at the last position). mechscope: one forward and
  one backward pass in C; SAELens: the SAE spliced in with use_error_term, backward
  through PyTorch's autograd.

- feature attribution: every feature of a second SAE (at blocks.3.hook_resid_pre, built
  the same way) at every token, attributed to 4 features of the first (their
  pre-activations at the last position), both SAEs' error terms kept. mechscope:
  ms.sae.feature_attribution with the 4 as targets (passes seeded at the later site,
  through blocks 0-6 only); SAELens: both spliced in with use_error_term, one forward
  pass and a backward pass per target feature through PyTorch's autograd.

The largest difference between the two sides' results is printed for each task.

    python -m mechscope.bench sae [--threads N] [--shape 8x128] [--d-sae 24576]
"""
import argparse
import tempfile

import numpy as np

import mechscope as ms

from . import common
from .patch import tl_from_hf

SITE, LAYER = "blocks.6.hook_resid_pre", 6
UP_SITE = "blocks.3.hook_resid_pre"  # the feature-attribution task's upstream SAE
N_TARGETS = 4


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mechscope.bench sae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=common.default_threads(),
                        help="threads for both mechscope and torch (default: all cores)")
    parser.add_argument("--shape", default="8x128", help="BATCHxPOS of the tokens (default 8x128)")
    parser.add_argument("--d-sae", type=int, default=24576, help="the SAE's features (default 24576)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.shape = tuple(int(x) for x in args.shape.split("x"))
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    ms.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    B, T = args.shape
    common.print_header(f"sparse autoencoder tasks, GPT-2 small size, {B}x{T}, SAE of {args.d_sae} features at {SITE}",
                        [f"threads: {args.threads} (mechscope and torch {torch.__version__})"])
    with tempfile.TemporaryDirectory() as folder:
        common.save_random_gpt2(folder, args.seed)
        model = ms.Model.from_pretrained(folder)
        tl = tl_from_hf(folder, cls=HookedSAETransformer)

    d = model.d_model
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, model.d_vocab, (B, T))
    t = torch.as_tensor(tokens)

    def both_saes(site):
        """an SAE at `site` in mechscope and in SAELens, with the same random weights"""
        x = model.run(tokens, cache=[site], logits=None).cache[site].reshape(-1, d)
        b_dec = x.mean(0)
        W_enc = (rng.normal(size=(d, args.d_sae)) / np.sqrt(d)).astype(np.float32)
        # each feature's bias puts its threshold 2.05 standard deviations up: about 2% of
        # the features are active on these tokens' activations
        b_enc = (-2.05 * ((x - b_dec) @ W_enc).std(0)).astype(np.float32)
        W_dec = np.ascontiguousarray(W_enc.T)
        lens = StandardSAE(StandardSAEConfig(d_in=d, d_sae=args.d_sae, metadata=SAEMetadata(hook_name=site))).eval()
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(lens, name).copy_(torch.from_numpy(value))
        return ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site), lens

    sae, lens = both_saes(SITE)
    up, up_lens = both_saes(UP_SITE)
    targets = rng.choice(args.d_sae, N_TARGETS, replace=False)

    answer, wrong = rng.integers(0, model.d_vocab, B), rng.integers(0, model.d_vocab, B)
    metric = ms.metrics.LogitDiff(answer, wrong)
    acts_name = f"{SITE}.hook_sae_acts_post"
    out = {}

    def ms_features():
        out["ms features"] = ms.sae.features(model, tokens, sae)

    def tl_features():
        _, cache = tl.run_with_cache_with_saes(t, saes=[lens], names_filter=[acts_name], stop_at_layer=LAYER + 1)
        out["tl features"] = cache[acts_name].numpy()

    def ms_loss():
        out["ms loss"] = ms.sae.reconstruction_loss(model, tokens, sae)

    def tl_loss():
        out["tl loss"] = dict(clean=float(tl(t, return_type="loss")),
                              spliced=float(tl.run_with_saes(t, saes=[lens], return_type="loss")),
                              zero=float(tl.run_with_hooks(t, return_type="loss",
                                                           fwd_hooks=[(SITE, lambda a, hook: a * 0.0)])))

    def ms_attribution():
        out["ms attribution"] = ms.sae.attribution(model, tokens, sae, metric)

    def keeper(kept, key):
        """a TransformerLens hook that keeps its activations in kept[key] (and, for the
        features "f", their gradient)"""
        def keep(acts, hook):
            if key == "f":
                acts.retain_grad()
            kept[key] = acts
            return acts
        return keep

    def tl_attribution():
        kept = {}
        keep = keeper(kept, "f")
        tl.add_sae(lens, use_error_term=True)
        try:
            with torch.enable_grad():
                logits = tl.run_with_hooks(t, fwd_hooks=[(acts_name, keep)])
                rows = torch.arange(B)
                diff = logits[rows, -1, torch.as_tensor(answer)] - logits[rows, -1, torch.as_tensor(wrong)]
                diff.sum().backward()
        finally:
            tl.reset_saes()
        out["tl attribution"] = (-kept["f"] * kept["f"].grad).detach().numpy()

    def ms_edges():
        out["ms edges"] = ms.sae.feature_attribution(model, tokens, up, sae, targets, progress=False)

    def tl_edges():
        kept = {}
        keep, read = keeper(kept, "f"), keeper(kept, "pre")
        tl.add_sae(up_lens, use_error_term=True)
        tl.add_sae(lens, use_error_term=True)
        edges = []
        try:
            with torch.enable_grad():
                tl.run_with_hooks(t, fwd_hooks=[(f"{UP_SITE}.hook_sae_acts_post", keep),
                                                (f"{SITE}.hook_sae_acts_pre", read)], stop_at_layer=LAYER + 1)
                for k, feature in enumerate(targets):
                    kept["f"].grad = None
                    kept["pre"][:, -1, int(feature)].sum().backward(retain_graph=k + 1 < len(targets))
                    edges.append((-kept["f"] * kept["f"].grad).detach().numpy())
        finally:
            tl.reset_saes()
        out["tl edges"] = np.stack(edges)

    print(f"{'task':22s} {'mechscope s':>12s} {'SAELens s':>10s} {'speedup':>8s}   largest difference")
    for task, fns in (("features", (ms_features, tl_features)), ("reconstruction loss", (ms_loss, tl_loss)),
                      ("attribution", (ms_attribution, tl_attribution)),
                      (f"feature attribution x{N_TARGETS}", (ms_edges, tl_edges))):
        times, _ = common.time_interleaved({"ms": fns[0], "tl": fns[1]}, budget_s=args.budget)
        key = "edges" if task.startswith("feature attribution") else task.split()[-1]
        ours, theirs = out[f"ms {key}"], out[f"tl {key}"]
        if isinstance(ours, dict):
            diff = max(abs(ours[k] - theirs[k]) for k in theirs)
        else:
            diff = float(np.abs(ours - theirs).max())
        print(f"{task:22s} {times['ms']:12.3f} {times['tl']:10.3f} {times['tl'] / times['ms']:7.2f}x   {diff:.2e}")
    f = out["ms features"]
    print(f"\nactive features per token: {(f > 0).sum(-1).mean():.0f} of {args.d_sae}; "
          f"spliced cross-entropy {out['ms loss']['spliced']:.4f} (clean {out['ms loss']['clean']:.4f})")
    return 0
