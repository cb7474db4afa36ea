"""Distributed alignment search: it recovers a variable planted in a hand-built model (plain
and Boundless DAS), its gradient with respect to the basis matches PyTorch autograd and
finite differences of the real SubspacePatch run, and bad input is refused by name."""
import numpy as np
import pytest
import scipy.linalg
import torch

import mechscope as ms
from mechscope import das as das_module
from mechscope.gradients import grad
from das_reference import das_loss

SITE = "blocks.1.hook_resid_pre"


def planted_model(seed=0, d=16, n_content=20):
    """A 2-layer GPT-2 built by hand whose answer (token A or B) is the sign of one
    direction v of the residual stream entering block 1 at the last position, and v
    carries the class (+1 / -1) of the last token, with an amplitude in [1, 2].

    Block 0 has random weights of O(1) scale (attention mixes every position into the
    last one) but neither reads nor writes v, block 1 writes nothing, the unembedding
    reads only v (rows +6v and -6v for A and B; v has zero mean, so the final LayerNorm
    keeps its sign). The token embeddings' other directions carry random features whose
    average is the same for both classes, so v is the only place the class is."""
    rng = np.random.default_rng(seed)
    V = n_content + 4  # 0 bos, 1 pad, content tokens, then A and B
    A, B = V - 2, V - 1
    cfg = dict(n_embd=d, n_head=2, n_layer=2, vocab_size=V, n_positions=8, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=0)
    w = {k: v.astype(np.float64) for k, v in ms.Model.from_config(cfg, seed=seed)._weights.items()}
    v = rng.normal(size=d)
    v -= v.mean()
    v /= np.linalg.norm(v)
    off = np.eye(d) - np.outer(v, v)  # projector onto the complement of v
    content = np.arange(2, 2 + n_content)
    cls = np.where(np.arange(n_content) % 2 == 0, 1.0, -1.0)
    wte = rng.normal(size=(V, d)) @ off
    for c in (1.0, -1.0):
        rows = content[cls == c]
        wte[rows] -= wte[rows].mean(axis=0) - wte[content].mean(axis=0)
    wte[content] += (cls * rng.uniform(1.0, 2.0, n_content))[:, None] * v
    w["wte.weight"] = wte
    w["wpe.weight"] = rng.normal(size=(8, d)) @ off
    for k in w:
        if k.startswith("h.0.") and "ln_" not in k:
            w[k] = (rng.normal(size=w[k].shape) / np.sqrt(w[k].shape[0]) if k.endswith("weight")
                    else 0.2 * rng.normal(size=w[k].shape))
    for k in ("h.0.attn.c_attn", "h.0.mlp.c_fc"):  # Conv1D weights are [in, out]: do not read v
        w[k + ".weight"] = off @ w[k + ".weight"]
    for k in ("h.0.attn.c_proj", "h.0.mlp.c_proj"):  # ... nor write it
        w[k + ".weight"] = w[k + ".weight"] @ off
        w[k + ".bias"] = w[k + ".bias"] @ off
    for k in ("h.1.attn.c_proj", "h.1.mlp.c_proj"):
        w[k + ".weight"][:] = 0
        w[k + ".bias"][:] = 0
    head = np.zeros((V, d))
    head[A], head[B] = 6 * v, -6 * v
    w["lm_head.weight"] = head
    model = ms.Model.from_arrays(cfg, {k: x.astype(np.float32) for k, x in w.items()})
    label = {int(t): (A if c > 0 else B) for t, c in zip(content, cls)}
    return model, v, content, label


def pairs(rng, content, label, n, T=4, differ=None):
    """n (base, source) pairs of random sequences; the counterfactual label is the answer
    for the source's last token. differ=True: base and source answers differ."""
    base, source = rng.choice(content, size=(n, T)), rng.choice(content, size=(n, T))
    if differ is not None:
        for i in range(n):
            while (label[int(base[i, -1])] != label[int(source[i, -1])]) != differ:
                source[i, -1] = rng.choice(content)
    return base, source, np.array([label[int(t)] for t in source[:, -1]])


