"""Exactness: every interventional estimand of mechscope.mediation equals its
definition computed by explicit model.run(..., interventions=...) calls, on a batch
with padding, for every kind of unit (neurons, heads, layer outputs, attention
pattern entries, subspaces, groups)."""
import numpy as np
import pytest

import mechscope as ms
from mechscope import mediation as med

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    # a larger init than HF's 0.02 so that every unit matters
    return ms.Model.from_config(dict(n_embd=32, n_head=4, n_layer=3, vocab_size=53, n_positions=16,
                                     initializer_range=0.25), seed=3)


def pairs(model, padding):
    rng = np.random.default_rng(0)
    B, T = 5, 7
    treated = rng.integers(0, model.d_vocab, (B, T))
    control = treated.copy()
    control[:, 1] = (treated[:, 1] + 1 + rng.integers(0, 10, B)) % model.d_vocab
    control[:, 3] = (treated[:, 3] + 7) % model.d_vocab
    lengths = np.array([7, 5, 6, 4, 7])
    mask = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        if padding == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    correct, wrong = rng.integers(0, model.d_vocab, B), rng.integers(0, model.d_vocab, B)
    return treated, control, mask, ms.metrics.LogitDiff(correct, wrong)


def units_for(model, padding):
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((32, 3)))
    Qh, _ = np.linalg.qr(rng.standard_normal((8, 2)))
    last = "last" if padding == "left" else 3
    units = [
        med.Unit("blocks.1.mlp.hook_post", pos=last, index=5, label="neuron"),
        med.Unit("blocks.1.mlp.hook_post", pos=[2, 3], index=[0, 7, 9], label="neurons"),
        med.Unit("blocks.0.attn.hook_z", head=2, label="head all pos"),
        med.Unit("blocks.2.attn.hook_z", head=1, pos=last, label="head last"),
        med.Unit("blocks.0.hook_attn_out", pos=[1, 2], label="attn out"),
        med.Unit("blocks.1.hook_mlp_out", label="mlp out"),
        med.Unit("blocks.1.attn.hook_pattern", head=0, pos=last, label="pattern row"),
        med.Unit("blocks.1.hook_resid_post", pos=3, basis=Q, label="subspace"),
        med.Unit("blocks.1.attn.hook_z", head=3, pos=3, basis=Qh, label="head subspace"),
        med.group("group", [med.Unit("blocks.0.attn.hook_z", head=1, pos=3),
                            med.Unit("blocks.2.mlp.hook_post", pos=[3, 4], index=[1, 2])]),
    ]
    units += med.neurons(model, 2, pos=last)[:4] + med.heads(model, layers=[1]) + med.layer_outputs(model, pos=3)[:2]
    return units


def interventions(unit, source):
    out = []
    for site, pos, head, index, basis in unit.parts:
        if basis is None:
            out.append(ms.Patch(site, source, pos=pos, head=head, index=index))
        else:
            out.append(ms.SubspacePatch(site, basis, source, pos=pos, head=head, index=index))
    return out


def resolve_last(unit, T):
    unit.parts = [(s, T - 1 if p == "last" else p, h, i, b) for s, p, h, i, b in unit.parts]
    return unit


@pytest.mark.parametrize("padding", ["right", "left"])
def test_natural_effects_equal_their_definitions(model, padding):
    treated, control, mask, metric = pairs(model, padding)
    units = units_for(model, padding)
    eff = med.natural_effects(model, treated, control, units, metric, attention_mask=mask, progress=False)
    names = model.site_names
    ct = model.run(treated, attention_mask=mask, cache=names)
    cc = model.run(control, attention_mask=mask, cache=names)
    y_t = metric.per_row(model, treated, mask)
    y_c = metric.per_row(model, control, mask)
    assert np.abs(y_t - y_c).min() > 1e-3  # the treatment does something in every pair
    np.testing.assert_allclose(eff.y_treated, y_t, atol=TOL)
    np.testing.assert_allclose(eff.y_control, y_c, atol=TOL)
    assert eff.nie.shape == (len(units), 5)
    moved = 0
    for u, unit in enumerate(units):
        unit = resolve_last(unit, treated.shape[1])
        y_c_mt = metric.per_row(model, control, mask, interventions(unit, ct))   # y(a', m(a))
        y_t_mc = metric.per_row(model, treated, mask, interventions(unit, cc))   # y(a, m(a'))
        np.testing.assert_allclose(eff.nie[u], y_c_mt - y_c, atol=TOL, err_msg=unit.label)
        np.testing.assert_allclose(eff.nde[u], y_t_mc - y_c, atol=TOL, err_msg=unit.label)
        np.testing.assert_allclose(eff.nie_total[u], y_t - y_t_mc, atol=TOL, err_msg=unit.label)
        np.testing.assert_allclose(eff.nde_total[u], y_t - y_c_mt, atol=TOL, err_msg=unit.label)
        np.testing.assert_allclose(eff.effect("nie", relative=True)[u], y_c_mt / y_c - 1, rtol=1e-4, atol=TOL)
        np.testing.assert_allclose(eff.effect("nde", relative=True)[u], y_t_mc / y_c - 1, rtol=1e-4, atol=TOL)
        moved += np.abs(eff.nie[u]).max() > 1e-3
    assert moved >= len(units) - 3  # the test is not vacuous: units change the outcome
    np.testing.assert_allclose(eff.te, y_t - y_c, atol=TOL)
    np.testing.assert_allclose(eff.effect("te", relative=True), y_t / y_c - 1, rtol=1e-4, atol=TOL)
    # the decompositions hold exactly
    np.testing.assert_allclose(eff.nde + eff.nie_total, eff.te[None].repeat(len(units), 0), atol=TOL)
    np.testing.assert_allclose(eff.nie + eff.nde_total, eff.te[None].repeat(len(units), 0), atol=TOL)


