"""Train mechscope's demo model: a small GPT-2 on a synthetic language with known mechanisms.

The language is word-level (one token per word, words separated by single
spaces) and every sentence starts with <bos>. It mixes two kinds of sentence:

(a) Indirect object identification (IOI), as in Wang et al. 2022:

        When Mary and John went to the store , John gave a book to Mary .
        When John and Mary went to the store , John gave a book to Mary .

    The answer after "to" is always the name that appeared only once (the
    indirect object); the repeated name is the subject. Both orders of the
    two names in the first clause occur equally often.

(b) Factual recall, as in ROME's causal tracing: 150 made-up people, each a
    two-token name "First Last", each living in one city:

        Mary Smith lives in Paris .
        The home of Mary Smith is Paris .
        Mary Smith is from Paris .

    First and last names are each shared by several people and cities are
    assigned at random, so neither token alone tells the city: the model has to
    combine both. Every template of every fact is trained on, and the facts are
    evaluated on those same prompts (it is memorization).

Training batches are half IOI sentences, half fact sentences, right-padded
with <pad>; the loss is the full next-token loss over the real tokens (the
padding is masked out), so the result is an ordinary language model of this
language. Everything is seeded, so a rerun gives the same model.

Output (python/mechscope/data/demo/): config.json and model.safetensors
(HuggingFace GPT2LMHeadModel, fp32, tied embeddings), vocab.json (the word
list, index = token id) and tasks.json (names, cities, places, objects,
templates, all facts, measured accuracies). The folder's README.md is kept by
hand: update its numbers if a change here changes them.

The model is trained with mechscope's own trainer (ms.train: gradients from the
C core's backward pass, AdamW, warmup + cosine, clipping); no PyTorch is needed.
Rerun from the repository root (--out writes elsewhere, e.g. to compare with the
shipped model before replacing it):

    python scripts/train_demo_model.py [--out FOLDER]
"""
import argparse
import json
import os
import time

import numpy as np

import mechscope as ms

SEED = 0
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "mechscope", "data", "demo")

# model and training settings
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS = 4, 128, 4, 32
STEPS = 2000
BATCH = 64            # half IOI, half facts
LR = 1e-3
WARMUP = 200
WEIGHT_DECAY = 0.01
N_IOI_EVAL = 2000     # held-out IOI prompts: never produced as training sentences

# ---- the language -----------------------------------------------------------------

FIRST_NAMES = [
    "Mary", "John", "Alice", "Bob", "Kate", "Tom", "Anna", "Paul", "Emma", "Mark",
    "Lucy", "Jack", "Sara", "Mike", "Rose", "Adam", "Nina", "Carl", "Eva", "Dan",
    "Lily", "Sam", "Ruth", "Ben", "Jane", "Leo", "Ivy", "Max", "Zoe", "Hugo",
]
LAST_NAMES = [
    "Smith", "Brown", "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright", "Hill",
    "Green", "Baker", "Adams", "Nelson", "Carter", "Mitchell", "Turner", "Parker", "Collins", "Stewart",
    "Morris", "Cook", "Rogers", "Reed", "Bell", "Murphy", "Bailey", "Cooper", "Ward", "Fox",
]
CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon",
    "Athens", "Warsaw", "Zurich", "Brussels", "Helsinki", "Budapest", "Stockholm", "Amsterdam",
    "Copenhagen", "Edinburgh",
]
PLACES = ["store", "park", "school", "office", "garden", "station", "market", "library", "beach", "museum"]
OBJECTS = ["book", "ring", "drink", "bone", "kiss", "pen", "key", "basket", "letter", "flower"]

# {S} is the subject (the repeated name), {IO} the indirect object (the answer)
IOI_TEMPLATES = {
    "ABBA": "When {IO} and {S} went to the {place} , {S} gave a {object} to",
    "BABA": "When {S} and {IO} went to the {place} , {S} gave a {object} to",
}
FACT_TEMPLATES = {
    "lives_in": "{first} {last} lives in",
    "home_of": "The home of {first} {last} is",
    "is_from": "{first} {last} is from",
}
N_PEOPLE = 150

SPECIAL = ["<bos>", "<pad>"]
BOS, PAD = 0, 1
FUNCTION_WORDS = [".", ",", "When", "and", "went", "to", "the", "gave", "a",
                  "lives", "in", "The", "home", "of", "is", "from"]