@pytest.fixture(scope="module")
def planted():
    model, v, content, label = planted_model()
    rng = np.random.default_rng(1)
    train = pairs(rng, content, label, 256)
    held_out = pairs(rng, content, label, 200, differ=True)
    return model, v, content, label, train, held_out


def angle_degrees(Q, v):
    return float(np.degrees(scipy.linalg.subspace_angles(Q, v[:, None]).min()))


def test_planted_model_answers_by_v(planted):
    model, v, content, label, _, (base, _, _) = planted
    out = model.run(base, logits="last", cache=SITE)
    assert (out.logits.argmax(-1) == [label[int(t)] for t in base[:, -1]]).all()
    # the answer follows the sign of v at the site
    sign = out.cache[SITE][:, -1] @ v > 0
    assert ((out.logits.argmax(-1) == model.d_vocab - 2) == sign).all()


def test_das_recovers_planted_direction(planted):
    model, v, content, label, train, held_out = planted
    das = ms.das.DAS(model, SITE, rank=1, lr=3e-2, epochs=10, progress=False).fit(*train)
    assert das.basis_.shape == (16, 1) and das.rank_ == 1
    assert np.allclose(das.basis_.T @ das.basis_, 1, atol=1e-6)
    assert angle_degrees(das.basis_, v) < 10
    assert das.history_["loss"][-1] < das.history_["loss"][0] / 2
    # on held-out pairs whose answers differ, the interchange gives the source's answer
    assert das.score(*held_out) >= 0.99
    # random subspaces of the same rank do not
    rng = np.random.default_rng(7)
    random_iia = [ms.das.iia(model, SITE, np.linalg.qr(rng.normal(size=(16, 1)))[0], *held_out) for _ in range(5)]
    assert max(random_iia) < 0.5
    # the basis is a SubspacePatch's, from a cache or a Source
    base, source, labels = held_out
    src = model.run(source, cache=SITE)
    for patch in (das.intervention(ms.Source(source)),
                  ms.SubspacePatch(SITE, basis=das.basis_, source=src.cache, pos=-1)):
        assert (model.run(base, logits="last", interventions=[patch]).logits.argmax(-1) == labels).mean() >= 0.99


def test_das_is_deterministic(planted):
    model, _, _, _, train, _ = planted
    first = ms.das.DAS(model, SITE, epochs=2, seed=3, progress=False).fit(*train).basis_
    again = ms.das.DAS(model, SITE, epochs=2, seed=3, progress=False).fit(*train).basis_
    other = ms.das.DAS(model, SITE, epochs=2, seed=4, progress=False).fit(*train).basis_
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("boundless", [False, True])
def test_fit_starts_each_step_at_the_sites_block(planted, monkeypatch, boundless):
    """A fit's steps start at the site's block from the base runs' residual stream there
    (read once); with a memory budget too small to keep it they run whole, and the two
    fits are the same."""
    model, _, _, _, train, _ = planted
    starts = []

    def spy(*args, _start=None, **kwargs):
        starts.append(None if _start is None else _start[0])
        return grad(*args, _start=_start, **kwargs)

    monkeypatch.setattr(das_module, "_grad", spy)
    kept = ms.das.DAS(model, SITE, boundless=boundless, epochs=2, progress=False).fit(*train)
    assert starts and set(starts) == {1}
    starts.clear()
    monkeypatch.setattr(das_module, "get_memory_budget", lambda: 0)
    whole = ms.das.DAS(model, SITE, boundless=boundless, epochs=2, progress=False).fit(*train)
    assert starts and set(starts) == {None}
    np.testing.assert_allclose(kept.history_["loss"], whole.history_["loss"], rtol=1e-6)
    np.testing.assert_allclose(kept.basis_, whole.basis_, atol=1e-6)


def test_boundless_das_recovers_planted_direction(planted):
    model, v, content, label, train, held_out = planted
    das = ms.das.DAS(model, SITE, boundless=True, lr=1e-2, boundary_lr=5e-2, epochs=20,
                     progress=False).fit(*train)
    assert das.rotation_.shape == (16, 16)
    assert np.allclose(das.rotation_.T @ das.rotation_, np.eye(16), atol=1e-6)
    # the boundary shrank from half the width, and the subspace it keeps holds v
    assert 1 <= das.rank_ < 8 and das.basis_.shape == (16, das.rank_)
    assert np.linalg.norm(das.basis_.T @ v) > 0.99
    assert das.history_["temperature"][0] == 1.0 and das.history_["temperature"][-1] == pytest.approx(0.05)
    assert das.score(*held_out) >= 0.99


