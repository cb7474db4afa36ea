"""Distributed alignment search: learn the subspace of a site that carries a causal variable.

DAS (Geiger et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations") learns an orthonormal basis Q [width, rank] of a site
such that the interchange intervention

    h' = h_base + Q Q^T (h_source - h_base)

(mechscope.SubspacePatch) makes the model output what a high-level causal model predicts:
the label that the base input gets when the variable takes the value it has in the source
input (the counterfactual label). Q is trained by the cross-entropy of that label's token
at the metric position of the intervened run, with Adam, keeping Q orthonormal by a QR
retraction. The gradient comes from the C core's backward pass (model.grad): with
g = d loss / d h' at the intervened positions and D = h_source - h_base,

    d loss / d Q = sum over rows and positions of  g (Q^T D)^T + D (Q^T g)^T.

Boundless DAS (Wu et al. 2023, "Interpretability at scale: identifying causal mechanisms in
Alpaca") learns a full rotation R [width, width] and a soft mask over its columns instead of
fixing the rank:

    h' = h_base + R diag(m) R^T (h_source - h_base),
    m_i = sigmoid((i + 1/2) / T) * sigmoid((b * width - i - 1/2) / T),   i = 0 .. width-1,

with a learned boundary b in [1/width, 1] (initially 1/2), the temperature T annealed
linearly over the training steps, and the loss cross-entropy + b (the boundary's size is
penalised, weight boundary_weight = 1). This is the form of the authors' library (pyvene's
BoundlessRotatedSpaceIntervention and its tutorials: Adam, boundary learning rate 1e-2),
with two changes. pyvene places coordinate i at i, so that its first coordinate never has
a mask above 1/2; here coordinate i sits at the centre i + 1/2 of its unit interval, so
that at a low temperature the mask is 1 on exactly the first round(b * width) columns,
which are the learned basis. And the temperature, which is measured in coordinates (the
mask's edge is about T coordinates wide), goes from 1 to 0.05 by default: pyvene's 50 to
0.1 was chosen for 4,096-wide models, and at the widths of small models it keeps the mask
well below 1 everywhere until the last steps.

Nothing before the site's block depends on the basis, so a fit reads the base inputs'
residual stream entering that block once, with their site values, and each step's
forward and backward pass runs from that block on: the same numbers as a whole run, in
less time the later the block (README: fits at layers 5, 19 and 28 of SmolLM2's 30). The
stream is kept in memory ([pairs, pos, d_model] float32) when it takes at most a quarter
of the memory budget (mechscope.set_memory_budget); otherwise every step runs from the
embedding.

    das = ms.das.DAS(model, "blocks.2.hook_resid_post", rank=1, pos=-1).fit(base, source, labels)
    das.score(test_base, test_source, test_labels)           # interchange intervention accuracy
    model.run(base, interventions=[das.intervention(ms.Source(source))])
"""
import inspect
import math

import numpy as np

from . import sites as _sites
from ._progress import progress_bar
from ._runtime import get_memory_budget
from .gradients import grad as _grad
from .interventions import Add, Source, SubspacePatch
from .metrics import LogProb, last_positions

__all__ = ["DAS", "iia"]


# ---------------------------------------------------------------- checks

def _positive_int(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument}: expected an int >= 1, got {value!r}")
    return int(value)


def _positive_float(value, argument):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argument}: expected a number, got {type(value).__name__}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{argument}: expected a finite number > 0, got {value!r}")
    return v


def _site_width(model, site):
    """Width of a token site (heads and d_head flattened for the headed sites)."""
    _, _, suffix = _sites.parse(site, model)  # unknown or absent sites raise here, by name
    if suffix in _sites.ATTENTION:
        raise ValueError(f"site: {site!r} is an attention site; DAS needs a token site "
                         "(e.g. 'blocks.1.hook_resid_post', 'blocks.1.attn.hook_z')")
    shape = _sites.shape(suffix, model._shape_cfg, 1, 1)
    return int(np.prod(shape[2:])), suffix


