"""ms.heads: attention-head detection against TransformerLens's detect_head on the same
weights (each named pattern, both error measures, the exclusions, a pattern array, a
subset of heads), padded batches against each row alone, and the patterns themselves
against their definitions written out position by position."""
import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import tl_model_from_hf

GPT2 = "deep4_eps"  # 4 layers, 6 heads


@pytest.fixture(scope="module")
def gpt2(hf_models, ms_models):
    return ms_models[GPT2], tl_model_from_hf(hf_models[GPT2])


@pytest.fixture(scope="module")
def rows():
    """Three rows of 13 ids from a small range, so that tokens repeat often."""
    return np.random.default_rng(3).integers(0, 6, size=(3, 13))


def tl_detect(tl, rows, pattern, **kw):
    """TransformerLens's detect_head on each row as its own sequence, the scores
    averaged over the rows (what it does for a list of strings, except that there it
    drops the options; called row by row they hold). Its to_tokens (which needs a
    tokenizer) is replaced by a lookup of the row a string names."""
    from transformer_lens.head_detector import detect_head

    tl.to_tokens = lambda seq, **_: torch.as_tensor(rows[int(seq)], dtype=torch.long)[None]
    try:
        return np.mean([detect_head(tl, str(i), pattern, **kw).numpy() for i in range(len(rows))], axis=0)
    finally:
        del tl.to_tokens


@pytest.mark.parametrize("pattern", ms.heads.PATTERNS)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_named_patterns_match_transformer_lens(gpt2, rows, pattern, error_measure):
    model, tl = gpt2
    for exclude_bos, exclude_current in ((False, False), (True, False), (False, True), (True, True)):
        if error_measure == "abs" and (exclude_bos or exclude_current) and pattern != "induction_head":
            continue  # the exclusions act alike for both measures; one pattern checks them under "abs"
        kw = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current, error_measure=error_measure)
        ours = ms.heads.detect(model, rows, pattern, **kw)
        ref = tl_detect(tl, rows, pattern, **kw)
        # TransformerLens rounds "abs" scores to 3 decimals
        tol = 5.1e-4 if error_measure == "abs" else 1e-5
        np.testing.assert_allclose(ours, ref, atol=tol, err_msg=f"{pattern} {kw}")


def test_pattern_array_and_head_subset_match_transformer_lens(gpt2, rows):
    model, tl = gpt2
    row = rows[:1]
    target = np.tril(np.random.default_rng(1).integers(0, 2, size=(13, 13)))
    heads = [(0, 1), (2, 5), (3, 0)]
    for error_measure in ("mul", "abs"):
        ours = ms.heads.detect(model, row, target, heads=heads, error_measure=error_measure)
        ref = tl_detect(tl, row, torch.as_tensor(target, dtype=torch.float32), heads=heads,
                        error_measure=error_measure)
        np.testing.assert_allclose(ours, ref, atol=5.1e-4 if error_measure == "abs" else 1e-5)
        assert (ours == -1).sum() == model.n_layers * model.n_heads - len(heads)
    # a dict of heads is the same choice
    np.testing.assert_array_equal(ms.heads.detect(model, row, target, heads={0: [1], 2: [5], 3: [0]}),
                                  ms.heads.detect(model, row, target, heads=heads))


def test_padded_rows_are_scored_alone(gpt2, rows):
    model, _ = gpt2
    lengths = (13, 9, 5)
    for side in ("left", "right"):
        tokens = np.zeros((3, 13), dtype=np.int64)
        mask = np.zeros((3, 13), dtype=np.int32)
        for b, n in enumerate(lengths):
            at = slice(13 - n, 13) if side == "left" else slice(0, n)
            tokens[b, at] = rows[b, :n]
            mask[b, at] = 1
        for pattern in ms.heads.PATTERNS:
            batch = ms.heads.detect(model, tokens, pattern, attention_mask=mask, per_row=True, exclude_bos=True)
            assert batch.shape == (3, model.n_layers, model.n_heads)
            for b, n in enumerate(lengths):
                alone = ms.heads.detect(model, rows[b:b + 1, :n], pattern, exclude_bos=True)
                np.testing.assert_allclose(batch[b], alone, atol=1e-5, err_msg=f"{side} row {b} {pattern}")
            np.testing.assert_allclose(ms.heads.detect(model, tokens, pattern, attention_mask=mask, exclude_bos=True),
                                       batch.mean(0), atol=1e-12)