# ---------------------------------------------------------------- the gradient

def _random_model():
    from conftest import make_hf_model
    hf = make_hf_model(dict(n_embd=24, n_head=3, n_layer=3, vocab_size=50, n_positions=16), seed=5)
    return ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})


@pytest.fixture(scope="module")
def gradient_case():
    model = _random_model()
    rng = np.random.default_rng(0)
    base, source = rng.integers(0, 50, (6, 7)), rng.integers(0, 50, (6, 7))
    labels = rng.integers(0, 50, 6)
    return model, base, source, labels, np.array([2, 6])


def _step(model, site, Q, base, source, labels, pos, weights=None, start=False):
    """The gradient a DAS step uses, through the package's own code path (pos: the same
    positions for every pair, or an int array [pairs, k]); start: the run starts at the
    site's block from the base's residual stream there, as a fit's steps do."""
    pos = np.broadcast_to(np.asarray(pos), (len(base), np.shape(pos)[-1]))
    hb, before = das_module._site_values(model, site, base, None, pos, 8, start=True)
    assert before is not None and before[0] == int(site.split(".")[1])
    hs = das_module._site_values(model, site, source, None, pos, 8)
    return das_module._interchange_gradient(model, site, Q, base, None, hs - hb, pos,
                                            np.full(len(base), base.shape[1] - 1), labels, weights,
                                            before if start else None)


@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("site", ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"])
def test_gradient_matches_autograd(gradient_case, site, start):
    model, base, source, labels, pos = gradient_case
    Q = np.linalg.qr(np.random.default_rng(1).normal(size=(24, 3)))[0]
    loss, dQ = _step(model, site, Q, base, source, labels, pos, start=start)
    with torch.enable_grad():
        Qt = torch.tensor(Q, requires_grad=True)
        ref = das_loss(model, site, Qt, base, source, labels, torch.as_tensor(pos))
        ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert np.abs(dQ - Qt.grad.numpy()).max() <= 1e-4 * np.abs(Qt.grad.numpy()).max()


@pytest.mark.parametrize("start", [False, True])
def test_boundless_gradient_matches_autograd(gradient_case, start):
    model, base, source, labels, pos = gradient_case
    site = "blocks.1.hook_resid_pre"
    R = np.linalg.qr(np.random.default_rng(2).normal(size=(24, 24)))[0]
    mask, dmask = das_module._boundless_mask(0.3, 24, 2.0)
    loss, dR, dm = _step(model, site, R, base, source, labels, pos, mask, start=start)
    with torch.enable_grad():
        Rt = torch.tensor(R, requires_grad=True)
        mt = torch.tensor(mask, requires_grad=True)
        ref = das_loss(model, site, Rt, base, source, labels, torch.as_tensor(pos), mask=mt)
        ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert np.abs(dR - Rt.grad.numpy()).max() <= 1e-4 * np.abs(Rt.grad.numpy()).max()
    assert np.abs(dm - mt.grad.numpy()).max() <= 1e-4 * np.abs(mt.grad.numpy()).max()
    # d mask / d boundary against central differences
    eps = 1e-6
    numeric = (das_module._boundless_mask(0.3 + eps, 24, 2.0)[0] - das_module._boundless_mask(0.3 - eps, 24, 2.0)[0]) / (2 * eps)
    np.testing.assert_allclose(dmask, numeric, rtol=1e-5, atol=1e-9)


def _patched_loss(model, site, Q, base, source, labels, pos):
    """The DAS loss of the real intervention: SubspacePatch from a Source, C forward pass."""
    patch = ms.SubspacePatch(site, basis=Q.astype(np.float32), source=ms.Source(source), pos=pos.tolist())
    logits = model.run(base, logits="last", interventions=[patch]).logits.astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    return -logp[np.arange(len(labels)), labels].mean()


LLAMA = dict(model_type="llama", hidden_size=24, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=40, vocab_size=50, max_position_embeddings=16, initializer_range=0.4)


@pytest.mark.parametrize("family, site", [("gpt2", "blocks.1.hook_resid_pre"), ("gpt2", "blocks.1.attn.hook_z"),
                                          ("gpt2", "blocks.0.mlp.hook_post"), ("llama", "blocks.1.hook_resid_mid"),
                                          ("llama", "blocks.0.attn.hook_v")])
def test_gradient_matches_finite_differences_of_the_subspace_patch(gradient_case, family, site):
    """Along tangent directions xi of the manifold of orthonormal bases, the loss of the
    retracted basis qr(Q + t xi), computed with the real SubspacePatch from a Source, changes
    at the rate <d loss / d Q, xi> (headed sites flattened over heads and d_head)."""
    model, base, source, labels, pos = gradient_case
    if family == "llama":
        model = ms.Model.from_config(LLAMA, seed=4)
    width = das_module._site_width(model, site)[0]
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.normal(size=(width, 2)))[0]
    _, dQ = _step(model, site, Q, base, source, labels, pos)
    for _ in range(3):
        xi = das_module._tangent(Q, rng.normal(size=Q.shape))
        xi /= np.linalg.norm(xi)
        t = 1e-2
        up = _patched_loss(model, site, das_module._retract(Q + t * xi), base, source, labels, pos)
        down = _patched_loss(model, site, das_module._retract(Q - t * xi), base, source, labels, pos)
        numeric = (up - down) / (2 * t)
        assert numeric == pytest.approx(float(np.sum(dQ * xi)), rel=2e-2, abs=2e-4)


