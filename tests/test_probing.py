"""mechscope.probing: probe sweeps against scikit-learn on activations computed the slow
way, control tasks, and probe directions turned into interventions checked against
explicit runs."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import mechscope as ms
from conftest import BLAS_TILES_EXACT

SITES = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(4)]


@pytest.fixture(scope="module")
def task():
    """200 IOI prompts of the demo model; the label: which name is the indirect object."""
    model = ms.Model.from_pretrained(ms.demo.DEMO_DIR)
    ioi = ms.demo.ioi_prompts(model, n=200, seed=1)
    return model, ioi


@pytest.fixture(scope="module")
def sweep(task):
    model, ioi = task
    return ms.probing.probe_sweep(model, ioi["clean"], ioi["io"], sites=SITES, cv=4)


def test_scores_equal_scikit_learn_on_model_run_features(task, sweep):
    model, ioi = task
    cache = model.run(ioi["clean"], cache=SITES, logits=None).cache
    for i, site in enumerate(SITES):
        X = cache[site][:, -1]
        want = cross_val_score(LogisticRegression(max_iter=1000), X, ioi["io"], cv=StratifiedKFold(4))
        # the sweep's features come from its own runs: identical to these where the BLAS's
        # sums do not depend on how a product is cut, else equal to rounding, which can
        # move one prompt of a fold across the decision boundary
        one_prompt = 0.0 if BLAS_TILES_EXACT else 1.0 / (len(X) // 4)
        np.testing.assert_allclose(sweep.scores[i], want, atol=one_prompt + 1e-12, err_msg=site)
        # the fitted probe is the estimator fitted on all prompts
        full = LogisticRegression(max_iter=1000).fit(X, ioi["io"])
        np.testing.assert_allclose(sweep.probes[site].coef_, full.coef_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sweep.mean, sweep.scores.mean(1))
    np.testing.assert_allclose(sweep.std, sweep.scores.std(1))


def test_known_answer_and_control_task(sweep):
    # the embedding of the last token ("to", in every prompt) cannot tell the 30 names apart
    assert sweep.mean[0] < 0.15
    # from block 2 on, the model has the indirect object at the last token
    assert sweep.mean[3] > 0.95 and sweep.mean[4] > 0.95
    assert sweep.best_site == "blocks.2.hook_resid_post"
    # random labels are not decodable from anything: the control stays at chance everywhere
    assert (sweep.control_mean < 0.15).all()
    np.testing.assert_allclose(sweep.selectivity, sweep.mean - sweep.control_mean)
    assert sweep.selectivity[3] > 0.8
    assert list(sweep.layers) == [0, 0, 1, 2, 3]
    assert "selectivity" in repr(sweep)
    fig = sweep.plot()
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= 2
    fig.clf()
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_control_types_share_labels(task):
    """With a type per prompt given, equal types get equal control labels; a probe can
    then learn the control task wherever the type is readable (Hewitt & Liang's point)."""
    model, ioi = task
    sweep = ms.probing.probe_sweep(model, ioi["clean"], ioi["io"] % 2, sites=["blocks.3.hook_resid_post"],
                                   cv=KFold(4), control_types=ioi["io"], estimator=LogisticRegression(max_iter=2000))
    # the type (the indirect object) is readable at layer 3, so its random relabelling is
    # too; labels drawn per prompt are not
    per_prompt = ms.probing.probe_sweep(model, ioi["clean"], ioi["io"] % 2, sites=["blocks.3.hook_resid_post"],
                                        cv=KFold(4), estimator=LogisticRegression(max_iter=2000))
    assert sweep.control_mean[0] > 0.75 > 0.65 > per_prompt.control_mean[0]
    np.testing.assert_array_equal(sweep.scores, per_prompt.scores)  # the task itself is unchanged


def test_regression_probe_and_scoring(task):
    model, ioi = task
    y = (ioi["io"] * 1.0)
    sweep = ms.probing.probe_sweep(model, ioi["clean"], y, sites="blocks.3.hook_resid_post", estimator=Ridge(),
                                   cv=3, scoring="r2")
    assert sweep.scoring == "r2" and sweep.scores.shape == (1, 3)


def test_bad_input_before_work(task):
    model, ioi = task
    calls = []
    orig = model.run
    model.run = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(ValueError, match=r"labels: expected one label per prompt \(200\)"):
            ms.probing.probe_sweep(model, ioi["clean"], ioi["io"][:-1])
        with pytest.raises(ValueError, match="data: empty"):
            ms.probing.probe_sweep(model, [], [])
        with pytest.raises(ValueError, match="positions: a probe reads"):
            ms.probing.probe_sweep(model, ioi["clean"], ioi["io"], positions="all")
        with pytest.raises(ValueError, match="unknown site name"):
            ms.probing.probe_sweep(model, ioi["clean"], ioi["io"], sites="blocks.0.hook_nothing")
        with pytest.raises(ValueError, match="control_types"):
            ms.probing.probe_sweep(model, ioi["clean"], ioi["io"], control_types=[1, 2])
        with pytest.raises(TypeError, match="estimator"):
            ms.probing.probe_sweep(model, ioi["clean"], ioi["io"], estimator="logistic")
    finally:
        del model.run
    assert calls == []


def test_probe_directions_read_what_the_probe_reads(task, sweep):
    model, ioi = task
    X = model.run(ioi["clean"], cache="blocks.3.hook_resid_post", logits=None).cache["blocks.3.hook_resid_post"][:, -1]
    binary = ioi["io"] % 2
    for probe in (LogisticRegression(max_iter=1000).fit(X, binary),
                  make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, binary)):
        d = ms.probing.probe_directions(probe)
        assert d.shape == (1, model.d_model)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, atol=1e-6)
        # moving along the direction changes the decision function linearly, and the
        # most per unit length (any orthogonal move changes nothing)
        f = probe.decision_function
        step = f(X[:5] + 0.1 * d) - f(X[:5])
        np.testing.assert_allclose(step, step[0], rtol=1e-4)
        assert step[0] > 0
        ortho = np.random.default_rng(0).standard_normal(model.d_model)
        ortho -= (ortho @ d[0]) * d[0]
        np.testing.assert_allclose(f(X[:5] + ortho) - f(X[:5]), 0, atol=1e-4)  # float32 directions
    multi = ms.probing.probe_directions(sweep.probes["blocks.3.hook_resid_post"])
    assert multi.shape == (30, model.d_model)
    with pytest.raises(TypeError, match="probe"):
        ms.probing.probe_directions(make_pipeline(Ridge()).steps[0][1])  # not fitted