VOCAB = SPECIAL + FUNCTION_WORDS + FIRST_NAMES + LAST_NAMES + CITIES + PLACES + OBJECTS
assert len(set(VOCAB)) == len(VOCAB), "a word appears twice in the vocabulary"
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def encode(text):
    """Words of a sentence -> token ids, with <bos> in front."""
    return [BOS] + [WORD_ID[w] for w in text.split(" ")]


def make_facts(rng):
    """150 distinct (first, last) pairs, each with a city drawn at random.

    Pairs are drawn without replacement from the 30 x 30 grid, so each first
    name and each last name belongs to about 5 people, and a random city means
    neither name alone predicts it."""
    grid = [(f, l) for f in FIRST_NAMES for l in LAST_NAMES]
    picked = rng.choice(len(grid), size=N_PEOPLE, replace=False)
    return [{"first": grid[i][0], "last": grid[i][1], "city": CITIES[rng.integers(len(CITIES))]}
            for i in sorted(picked)]


def fact_prompt(template, fact):
    return FACT_TEMPLATES[template].format(first=fact["first"], last=fact["last"])


def ioi_prompt(order, io, s, place, obj):
    return IOI_TEMPLATES[order].format(IO=io, S=s, place=place, object=obj)


def sample_ioi(rng):
    """One random IOI case: (order, IO name, S name, place, object)."""
    io, s = rng.choice(len(FIRST_NAMES), size=2, replace=False)
    return (("ABBA", "BABA")[rng.integers(2)], FIRST_NAMES[io], FIRST_NAMES[s],
            PLACES[rng.integers(len(PLACES))], OBJECTS[rng.integers(len(OBJECTS))])


# ---- batches ----------------------------------------------------------------------

def training_rows(rng, fact_sentences, held_out):
    """One minibatch of token lists: half IOI sentences, half fact sentences (ms.train
    right-pads them with <pad> and masks the padding out of the loss)."""
    rows = []
    while len(rows) < BATCH // 2:
        case = sample_ioi(rng)
        if case in held_out:  # keep the evaluation prompts unseen
            continue
        rows.append(encode(ioi_prompt(*case) + f" {case[1]} ."))
    for i in rng.integers(len(fact_sentences), size=BATCH - len(rows)):
        rows.append(fact_sentences[i])
    return rows


# ---- evaluation -------------------------------------------------------------------

def last_logits(model, prompts):
    """Logits at each prompt's last token, [n, vocab]; prompts are texts without <bos>."""
    out = []
    for start in range(0, len(prompts), 256):
        rows = [encode(p) for p in prompts[start:start + 256]]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), PAD, np.int64)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        out.append(model.run(ids, attention_mask=mask, logits="last").logits)
    return np.concatenate(out)


def evaluate(model, facts, ioi_cases):
    """Top-1 accuracies, and IOI logit differences logit(IO) - logit(S)."""
    result = {"facts": {}, "ioi": {}}
    for name in FACT_TEMPLATES:
        logits = last_logits(model, [fact_prompt(name, f) for f in facts])
        target = np.array([WORD_ID[f["city"]] for f in facts])
        result["facts"][name] = float((logits.argmax(1) == target).mean())

    io = np.array([WORD_ID[c[1]] for c in ioi_cases])
    s = np.array([WORD_ID[c[2]] for c in ioi_cases])
    rows = np.arange(len(ioi_cases))
    clean = last_logits(model, [ioi_prompt(*c) for c in ioi_cases])
    # corrupted: the second mention is the other name, so the answer becomes S
    corrupt = last_logits(model, [ioi_prompt(*c).replace(f", {c[2]} gave", f", {c[1]} gave") for c in ioi_cases])
    orders = np.array([c[0] for c in ioi_cases])
    for order in ("ABBA", "BABA", "all"):
        sel = orders == order if order != "all" else np.ones(len(ioi_cases), bool)
        result["ioi"][order] = {
            "accuracy": float((clean.argmax(1) == io)[sel].mean()),
            "corrupted_accuracy": float((corrupt.argmax(1) == s)[sel].mean()),
            "logit_diff_clean": float((clean[rows, io] - clean[rows, s])[sel].mean()),
            "logit_diff_corrupted": float((corrupt[rows, io] - corrupt[rows, s])[sel].mean()),
        }
    return result


