"""Training small transformers with mechscope's own gradients (``model.grad``).

    import mechscope as ms
    model = ms.Model.from_config(dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4,
                                      vocab_size=20, n_positions=32))
    history = ms.train.fit(model, sequences, steps=1000, batch_size=32, lr=1e-3,
                           schedule="cosine", warmup=100, clip_norm=1.0, seed=0)
    ms.train.save_pretrained(model, "out/")   # a HuggingFace folder transformers loads

The loss is the mean next-token cross-entropy over real tokens (padding masked out),
the optimizer AdamW (decoupled weight decay, as torch.optim.AdamW), the schedule a
linear warmup followed by cosine, linear or constant. The model's weights are updated
in place: the model runs, patches and caches with the trained weights as soon as fit
returns (and between steps, in a callback). Everything random (minibatch order, the
batches a generator draws) comes from ``seed``, so the same seed gives bit-identical
weights.
"""
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import architectures
from ._progress import progress_bar
from ._runtime import _core

__all__ = ["AdamW", "lr_schedule", "clip_grad_norm", "fit", "TrainHistory", "save_pretrained"]


def _check_positive(value, name, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def default_no_decay(name, array):
    """Parameters AdamW does not decay by default: biases and norm weights (every 1-D
    parameter), as in the usual GPT-2 / Llama recipes."""
    return array.ndim < 2


# ---- the optimizer -----------------------------------------------------------------

def _check_adamw(lr, betas, eps, weight_decay):
    lr = _check_positive(lr, "lr")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float, np.floating)) or not (0.0 <= b < 1.0):
            raise ValueError(f"betas: beta{i + 1} must be in [0, 1), got {b!r}")
    eps = _check_positive(eps, "eps", allow_zero=True)
    weight_decay = _check_positive(weight_decay, "weight_decay", allow_zero=True)
    return lr, (float(betas[0]), float(betas[1])), eps, weight_decay