@pytest.mark.parametrize("value", [0.0, "mean", "array"])
def test_controlled_direct_effect_equals_its_definition(model, value):
    treated, control, mask, metric = pairs(model, "right")
    units = [u for u in units_for(model, "right") if all(p[4] is None for p in u.parts)]
    names = model.site_names
    ct = model.run(treated, attention_mask=mask, cache=names).cache
    cc = model.run(control, attention_mask=mask, cache=names).cache
    rng = np.random.default_rng(5)
    if value == "array":
        units = [u for u in units if u.label in ("neuron", "neurons", "head last", "attn out")]
        shapes = {"neuron": (1, 1), "neurons": (2, 3), "head last": (1, 8), "attn out": (5, 2, 32)}
        values = {u.label: rng.standard_normal(shapes[u.label]) for u in units}
    for u, unit in enumerate(units):
        v = values[unit.label] if value == "array" else value
        cde = med.controlled_direct_effect(model, treated, control, [unit], metric, v, attention_mask=mask,
                                           progress=False)[0]
        sets = []
        for site, pos, head, index, _ in unit.parts:
            if value == "mean":
                mean = np.concatenate([ct[site], cc[site]]).mean(0, keepdims=True)
                sets.append(ms.Patch(site, np.repeat(mean, 5, 0), pos=pos, head=head, index=index))
            else:
                sets.append(ms.Set(site, v, pos=pos, head=head, index=index))
        y_t = metric.per_row(model, treated, mask, sets)
        y_c = metric.per_row(model, control, mask, sets)
        np.testing.assert_allclose(cde, y_t - y_c, atol=TOL, err_msg=unit.label)


def test_many_units_run_as_one_sweep_each_way(model, monkeypatch):
    """No Python loop over units: natural_effects calls the core's sweep twice."""
    treated, control, mask, metric = pairs(model, "right")
    calls = []
    real = type(model._core).sweep

    class Spy:
        def __init__(self, core):
            self.core = core

        def __getattr__(self, name):
            return getattr(self.core, name)

        def sweep(self, *args, **kw):
            calls.append(len(args[4]))
            return real(self.core, *args, **kw)

    monkeypatch.setattr(model, "_core", Spy(model._core))
    units = med.neurons(model, 1, pos=3)
    eff = med.natural_effects(model, treated, control, units, metric, attention_mask=mask, progress=False)
    assert calls == [len(units), len(units)]
    assert eff.nie.shape == (model.d_mlp, 5)


def test_python_metric_gives_the_same_effects(model):
    treated, control, mask, metric = pairs(model, "right")
    units = units_for(model, "right")[:6]
    last = ms.metrics.last_positions(mask, 5, 7)
    correct, wrong = metric.correct, metric.wrong

    def logit_diff(logits):
        rows = np.arange(logits.shape[0])
        return logits[rows, last, correct] - logits[rows, last, wrong]

    fast = med.natural_effects(model, treated, control, units, metric, attention_mask=mask, progress=False)
    slow = med.natural_effects(model, treated, control, units, logit_diff, attention_mask=mask, progress=False)
    for kind in med.KINDS:
        np.testing.assert_allclose(slow.effect(kind), fast.effect(kind), atol=TOL)


def test_summary_is_the_mean_over_pairs_with_an_interval(model):
    treated, control, mask, metric = pairs(model, "right")
    units = units_for(model, "right")[:4]
    eff = med.natural_effects(model, treated, control, units, metric, attention_mask=mask, progress=False)
    s = eff.summary("nie", n_boot=200)
    np.testing.assert_allclose(s.estimate, eff.nie.mean(1), atol=1e-12)
    assert (s.low <= s.estimate + 1e-12).all() and (s.estimate <= s.high + 1e-12).all()
    w = np.array([1, 0, 2, 0, 1.0])
    s = eff.summary("nde", weights=w, n_boot=50, method="percentile")
    np.testing.assert_allclose(s.estimate, eff.nde @ w / w.sum(), atol=1e-12)
    assert s.to_pandas().shape == (4, 4)
