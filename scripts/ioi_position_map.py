"""Where does the demo model carry the position of the indirect object? The upper bound.

For the high-level hypothesis "the model carries which name slot (first or second name of
the prompt) holds the indirect object", the interchange of that variable from a source
into a base makes the base answer with its own name in the source's IO slot. This script
measures, without any training, the interchange intervention accuracy (IIA) of the FULL
interchange (the whole site value copied from the source run, computed in the same pass)
at every layer of the residual stream (pre, mid, post), the attention and MLP outputs and
each head's output (attn.hook_z), at each position 1..14 and at sets of positions, on
pairs where the position hypothesis predicts another answer than the base's own. Every
IOI template of the demo model has the same length, so the name slots (2, 4), the
repeated name (10) and the last token (14) are at the same positions in base and source.

Pair designs (--designs, comma-separated):
  order          same names and roles, the other template: only the first two names swap
  newIO          the same subject, a new IO, the other template
  newnames       four different names, the other template (the "position signal" design)
  newnames_same  four different names, the same template (control: no position change)
For every design the position label is the base's name in the source's IO slot; for the
other-template designs that is the base's subject in every pair.

    python scripts/ioi_position_map.py --pairs 128 --designs order,newIO,newnames
"""
import argparse
import time

import numpy as np

import mechscope as ms

SUFFIXES = ["hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
POSITION_SETS = {**{str(p): [p] for p in range(1, 15)}, "5-14": list(range(5, 15)),
                 "10-14": list(range(10, 15)), "11-14": list(range(11, 15)), "2,4": [2, 4]}


def make_pairs(model, tasks, n, seed, design):
    """-> base, source tokens [n, 15], the position label, the base's own answer."""
    templates = tasks["ioi"]["templates"]
    rng = np.random.default_rng(seed)
    base, source = [], []
    for _ in range(n):
        a, b, c, d = rng.choice(tasks["first_names"], 4, replace=False)
        place, obj = rng.choice(tasks["places"]), rng.choice(tasks["objects"])
        t = rng.choice(["ABBA", "BABA"])
        other = "BABA" if t == "ABBA" else "ABBA"
        base.append(templates[t].format(IO=a, S=b, place=place, object=obj))
        io, s, ts = {"order": (a, b, other), "newIO": (c, b, other), "newnames": (c, d, other),
                     "newnames_same": (c, d, t)}[design]
        source.append(templates[ts].format(IO=io, S=s, place=place, object=obj))
    base, source = np.asarray(model.to_tokens(base)), np.asarray(model.to_tokens(source))
    rows = np.arange(n)
    label = base[rows, np.where(source[:, 4] == source[:, 10], 2, 4)]
    answer = base[rows, np.where(base[:, 4] == base[:, 10], 2, 4)]
    return base, source, label, answer


def full_interchange_iia(model, site, pos, base, source, labels, head=None):
    patch = ms.Patch(site, ms.Source(source), pos=pos, **({} if head is None else {"head": head}))
    said = model.run(base, logits="last", interventions=[patch]).logits.argmax(-1)
    return float(np.mean(said == labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--designs", default="order,newIO,newnames")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ms.set_num_threads(args.threads)
    model, tasks = ms.demo.load_model(), ms.demo.tasks()
    for design in args.designs.split(","):
        base, source, label, answer = make_pairs(model, tasks, args.pairs, 1, design)
        clean = model.run(base, logits="last").logits.argmax(-1)
        changed = label != answer
        print(f"\n=== {design}: base accuracy {np.mean(clean == answer):.2f}, position label differs from the "
              f"base's answer in {np.mean(changed):.2f} of the pairs (IIA below on those)")
        if not changed.any():
            continue
        b, s, y = base[changed], source[changed], label[changed]
        start, best = time.perf_counter(), []
        rows = [(f"blocks.{L}.{suffix}", None) for L in range(model.n_layers) for suffix in SUFFIXES]
        rows += [(f"blocks.{L}.attn.hook_z", h) for L in range(model.n_layers) for h in range(model.n_heads)]
        for site, head in rows:
            scores = {k: full_interchange_iia(model, site, p, b, s, y, head) for k, p in POSITION_SETS.items()}
            name = site if head is None else f"{site} h{head}"
            best += [(v, name, k) for k, v in scores.items()]
            print(f"{name:28s} " + " ".join(f"{k}:{v:.2f}" for k, v in scores.items()), flush=True)
        best.sort(reverse=True)
        print("highest:", ", ".join(f"{name} pos {k}: {v:.2f}" for v, name, k in best[:5]),
              f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
