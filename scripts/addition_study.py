"""Equivalence generalization in 3-digit addition (Xu et al. 2023, arXiv 2308.08268),
reproduced with mechscope's trainer.

Small GPT-2 models are trained on a + b = c with both operands 3-digit (100..999) and
tested on unseen 3-digit pairs (in distribution) and on 4-digit operands (1000..9999)
they never saw. The paper's finding: out of distribution the models answer as if the
operands were taken mod 10^3, i.e. they output r = (a mod 1000) + (b mod 1000) instead
of a + b. This script measures, per model, how often the greedy answer equals r, how
often it equals the true sum, and how often its last three digits are right.

Format (one token per symbol; vocabulary: digits 0-9 = ids 0-9, '+' 10, '=' 11,
<bos> 12, <eos> 13), --format padded (the default):

    <bos> 0 a_2 a_1 a_0 + 0 b_2 b_1 b_0 = c_0 c_1 c_2 c_3 c_4 <eos>

The operands are written as usual (most significant digit first) in 4 digit slots,
so a 3-digit operand has a leading 0 and a 4-digit query puts a digit the model has
only ever seen as 0 there; every token sits at the same position in and out of
distribution (GPT-2's position embeddings are absolute, so this isolates the unseen
digit from an unseen layout). The answer is written reversed (least significant
digit first: the order in which carries are computed, Lee et al. 2023) in 5 slots,
enough for any 4-digit sum, so both hypotheses are writable: the true sum a + b
(>= 2000 for 4-digit operands) and the residue-class answer r (< 2000). The model's
answer is its first 5 generated tokens, reversed back.

--format unpadded writes 3-digit operands with 3 tokens and 4-digit ones with 4
(answer in 4 slots): the layout shifts out of distribution, and the measured
answers show what an absolute-position model does with that.

Training: the full next-token loss on fresh random pairs every step (the held-out
evaluation pairs are never drawn), AdamW, warmup + cosine, clipping; all seeded.

    python scripts/addition_study.py [--sizes small,medium] [--seeds 0,1,2] [--steps 1500] [--format padded]

writes python/mechscope/data/addition/results.json (the table) and, for seed 0 of
each size, python/mechscope/data/addition/<format>-<size>/ (a HuggingFace checkpoint, config.json + model.safetensors).
"""
import argparse
import json
import os
import time

import numpy as np

import mechscope as ms

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "python", "mechscope", "data", "addition")

PLUS, EQUALS, BOS, EOS = 10, 11, 12, 13
VOCAB = [str(d) for d in range(10)] + ["+", "=", "<bos>", "<eos>"]
FORMAT = {"padded": dict(slots=4, answer=5), "unpadded": dict(slots=None, answer=4)}
N_EVAL = 2000         # prompts per evaluation set

SIZES = {
    "small": dict(n_layer=2, n_embd=64, n_head=4),
    "medium": dict(n_layer=3, n_embd=128, n_head=4),
}


def digits(x, n):
    """x as n digits, most significant first."""
    return [int(c) for c in str(x).zfill(n)]


def prompt(a, b, fmt):
    """The tokens up to '=' (an operand takes max(its digits, the format's slots) tokens)."""
    n = FORMAT[fmt]["slots"] or max(len(str(a)), len(str(b)))
    return [BOS] + digits(a, n) + [PLUS] + digits(b, n) + [EQUALS]


def sequence(a, b, fmt):
    return prompt(a, b, fmt) + digits(a + b, FORMAT[fmt]["answer"])[::-1] + [EOS]


