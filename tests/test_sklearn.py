"""mechscope.sklearn.ActivationFeatures: scikit-learn's estimator checks, Pipeline and
GridSearchCV, pickling by path."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

import mechscope as ms
from mechscope.sklearn import ActivationFeatures

DEMO = ms.demo.DEMO_DIR

# The checks that cannot apply, and why. Everything else in scikit-learn's suite runs
# (with the categorical input tag its checks send small non-negative integers, which
# are token ids of the demo model's vocabulary).
NOT_APPLICABLE = {
    "check_n_features_in": "a prompt is a sequence of any length: the columns of a token array are "
                           "positions, not features, so there is no fixed n_features_in_",
    "check_n_features_in_after_fitting": "prompts of any length are valid after fit (the columns of a "
                                         "token array are positions, not features)",
}


# Checks that compare a batch's transform with its parts' to 1e-7. A forward pass in
# float32 gives the same values for any batch composition only up to rounding: the BLAS
# chooses its kernel by matrix size (1-ulp differences, seen in the -O1 sanitizer build
# of CI). Where the exact comparison fails, the same comparison is made at float32's
# tolerance instead.
FLOAT32_BATCHING = ("check_methods_subset_invariance", "check_methods_sample_order_invariance")


def _batching_invariance_at_float32_tolerance(estimator):
    from sklearn.base import clone

    rnd = np.random.RandomState(0)
    X = 3 * rnd.uniform(size=(20, 3))
    X = np.round(X - X.min()).astype(np.int32)  # scikit-learn's own categorical input
    est = clone(estimator).fit(X)
    full = est.transform(X)
    by_one = np.concatenate([est.transform(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_allclose(by_one, full, rtol=1e-5, atol=1e-5)
    order = np.random.RandomState(1).permutation(len(X))
    np.testing.assert_allclose(est.transform(X[order]), full[order], rtol=1e-5, atol=1e-5)


@parametrize_with_checks([ActivationFeatures(DEMO, "blocks.1.hook_resid_post"),
                          ActivationFeatures(ms.Model.from_pretrained(DEMO), "blocks.0.attn.hook_z",
                                             positions=[0, -1])],
                         expected_failed_checks=lambda est: NOT_APPLICABLE)
def test_scikit_learn_checks(estimator, check, tmp_path):
    name = getattr(check, "func", check).__name__
    if name in FLOAT32_BATCHING:
        try:
            check(estimator)
        except AssertionError:
            _batching_invariance_at_float32_tolerance(estimator)
        return
    if name == "check_array_api_input":
        # scikit-learn runs this check only in a process whose SciPy was imported with
        # SCIPY_ARRAY_API=1 (it skips otherwise): run it in such a process
        assert check.keywords == {"array_namespace": "numpy", "expect_only_array_outputs": False}
        (tmp_path / "est.pkl").write_bytes(pickle.dumps(estimator))
        code = ("import pickle, sys; from sklearn.utils.estimator_checks import check_array_api_input; "
                "est = pickle.load(open(sys.argv[1], 'rb')); "
                "check_array_api_input('ActivationFeatures', est, array_namespace='numpy', "
                "expect_only_array_outputs=False); print('passed')")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "est.pkl")], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "SCIPY_ARRAY_API": "1",
                                                           "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0 and "passed" in done.stdout, done.stderr
        return
    check(estimator)


@pytest.fixture(scope="module")
def data():
    model = ms.Model.from_pretrained(DEMO)
    ioi = ms.demo.ioi_prompts(model, n=150, seed=3)
    texts = [model.tokenizer.decode(row[1:]) for row in ioi["clean"]]
    return model, ioi, texts


def test_features_are_the_extracted_activations(data):
    model, ioi, texts = data
    feats = ActivationFeatures(model, "blocks.2.hook_resid_post", positions=[3, -1]).fit_transform(texts)
    assert feats.shape == (150, 2 * model.d_model) and feats.dtype == np.float32
    cache = model.run(ioi["clean"], cache="blocks.2.hook_resid_post", logits=None).cache["blocks.2.hook_resid_post"]
    want = np.concatenate([cache[:, 3], cache[:, -1]], axis=1)
    np.testing.assert_allclose(feats, want, rtol=0, atol=1e-6 * 32)
    # token arrays, ragged lists and texts give the same features
    from_tokens = ActivationFeatures(model, "blocks.2.hook_resid_post", positions=[3, -1]).transform(ioi["clean"])
    np.testing.assert_array_equal(from_tokens, feats)
    names = ActivationFeatures(DEMO, "blocks.2.hook_resid_post").get_feature_names_out()
    assert len(names) == model.d_model and names[5] == "blocks.2.hook_resid_post[5]"


def test_pipeline_and_grid_search(data):
    model, ioi, texts = data
    # which half of the name list the indirect object comes from: a variable of the task
    first_half = {model.tokenizer.ids[n] for n in ms.demo.tasks()["first_names"][:15]}
    y = np.array([int(i in first_half) for i in ioi["io"]])
    pipe = make_pipeline(ActivationFeatures(DEMO), LogisticRegression(max_iter=500))
    grid = GridSearchCV(pipe, {"activationfeatures__site": ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_post"]},
                        cv=3).fit(texts, y)
    # unreadable from the embedding of "to" (every prompt ends with it), read at layer 3
    scores = dict(zip(grid.cv_results_["param_activationfeatures__site"], grid.cv_results_["mean_test_score"]))
    assert scores["blocks.3.hook_resid_post"] > 0.9
    assert scores["blocks.0.hook_resid_pre"] < 0.7
    assert grid.best_params_ == {"activationfeatures__site": "blocks.3.hook_resid_post"}
    assert (grid.predict(texts) == y).mean() > 0.9


def test_pickle_holds_the_path_and_reloads_the_model(data, tmp_path):
    model, ioi, texts = data
    pipe = make_pipeline(ActivationFeatures(model, "blocks.3.hook_resid_post"), LogisticRegression(max_iter=500))
    pipe.fit(texts, ioi["io"] % 2)
    blob = pickle.dumps(pipe)
    assert len(blob) < 200_000  # the probe and a path, not the 3.3 MB of weights
    (tmp_path / "pipe.pkl").write_bytes(blob)
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    code = ("import pickle, sys, numpy as np; pipe = pickle.load(open(sys.argv[1], 'rb')); "
            "texts = open(sys.argv[2]).read().split('\\n'); "
            "np.save(sys.argv[3], pipe.predict_proba(texts))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe.pkl"), str(tmp_path / "texts.txt"),
                           str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    # the same up to float rounding (the other process may run another number of threads)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), pipe.predict_proba(texts), rtol=0, atol=1e-6)


def test_bad_parameters_are_named(data):
    model, ioi, texts = data
    with pytest.raises(ValueError, match="site"):
        ActivationFeatures(model, "blocks.*.hook_resid_post").fit(texts)
    with pytest.raises(ValueError, match="unknown site name"):
        ActivationFeatures(model, "blocks.1.hook_nothing").fit_transform(texts)
    with pytest.raises(ValueError, match="positions: 'all'"):
        ActivationFeatures(model, positions="all").fit(texts)
    with pytest.raises(ValueError, match="model: .* is not a model folder"):
        ActivationFeatures("/nonexistent/folder").fit(texts)
    with pytest.raises(TypeError, match="model"):
        ActivationFeatures(3).fit(texts)
    with pytest.raises(ValueError, match="X: empty"):
        ActivationFeatures(model).fit([])
    name_ids = {model.tokenizer.ids[n] for n in ms.demo.tasks()["first_names"]}
    with pytest.raises(ValueError, match="same number of positions"):
        ActivationFeatures(model, positions=lambda t: [i for i, x in enumerate(t) if x in name_ids][:1 + int(t[2] % 2)]
                           ).fit_transform(ioi["clean"])
