"""Predicting whether a model answers an input correctly, out of distribution too,
from a causal variable it computes inside (Huang et al. 2025, "Internal causal
mechanisms robustly predict language model out-of-distribution behaviors").

Both predictors read a variable of a high-level causal model that has been localized
at a site: a basis Q [width, k] of its subspace (e.g. ``ms.das.DAS(...).basis_``; None
for the whole site) at given positions.

- ``counterfactual_simulation``: the test input's value of the variable is patched into
  in-distribution base inputs (h_base + Q Qᵀ (h_test − h_base)). Where the model computes
  the variable right on the test input, each patched base gives the output the causal
  model predicts for that base with the test input's value. The score is the share of
  bases that do.
- ``value_probe``: a classifier of the variable's value from the coordinates Qᵀh,
  trained on in-distribution inputs; the score is its probability of the value the
  causal model assigns to the test input.
- ``output_confidence``: the baseline, the model's probability of its own top token.

``is_correct`` gives the labels to predict; compare scores by AUC-ROC
(``sklearn.metrics.roc_auc_score(correct, scores)``).

    scores = ms.correctness.counterfactual_simulation(model, site, das.basis_, test, bases, expected, pos=pos)
    auc = roc_auc_score(ms.correctness.is_correct(model, test, answers), scores)
"""
import numpy as np

from . import das as _das
from ._progress import progress_bar
from .interventions import Patch
from .metrics import Accuracy
from .metrics import positions as _positions
from .patching import sweep

__all__ = ["counterfactual_simulation", "value_probe", "output_confidence", "is_correct"]