def eval_pairs(seed, lo, hi, n=N_EVAL):
    """n distinct random pairs with both operands in [lo, hi]."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


ID_PAIRS = eval_pairs(1000, 100, 999)      # unseen 3-digit pairs (excluded from training)
OOD_PAIRS = eval_pairs(2000, 1000, 9999)   # 4-digit operands
HELD_OUT = set(ID_PAIRS)


def training_rows(rng, batch, fmt):
    rows = []
    while len(rows) < batch:
        a, b = (int(x) for x in rng.integers(100, 1000, size=2))
        if (a, b) not in HELD_OUT:
            rows.append(sequence(a, b, fmt))
    return rows


def generate(model, pairs, fmt):
    """Greedy answers: the format's answer slots, generated and decoded as a number
    (reversed digits); -1 where a generated token is not a digit."""
    ids = np.array([prompt(a, b, fmt) for a, b in pairs], np.int64)
    out = []
    n_answer = FORMAT[fmt]["answer"]
    for _ in range(n_answer):
        nxt = model.run(ids, logits="last").logits.argmax(-1)
        out.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    gen = np.stack(out, 1)                                   # [n, 4], least significant first
    ok = (gen < 10).all(1)
    value = (np.where(gen < 10, gen, 0) * 10 ** np.arange(n_answer)).sum(1)
    return np.where(ok, value, -1)


def evaluate(model, fmt):
    a, b = np.array(ID_PAIRS).T
    id_answer = generate(model, ID_PAIRS, fmt)
    A, B = np.array(OOD_PAIRS).T
    ood_answer = generate(model, OOD_PAIRS, fmt)
    residue = A % 1000 + B % 1000
    return {
        "id_accuracy": float((id_answer == a + b).mean()),
        "ood_true_sum": float((ood_answer == A + B).mean()),
        "ood_residue_class": float((ood_answer == residue).mean()),
        "ood_last3_correct": float((ood_answer % 1000 == (A + B) % 1000).mean()),
        "ood_valid_digits": float((ood_answer >= 0).mean()),
    }


def train_one(size, seed, steps, fmt, batch=64, lr=None, progress=None):
    config = dict(model_type="gpt2", vocab_size=len(VOCAB), n_positions=20, activation_function="gelu_new",
                  tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                  **SIZES[size])
    model = ms.Model.from_config(config, seed=seed)
    history = ms.train.fit(model, lambda rng: training_rows(rng, batch, fmt), steps=steps, lr=lr,
                           schedule="cosine", warmup=min(200, steps // 10), min_lr_ratio=0.1,
                           weight_decay=0.1, betas=(0.9, 0.98), clip_norm=1.0, seed=seed, pad_id=EOS,
                           progress=progress)
    return model, history, config


def main(argv=None):
    parser = argparse.ArgumentParser(description="3-digit addition, tested on 4-digit operands")
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--format", default="padded", choices=sorted(FORMAT))
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 small, 2e-3 medium)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {"runs": []}
    results["formats"] = {
        "padded": "<bos> 0 a2 a1 a0 + 0 b2 b1 b0 = c0 c1 c2 c3 c4 <eos>: operands most significant digit first "
                  "in 4 slots, answer reversed in 5 slots; 4-digit queries fill the leading slot; the answer is "
                  "the first 5 greedy tokens",
        "unpadded": "<bos> a2 a1 a0 + b2 b1 b0 = c0 c1 c2 c3 <eos>; 4-digit queries have 4 tokens per operand "
                    "(the layout shifts); the answer is the first 4 greedy tokens"}
    results["vocab"] = VOCAB
    results["eval"] = {"id": f"{N_EVAL} random 3-digit pairs never drawn in training",
                       "ood": f"{N_EVAL} random pairs of 4-digit operands (1000..9999)",
                       "residue_class": "answer == (a mod 1000) + (b mod 1000)"}
    for size in args.sizes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.time()
            lr = args.lr if args.lr is not None else (3e-3 if size == "small" else 2e-3)
            model, history, config = train_one(size, seed, args.steps, args.format, lr=lr, progress=False)
            row = {"format": args.format, "size": size, "seed": seed, "steps": args.steps, "lr": lr, **SIZES[size],
                   "n_params": int(sum(w.size for w in model._weights.values())),
                   "final_loss": float(history.loss[-50:].mean()), "train_seconds": round(history.seconds, 1),
                   **evaluate(model, args.format)}
            print(json.dumps(row), flush=True)
            key = (args.format, size, seed, lr)
            results["runs"] = [r for r in results["runs"]
                               if (r["format"], r["size"], r["seed"], r.get("lr")) != key] + [row]
            if seed == 0:
                folder = os.path.join(args.out, f"{args.format}-{size}")
                ms.train.save_pretrained(model, folder)
                np.save(os.path.join(folder, "loss.npy"), history.loss.astype(np.float32))
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)
                f.write("\n")
            print(f"{size} seed {seed}: {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
