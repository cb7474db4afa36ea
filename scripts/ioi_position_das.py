"""DAS for the position of the indirect object in the demo model (see ioi_position_map.py).

Two designs, labels from the IO-position hypothesis (the base answers with its own name in
the source's IO slot):
  order    base and source with the same names and roles in the other order; the label is
           the base's subject for every pair (the full interchange there is 0.00 everywhere).
  newnames four new names in the source, half of the pairs with the other template (label:
           the base's subject) and half with the same template (label: the base's own
           answer). A subspace that merely breaks the base's subject scores on the first half
           only, so the IIA over both halves is the fair score (chance: 0.5).
Held-out IIA of DAS at ranks 1..64, a random subspace (order design) and the full
interchange (the identity basis).

    python scripts/ioi_position_das.py
"""
import os
import sys

import numpy as np

import mechscope as ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ioi_position_map import make_pairs  # noqa: E402


def site_width(model, site):
    v = model.run(np.zeros((1, 2), np.int64), cache=site, logits=None).cache[site]
    return int(np.prod(v.shape[2:]))


def main():
    ms.set_num_threads(1)
    model, tasks = ms.demo.load_model(), ms.demo.tasks()
    rng = np.random.default_rng(0)

    print("order design (held-out IIA, every label differs from the base's answer)")
    train, test = make_pairs(model, tasks, 256, 0, "order"), make_pairs(model, tasks, 128, 1, "order")
    for site, pos in [("blocks.1.hook_resid_pre", 10), ("blocks.2.hook_resid_pre", 10),
                      ("blocks.3.hook_resid_pre", 14), ("blocks.2.hook_resid_pre", list(range(5, 15))),
                      ("blocks.3.attn.hook_z", 14)]:
        width = site_width(model, site)
        full = ms.das.iia(model, site, np.eye(width), *test[:3], pos=pos)
        cells = []
        for rank in (1, 4, 16, 64):
            das = ms.das.DAS(model, site, rank=rank, pos=pos, lr=2e-2, epochs=10, progress=False).fit(*train[:3])
            random_basis = np.linalg.qr(rng.normal(size=(width, rank)))[0]
            cells.append(f"rank {rank}: {das.score(*test[:3]):.2f} (random {ms.das.iia(model, site, random_basis, *test[:3], pos=pos):.2f})")
        print(f"  {site} pos {pos}: full {full:.2f}; " + ", ".join(cells), flush=True)

    print("newnames design, half other template / half same template (held-out IIA: all, other, same)")

    def mixed(n, seed):
        a = make_pairs(model, tasks, n // 2, seed, "newnames")
        b = make_pairs(model, tasks, n // 2, seed + 100, "newnames_same")
        return [np.concatenate([x, y]) for x, y in zip(a, b)]

    train, test = mixed(256, 0), mixed(128, 1)
    other = np.arange(128) < 64
    for site, pos in [("blocks.1.hook_resid_pre", 10), ("blocks.2.hook_resid_pre", 10),
                      ("blocks.3.hook_resid_pre", 14), ("blocks.2.hook_attn_out", 14)]:
        width = site_width(model, site)
        full = [ms.das.iia(model, site, np.eye(width), *(x[m] for x in test[:3]), pos=pos) for m in (other, ~other)]
        cells = []
        for rank in (1, 8, 32):
            das = ms.das.DAS(model, site, rank=rank, pos=pos, lr=2e-2, epochs=10, progress=False).fit(*train[:3])
            scores = [das.score(*test[:3])] + [das.score(*(x[m] for x in test[:3])) for m in (other, ~other)]
            cells.append(f"rank {rank}: {scores[0]:.2f} ({scores[1]:.2f} / {scores[2]:.2f})")
        print(f"  {site} pos {pos}: full (other / same template) {full[0]:.2f} / {full[1]:.2f}; " + ", ".join(cells),
              flush=True)


if __name__ == "__main__":
    main()
