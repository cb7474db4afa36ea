"""ms.patching.path against path patching written out with TransformerLens hooks on the
same weights: for each sender head, the clean output of the sender and every later
head held at its corrupted value (also the MLPs, when asked), then either the logits
of that run or, for receivers, a second run with the receivers' inputs written."""
import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import tl_model_from_hf

NAME = "deep4_eps"  # 4 layers of 6 heads


@pytest.fixture(scope="module")
def setup(hf_models, ms_models):
    model, tl = ms_models[NAME], tl_model_from_hf(hf_models[NAME])
    rng = np.random.default_rng(11)
    clean, corrupted = (rng.integers(0, model.d_vocab, size=(3, 9)) for _ in range(2))
    correct, wrong = rng.integers(0, model.d_vocab, size=3), rng.integers(0, model.d_vocab, size=3)
    return model, tl, clean, corrupted, correct, wrong


def logit_diff(logits, correct, wrong):
    rows = np.arange(len(correct))
    return float(np.mean(logits[rows, -1, correct] - logits[rows, -1, wrong]))


def zero_head(z, hook):
    """The base intervention of the tests that have one: head 1 of layer 0 zeroed."""
    z[:, :, 1] = 0.0
    return z


def tl_path(tl, clean, corrupted, correct, wrong, receivers, freeze_mlps, zeroed=False):
    """The slow definition, one or two hooked TransformerLens runs per sender (every run
    of the corrupted tokens with head 0.1 zeroed when ``zeroed``)."""
    L, H = tl.cfg.n_layers, tl.cfg.n_heads
    clean_t, corrupted_t = torch.as_tensor(clean), torch.as_tensor(corrupted)
    _, clean_cache = tl.run_with_cache(clean_t)
    base = [("blocks.0.attn.hook_z", zero_head)] if zeroed else []  # first in every run of corrupted_t
    with tl.hooks(fwd_hooks=base):
        _, held = tl.run_with_cache(corrupted_t)
    grid = np.empty((L, H))
    for layer in range(L):
        for head in range(H):
            def hold_z(z, hook, layer=layer, head=head):
                if hook.layer() == layer:
                    z[:, :, head] = clean_cache[hook.name][:, :, head]
                elif hook.layer() > layer:
                    z[:] = held[hook.name]
                return z

            hooks = [(f"blocks.{k}.attn.hook_z", hold_z) for k in range(L)]
            if freeze_mlps:
                hooks += [(f"blocks.{k}.hook_mlp_out", lambda x, hook: held[hook.name]) for k in range(layer, L)]
            if receivers is None:
                logits = tl.run_with_hooks(corrupted_t, fwd_hooks=base + hooks)
            else:
                with tl.hooks(fwd_hooks=base + hooks):
                    _, sent = tl.run_with_cache(corrupted_t)

                def write(x, hook, layer=layer):
                    for r_layer, r_head, kind in receivers:
                        if hook.name == f"blocks.{r_layer}.attn.hook_{kind}" and r_layer > layer:
                            x[:, :, r_head] = sent[hook.name][:, :, r_head]
                    return x

                logits = tl.run_with_hooks(corrupted_t, fwd_hooks=base + [
                    (f"blocks.{r}.attn.hook_{k}", write) for r, _, k in receivers])
            grid[layer, head] = logit_diff(logits.numpy(), correct, wrong)
    return grid


@pytest.mark.parametrize("receivers", [None, [(2, 1, "q"), (3, 4, "k"), (3, 0, "v")], [(1, 5, "v")]])
@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_matches_hooked_transformer_lens(setup, receivers, freeze_mlps):
    model, tl, clean, corrupted, correct, wrong = setup
    cache = model.run(clean, cache="blocks.*.attn.hook_z").cache
    grid = ms.patching.path(model, corrupted, cache, ms.metrics.LogitDiff(correct, wrong), receivers,
                            freeze_mlps=freeze_mlps)
    expected = tl_path(tl, clean, corrupted, correct, wrong, receivers, freeze_mlps)
    assert grid.shape == (model.n_layers, model.n_heads)
    np.testing.assert_allclose(grid, expected, atol=1e-4)
    assert np.ptp(grid) > 0.05  # the senders differ: the test sees the paths


@pytest.mark.parametrize("receivers", [None, [(2, 1, "q"), (3, 4, "k"), (3, 0, "v")]])
def test_base_interventions_hold_in_every_run(setup, receivers):
    model, tl, clean, corrupted, correct, wrong = setup
    cache = model.run(clean, cache="blocks.*.attn.hook_z").cache
    grid = ms.patching.path(model, corrupted, cache, ms.metrics.LogitDiff(correct, wrong), receivers,
                            interventions=[ms.Zero("blocks.0.attn.hook_z", head=1)])
    expected = tl_path(tl, clean, corrupted, correct, wrong, receivers, False, zeroed=True)
    np.testing.assert_allclose(grid, expected, atol=1e-4)


def test_the_last_layer_and_a_python_metric(setup):
    model, _, clean, corrupted, correct, wrong = setup
    cache = model.run(clean, cache=model.site_names).cache
    metric = ms.metrics.LogitDiff(correct, wrong)
    grid = ms.patching.path(model, corrupted, cache, metric)
    # nothing comes after the last layer's heads: path = activation patching there
    heads = ms.patching.attn_head_out_all_pos(model, corrupted, cache, metric)
    np.testing.assert_allclose(grid[-1], heads[-1], atol=1e-5)
    # a Python function of the logits gives the same grid (one run per sender)
    slow = ms.patching.path(model, corrupted, cache, lambda logits: logit_diff(logits, correct, wrong),
                            [(3, 2, "q")])
    np.testing.assert_allclose(slow, ms.patching.path(model, corrupted, cache, metric, [(3, 2, "q")]), atol=1e-5)


def test_bad_receivers(setup):
    model, _, clean, corrupted, correct, wrong = setup
    cache = model.run(clean, cache="blocks.*.attn.hook_z").cache
    metric = ms.metrics.LogitDiff(correct, wrong)
    for receivers, message in [([(2, 1, "z")], "'q', 'k' or 'v'"), ([(2, 6, "q")], "head 6 .* out of range"),
                               ([(4, 0, "q")], "layer 4 .* out of range"), ([(0, 1, "v")], "in layer 0"),
                               ([], "empty"), ([(2, 1)], "expected \\(layer, head")]:
        with pytest.raises(ValueError, match=message):
            ms.patching.path(model, corrupted, cache, metric, receivers)
