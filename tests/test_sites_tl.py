"""Every site against TransformerLens 2.18 HookedTransformer, no weight processing."""
import fnmatch

import numpy as np
import pytest

from conftest import CONFIGS, assert_close, random_tokens, tl_model_from_hf, tl_run

BLOCK_SITES = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
    "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


def expected_site_names(n_layers):
    return (["hook_embed", "hook_pos_embed"]
            + [f"blocks.{l}.{s}" for l in range(n_layers) for s in BLOCK_SITES]
            + ["ln_final.hook_scale", "ln_final.hook_normalized"])


@pytest.fixture(scope="session")
def tl_models(hf_models):
    return {name: tl_model_from_hf(hf) for name, hf in hf_models.items()}


@pytest.fixture(scope="session")
def tl_runs(tl_models):
    """name -> (tokens, TL logits, TL cache) on a batch of 2 at full context."""
    rng = np.random.default_rng(7)
    runs = {}
    for name, tl in tl_models.items():
        tokens = random_tokens(rng, CONFIGS[name]["vocab_size"], 2, CONFIGS[name]["n_positions"])
        runs[name] = (tokens, *tl_run(tl, tokens))
    return runs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_site_matches_tl(name, ms_models, tl_runs):
    model = ms_models[name]
    tokens, tl_logits, tl_cache = tl_runs[name]
    out = model.run(tokens, cache=model.site_names)
    assert set(out.cache.keys()) == set(tl_cache.keys())
    for site, expected in tl_cache.items():
        got = out.cache[site]
        assert got.dtype == np.float32, site
        assert_close(got, expected, what=site)  # also checks the shape
    assert_close(out.logits, tl_logits, what="logits")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_site_names_in_tl_order(name, ms_models, tl_runs):
    _, _, tl_cache = tl_runs[name]
    names = list(ms_models[name].site_names)
    assert names == list(tl_cache.keys())
    # and TL's order is the documented one (guards against a TL change hiding a bug)
    assert names == expected_site_names(CONFIGS[name]["n_layer"])


def test_tl_shapes(ms_models, tl_runs):
    """Spot-check the documented TL shapes on the 4-layer model (b=2, p=64, 6 heads of 8)."""
    model = ms_models["deep4_eps"]
    tokens, _, _ = tl_runs["deep4_eps"]
    c = model.run(tokens, cache=["blocks.3.*", "ln_final.hook_scale"]).cache
    assert c["blocks.3.ln1.hook_scale"].shape == (2, 64, 1)
    assert c["blocks.3.attn.hook_q"].shape == (2, 64, 6, 8)
    assert c["blocks.3.attn.hook_z"].shape == (2, 64, 6, 8)
    assert c["blocks.3.attn.hook_attn_scores"].shape == (2, 6, 64, 64)
    assert c["blocks.3.mlp.hook_post"].shape == (2, 64, 72)
    assert c["ln_final.hook_scale"].shape == (2, 64, 1)


# --------------------------------------------------------- cache= selection

@pytest.mark.parametrize("request_", [
    "blocks.*.hook_resid_post",
    "blocks.0.attn.*",
    "*hook_scale",
    "blocks.2.mlp.hook_post",
    ["hook_embed", "blocks.1.attn.hook_pattern"],
    ["blocks.*.hook_resid_pre", "ln_final.hook_normalized"],
    ["blocks.3.hook_mlp_out", "blocks.3.hook_mlp_out"],  # duplicates collapse
])
def test_only_requested_sites_returned(request_, ms_models, tl_runs):
    model = ms_models["deep4_eps"]
    tokens, _, tl_cache = tl_runs["deep4_eps"]
    patterns = [request_] if isinstance(request_, str) else request_
    wanted = {s for s in model.site_names if any(fnmatch.fnmatchcase(s, p) for p in patterns)}
    assert wanted  # the request is meaningful
    out = model.run(tokens[:1, :10], cache=request_)
    assert set(out.cache.keys()) == wanted
    # values are the same as when everything is cached
    for site in wanted:
        assert_close(out.cache[site], tl_cache[site][:1, :10] if "attn_scores" not in site
                     and "pattern" not in site else tl_cache[site][:1, :, :10, :10], what=site)


def test_resid_pattern_count(ms_models, rng):
    model = ms_models["deep4_eps"]
    out = model.run(random_tokens(rng, 300, 1, 3), cache="blocks.*.hook_resid_post")
    assert sorted(out.cache.keys()) == [f"blocks.{l}.hook_resid_post" for l in range(4)]