def counterfactual_simulation(model, site, basis, test, bases, expected, *, pos=-1, test_pos=None,
                              metric_pos=None, batch_size=64, progress=None):
    """For each test input, the share of in-distribution bases that, with the test
    input's value of the variable patched in, give the output the causal model expects.

    site, basis: where the variable is: a token site and an orthonormal basis [width, k]
        of its subspace (None: the whole site).
    test: token arrays [n, T] (or texts); bases: [m, T] in-distribution inputs, padded
        to the same length as the test inputs.
    expected: token ids [n, m]: the causal model's output for base j with the variable
        set to its value on test input i.
    pos: the bases' positions that hold the variable: an int or a list of ints, or an
        int array [m, k] (each base its own); test_pos: where the test inputs hold it,
        in the same forms ([n, k] per test input; None: pos, when pos is shared).
    metric_pos: where the output is read (None: each base's last real token).
    Returns float64 scores [n] in [0, 1].

    The n x m patched runs are patching sweeps (``ms.patching.sweep`` with the
    ``Accuracy`` metric), one for each distinct row of ``expected``: each base resumes
    at the site's block from the first position the patch changes.
    """
    tt, tm = model._check_tokens(test, None)
    bt, bm = model._check_tokens(bases, None)
    if tt.shape[1] != bt.shape[1]:
        raise ValueError(f"bases: {bt.shape[1]} positions, the test inputs have {tt.shape[1]}; pad both to one "
                         "length (left padding keeps the last tokens aligned)")
    n, m = len(tt), len(bt)
    expected = np.asarray(expected)
    if expected.dtype == bool or not np.issubdtype(expected.dtype, np.integer):
        raise TypeError("expected: the causal model's output token id for each (test input, base) pair (ints)")
    if expected.shape != (n, m):
        raise ValueError(f"expected: shape [{n}, {m}] (test inputs x bases), got {list(expected.shape)}")
    width, _ = _das._site_width(model, site)
    Q = _das._check_basis(_whole_site(model, site) if basis is None else basis, width)
    if np.ndim(pos) == 2 and test_pos is None:
        raise ValueError("test_pos: needed when pos gives each base its own positions")
    if expected.min() < 0 or expected.max() >= model.d_vocab:
        raise ValueError(f"expected: token id out of range [0, {model.d_vocab})")
    Pb = _das._positions(pos, bt.shape[1], m, [("base", bm)])
    Pt = _das._positions(pos if test_pos is None else test_pos, tt.shape[1], n, [("test", tm)],
                         "pos" if test_pos is None else "test_pos")
    if Pt.shape[1] != Pb.shape[1]:
        raise ValueError(f"test_pos: {Pt.shape[1]} positions per test input, pos has {Pb.shape[1]}")
    batch_size = _das._positive_int(batch_size, "batch_size")
    # the bases in one run, as the sweep's own base run: the same bits, so that the patch
    # entries left at the bases' values are seen as unchanged and cost nothing
    base_value = np.asarray(model.run(bt, attention_mask=bm, cache=[site], logits=None).cache[site], np.float32)
    shape = base_value.shape
    base_value = base_value.reshape(m, shape[1], width)
    test_value = _das._site_values(model, site, tt, tm, Pt, batch_size)  # [n, k, width]
    rows = np.arange(m)[:, None]
    held = base_value[rows, Pb].astype(np.float64)  # [m, k, width]
    # tests that expect the same outputs from every base share the metric: one sweep each
    groups, which = np.unique(expected, axis=0, return_inverse=True)
    per_test = max(1, (256 << 20) // (4 * base_value.size))  # patch arrays of at most 256 MiB at once
    correct = np.zeros((n, m))
    with progress_bar(progress, "counterfactual simulation", "test input", total=n) as bar:
        for g, answers in enumerate(groups):
            members = np.flatnonzero(which.reshape(-1) == g)
            metric = Accuracy(answers, pos=metric_pos)
            for lo in range(0, len(members), per_test):
                chunk = members[lo:lo + per_test]
                patches = []
                for i in chunk:
                    value = base_value.copy()  # the bases' own values, the variable's coordinates replaced
                    value[rows, Pb] = held + ((test_value[i][None] - held) @ Q) @ Q.T
                    patches.append(Patch(site, value.reshape(shape)))
                correct[chunk] = sweep(model, bt, patches, metric, attention_mask=bm, per_row=True,
                                       progress=False)
                bar.update(len(chunk))
    return correct.mean(axis=1)


def value_probe(model, site, basis, train, train_values, test, test_values, *, pos=-1, test_pos=None,
                estimator=None, batch_size=64, return_probe=False):
    """The probability a probe of the variable's value gives the value the causal model
    assigns to each test input.

    train, train_values: in-distribution inputs and their values of the variable (one
        label per input); test, test_values: the inputs to score and their values.
    pos / test_pos: where the training / test inputs hold the variable (as in
        ``counterfactual_simulation``; per-input positions as an int array [n, k]).
    estimator: a scikit-learn classifier with predict_proba, fitted on the coordinates
        Qᵀh (the positions' coordinates side by side); default LogisticRegression.
        A test value the probe never saw in training gets probability 0.
    Returns float64 scores [n_test] (and the fitted probe with ``return_probe=True``).
    """
    try:
        from sklearn.base import clone
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("mechscope.correctness.value_probe needs scikit-learn: "
                          "pip install 'mechscope[sklearn]'") from None

    width, _ = _das._site_width(model, site)
    Q = _das._check_basis(_whole_site(model, site) if basis is None else basis, width)
    features = []
    for tokens, where, argument in ((train, pos, "pos"), (test, pos if test_pos is None else test_pos, "test_pos")):
        t, mask = model._check_tokens(tokens, None)
        P = _das._positions(where, t.shape[1], len(t), [("input", mask)], argument)
        values = _das._site_values(model, site, t, mask, P, _das._positive_int(batch_size, "batch_size"))
        features.append((values @ Q).reshape(len(t), -1))  # [n, k positions x rank]
    train_values, test_values = np.asarray(train_values), np.asarray(test_values)
    for name, values, X in (("train_values", train_values, features[0]), ("test_values", test_values, features[1])):
        if values.shape != (len(X),):
            raise ValueError(f"{name}: expected one value per input ({len(X)}), got shape {list(values.shape)}")
    probe = clone(estimator) if estimator is not None else LogisticRegression(max_iter=2000)
    probe.fit(features[0], train_values)
    proba = probe.predict_proba(features[1])
    column = {v: i for i, v in enumerate(probe.classes_.tolist())}
    scores = np.array([proba[r, column[v]] if v in column else 0.0 for r, v in enumerate(test_values.tolist())])
    return (scores, probe) if return_probe else scores


def output_confidence(model, tokens, *, pos=None, attention_mask=None, batch_size=64):
    """The model's probability of its own top token at ``pos`` (None: each row's last
    real token): the confidence baseline. Returns float64 [batch]."""
    logits = _logits_at(model, tokens, pos, attention_mask, batch_size)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


def is_correct(model, tokens, answers, *, pos=None, attention_mask=None, batch_size=64):
    """Whether the model's top token at ``pos`` (None: each row's last real token) is the
    answer (a token id per row, or one for all). Returns bool [batch]."""
    logits = _logits_at(model, tokens, pos, attention_mask, batch_size)
    answers = np.asarray(answers)
    if answers.dtype == bool or not np.issubdtype(answers.dtype, np.integer):
        raise TypeError("answers: expected token ids (ints)")
    answers = np.broadcast_to(answers, (len(logits),)) if answers.ndim == 0 else answers
    if answers.shape != (len(logits),):
        raise ValueError(f"answers: expected one token id per row ({len(logits)}), got shape {list(answers.shape)}")
    return logits.argmax(axis=1) == answers


# ---------------------------------------------------------------- helpers

def _whole_site(model, site):
    width, _ = _das._site_width(model, site)
    return np.eye(width)


def _logits_at(model, tokens, pos, attention_mask, batch_size):
    """float64 logits [batch, vocab] at each row's position, batch_size rows per run."""
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    at = _positions(pos, mask, B, T)
    batch_size = _das._positive_int(batch_size, "batch_size")
    out = []
    for i in range(0, B, batch_size):
        j = min(B, i + batch_size)
        m = None if mask is None else mask[i:j]
        if pos is None:  # each row's last real token
            out.append(np.asarray(model.run(tokens[i:j], attention_mask=m, logits="last").logits, np.float64))
        else:
            logits = model.run(tokens[i:j], attention_mask=m, logits="all").logits
            out.append(np.asarray(logits[np.arange(j - i), at[i:j]], np.float64))
    return np.concatenate(out)
