"""model.loss: the next-token cross-entropy against HuggingFace's loss and
TransformerLens's return_type="loss", per token against torch, with padding and
interventions."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import positions_from_mask, random_tokens, tl_model_from_hf
from test_architectures import batch, make_hf

torch.set_grad_enabled(False)


def _padded(rng, vocab, lengths, T, left):
    """(tokens, mask) of rows with these real lengths, padded on the left or the right"""
    tokens, mask = batch(SimpleNamespace(d_vocab=vocab), rng, lengths, T, left)
    return tokens, mask.astype(np.int64)


def test_loss_equals_hf_and_transformer_lens(small, rng):
    hf, _, model = small
    tokens = random_tokens(rng, model.d_vocab, 3, 11)
    want = hf(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss.item()
    assert model.loss(tokens) == pytest.approx(want, abs=1e-5)
    tl = tl_model_from_hf(hf)
    assert model.loss(tokens) == pytest.approx(tl(torch.as_tensor(tokens), return_type="loss").item(), abs=1e-5)
    per = tl(torch.as_tensor(tokens), return_type="loss", loss_per_token=True).numpy()
    np.testing.assert_allclose(model.loss(tokens, per_token=True), per, atol=1e-5, rtol=0)
    # right padding: HF's loss with labels -100 at the padding
    tokens, mask = _padded(rng, model.d_vocab, [11, 6, 2], 11, left=False)
    labels = torch.as_tensor(np.where(mask == 1, tokens, -100))
    want = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), labels=labels).loss.item()
    assert model.loss(tokens, attention_mask=mask) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("name", ["gemma2_softcap", "phi_parallel"])
def test_per_token_loss_with_left_padding_equals_torch(name):
    """each row's real tokens alone; NaN where the token or the next one is padding;
    Gemma 2's capped logits and Phi's unembedding bias are part of the loss"""
    import mechscope as ms
    hf = make_hf(name, seed=1)
    model = ms.Model.from_arrays(hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    tokens, mask = _padded(np.random.default_rng(3), model.d_vocab, [9, 5, 2], 9, left=True)
    logits = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions_from_mask(mask))).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.as_tensor(tokens[:, 1:]),
                                             reduction="none").numpy()
    both = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    got = model.loss(tokens, attention_mask=mask, per_token=True)
    assert got.shape == (3, 8)
    np.testing.assert_array_equal(np.isnan(got), ~both)
    np.testing.assert_allclose(got[both], want[both], atol=2e-5, rtol=0)
    assert model.loss(tokens, attention_mask=mask) == pytest.approx(want[both].mean(), abs=2e-5)


def test_loss_of_an_intervened_run(ms, small, rng):
    _, _, model = small
    tokens = random_tokens(rng, model.d_vocab, 2, 8)
    zero = [ms.Zero("blocks.0.hook_mlp_out")]
    logits = model.run(tokens, interventions=zero).logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(model.loss(tokens, interventions=zero, per_token=True), want, atol=1e-9, rtol=0)
    assert abs(model.loss(tokens, interventions=zero) - model.loss(tokens)) > 1e-3


def test_bad_loss_requests_are_refused(small):
    _, _, model = small
    with pytest.raises(ValueError, match="at least 2 positions"):
        model.loss([[3]])
    with pytest.raises(ValueError, match="no row has two real tokens in a row"):
        model.loss([[3, 4, 5]], attention_mask=[[0, 0, 1]])