def _added_loss(model, site, Q, base, source, labels, pos, source_pos):
    """The DAS loss with each pair's own positions, one pair at a time: the base run of
    pair r adds Q Q^T (h_source - h_base) at pos[r], h_source read at source_pos[r]."""
    total = 0.0
    for r in range(len(base)):
        hb = model.run(base[r:r + 1], cache=site, logits=None).cache[site][0].reshape(base.shape[1], -1)
        hs = model.run(source[r:r + 1], cache=site, logits=None).cache[site][0].reshape(base.shape[1], -1)
        delta = ((hs[source_pos[r]] - hb[pos[r]]).astype(np.float64) @ Q @ Q.T).astype(np.float32)
        logits = model.run(base[r:r + 1], logits="last",
                           interventions=[ms.Add(site, delta[None], pos=list(map(int, pos[r])))]).logits[0]
        logits = logits.astype(np.float64)
        total -= logits[labels[r]] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    return total / len(base)


def test_per_pair_positions_gradient_and_iia(gradient_case):
    """Each pair its own positions, and the source read elsewhere than the base: the
    step's loss and gradient (directional derivatives) equal the one-pair-at-a-time
    definition, and iia's two paths agree."""
    model, base, source, labels, _ = gradient_case
    site = "blocks.1.hook_resid_pre"
    pos = np.array([[2, 6], [1, 3], [5, 0], [2, 6], [4, 5], [3, 2]])
    source_pos = np.array([[1, 6], [2, 4], [0, 5], [3, 5], [6, 2], [2, 3]])
    rng = np.random.default_rng(4)
    Q = np.linalg.qr(rng.normal(size=(24, 2)))[0]
    hb = das_module._site_values(model, site, base, None, pos, 8)
    hs = das_module._site_values(model, site, source, None, source_pos, 8)
    loss, dQ = das_module._interchange_gradient(model, site, Q, base, None, hs - hb, pos,
                                                np.full(len(base), base.shape[1] - 1), labels)
    assert loss == pytest.approx(_added_loss(model, site, Q, base, source, labels, pos, source_pos), rel=1e-5)
    for _ in range(2):
        xi = das_module._tangent(Q, rng.normal(size=Q.shape))
        xi /= np.linalg.norm(xi)
        t = 1e-2
        up = _added_loss(model, site, das_module._retract(Q + t * xi), base, source, labels, pos, source_pos)
        down = _added_loss(model, site, das_module._retract(Q - t * xi), base, source, labels, pos, source_pos)
        assert (up - down) / (2 * t) == pytest.approx(float(np.sum(dQ * xi)), rel=2e-2, abs=2e-4)
    # iia: the same positions in every pair (one SubspacePatch) and the same interchange
    # written per pair (rows listing the positions in other orders) give the same answers
    shared = das_module.iia(model, site, Q, base, source, labels, pos=[2, 6])
    reordered = np.array([[2, 6], [6, 2]] * 3)
    assert das_module.iia(model, site, Q, base, source, labels, pos=reordered) == shared
    # and a fit with per-pair positions runs and scores through the per-pair path
    das = ms.das.DAS(model, site, rank=2, pos=pos, source_pos=source_pos, epochs=2, batch_size=3).fit(
        base, source, labels)
    assert 0.0 <= das.score(base, source, labels) <= 1.0
    with pytest.raises(ValueError, match="intervention: .*per-pair"):
        das.intervention(ms.Source(source))
    # bad positions
    with pytest.raises(ValueError, match="pos: positions for 2 pairs"):
        das_module.iia(model, site, Q, base, source, labels, pos=pos[:2])
    with pytest.raises(ValueError, match="source_pos: 1 positions per pair"):
        das_module.iia(model, site, Q, base, source, labels, pos=pos, source_pos=source_pos[:, :1])
    with pytest.raises(ValueError, match="pos: a position is repeated within a pair"):
        das_module.iia(model, site, Q, base, source, labels, pos=np.array([[1, 1]] * 6))
    with pytest.raises(ValueError, match="source_pos: position out of range"):
        das_module.iia(model, site, Q, base, source, labels, pos=pos, source_pos=source_pos + 7)