def test_interventions_equal_explicit_runs(task, sweep):
    model, ioi = task
    site = "blocks.2.hook_resid_post"
    probe = sweep.probes[site]
    tokens = ioi["clean"][:6]
    d = ms.probing.probe_directions(probe)
    # steering: Add of the unit direction times the scale
    add = ms.probing.steering(probe, site, scale=3.0, pos=-1, direction_index=4)
    assert isinstance(add, ms.Add)
    got = model.run(tokens, interventions=[add], logits="last").logits
    want = model.run(tokens, interventions=[ms.Add(site, vector=d[4], scale=3.0, pos=-1)], logits="last").logits
    np.testing.assert_array_equal(got, want)
    # subspace interchange on the span of a 3-class probe's directions: a plane, since
    # the multinomial model's three coefficient rows sum to zero
    two = LogisticRegression(max_iter=1000).fit(
        model.run(ioi["clean"], cache=site, logits=None).cache[site][:, -1], ioi["io"] % 3)
    source = model.run(ioi["corrupted"][:6], cache=site, logits=None)
    patch = ms.probing.subspace_patch(two, site, source=source.cache, pos=-1)
    Q = patch.basis
    assert Q.shape == (model.d_model, 2)
    np.testing.assert_allclose(Q.T @ Q, np.eye(2), atol=1e-5)
    # the span is that of the probe's directions
    W = ms.probing.probe_directions(two)
    np.testing.assert_allclose(Q @ (Q.T @ W.T), W.T, atol=1e-5)
    out = model.run(tokens, interventions=[patch], cache=site, logits=None).cache[site][:, -1]
    base = model.run(tokens, cache=site, logits=None).cache[site][:, -1]
    s = source.cache[site][:, -1]
    np.testing.assert_allclose(out, base + (s - base) @ Q @ Q.T, atol=1e-4)


def test_causal_effect_matches_explicit_runs_and_beats_random(task, sweep):
    model, ioi = task
    site = "blocks.2.hook_resid_post"
    probe = sweep.probes[site]
    test = ms.demo.ioi_prompts(model, n=40, seed=7)
    target = int(probe.classes_[0])
    keep = (test["io"] != target) & (test["s"] != target)
    tokens = test["clean"][keep]
    metric = ms.metrics.LogitDiff(np.full(keep.sum(), target), test["io"][keep])
    eff = ms.probing.causal_effect(model, tokens, probe, site, metric, scales=[0, 4, 16], pos=-1, n_random=5)
    d = ms.probing.probe_directions(probe)[0]
    base = metric.evaluate(model, tokens)
    for k, s in enumerate([0, 4, 16]):
        want = metric.evaluate(model, tokens, interventions=[ms.Add(site, vector=d, scale=s, pos=-1)]) - base
        assert eff.effect[k] == pytest.approx(want, abs=1e-5)
    assert eff.effect[0] == 0 and (eff.random_effects[:, 0] == 0).all()
    # steering toward the target name's direction raises its logit over the indirect
    # object's more than any random direction of the same length
    assert eff.effect[2] > eff.random_effects[:, 2].max()
    assert eff.z[2] > 3
    fig = eff.plot()
    assert len(fig.axes) == 1
    __import__("matplotlib.pyplot").pyplot.close(fig)
    with pytest.raises(ValueError, match="dimensions"):
        ms.probing.causal_effect(model, tokens, probe, "blocks.2.mlp.hook_post", metric)
    with pytest.raises(TypeError, match="metric"):
        ms.probing.causal_effect(model, tokens, probe, site, lambda logits: 0.0)