def _pairs(model, base, source, labels):
    """-> base tokens, base mask, source tokens, source mask, labels (int64 [n])."""
    bt, bm = model._check_tokens(base, None)
    st, sm = model._check_tokens(source, None)
    if bt.shape != st.shape:
        raise ValueError(f"source: tokens of shape {list(st.shape)}, the base tokens have {list(bt.shape)}; "
                         "pairs must be aligned (pad them to one length)")
    lab = np.asarray(labels)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise TypeError("labels: expected the counterfactual label's token id per pair (ints)")
    if lab.shape != (bt.shape[0],):
        raise ValueError(f"labels: expected one token id per pair ({bt.shape[0]}), got shape {list(lab.shape)}")
    if lab.min() < 0 or lab.max() >= model.d_vocab:
        raise ValueError(f"labels: token id out of range [0, {model.d_vocab})")
    return bt, bm, st, sm, lab.astype(np.int64)


def _positions(pos, n_pos, n, masks, argument="pos"):
    """pos -> int array [n, k]: an int or a list of ints is the same k positions for
    every pair; an int array [n, k] gives each pair its own. Negative positions count
    from the end; every position must be a real token in each of masks ((name, mask))."""
    arr = np.asarray(pos)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 2 or arr.size == 0:
        raise TypeError(f"{argument}: expected an int, a list of ints, or an int array [pairs, k], got {pos!r}")
    if arr.ndim == 2 and arr.shape[0] != n:
        raise ValueError(f"{argument}: positions for {arr.shape[0]} pairs, but there are {n} pairs")
    arr = np.broadcast_to(arr, (n, arr.shape[-1]))
    arr = np.where(arr < 0, arr + n_pos, arr).astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_pos:
        raise ValueError(f"{argument}: position out of range for {n_pos} positions ({pos!r})")
    if (np.diff(np.sort(arr, axis=1), axis=1) == 0).any():
        raise ValueError(f"{argument}: a position is repeated within a pair ({pos!r})")
    rows = np.arange(n)[:, None]
    for name, mask in masks:
        if mask is not None and not mask[rows, arr].all():
            raise ValueError(f"{argument}: a position to intervene on is padding in the {name} tokens")
    return arr


def _shared(P):
    """True when every pair has the same positions (P [n, k])."""
    return bool((P == P[:1]).all())


def _metric_positions(metric_pos, mask, n, n_pos):
    if metric_pos is None:
        return last_positions(mask, n, n_pos)
    if isinstance(metric_pos, bool) or not isinstance(metric_pos, (int, np.integer)):
        raise TypeError(f"metric_pos: expected None (each row's last real token) or an int, got {metric_pos!r}")
    p = int(metric_pos) + (n_pos if metric_pos < 0 else 0)
    if not 0 <= p < n_pos:
        raise ValueError(f"metric_pos: position {metric_pos} out of range for {n_pos} positions")
    if mask is not None and not mask[:, p].all():
        raise ValueError(f"metric_pos: position {metric_pos} is padding in some base row")
    return np.full(n, p, np.int32)


def _check_basis(basis, width):
    Q = np.asarray(basis, np.float64)
    if Q.ndim == 1:
        Q = Q[:, None]
    if Q.ndim != 2 or Q.shape[0] != width or Q.shape[1] < 1:
        raise ValueError(f"basis: expected shape [{width}, k] with k >= 1, got {list(np.shape(basis))}")
    if not np.allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-4):
        raise ValueError("basis: columns must be orthonormal (use numpy.linalg.qr)")
    return Q


# ---------------------------------------------------------------- pieces

def _site_values(model, site, tokens, mask, pos, batch_size, start=False):
    """The site's value at each row's positions pos [n, k]: [n, k, width].

    start=True: also (block, hook_resid_pre entering the site's block [n, pos, d_model]),
    read in the same runs: the base runs' residual stream there, which no step of a fit
    changes, so that each step's forward starts at that block instead of the embedding;
    None instead when the site is not in a block (embedding, final norm) or when the
    values would take more than a quarter of the memory budget."""
    n, T = tokens.shape
    _, layer, _ = _sites.parse(site, model)
    keep = start and site.startswith("blocks.") and 4 * n * T * model.d_model <= get_memory_budget() // 4
    resid = f"blocks.{layer}.hook_resid_pre"
    out, before = [], np.empty((n, T, model.d_model), np.float32) if keep else None
    for i in range(0, n, batch_size):
        m = None if mask is None else mask[i:i + batch_size]
        names = list(dict.fromkeys([site, resid] if keep else [site]))  # the site may be resid itself
        cache = model.run(tokens[i:i + batch_size], attention_mask=m, cache=names, logits=None).cache
        v = cache[site].reshape(cache[site].shape[0], T, -1)
        out.append(v[np.arange(v.shape[0])[:, None], pos[i:i + batch_size]])
        if keep:
            before[i:i + batch_size] = cache[resid]
    values = np.concatenate(out).astype(np.float64)
    if not start:
        return values
    return values, (layer, before) if keep else None