# ---------------------------------------------------------------- the estimator's protocol

def test_get_and_set_params_and_clone(planted):
    import sklearn.base as sklearn_base
    model = planted[0]
    das = ms.das.DAS(model, SITE, rank=2, lr=0.05)
    params = das.get_params()
    assert params["rank"] == 2 and params["lr"] == 0.05 and params["model"] is model
    copy = sklearn_base.clone(das)
    assert copy.get_params() == params and copy is not das
    assert das.set_params(rank=3).rank == 3
    with pytest.raises(ValueError, match="ranke"):
        das.set_params(ranke=3)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=17), ValueError, "rank: 17 is larger than the width"),
    (dict(rank=0), ValueError, "rank: expected an int >= 1"),
    (dict(rank=-2), ValueError, "rank"),
    (dict(rank=1.5), ValueError, "rank"),
    (dict(rank=True), ValueError, "rank"),
    (dict(lr=0), ValueError, "lr: expected a finite number > 0"),
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(lr="fast"), TypeError, "lr"),
    (dict(boundary_lr=0.0, boundless=True), ValueError, "boundary_lr"),
    (dict(boundary_weight=-1.0), ValueError, "boundary_weight"),
    (dict(temperature=(0.1, 1.0)), ValueError, "temperature"),
    (dict(temperature=(1.0, 0.0)), ValueError, "temperature"),
    (dict(temperature=5), TypeError, "temperature"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(boundless="yes"), TypeError, "boundless"),
    (dict(pos=9), ValueError, "pos: position out of range"),
    (dict(pos=[1, 1]), ValueError, "pos: a position is repeated"),
    (dict(pos="last"), TypeError, "pos"),
    (dict(metric_pos=7), ValueError, "metric_pos"),
])
def test_bad_parameters(planted, kwargs, error, match):
    model, _, _, _, (base, source, labels), _ = planted
    with pytest.raises(error, match=match):
        ms.das.DAS(model, SITE, **kwargs).fit(base[:8], source[:8], labels[:8])


@pytest.mark.parametrize("site, match", [
    ("blocks.7.hook_resid_pre", "layer 7 out of range"),
    ("blocks.0.hook_resid_prex", "unknown site"),
    ("resid", "unknown site"),
    ("blocks.0.attn.hook_pattern", "attention site"),
])
def test_bad_site(planted, site, match):
    model, _, _, _, (base, source, labels), _ = planted
    with pytest.raises(ValueError, match=match):
        ms.das.DAS(model, site).fit(base[:8], source[:8], labels[:8])


