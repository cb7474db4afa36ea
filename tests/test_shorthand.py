"""TransformerLens's shorthand for sites: act_name against its utils.get_act_name, and a
run's cache read by (name, layer) as its ActivationCache is."""
import numpy as np
import pytest
import torch

from mechscope.sites import act_name
from conftest import random_tokens, tl_model_from_hf

SHORT = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "attn", "attn_scores",
         "attn_logits", "q", "k", "v", "z", "query", "key", "value", "rot_q", "rot_k", "pre", "post",
         "pre_linear", "mlp_pre", "mlp_post", "scale", "normalized", "embed", "pos_embed"]


@pytest.mark.parametrize("name", SHORT)
def test_act_name_equals_get_act_name(name):
    from transformer_lens.utils import get_act_name
    assert act_name(name) == get_act_name(name)
    for layer in (0, 7):
        assert act_name(name, layer) == get_act_name(name, layer)
    if name in ("scale", "normalized"):
        for part in ("ln1", "ln2"):
            assert act_name(name, 3, part) == get_act_name(name, 3, part)


@pytest.mark.parametrize("packed", ["k6", "pre5", "scale4ln1", "normalized2ln2", "z11", "q0a", "v3attention"])
def test_packed_shorthand_equals_get_act_name(packed):
    from transformer_lens.utils import get_act_name
    assert act_name(packed) == get_act_name(packed)


def test_cache_reads_shorthand_as_activation_cache(ms, small, rng):
    hf, _, model = small
    tokens = random_tokens(rng, model.d_vocab, 2, 6)
    out = model.run(tokens, cache="*")
    _, tl_cache = tl_model_from_hf(hf).run_with_cache(torch.as_tensor(tokens))
    L = model.n_layers
    for key in [("resid_pre", 1), ("pattern", 0), ("attn", L - 1), ("z", 1, "attn"), ("resid_post", -1),
                ("normalized", 0, "ln1"), ("scale", -1, "ln2"), "embed", "pos_embed", "scale", "k1", "pre0",
                "blocks.0.hook_mlp_out"]:
        np.testing.assert_allclose(out.cache[key], tl_cache[key].numpy(), atol=1e-4, rtol=0, err_msg=str(key))
    assert out.cache["resid_post", -1] is out.cache[f"blocks.{L - 1}.hook_resid_post"]
    assert isinstance(out.cache, dict) and "blocks.0.hook_resid_pre" in out.cache
    partial = model.run(tokens, cache="blocks.0.*")
    with pytest.raises(KeyError, match="'blocks.1.hook_resid_pre', which this cache does not hold"):
        partial.cache["resid_pre", 1]
    with pytest.raises(KeyError, match="'blocks.1.hook_mlp_out': this cache does not hold"):
        partial.cache["blocks.1.hook_mlp_out"]
    with pytest.raises(KeyError):
        partial.cache[3.5]


def test_cache_takes_a_names_filter(small, rng):
    """cache= a function of the name, as TransformerLens's names_filter"""
    _, _, model = small
    tokens = random_tokens(rng, model.d_vocab, 1, 5)
    out = model.run(tokens, cache=lambda name: name.endswith("hook_z"))
    assert list(out.cache) == [f"blocks.{layer}.attn.hook_z" for layer in range(model.n_layers)]
    with pytest.raises(ValueError, match="the function picks no site"):
        model.run(tokens, cache=lambda name: False)
