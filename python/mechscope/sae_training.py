"""Training a sparse autoencoder on activations (ms.sae.train).

Two recipes, each a loss over minibatches of activations x [batch, d_in], minimised
with ms.train.AdamW:
- "topk" (Gao et al. 2024): features = ReLU of the k largest pre-activations, loss the
  mean squared reconstruction error (summed over d_in); the decoder's rows are kept at
  unit norm after every step, so that a feature's size is its activation.
- "standard" with an L1 penalty (Bricken et al. 2023, with the decoder-norm weighting
  of Anthropic's 2024 update): features = ReLU(pre), loss = mean squared error
  + l1 * mean over the batch of sum_i f_i * |W_dec[i]|.
Both start from a decoder of random unit rows, the encoder its transpose, b_dec the
mean activation and b_enc zero. The gradients are written out below (one matrix
product each way, NumPy's); they are checked against PyTorch's autograd in the tests.

A transcoder is trained the same way on pairs (x at its input site, y at its output
site, [batch, d_out]): features from x @ W_enc + b_enc (no b_dec subtracted), the
reconstruction error that of y; its encoder starts as random unit columns of its own,
b_dec as the mean of y.
"""
import numpy as np

from ._progress import progress_bar


def _forward(p, x, k, transcoder=False):
    """(features, reconstruction) of the batch x, as the SAE (or transcoder) it trains
    computes them"""
    from .sae import _activation  # noqa: PLC0415  (sae imports this module)

    centred = x if transcoder else x - p["b_dec"]
    f = _activation(centred @ p["W_enc"] + p["b_enc"], "standard" if k is None else "topk", k=k)
    return f, f @ p["W_dec"] + p["b_dec"]


def loss_and_grads(p, x, k=None, l1=0.0, y=None):
    """(loss, {name: d loss / d name}, features, reconstruction) of one batch, as the
    module's docstring defines them. p: W_enc [d_in, d_sae], b_enc [d_sae], W_dec
    [d_sae, d_in], b_dec [d_in]. y: a transcoder's targets [batch, d_out] (then W_dec
    [d_sae, d_out], b_dec [d_out])."""
    B = x.shape[0]
    transcoder = y is not None
    f, x_hat = _forward(p, x, k, transcoder)
    err = x_hat - (y if transcoder else x)
    loss = float((err.astype(np.float64) ** 2).sum() / B)
    d_hat = (2.0 / B) * err                              # [B, d_in]
    g = {"W_dec": f.T @ d_hat, "b_dec": d_hat.sum(0)}
    d_f = d_hat @ p["W_dec"].T                           # [B, d_sae]
    if l1:
        norms = np.sqrt((p["W_dec"].astype(np.float64) ** 2).sum(1)).astype(np.float32)
        loss += float(l1 * (f.astype(np.float64) @ norms).sum() / B)
        d_f = d_f + (l1 / B) * norms
        safe = np.where(norms > 0, norms, 1.0)
        g["W_dec"] += (l1 / B) * f.sum(0)[:, None] * (p["W_dec"] / safe[:, None])
    d_pre = d_f * (f > 0)                                # ReLU (and top-k) pass the kept ones only
    g["W_enc"] = (x if transcoder else x - p["b_dec"]).T @ d_pre
    g["b_enc"] = d_pre.sum(0)
    if not transcoder:  # b_dec is also subtracted from the input
        g["b_dec"] = g["b_dec"] - d_pre.sum(0) @ p["W_enc"].T
    return loss, {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in g.items()}, f, x_hat


def _rows(a, name, what):
    x = np.asarray(a, dtype=np.float32)
    if x.ndim < 2 or x.shape[0] < 2 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected [n, {what}] (n >= 2), got shape {list(x.shape)}")
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contain NaN or infinity")
    return x


