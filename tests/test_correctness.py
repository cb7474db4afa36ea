"""ms.correctness: each correctness predictor against its definition computed the slow
way (one intervened run per (test input, base) pair, a scikit-learn probe fitted on
coordinates read from model.run, the softmax of a run's logits)."""
import numpy as np
import pytest

import mechscope as ms

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return ms.Model.from_config(dict(n_embd=24, n_head=3, n_layer=3, vocab_size=12, n_positions=16,
                                     initializer_range=0.3), seed=7)


@pytest.fixture(scope="module")
def basis():
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((24, 3)))
    return q


def value_at(model, tokens, mask, site, row, positions):
    run = model.run(tokens[row:row + 1], attention_mask=None if mask is None else mask[row:row + 1], cache=[site],
                    logits=None)
    return run.cache[site][0, positions].astype(np.float64)  # [k, width]


def slow_top(model, bases, bmask, tests, tmask, basis, base_pos, test_pos, i, j):
    """Base j with test i's coordinates at the site, the top token at its last real token."""
    Q = np.eye(24) if basis is None else basis
    h_base = value_at(model, bases, bmask, SITE, j, base_pos[j])
    h_test = value_at(model, tests, tmask, SITE, i, test_pos[i])
    delta = (h_test - h_base) @ Q @ Q.T
    run = model.run(bases[j:j + 1], attention_mask=None if bmask is None else bmask[j:j + 1], logits="last",
                    interventions=[ms.Add(SITE, delta[None].astype(np.float32), pos=list(map(int, base_pos[j])))])
    return int(run.logits[0].argmax())


@pytest.mark.parametrize("case", ["shared", "per_input_padded", "whole_site"])
def test_counterfactual_simulation_is_the_share_of_bases(model, basis, case):
    rng = np.random.default_rng(2)
    n, m, T = 4, 5, 9
    tests, bases = rng.integers(0, 12, size=(n, T)), rng.integers(0, 12, size=(m, T))
    tmask = bmask = None
    if case == "per_input_padded":  # left padding; each input holds the variable at its own two positions
        tmask, bmask = np.ones((n, T), np.int32), np.ones((m, T), np.int32)
        tmask[1, :2] = 0
        bmask[3, :3] = 0
        base_pos = np.array([[4, 6], [3, 5], [5, 7], [4, 8], [6, 7]])
        test_pos = np.array([[2, 8], [3, 4], [5, 6], [4, 7]])
        kw = dict(pos=base_pos, test_pos=test_pos)
        tests, bases = ms.Tokens(tests, tmask), ms.Tokens(bases, bmask)
    else:
        base_pos, test_pos = np.full((m, 1), 5), np.full((n, 1), 5)
        kw = dict(pos=5)
    Q = None if case == "whole_site" else basis
    slow = np.array([[slow_top(model, np.asarray(bases), bmask, np.asarray(tests), tmask, Q, base_pos, test_pos, i, j)
                      for j in range(m)] for i in range(n)])
    # the expected outputs: the slow run's top token for about half of the pairs
    expected = np.where(rng.random((n, m)) < 0.5, slow, (slow + 1) % 12)
    scores = ms.correctness.counterfactual_simulation(model, SITE, Q, tests, bases, expected, batch_size=7, **kw)
    np.testing.assert_array_equal(scores, (expected == slow).mean(axis=1))
    assert 0 < scores.mean() < 1


def test_value_probe_is_a_probe_of_the_coordinates(model, basis):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    train, test = rng.integers(0, 12, size=(40, 8)), rng.integers(0, 12, size=(10, 8))
    train_values = train[:, 2] % 3  # a variable the inputs carry
    test_values = np.r_[test[:9, 2] % 3, 7]  # the last one a value never seen in training
    scores, probe = ms.correctness.value_probe(model, SITE, basis, train, train_values, test, test_values,
                                               pos=[2, 3], return_probe=True)
    coords = [np.stack([value_at(model, x, None, SITE, r, [2, 3]) @ basis for r in range(len(x))]).reshape(len(x), -1)
              for x in (train, test)]
    ref = LogisticRegression(max_iter=2000).fit(coords[0], train_values)
    proba = ref.predict_proba(coords[1])
    # lbfgs stops at its tolerance: coordinates that differ in the last float32 bits
    # (batched runs against one row at a time) move the fit's probabilities by ~1e-5
    np.testing.assert_allclose(scores[:9], proba[np.arange(9), test_values[:9]], atol=1e-4)
    assert scores[9] == 0.0
    np.testing.assert_array_equal(probe.classes_, [0, 1, 2])


def test_output_confidence_and_is_correct(model):
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 12, size=(6, 7))
    mask = np.ones_like(tokens)
    mask[2, 5:] = 0  # right padding: row 2 ends at position 4
    logits = np.stack([model.run(tokens[r, :5 if r == 2 else 7], logits="last").logits[0] for r in range(6)])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    got = ms.correctness.output_confidence(model, tokens, attention_mask=mask, batch_size=4)
    np.testing.assert_allclose(got, probs.max(1), atol=1e-6)
    answers = np.where(rng.random(6) < 0.5, logits.argmax(1), (logits.argmax(1) + 1) % 12)
    np.testing.assert_array_equal(ms.correctness.is_correct(model, tokens, answers, attention_mask=mask),
                                  answers == logits.argmax(1))
    at3 = model.run(tokens, logits=[3]).logits[:, 0]
    np.testing.assert_array_equal(ms.correctness.is_correct(model, tokens, 5, pos=3), at3.argmax(1) == 5)


def test_bad_input(model, basis):
    tests, bases = np.zeros((2, 6), np.int64), np.zeros((3, 6), np.int64)
    with pytest.raises(ValueError, match=r"expected: shape \[2, 3\]"):
        ms.correctness.counterfactual_simulation(model, SITE, basis, tests, bases, np.zeros((3, 2), np.int64))
    with pytest.raises(TypeError, match="expected: the causal model's output"):
        ms.correctness.counterfactual_simulation(model, SITE, basis, tests, bases, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="bases: 5 positions, the test inputs have 6"):
        ms.correctness.counterfactual_simulation(model, SITE, basis, tests, bases[:, :5], np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="test_pos: needed"):
        ms.correctness.counterfactual_simulation(model, SITE, basis, tests, bases, np.zeros((2, 3), np.int64),
                                                 pos=np.zeros((3, 1), np.int64))
    with pytest.raises(ValueError, match="basis: expected shape"):
        ms.correctness.counterfactual_simulation(model, SITE, basis[:5], tests, bases, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="attention site"):
        ms.correctness.counterfactual_simulation(model, "blocks.0.attn.hook_pattern", None, tests, bases,
                                                 np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="train_values: expected one value per input"):
        ms.correctness.value_probe(model, SITE, basis, bases, [0, 1], tests, [0, 1])
    with pytest.raises(ValueError, match="answers: expected one token id per row"):
        ms.correctness.is_correct(model, tests, [1, 2, 3])
    with pytest.raises(TypeError, match="answers: expected token ids"):
        ms.correctness.is_correct(model, tests, [1.5, 2])