def test_patterns_follow_their_definitions(gpt2, rows):
    """Each named pattern written out position by position: the score of a head that
    attends as the pattern says is 1, and the built patterns equal the definitions."""
    from mechscope.heads import _named_pattern

    ids = rows[0]
    n = len(ids)
    defs = {
        "previous_token_head": lambda q, k: k == q - 1,
        "duplicate_token_head": lambda q, k: k < q and ids[k] == ids[q],
        "induction_head": lambda q, k: 1 <= k <= q and k - 1 < q and ids[k - 1] == ids[q],
    }
    for name, rule in defs.items():
        expected = np.array([[float(rule(q, k)) for k in range(n)] for q in range(n)])
        np.testing.assert_array_equal(_named_pattern(name, ids), expected, err_msg=name)


def test_repeated_tokens_find_a_planted_induction_head():
    """Zeroing every score of the run but writing an induction pattern into one head
    (an intervention at hook_pattern) gives that head a score of 1 on the second copy."""
    model = ms.Model.from_config(dict(n_embd=32, n_head=4, n_layer=2, vocab_size=50, n_positions=64), seed=0)
    tokens = ms.heads.repeated_tokens(model, 20, batch=2, seed=4)
    assert tokens.shape == (2, 41)
    assert (tokens[:, 0] == model._bos()).all()
    np.testing.assert_array_equal(tokens[:, 1:21], tokens[:, 21:])
    np.testing.assert_array_equal(tokens, ms.heads.repeated_tokens(model, 20, batch=2, seed=4))
    # an exact induction pattern (the key after the first copy) on the second copy,
    # and attention to BOS elsewhere, written into layer 1 head 3
    T = tokens.shape[1]
    planted = np.zeros((T, T), dtype=np.float32)
    planted[:21, 0] = 1
    for q in range(21, T):
        planted[q, q - 19] = 1  # the first copy of token q is at q - 20; the key after it
    scores = ms.heads.detect(model, tokens[:1], "induction_head", exclude_bos=True,
                             interventions=[ms.Set("blocks.1.attn.hook_pattern", planted, head=3)])
    # all of the head's attention left after BOS is on induction targets
    assert scores[1, 3] == pytest.approx(1.0, abs=1e-6)
    assert (np.delete(scores.ravel(), 1 * 4 + 3) < 0.5).all()


def test_bad_input(gpt2, rows):
    model, _ = gpt2
    with pytest.raises(ValueError, match="pattern: expected an array or one of"):
        ms.heads.detect(model, rows, "induction")
    with pytest.raises(ValueError, match="error_measure: expected one of"):
        ms.heads.detect(model, rows, "induction_head", error_measure="l2")
    with pytest.raises(ValueError, match=r"pattern: expected shape \[13, 13\]"):
        ms.heads.detect(model, rows, np.zeros((12, 12)))
    with pytest.raises(ValueError, match="lower triangular"):
        ms.heads.detect(model, rows, np.ones((13, 13)))
    with pytest.raises(ValueError, match="not finite"):
        ms.heads.detect(model, rows, np.full((13, 13), np.nan))
    with pytest.raises(TypeError, match="pattern: expected a real array"):
        ms.heads.detect(model, rows, np.zeros((13, 13), dtype=bool))
    mask = np.ones_like(rows)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="must have no padding"):
        ms.heads.detect(model, rows, np.eye(13), attention_mask=mask)
    with pytest.warns(UserWarning, match="values other than 0 and 1"):
        ms.heads.detect(model, rows, np.eye(13) * 0.5)
    with pytest.raises(ValueError, match=r"heads: \(4, 0\) is not a head"):
        ms.heads.detect(model, rows, "induction_head", heads=[(4, 0)])
    with pytest.raises(TypeError, match="heads: expected"):
        ms.heads.detect(model, rows, "induction_head", heads=[(0, 1.0)])
    with pytest.raises(ValueError, match="heads: empty"):
        ms.heads.detect(model, rows, "induction_head", heads=[])
    with pytest.raises(ValueError, match="row 0: no attention is left"):
        ms.heads.detect(model, rows[:1, :1], "previous_token_head", exclude_bos=True)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        ms.heads.repeated_tokens(model, 0)
    with pytest.raises(ValueError, match="batch: expected a positive int"):
        ms.heads.repeated_tokens(model, 3, batch=True)
    with pytest.raises(ValueError, match="do not fit the model's context of 64"):
        ms.heads.repeated_tokens(model, 32)