class AdamW:
    """AdamW (Loshchilov & Hutter): Adam with weight decay decoupled from the gradient,
    computed exactly as torch.optim.AdamW (bias-corrected moments, eps added after the
    square root, decay p -= lr * weight_decay * p before the Adam update).

    params: {name: float32 array}, updated in place by step().
    no_decay: names (a collection) or a function (name, array) -> True for parameters
        that get no weight decay; default: every 1-D parameter (biases, norm weights).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, no_decay=None):
        if not isinstance(params, dict) or not params:
            raise TypeError("params: expected a non-empty dict of name -> float32 array")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype != np.float32 or not p.flags.c_contiguous \
                    or not p.flags.writeable:
                raise TypeError(f"params: {name} must be a writeable C-contiguous float32 array")
        self.lr, self.betas, self.eps, self.weight_decay = _check_adamw(lr, betas, eps, weight_decay)
        if no_decay is None:
            no_decay = default_no_decay
        if callable(no_decay):
            skip = {n for n, p in params.items() if no_decay(n, p)}
        else:
            skip = set(no_decay)
            unknown = sorted(skip - set(params))
            if unknown:
                raise ValueError(f"no_decay: {unknown[0]!r} is not a parameter name")
        self.params = params
        self.decay = {n: n not in skip for n in params}
        self.exp_avg = {n: np.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self, grads, lr=None):
        """One update with grads {name: array shaped like the parameter} (every parameter
        needs its gradient); lr overrides the base rate (a schedule passes it)."""
        self._update(grads, lr, 1.0)

    def _update(self, grads, lr, grad_scale):
        """step() with every gradient multiplied by grad_scale first (as clipping in
        place does), without changing grads."""
        lr = self.lr if lr is None else _check_positive(lr, "lr", allow_zero=True)
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise ValueError(f"grads: no gradient for {missing[0]}")
        shapes = [n for n, p in self.params.items() if np.shape(grads[n]) != p.shape]
        if shapes:
            n = shapes[0]
            raise ValueError(f"grads: {n} has shape {list(np.shape(grads[n]))}, the parameter "
                             f"{list(self.params[n].shape)}")
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.t
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        step_size = lr / bc1
        for name, p in self.params.items():
            g = np.ascontiguousarray(grads[name], dtype=np.float32)
            decay = 1.0 - lr * self.weight_decay if self.decay[name] else 1.0
            # in C, one pass over p, g, m, v (the float32 operations of torch.optim.AdamW)
            _core.adamw(p, g, self.exp_avg[name], self.exp_avg_sq[name], decay, b1, b2, self.eps, step_size,
                        bc2_sqrt, grad_scale)

    def state_dict(self):
        """The optimizer's state (moments and step count), for saving next to a checkpoint."""
        return {"t": self.t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


def _global_norm(grads):
    # in C, in float64, with every thread: one pass over the gradients
    return math.sqrt(_core.sum_of_squares([np.ascontiguousarray(g, np.float32) for g in grads.values()]))


def _clip_coefficient(grads, max_norm):
    """(the global L2 norm of grads, the factor clipping multiplies them by: 1, or
    max_norm / (norm + 1e-6) when that is below 1, as torch.nn.utils.clip_grad_norm_)"""
    max_norm = _check_positive(max_norm, "clip_norm")
    total = _global_norm(grads)
    if not math.isfinite(total):
        raise FloatingPointError(f"gradient norm is {total}: the loss diverged (lower lr or clip harder)")
    coef = np.float32(max_norm) / np.float32(total + 1e-6)
    return total, (float(coef) if coef < 1.0 else 1.0)


def clip_grad_norm(grads, max_norm):
    """Scale grads (in place) so that their global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), only when
    below 1). Returns the norm before clipping."""
    total, coef = _clip_coefficient(grads, max_norm)
    if coef < 1.0:
        for g in grads.values():
            g *= np.float32(coef)
    return total


def _step(model, opt, ids, mask, clip_norm, lr, reuse=None, step=0):
    """One training step: the gradient of the cross-entropy (into reuse's arrays when
    given, see Model.grad's out=), clipping folded into AdamW, the core's fused copies
    refreshed. Returns (the Gradients, the gradient norm before clipping)."""
    g = model.grad(ids, "cross_entropy", weights=True, attention_mask=mask, progress=False, out=reuse)
    if not math.isfinite(g.value):
        raise FloatingPointError(f"step {step}: the loss is {g.value} (lower lr, or clip_norm)")
    norm = _clipped_update(opt, g.weights, clip_norm, lr)
    _sync_core(model)
    return g, norm


def _clipped_update(opt, grads, clip_norm, lr):
    """One step of fit after the gradient: clipping folded into the AdamW pass (each
    gradient times the clipping factor, then AdamW, as clip_grad_norm then step do,
    with one pass fewer over memory). Returns the gradient norm before clipping."""
    if clip_norm is None:
        norm, coef = _global_norm(grads), 1.0
    else:
        norm, coef = _clip_coefficient(grads, clip_norm)
    opt._update(grads, lr, coef)
    return norm


# ---- learning-rate schedules ---------------------------------------------------------

_SCHEDULES = ("cosine", "linear", "constant")


def lr_schedule(kind, total_steps, warmup=0, min_lr_ratio=0.0):
    """The multiplier of the base learning rate at step s (0-based: the s-th update),
    as a function s -> float:

        warmup:   (s + 1) / warmup                         for s < warmup
        then, with progress = (s - warmup) / (total_steps - warmup) in [0, 1):
        cosine:   r + (1 - r) * (1 + cos(pi * progress)) / 2
        linear:   1 - (1 - r) * progress
        constant: 1
    where r = min_lr_ratio (the final rate as a fraction of the peak)."""
    if kind not in _SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(_SCHEDULES)} or a function step -> "
                         f"multiplier, got {kind!r}")
    total_steps = _check_int(total_steps, "steps", 1)
    warmup = _check_int(warmup, "warmup", 0)
    if warmup > total_steps:
        raise ValueError(f"warmup: {warmup} warmup steps is more than the {total_steps} steps of training")
    r = float(min_lr_ratio)
    if not (0.0 <= r <= 1.0):
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    decay_steps = max(1, total_steps - warmup)

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / decay_steps
        if kind == "cosine":
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - (1.0 - r) * progress
        return 1.0

    return multiplier


# ---- data ----------------------------------------------------------------------------

def _pad_rows(rows, pad_id, n_ctx):
    """token lists -> (int64 ids [B, T] right-padded with pad_id, int32 mask [B, T])"""
    lengths = [len(r) for r in rows]
    if min(lengths) < 2:
        raise ValueError("data: every sequence needs at least 2 tokens (a token and its successor)")
    width = max(lengths)
    if width > n_ctx:
        raise ValueError(f"data: a sequence of {width} tokens is longer than the model's n_ctx = {n_ctx}")
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