def _added(site, delta, pos):
    """The Add interventions writing delta [rows, k, ...] at each row's positions pos [rows, k]:
    one for all rows when they share the positions, else one per row."""
    if _shared(pos):
        return [Add(site, delta, pos=list(map(int, pos[0])))]
    return [Add(site, delta[r:r + 1], pos=list(map(int, pos[r])), row=r) for r in range(pos.shape[0])]


def _retract(X):
    """QR retraction onto matrices with orthonormal columns (signs fixed so that it is
    continuous: X = Q R with diag(R) > 0)."""
    Q, R = np.linalg.qr(X)
    return Q * np.where(np.diag(R) < 0, -1.0, 1.0)


def _tangent(Q, G):
    """The gradient G projected onto the tangent space of the Stiefel manifold at Q."""
    QtG = Q.T @ G
    return G - Q @ (QtG + QtG.T) / 2


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _boundless_mask(boundary, width, temperature):
    """Boundless DAS's mask over the rotated coordinates and d mask / d boundary."""
    centres = np.arange(width) + 0.5
    left = _sigmoid(centres / temperature)
    right = _sigmoid((boundary * width - centres) / temperature)
    mask = left * right
    return mask, mask * (1 - right) * width / temperature


def _subspace_gradient(Q, D, G, weights=None):
    """d loss / d Q for h' = h_b + Q diag(w) Q^T D (w = 1: a plain interchange), from the
    site gradient G = d loss / d h' and D = h_source - h_base, rows x positions stacked
    [N, width]; also d loss / d w when weights are given."""
    DQ, GQ = D @ Q, G @ Q
    if weights is None:
        return G.T @ DQ + D.T @ GQ
    return G.T @ (DQ * weights) + D.T @ (GQ * weights), (GQ * DQ).sum(axis=0)


def _interchange_gradient(model, site, Q, tokens, mask, D, pos, metric_pos, labels, weights=None, start=None):
    """One step's loss (mean cross-entropy of the labels) and its gradient with respect to
    Q (and to the mask weights, when given) for the interchange h' = h_b + Q diag(w) Q^T D
    at each row's positions pos [rows, k]; D = h_source - h_base there [rows, k, width].
    start: None, or (block, the rows' hook_resid_pre there) to start the run there."""
    # The base's and the source's values at the site do not depend on Q, so the run is
    # written as an Add of h' - h_b: the same intervened run as SubspacePatch from a Source
    # (the tests check the gradient against that run), without the source rows, and
    # Add's backward is the identity, so the site's gradient is d loss / d h'.
    rows, width = D.shape[0], Q.shape[0]
    coords = D @ Q
    delta = (coords if weights is None else coords * weights) @ Q.T
    _, _, suffix = _sites.parse(site, model)
    if suffix in _sites.HEADED:  # the Add intervention wants [rows, positions, heads, d_head]
        delta = delta.reshape(rows, pos.shape[1], -1, model.d_head)
    g = _grad(model, tokens, LogProb(labels, pos=metric_pos), sites=[site], attention_mask=mask,
              interventions=_added(site, delta.astype(np.float32), pos), progress=False,  # DAS shows its own bar
              _start=start)
    # loss = -mean log p(label): its gradient is -1/rows times that of the summed metric
    site_grad = np.asarray(g[site], np.float64)
    G = -site_grad.reshape(rows, tokens.shape[1], -1)[np.arange(rows)[:, None], pos].reshape(-1, width) / rows
    loss = -float(np.mean(g.metric))
    if weights is None:
        return loss, _subspace_gradient(Q, D.reshape(-1, width), G)
    return (loss,) + _subspace_gradient(Q, D.reshape(-1, width), G, weights)


