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

Rerun from the repository root (needs only torch, transformers and numpy;
about 3 minutes on 2 CPU cores):

    python scripts/train_demo_model.py
"""
import json
import os
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

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

def pad_batch(rows):
    """Right-pad token lists with <pad>; labels are -100 on padding so the loss ignores it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def training_batch(rng, fact_sentences, held_out):
    rows = []
    while len(rows) < BATCH // 2:
        case = sample_ioi(rng)
        if case in held_out:  # keep the evaluation prompts unseen
            continue
        rows.append(encode(ioi_prompt(*case) + f" {case[1]} ."))
    for i in rng.integers(len(fact_sentences), size=BATCH - len(rows)):
        rows.append(fact_sentences[i])
    return pad_batch(rows)


# ---- evaluation -------------------------------------------------------------------

@torch.no_grad()
def last_logits(model, prompts):
    """Logits at each prompt's last token, [n, vocab]; prompts are texts without <bos>."""
    out = []
    for start in range(0, len(prompts), 256):
        ids, mask, _ = pad_batch([encode(p) for p in prompts[start:start + 256]])
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        out.append(logits[torch.arange(len(ids)), last])
    return torch.cat(out)


def evaluate(model, facts, ioi_cases):
    """Top-1 accuracies, and IOI logit differences logit(IO) - logit(S)."""
    model.eval()
    result = {"facts": {}, "ioi": {}}
    for name in FACT_TEMPLATES:
        logits = last_logits(model, [fact_prompt(name, f) for f in facts])
        target = torch.tensor([WORD_ID[f["city"]] for f in facts])
        result["facts"][name] = float((logits.argmax(1) == target).float().mean())

    io = torch.tensor([WORD_ID[c[1]] for c in ioi_cases])
    s = torch.tensor([WORD_ID[c[2]] for c in ioi_cases])
    rows = torch.arange(len(ioi_cases))
    clean = last_logits(model, [ioi_prompt(*c) for c in ioi_cases])
    # corrupted: the second mention is the other name, so the answer becomes S
    corrupt = last_logits(model, [ioi_prompt(*c).replace(f", {c[2]} gave", f", {c[1]} gave") for c in ioi_cases])
    orders = np.array([c[0] for c in ioi_cases])
    for order in ("ABBA", "BABA", "all"):
        sel = torch.from_numpy(orders == order) if order != "all" else torch.ones(len(ioi_cases), dtype=torch.bool)
        result["ioi"][order] = {
            "accuracy": float((clean.argmax(1) == io)[sel].float().mean()),
            "corrupted_accuracy": float((corrupt.argmax(1) == s)[sel].float().mean()),
            "logit_diff_clean": float((clean[rows, io] - clean[rows, s])[sel].mean()),
            "logit_diff_corrupted": float((corrupt[rows, io] - corrupt[rows, s])[sel].mean()),
        }
    model.train()
    return result


# ---- main -------------------------------------------------------------------------

def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
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

    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        activation_function="gelu_new", tie_word_embeddings=True,
        # no dropout: the facts must be memorized exactly and the data is unlimited anyway
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, vocabulary of {len(VOCAB)} words, {len(facts)} facts")

    # no weight decay on biases, layer norms and embeddings (the usual GPT-2 recipe)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98))
    # linear warmup, then cosine decay to 10% of the peak
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP) * (0.55 + 0.45 * np.cos(np.pi * step / STEPS)))

    model.train()
    start = time.time()
    for step in range(1, STEPS + 1):
        ids, mask, labels = training_batch(rng, fact_sentences, held_out)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == STEPS:
            r = evaluate(model, facts, ioi_eval[:500])
            print(f"step {step:5d}  loss {loss.item():.3f}  ioi {r['ioi']['all']['accuracy']:.3f}  "
                  f"facts {r['facts']['lives_in']:.3f}  {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start

    result = evaluate(model, facts, ioi_eval)
    print(json.dumps(result, indent=2))

    os.makedirs(OUT_DIR, exist_ok=True)
    model.save_pretrained(OUT_DIR, safe_serialization=True)
    with open(os.path.join(OUT_DIR, "vocab.json"), "w") as f:
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
        "training": {"seed": SEED, "steps": STEPS, "batch_size": BATCH, "lr": LR,
                     "train_seconds": round(train_seconds), "n_params": n_params},
        "accuracy": {
            "ioi_note": f"{N_IOI_EVAL} random IOI prompts (both orders) never seen in training",
            "ioi": result["ioi"],
            "facts_note": "top-1 city over all facts, for each template",
            "facts": result["facts"],
        },
    }
    with open(os.path.join(OUT_DIR, "tasks.json"), "w") as f:
        json.dump(tasks, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT_DIR)} after {train_seconds:.0f}s of training")


if __name__ == "__main__":
    main()