class _Batches:
    """Minibatches from a fixed dataset (shuffled each epoch) or from a generator function."""

    def __init__(self, data, batch_size, rng, pad_id, n_ctx, vocab):
        self.rng, self.batch_size, self.pad_id, self.n_ctx, self.vocab = rng, batch_size, pad_id, n_ctx, vocab
        self.generator = data if callable(data) else None
        if self.generator is None:
            mask = getattr(data, "attention_mask", None)
            if isinstance(data, np.ndarray) and data.ndim == 2:
                rows = [np.asarray(r)[np.asarray(m, bool)] if mask is not None else np.asarray(r)
                        for r, m in zip(data, mask if mask is not None else data)]
            elif isinstance(data, (list, tuple)) and len(data) > 0:
                rows = [np.asarray(r) for r in data]
            else:
                raise TypeError("data: expected a list of token sequences, a 2-D token array (with an "
                                "attention_mask if padded), or a function rng -> list of sequences")
            for i, r in enumerate(rows):
                self._check_row(r, i)
            self.rows = [r.astype(np.int64) for r in rows]
            self.order, self.cursor = self.rng.permutation(len(self.rows)), 0

    def _check_row(self, r, i):
        if r.ndim != 1 or not (np.issubdtype(r.dtype, np.integer)):
            raise TypeError(f"data: sequence {i} is not a 1-D list of integer token ids")
        if r.size and (r.min() < 0 or r.max() >= self.vocab):
            raise ValueError(f"data: sequence {i} has a token id outside [0, {self.vocab})")

    def next(self):
        if self.generator is not None:
            rows = [np.asarray(r) for r in self.generator(self.rng)]
            if not rows:
                raise ValueError("data: the batch function returned no sequences")
            for i, r in enumerate(rows):
                self._check_row(r, i)
        else:
            rows = []
            while len(rows) < self.batch_size:
                if self.cursor == len(self.order):
                    self.order, self.cursor = self.rng.permutation(len(self.rows)), 0
                take = self.order[self.cursor:self.cursor + self.batch_size - len(rows)]
                self.cursor += len(take)
                rows.extend(self.rows[i] for i in take)
        return _pad_rows(rows, self.pad_id, self.n_ctx)


# ---- the model's parameters ------------------------------------------------------------

def _trainable(model):
    """Make model._weights writeable, C-contiguous float32 arrays that the C core reads
    directly, and return them.

    The core keeps pointers into the arrays it was built with. For GPT-2 those are the
    HF-named arrays themselves, so an in-place update reaches it; Llama's stacks
    (q|k|v, gate|up) are views of the HF arrays, which are rows of one array; GPT-NeoX's
    regrouped q|k|v is a copy, which _sync_core refreshes after a step."""
    w = model._weights
    fresh = {}
    for name, a in w.items():
        if a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable and a.flags.aligned:
            fresh[name] = a
        else:
            fresh[name] = np.array(a, dtype=np.float32, order="C", copy=True)
    model._weights = fresh
    model.dtype = "float32"
    model._grad_core = None  # a 2-byte model's float32 twin for gradients (gradients.py): now the model itself
    model._core_weights = architectures.core_weights(model.arch, fresh)
    model._core = _core.Model(architectures.core_config(model.arch), model._core_weights)
    # core arrays that are not one of the HF arrays (stacks, regrouped copies)
    ids = {id(a) for a in fresh.values()}
    model._derived_core = [k for k, a in model._core_weights.items() if id(a) not in ids]
    _forget_derived(model)
    return fresh


def _sync_core(model):
    """After an in-place update: refresh the core's copies of the HF arrays (GPT-NeoX's
    regrouped q|k|v), forget cached digests."""
    derived = getattr(model, "_derived_core", ())
    if derived:
        new = architectures.core_weights(model.arch, model._weights)
        for k in derived:
            # a stack whose parts are consecutive rows of one array (q|k|v, gate|up once
            # loaded) is a read-only view of the HF arrays' memory: already up to date
            if not np.may_share_memory(model._core_weights[k], new[k]):
                np.copyto(model._core_weights[k], new[k])
    _forget_derived(model)


def _forget_derived(model):
    model._fingerprint = None   # the activation store's digest of the weights
    model.path = None           # no longer the weights of the folder it came from


# ---- the loop ----------------------------------------------------------------------------