def _rows(start, idx):
    return None if start is None else (start[0], start[1][idx])


class _Adam:
    def __init__(self, lr, shape, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

    def step(self, grad):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# ---------------------------------------------------------------- evaluation

def iia(model, site, basis, base, source, labels, *, pos=-1, source_pos=None, metric_pos=None, batch_size=64,
        progress=None):
    """Interchange intervention accuracy: the share of pairs for which the base run, with
    the basis's coordinates of the site at positions pos taken from the source run at
    source_pos, predicts the counterfactual label (top-1 over the whole vocabulary at
    metric_pos: None = each base row's last real token).

    basis: [width, k] orthonormal (e.g. a fitted DAS's basis_, or a random one as a
    baseline); base, source: token arrays [n, pos] of the same shape (or texts);
    labels: the counterfactual label's token id per pair. pos: an int or a list of ints
    (the same for every pair) or an int array [n, k] (each pair its own positions);
    source_pos: the source's positions in the same forms (None: pos). With the same
    positions in both and in every pair this is mechscope.SubspacePatch from a Source
    computed in the same pass; otherwise the two inputs' values are read first and the
    base run adds Q Q^T (h_source - h_base) at each pair's positions."""
    return float(_interchange_correct(model, site, basis, base, source, labels, pos, source_pos, metric_pos,
                                      batch_size, progress, "IIA").mean())


def _interchange_correct(model, site, basis, base, source, labels, pos, source_pos, metric_pos, batch_size,
                         progress, what):
    """Whether each pair's interchanged base run predicts its label (top-1): bool [n]."""
    width, _ = _site_width(model, site)
    Q = _check_basis(basis, width)
    bt, bm, st, sm, lab = _pairs(model, base, source, labels)
    n, T = bt.shape
    Pb, Ps = _pair_positions(pos, source_pos, T, n, bm, sm)
    mpos = _metric_positions(metric_pos, bm, n, T)
    batch_size = _positive_int(batch_size, "batch_size")
    together = _shared(Pb) and np.array_equal(Pb, Ps)
    _, _, suffix = _sites.parse(site, model)
    correct = np.zeros(n, bool)
    with progress_bar(progress, what, "pair", total=n) as bar:
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            m = None if bm is None else bm[i:j]
            if together:
                src = Source(st[i:j], attention_mask=None if sm is None else sm[i:j])
                interventions = [SubspacePatch(site, Q.astype(np.float32), src, pos=Pb[0].tolist())]
            else:
                D = (_site_values(model, site, st[i:j], None if sm is None else sm[i:j], Ps[i:j], j - i)
                     - _site_values(model, site, bt[i:j], m, Pb[i:j], j - i))
                delta = (D @ Q) @ Q.T
                if suffix in _sites.HEADED:
                    delta = delta.reshape(j - i, Pb.shape[1], -1, model.d_head)
                interventions = _added(site, delta.astype(np.float32), Pb[i:j])
            out = model.run(bt[i:j], attention_mask=m, logits="last" if metric_pos is None else [int(mpos[0])],
                            interventions=interventions)
            logits = out.logits if metric_pos is None else out.logits[:, 0]
            correct[i:j] = logits.argmax(axis=-1) == lab[i:j]
            bar.update(j - i)
    return correct


def _pair_positions(pos, source_pos, n_pos, n, base_mask, source_mask):
    """(base positions, source positions), each [n, k], checked real in their inputs."""
    if source_pos is None:
        P = _positions(pos, n_pos, n, [("base", base_mask), ("source", source_mask)])
        return P, P
    Pb = _positions(pos, n_pos, n, [("base", base_mask)])
    Ps = _positions(source_pos, n_pos, n, [("source", source_mask)], "source_pos")
    if Ps.shape != Pb.shape:
        raise ValueError(f"source_pos: {Ps.shape[1]} positions per pair, pos has {Pb.shape[1]}")
    return Pb, Ps


# ---------------------------------------------------------------- the estimator

class DAS:
    """Distributed alignment search at one site (see the module's docstring).

    model: a mechscope.Model. site: a token site, e.g. "blocks.2.hook_resid_post"
        (headed sites such as attn.hook_z are flattened over heads and d_head).
    rank: the subspace's dimension (plain DAS); ignored with boundless=True, which learns it.
    pos: the positions whose values are interchanged: an int or a list of ints (the same
        for every pair), or an int array [pairs, k] (each pair its own k positions); real
        tokens. source_pos: where the source's values are read, in the same forms (None:
        pos); e.g. the position of a token that sits elsewhere in the source prompt.
    metric_pos: where the counterfactual label is read: None (each base row's last real
        token) or an int.
    boundless: Boundless DAS (a full rotation and a learned mask) instead of a fixed rank.
    lr: Adam's learning rate for the basis (or the rotation); boundary_lr for Boundless
        DAS's boundary; boundary_weight: its penalty; temperature: (start, end) of the
        linear annealing.
    epochs, batch_size, seed: passes over the pairs, pairs per step, the seed of the
        initial basis and of the minibatch order (a fit is deterministic).
    progress: True / False / None (a tqdm bar once a fit takes more than a second).

    After fit: basis_ [width, rank_] (orthonormal: usable as SubspacePatch(site,
    basis=das.basis_, ...)), rank_, history_ (loss per step; with boundless, also the
    boundary and temperature per step), and for Boundless DAS rotation_ and boundary_.
    """

    def __init__(self, model, site, rank=1, *, pos=-1, source_pos=None, metric_pos=None, boundless=False, lr=1e-2,
                 boundary_lr=1e-2, boundary_weight=1.0, temperature=(1.0, 0.05), epochs=10, batch_size=32,
                 seed=0, progress=None):
        self.model, self.site, self.rank, self.pos, self.metric_pos = model, site, rank, pos, metric_pos
        self.source_pos = source_pos
        self.boundless, self.lr, self.boundary_lr, self.boundary_weight = boundless, lr, boundary_lr, boundary_weight
        self.temperature, self.epochs, self.batch_size, self.seed = temperature, epochs, batch_size, seed
        self.progress = progress

    # scikit-learn's parameter protocol (without depending on scikit-learn)
    @classmethod
    def _param_names(cls):
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        for name, value in params.items():
            if name not in self._param_names():
                raise ValueError(f"{name}: not a parameter of DAS (parameters: {', '.join(self._param_names())})")
            setattr(self, name, value)
        return self

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k != "model")
        return f"DAS({shown})"

    def _check(self):
        """Every parameter, before any work."""
        model = self.model
        if not hasattr(model, "grad") or not hasattr(model, "_shape_cfg"):
            raise TypeError(f"model: expected a mechscope.Model, got {type(model).__name__}")
        width, _ = _site_width(model, self.site)
        if not isinstance(self.boundless, bool):
            raise TypeError(f"boundless: expected True or False, got {self.boundless!r}")
        if not self.boundless:
            rank = _positive_int(self.rank, "rank")
            if rank > width:
                raise ValueError(f"rank: {rank} is larger than the width of {self.site!r} ({width})")
        lr = _positive_float(self.lr, "lr")
        boundary_lr = _positive_float(self.boundary_lr, "boundary_lr")
        try:
            weight = float(self.boundary_weight)
        except (TypeError, ValueError):
            raise TypeError("boundary_weight: expected a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"boundary_weight: expected a finite number >= 0, got {self.boundary_weight!r}")
        try:
            t0, t1 = self.temperature
        except (TypeError, ValueError):
            raise TypeError(f"temperature: expected (start, end), got {self.temperature!r}") from None
        t0, t1 = _positive_float(t0, "temperature"), _positive_float(t1, "temperature")
        if t1 > t0:
            raise ValueError(f"temperature: the annealing goes down, start >= end (got {self.temperature!r})")
        epochs = _positive_int(self.epochs, "epochs")
        batch_size = _positive_int(self.batch_size, "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")
        return width, lr, boundary_lr, weight, (t0, t1), epochs, batch_size

    def fit(self, base, source, labels):
        """Learn the basis from pairs: base and source token arrays [n, pos] of the same
        shape (or texts), labels the counterfactual label's token id per pair."""
        width, lr, boundary_lr, weight, (t0, t1), epochs, batch_size = self._check()
        model, site = self.model, self.site
        bt, bm, st, sm, lab = _pairs(model, base, source, labels)
        n, T = bt.shape
        P, Ps = _pair_positions(self.pos, self.source_pos, T, n, bm, sm)
        mpos = _metric_positions(self.metric_pos, bm, n, T)

        # the site's values of both inputs do not depend on the basis: computed once; and
        # neither do the base runs before the site's block, where each step then starts
        base_values, start = _site_values(model, site, bt, bm, P, batch_size, start=True)
        D_all = _site_values(model, site, st, sm, Ps, batch_size) - base_values

        rng = np.random.default_rng(self.seed)
        k0 = width if self.boundless else int(self.rank)
        Q = _retract(rng.normal(size=(width, k0)))
        adam = _Adam(lr, Q.shape)
        boundary, b_adam = 0.5, _Adam(boundary_lr, ())
        steps = epochs * math.ceil(n / batch_size)
        schedule = np.linspace(t0, t1, steps)
        history = {"loss": []}
        if self.boundless:
            history.update(boundary=[], temperature=[])

        step = 0
        with progress_bar(self.progress, "DAS", "step", total=steps) as bar:
            for _ in range(epochs):
                order = rng.permutation(n)
                for i in range(0, n, batch_size):
                    idx = np.sort(order[i:i + batch_size])
                    if self.boundless:
                        mask, dmask = _boundless_mask(boundary, width, schedule[step])
                        loss, dQ, dm = _interchange_gradient(model, site, Q, bt[idx], None if bm is None else bm[idx],
                                                             D_all[idx], P[idx], mpos[idx], lab[idx], mask,
                                                             _rows(start, idx))
                        loss += weight * boundary
                        history["boundary"].append(boundary)
                        history["temperature"].append(float(schedule[step]))
                        db = float(dm @ dmask) + weight
                        boundary = float(np.clip(boundary - b_adam.step(db), 1.0 / width, 1.0))
                    else:
                        loss, dQ = _interchange_gradient(model, site, Q, bt[idx], None if bm is None else bm[idx],
                                                         D_all[idx], P[idx], mpos[idx], lab[idx],
                                                         start=_rows(start, idx))
                    Q = _retract(Q - adam.step(_tangent(Q, dQ)))
                    history["loss"].append(loss)
                    step += 1
                    bar.update(1)

        if self.boundless:
            mask, _ = _boundless_mask(boundary, width, t1)
            self.rank_ = max(1, int((mask > 0.5).sum()))
            self.rotation_, self.boundary_ = Q, boundary
            self.basis_ = Q[:, :self.rank_].copy()
        else:
            self.rank_, self.basis_ = Q.shape[1], Q
        self.width_, self.history_ = width, history
        return self

    def _fitted(self):
        if not hasattr(self, "basis_"):
            raise ValueError("DAS: not fitted yet; call fit(base, source, labels) first")

    def score(self, base, source, labels):
        """Interchange intervention accuracy of the learned basis on (held-out) pairs."""
        self._fitted()
        return iia(self.model, self.site, self.basis_, base, source, labels, pos=self.pos,
                   source_pos=self.source_pos, metric_pos=self.metric_pos, batch_size=self.batch_size,
                   progress=self.progress)

    def intervention(self, source):
        """The learned interchange as an intervention: SubspacePatch(site, basis_, source, pos)
        (which reads the source at the same positions, the same for every row)."""
        self._fitted()
        if self.source_pos is not None or np.ndim(self.pos) == 2:
            raise ValueError("intervention: a SubspacePatch interchanges the same positions of every row in "
                             "base and source; with per-pair positions or source_pos use ms.das.iia, or "
                             "SubspacePatch per row (row=) with the source's values")
        return SubspacePatch(self.site, self.basis_.astype(np.float32), source, pos=self.pos)

    def plot(self, ax=None, title=None):
        """The training loss per step (and Boundless DAS's boundary), with matplotlib."""
        self._fitted()
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
        ax.plot(self.history_["loss"], label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy + boundary penalty" if self.boundless
                      else "cross-entropy of the counterfactual label")
        if self.boundless:
            twin = ax.twinx()
            twin.plot(np.asarray(self.history_["boundary"]) * self.width_, color="C1", label="boundary x width")
            twin.set_ylabel("boundary x width", color="C1")
        ax.set_title(title or f"DAS at {self.site} (rank {self.rank_})")
        return ax.figure