def test_bad_data(planted):
    model, _, _, _, (base, source, labels), _ = planted
    das = ms.das.DAS(model, SITE)
    with pytest.raises(ValueError, match="source: tokens of shape"):
        das.fit(base[:8], source[:8, :3], labels[:8])
    with pytest.raises(ValueError, match="labels: expected one token id per pair"):
        das.fit(base[:8], source[:8], labels[:7])
    with pytest.raises(ValueError, match="labels: token id out of range"):
        das.fit(base[:8], source[:8], labels[:8] + 100)
    with pytest.raises(TypeError, match="labels"):
        das.fit(base[:8], source[:8], labels[:8] * 1.0)
    with pytest.raises(TypeError, match="model: expected a mechscope.Model"):
        ms.das.DAS("gpt2", SITE).fit(base[:8], source[:8], labels[:8])
    with pytest.raises(ValueError, match="not fitted"):
        das.score(base[:8], source[:8], labels[:8])
    # padding where the interchange happens
    mask = np.ones((8, 4), np.int32)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="pos: a position to intervene on is padding in the base"):
        das.fit(ms.Tokens(base[:8], mask), source[:8], labels[:8])


def test_iia_bad_basis(planted):
    model, _, _, _, _, (base, source, labels) = planted
    with pytest.raises(ValueError, match="basis: columns must be orthonormal"):
        ms.das.iia(model, SITE, np.ones((16, 1)), base, source, labels)
    with pytest.raises(ValueError, match=r"basis: expected shape \[16, k\]"):
        ms.das.iia(model, SITE, np.eye(8)[:, :1], base, source, labels)


def test_iia_is_the_share_of_pairs_one_run_at_a_time(planted):
    """iia (batched, Sources in the same pass) against one base run per pair, patched from
    the source's cached value."""
    model, v, content, label, _, _ = planted
    base, source, labels = pairs(np.random.default_rng(5), content, label, 24)
    Q = np.linalg.qr(np.c_[v, np.random.default_rng(6).normal(size=16)])[0]
    hits = []
    for b, s, y in zip(base, source, labels):
        cache = model.run(s[None], cache=SITE, logits=None).cache
        out = model.run(b[None], logits="last", interventions=[ms.SubspacePatch(SITE, basis=Q, source=cache, pos=-1)])
        hits.append(out.logits[0].argmax() == y)
    assert ms.das.iia(model, SITE, Q, base, source, labels, batch_size=5) == np.mean(hits)


def test_das_on_left_padded_pairs(planted):
    """Prompts of 2 to 4 tokens, left-padded: the interchange at the last position and the
    label read at each row's last real token."""
    model, v, content, label, _, _ = planted
    rng = np.random.default_rng(8)

    def padded(n):
        base, source, labels = pairs(rng, content, label, n)
        mask = np.ones_like(base)
        for row, length in enumerate(rng.integers(2, 5, n)):
            mask[row, :4 - length] = 0
        base, source = np.where(mask == 1, base, 1), np.where(mask == 1, source, 1)
        return ms.Tokens(base, mask), ms.Tokens(source, mask), labels

    train, held_out = padded(256), padded(100)
    assert held_out[0].attention_mask.min() == 0
    das = ms.das.DAS(model, SITE, rank=1, lr=3e-2, epochs=10, progress=False).fit(*train)
    assert angle_degrees(das.basis_, v) < 10
    assert das.score(*held_out) >= 0.99


@pytest.mark.parametrize("boundless", [False, True])
def test_plot_shows_the_loss_and_the_boundary(planted, boundless):
    import matplotlib

    matplotlib.use("Agg")
    model, _, _, _, train, _ = planted
    das = ms.das.DAS(model, SITE, boundless=boundless, epochs=1, progress=False).fit(*train)
    fig = das.plot()
    axes = fig.axes
    assert len(axes) == (2 if boundless else 1)
    assert np.allclose(axes[0].lines[0].get_ydata(), das.history_["loss"])
    assert axes[0].get_ylabel() == ("cross-entropy + boundary penalty" if boundless
                                    else "cross-entropy of the counterfactual label")
    if boundless:
        assert np.allclose(axes[1].lines[0].get_ydata(), np.asarray(das.history_["boundary"]) * das.width_)
    with pytest.raises(ValueError, match="not fitted yet"):
        ms.das.DAS(model, SITE).plot()