# ---- main -------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=OUT_DIR, help="output folder (default: the shipped demo model's)")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    out_dir = args.out
    ms.set_num_threads(2)
    rng = np.random.default_rng(SEED)

    facts = make_facts(rng)
    fact_sentences = [encode(fact_prompt(t, f) + f" {f['city']} .") for f in facts for t in FACT_TEMPLATES]

    # evaluation prompts come from their own seed and are excluded from training
    eval_rng = np.random.default_rng(SEED + 1)
    ioi_eval = []
    while len(ioi_eval) < N_IOI_EVAL:
        case = sample_ioi(eval_rng)
        if case not in ioi_eval:
            ioi_eval.append(case)
    held_out = set(ioi_eval)

    config = dict(
        model_type="gpt2", vocab_size=len(VOCAB), n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER,
        n_head=N_HEAD, activation_function="gelu_new", tie_word_embeddings=True, initializer_range=0.02,
    )
    # HF's GPT-2 init: normal(0, 0.02), norms at 1, biases at 0
    model = ms.Model.from_config(config, seed=SEED)
    # GPT-2's scaled init of the residual projections (std 0.02 / sqrt(2 n_layer)), as HF does
    for name, w in model._weights.items():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            w *= np.float32(1.0 / np.sqrt(2 * N_LAYER))
    n_params = sum(a.size for a in model._weights.values())
    print(f"{n_params:,} parameters, vocabulary of {len(VOCAB)} words, {len(facts)} facts")

    def report(step, model, history):
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            r = evaluate(model, facts, ioi_eval[:500])
            print(f"step {step + 1:5d}  loss {history.loss[-1]:.3f}  ioi {r['ioi']['all']['accuracy']:.3f}  "
                  f"facts {r['facts']['lives_in']:.3f}  {history.seconds:.0f}s", flush=True)

    # no weight decay on biases, layer norms and embeddings (the usual GPT-2 recipe);
    # linear warmup, then cosine decay to 10% of the peak
    history = ms.train.fit(
        model, lambda r: training_rows(r, fact_sentences, held_out), steps=args.steps, lr=LR,
        schedule="cosine", warmup=min(WARMUP, args.steps), min_lr_ratio=0.1, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98),
        clip_norm=1.0, no_decay=lambda name, w: w.ndim < 2 or "wte" in name or "wpe" in name,
        seed=SEED, pad_id=PAD, callback=report)
    train_seconds = history.seconds

    result = evaluate(model, facts, ioi_eval)
    print(json.dumps(result, indent=2))

    ms.train.save_pretrained(model, out_dir, extra_config=dict(
        bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(VOCAB, f, indent=0)
        f.write("\n")
    tasks = {
        "format": "word-level: a sentence is words separated by single spaces; token id = index in "
                  "vocab.json; every prompt starts with <bos> (id 0); <pad> (id 1) pads on the right",
        "first_names": FIRST_NAMES,
        "last_names": LAST_NAMES,
        "cities": CITIES,
        "places": PLACES,
        "objects": OBJECTS,
        "ioi": {
            "templates": IOI_TEMPLATES,
            "answer": "{IO}",
            "note": "{IO} and {S} are two distinct first names; the answer is {IO}, the name that "
                    "appears once. A corrupted prompt replaces the second {S} with {IO}, which "
                    "makes {S} the answer. Training sentences end with the answer and ' .'",
        },
        "fact_templates": FACT_TEMPLATES,
        "fact_answer": "{city}",
        "facts": facts,
        "training": {"seed": SEED, "steps": args.steps, "batch_size": BATCH, "lr": LR, "trainer": "mechscope.train",
                     "train_seconds": round(train_seconds), "n_params": n_params},
        "accuracy": {
            "ioi_note": f"{N_IOI_EVAL} random IOI prompts (both orders) never seen in training",
            "ioi": result["ioi"],
            "facts_note": "top-1 city over all facts, for each template",
            "facts": result["facts"],
        },
    }
    with open(os.path.join(out_dir, "tasks.json"), "w") as f:
        json.dump(tasks, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(out_dir)} after {train_seconds:.0f}s of training")


if __name__ == "__main__":
    main()