def _check(activations, d_sae, site, k, l1, steps, batch_size, lr):
    from .train import _check_int, _check_positive  # noqa: PLC0415

    x = _rows(activations, "activations", "d_in")
    if not isinstance(site, str):
        raise TypeError(f"site: expected the site name the activations come from, got {type(site).__name__}")
    d_sae = _check_int(d_sae, "d_sae", 1)
    if (k is None) == (l1 is None):
        raise ValueError("give k (a TopK SAE) or l1 (a ReLU SAE with an L1 penalty), one of them")
    if k is not None:
        k = _check_int(k, "k", 1)
        if k > d_sae:
            raise ValueError(f"k: {k} features per token, but the SAE has d_sae={d_sae}")
    else:
        l1 = _check_positive(l1, "l1", allow_zero=True)
    return x, d_sae, k, l1, _check_int(steps, "steps", 1), _check_int(batch_size, "batch_size", 1), \
        _check_positive(lr, "lr")


def train(activations, d_sae, *, site, k=None, l1=None, targets=None, site_out=None, steps=2000, batch_size=256,
          lr=1e-3, warmup=0, seed=0, progress=None):
    """A sparse autoencoder trained on `activations` [n, d_in] (any leading shape; e.g.
    ms.extract(model, data, site, positions="all") flattened), for the site they come
    from. k: a TopK SAE with k active features per token; l1: a ReLU SAE with that L1
    coefficient (give one). Adam (no weight decay) at `lr`, linear warm-up over
    `warmup` steps, minibatches drawn without replacement, seeded.

    targets [n, d_out] and site_out: a transcoder from `site` to `site_out` instead,
    trained to give targets[i] (the output site's value at the same token) from
    activations[i].

    Returns the SAE, with ``history``: {"loss", "fvu" (fraction of the batch's variance
    left unexplained), "l0" (mean active features per token)}, one entry per step."""
    from .sae import SAE  # noqa: PLC0415  (sae imports this module)
    from .train import AdamW, lr_schedule  # noqa: PLC0415

    x, d_sae, k, l1, steps, batch_size, lr = _check(activations, d_sae, site, k, l1, steps, batch_size, lr)
    n, d_in = x.shape
    y = None
    if (targets is None) != (site_out is None):
        raise ValueError("a transcoder needs both targets (the output site's values) and site_out (its name)")
    if targets is not None:
        if not isinstance(site_out, str):
            raise TypeError(f"site_out: expected the site name the targets come from, got {type(site_out).__name__}")
        y = _rows(targets, "targets", "d_out")
        if len(y) != n:
            raise ValueError(f"targets: {len(y)} rows, but activations have {n}; give the two sites' values "
                             "at the same tokens")
    rng = np.random.default_rng(seed)
    target = x if y is None else y
    W_dec = rng.normal(size=(d_sae, target.shape[1])).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if y is None:
        W_enc = np.ascontiguousarray(W_dec.T)
    else:
        W_enc = rng.normal(size=(d_in, d_sae)).astype(np.float32)
        W_enc /= np.linalg.norm(W_enc, axis=0, keepdims=True)
    p = {"W_enc": W_enc, "b_enc": np.zeros(d_sae, np.float32), "W_dec": W_dec,
         "b_dec": target.mean(0).astype(np.float32)}
    opt = AdamW(p, lr=lr, weight_decay=0.0)
    multiplier = lr_schedule("constant", steps, warmup=min(warmup, steps))
    history = {"loss": [], "fvu": [], "l0": []}
    order, at = rng.permutation(n), 0
    with progress_bar(progress, "training SAE", "step", total=steps) as bar:
        for step in range(steps):
            if at + batch_size > n:
                order, at = rng.permutation(n), 0
            rows = order[at:at + batch_size]
            at += batch_size
            batch = x[rows]
            want = batch if y is None else y[rows]
            loss, grads, f, x_hat = loss_and_grads(p, batch, k, l1 or 0.0, None if y is None else want)
            history["loss"].append(loss)
            history["fvu"].append(float(((x_hat - want) ** 2).sum() / ((want - want.mean(0)) ** 2).sum()))
            history["l0"].append(float((f > 0).sum(1).mean()))
            opt.step(grads, lr=lr * multiplier(step))
            if k is not None:
                p["W_dec"] /= np.maximum(np.linalg.norm(p["W_dec"], axis=1, keepdims=True), 1e-12)
            bar.update(1)
    sae = SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], site, architecture="standard" if k is None else "topk",
              k=k, site_out=site_out)
    sae.history = {name: np.asarray(v) for name, v in history.items()}
    return sae