@dataclass
class TrainHistory:
    """What fit recorded: per step the loss of the minibatch (before the update), the
    learning rate used and the gradient norm before clipping; plus the optimizer."""
    loss: np.ndarray
    lr: np.ndarray
    grad_norm: np.ndarray
    optimizer: AdamW = field(repr=False)
    seconds: float = 0.0

    def plot(self, ax=None, smooth=20):
        """The loss curve (and its running mean over `smooth` steps), on a log scale."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        steps = np.arange(1, len(self.loss) + 1)
        ax.plot(steps, self.loss, alpha=0.35, lw=0.8, label="minibatch")
        if len(self.loss) >= smooth > 1:
            run = np.convolve(self.loss, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1:], run, lw=1.5, label=f"mean of {smooth}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend()
        return ax


def fit(model, data, *, steps, batch_size=32, lr=1e-3, schedule="cosine", warmup=0, min_lr_ratio=0.0,
        weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, clip_norm=1.0, no_decay=None, seed=0,
        pad_id=None, callback=None, progress=None):
    """Train the model in place on next-token cross-entropy (padding masked out).

    data: a list of token sequences (lists or 1-D arrays of ids, any lengths), or a 2-D
        token array (an ms.Tokens or with rows all real), sampled in shuffled epochs;
        or a function rng -> list of sequences that makes each minibatch (fresh data
        for synthetic tasks; it must draw from the rng it is given to stay seeded).
    steps, batch_size: optimizer updates and sequences per minibatch (a function's
        batches have the size it returns).
    lr: the peak learning rate; schedule "cosine", "linear", "constant" (see
        lr_schedule) after `warmup` linear warmup steps, ending at min_lr_ratio * lr;
        or a function step -> multiplier.
    weight_decay, betas, eps, no_decay: AdamW's (see AdamW).
    clip_norm: the maximum global gradient norm, or None for no clipping.
    seed: minibatch order and generated batches; the same seed, data and model give
        bit-identical weights.
    pad_id: the token that pads short rows (it is masked, so any id works): default
        the config's pad_token_id, else 0.
    callback: fn(step, model, history_so_far) called after each update; return True to stop.
    Returns a TrainHistory."""
    import time

    steps = _check_int(steps, "steps", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    lr = _check_positive(lr, "lr")
    if callable(schedule):
        multiplier = schedule
        _check_int(warmup, "warmup", 0)
        if warmup > steps:
            raise ValueError(f"warmup: {warmup} warmup steps is more than the {steps} steps of training")
    else:
        multiplier = lr_schedule(schedule, steps, warmup, min_lr_ratio)
    if clip_norm is not None:
        clip_norm = _check_positive(clip_norm, "clip_norm")
    if callback is not None and not callable(callback):
        raise TypeError("callback: expected a function (step, model, history) -> stop?")
    if pad_id is None:
        pad_id = model.config.get("pad_token_id")
        pad_id = 0 if pad_id is None else int(pad_id)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}")
    if not hasattr(model, "grad"):
        raise RuntimeError("fit needs Model.grad (the C backward pass), which this build lacks")
    _check_adamw(lr, betas, eps, weight_decay)  # before the model is touched
    rng = np.random.default_rng(seed)
    batches = _Batches(data, batch_size, rng, pad_id, model.n_ctx, model.d_vocab)
    params = _trainable(model)
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_decay=no_decay)

    loss_h, lr_h, norm_h = [], [], []
    start = time.time()
    with progress_bar(progress, "training", "step", total=steps) as bar:
        g, last_shape = None, None
        for step in range(steps):
            ids, mask = batches.next()
            # the last step's gradient arrays are overwritten when the batch has the same shape
            reuse = g if last_shape == ids.shape else None
            last_shape = ids.shape
            step_lr = lr * float(multiplier(step))
            g, norm = _step(model, opt, ids, mask, clip_norm, step_lr, reuse, step)
            loss = float(g.value)
            loss_h.append(loss)
            lr_h.append(step_lr)
            norm_h.append(norm)
            bar.update(1)
            if bar._bar is not None and (step % 10 == 0 or step == steps - 1):
                bar._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{step_lr:.2e}", refresh=False)
            if callback is not None:
                hist = TrainHistory(np.array(loss_h), np.array(lr_h), np.array(norm_h), opt, time.time() - start)
                if callback(step, model, hist):
                    break
    return TrainHistory(np.array(loss_h), np.array(lr_h), np.array(norm_h), opt, time.time() - start)


# ---- checkpoints ---------------------------------------------------------------------

def write_safetensors(path, tensors, metadata=None):
    """Write {name: array} as a safetensors file (float32/int arrays, little-endian):
    an 8-byte header length, the JSON header, then the data, 8-byte aligned."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
              np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
    header, offset, arrays = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in dtypes:
            raise TypeError(f"tensors: {name} has dtype {a.dtype}, not one safetensors stores here")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": dtypes[a.dtype.newbyteorder("=")], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def save_pretrained(model, path, extra_config=None):
    """Save the model as a HuggingFace folder: config.json + model.safetensors (fp32),
    named as transformers' own save_pretrained names them, so that
    AutoModelForCausalLM.from_pretrained(path) and ms.Model.from_pretrained(path) load it.
    extra_config: keys added to config.json (bos/eos/pad token ids, ...)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    family = model.family
    tensors = {architectures.hf_name(name, family): a for name, a in model._weights.items()}
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config["model_type"] = family
    config["architectures"] = [architectures.architecture_class(family)]
    config.setdefault("torch_dtype", "float32")
    if extra_config:
        config.update(extra_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    return path


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"config: {type(x).__name__} is not JSON-serializable")
