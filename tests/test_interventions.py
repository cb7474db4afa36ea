"""Interventions and Python hooks against TransformerLens's hooks at the same sites
(no weight processing), and nested counterfactuals against their two-pass definition."""
import numpy as np
import pytest
import torch

from conftest import assert_close, make_hf_model, save_hf, tl_model_from_hf

CONFIG = dict(n_embd=24, n_head=3, n_layer=3, vocab_size=57, n_positions=16, activation_function="gelu_new")
B, T, H, DH, C = 2, 7, 3, 8, 24


@pytest.fixture(scope="module")
def models(ms, tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=41)
    return ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("iv") / "m")), tl_model_from_hf(hf)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(3)
    return rng.integers(0, CONFIG["vocab_size"], (B, T)), rng.integers(0, CONFIG["vocab_size"], (B, T))


def tl_logits(tl, tokens, hooks):
    """TransformerLens with hooks fn(value) -> new value (torch), per site name."""
    fwd = [(name, (lambda f: lambda act, hook: f(act.clone()))(fn)) for name, fn in hooks.items()]
    with torch.no_grad():
        return tl.run_with_hooks(torch.as_tensor(tokens), fwd_hooks=fwd).numpy()


def sl(x):
    """a list of indices as a torch index"""
    return torch.as_tensor(np.atleast_1d(x))


RNG = np.random.default_rng(11)
VEC_C = RNG.normal(size=C).astype(np.float32)
VEC_DH = RNG.normal(size=(2, DH)).astype(np.float32)
NEURONS = [0, 5, 17, 90]


def cases(ms):
    """(mechscope intervention, site, TL hook on the torch value)"""
    t = torch.as_tensor
    return [
        (ms.Add("blocks.1.hook_resid_pre", VEC_C, scale=2.5), "blocks.1.hook_resid_pre",
         lambda v: v + 2.5 * t(VEC_C)),
        (ms.Add("blocks.0.hook_resid_mid", VEC_C, pos=[1, 4]), "blocks.0.hook_resid_mid",
         lambda v: (v.__setitem__((slice(None), sl([1, 4])), v[:, sl([1, 4])] + t(VEC_C)), v)[1]),
        (ms.Zero("blocks.2.attn.hook_z", head=1), "blocks.2.attn.hook_z",
         lambda v: (v.__setitem__((slice(None), slice(None), 1), 0.0), v)[1]),
        (ms.Set("blocks.1.attn.hook_v", VEC_DH, head=[0, 2], pos=3), "blocks.1.attn.hook_v",
         lambda v: (v.__setitem__((slice(None), 3, sl([0, 2])), t(VEC_DH)), v)[1]),
        (ms.Scale("blocks.0.mlp.hook_post", 0.0, index=NEURONS), "blocks.0.mlp.hook_post",
         lambda v: (v.__setitem__((Ellipsis, sl(NEURONS)), 0.0), v)[1]),
        (ms.Scale("blocks.2.attn.hook_q", -1.5, head=2, index=[0, 3]), "blocks.2.attn.hook_q",
         lambda v: (v.__setitem__((slice(None), slice(None), 2, sl([0, 3])), -1.5 * v[:, :, 2, sl([0, 3])]), v)[1]),
        (ms.Set("blocks.1.attn.hook_pattern", 0.25, head=0, pos=5, key_pos=[0, 1, 2, 5]),
         "blocks.1.attn.hook_pattern",
         lambda v: (v.__setitem__((slice(None), 0, 5, sl([0, 1, 2, 5])), 0.25), v)[1]),
        (ms.Add("blocks.0.attn.hook_attn_scores", 3.0, head=[1, 2], pos=[2, 6], key_pos=0),
         "blocks.0.attn.hook_attn_scores",
         lambda v: (v.__setitem__((slice(None), sl([1, 2])[:, None], sl([2, 6]), 0),
                                  v[:, sl([1, 2])[:, None], sl([2, 6]), 0] + 3.0), v)[1]),
        (ms.Zero("hook_embed", pos=2), "hook_embed", lambda v: (v.__setitem__((slice(None), 2), 0.0), v)[1]),
        (ms.Scale("blocks.2.ln2.hook_scale", 2.0), "blocks.2.ln2.hook_scale", lambda v: 2.0 * v),
        (ms.Add("ln_final.hook_normalized", VEC_C, row=1), "ln_final.hook_normalized",
         lambda v: (v.__setitem__(1, v[1] + t(VEC_C)), v)[1]),
        (ms.Set("blocks.2.hook_mlp_out", np.arange(B * 2 * 3, dtype=np.float32).reshape(B, 2, 3),
                pos=[0, 6], index=[1, 2, 3]), "blocks.2.hook_mlp_out",
         lambda v: (v.__setitem__((slice(None), sl([0, 6])[:, None], sl([1, 2, 3])),
                                  t(np.arange(B * 2 * 3, dtype=np.float32).reshape(B, 2, 3))), v)[1]),
    ]


@pytest.mark.parametrize("i", range(12))
def test_intervention_as_transformer_lens_hook(ms, models, tokens, i):
    model, tl = models
    iv, site, hook = cases(ms)[i]
    ours = model.run(tokens[0], interventions=[iv]).logits
    theirs = tl_logits(tl, tokens[0], {site: hook})
    assert_close(ours, theirs, what=repr(iv))
    assert np.abs(ours - model.run(tokens[0]).logits).max() > 1e-4  # it did something


def test_several_interventions_in_order(ms, models, tokens):
    """At one site they apply in the order given; across sites in forward order."""
    model, tl = models
    ivs = [ms.Add("blocks.1.hook_resid_pre", VEC_C), ms.Scale("blocks.1.hook_resid_pre", 0.5, pos=[0, 1]),
           ms.Zero("blocks.0.attn.hook_z", head=0)]
    t = torch.as_tensor

    def resid(v):
        v = v + t(VEC_C)
        v[:, :2] = 0.5 * v[:, :2]
        return v

    def z(v):
        v[:, :, 0] = 0.0
        return v
    assert_close(model.run(tokens[0], interventions=ivs).logits,
                 tl_logits(tl, tokens[0], {"blocks.1.hook_resid_pre": resid, "blocks.0.attn.hook_z": z}))


def test_mean_ablate_and_noise(ms, models, tokens):
    model, tl = models
    reference = model.run(np.random.default_rng(5).integers(0, 57, (6, T)), cache="blocks.1.hook_mlp_out").cache
    mean = reference["blocks.1.hook_mlp_out"].mean(0)
    ours = model.run(tokens[0], interventions=[ms.MeanAblate("blocks.1.hook_mlp_out", reference, pos=[2, 3])]).logits

    def ablate(v):
        v[:, 2:4] = torch.as_tensor(mean[2:4])
        return v
    assert_close(ours, tl_logits(tl, tokens[0], {"blocks.1.hook_mlp_out": ablate}))

    draws = np.random.RandomState(4).randn(B, 2, C) * 0.7
    ours = model.run(tokens[0], interventions=[ms.Noise("hook_embed", std=0.7, seed=4, pos=[1, 2])]).logits

    def noise(v):
        v[:, 1:3] += torch.as_tensor(draws, dtype=torch.float32)
        return v
    assert_close(ours, tl_logits(tl, tokens[0], {"hook_embed": noise}))


def test_subspace_patch(ms, models, tokens):
    """b <- (I - QQ^T) b + QQ^T s within the chosen dimensions."""
    model, tl = models
    source = model.run(tokens[1], cache="blocks.1.hook_resid_post").cache
    dims = [2, 3, 5, 7, 11, 13]
    Q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(len(dims), 2)))
    ours = model.run(tokens[0], interventions=[ms.SubspacePatch("blocks.1.hook_resid_post", Q, source,
                                                               pos=[4, 6], index=dims)]).logits
    s = torch.as_tensor(source["blocks.1.hook_resid_post"])
    P = torch.as_tensor((Q @ Q.T).astype(np.float32))

    def project(v):
        for p in (4, 6):
            b = v[:, p, dims]
            v[:, p, dims] = b + (s[:, p, dims] - b) @ P
        return v
    assert_close(ours, tl_logits(tl, tokens[0], {"blocks.1.hook_resid_post": project}))


def test_patch_from_cache_and_from_same_pass_source(ms, models, tokens):
    """Patch(source=cache) is TL's patching hook; Patch(source=Source(...)) computes the
    source in the same pass and gives the same numbers."""
    model, tl = models
    clean, corrupted = tokens
    cache = model.run(clean, cache="blocks.1.attn.hook_z").cache
    two_pass = model.run(corrupted, interventions=[ms.Patch("blocks.1.attn.hook_z", cache, head=2, pos=[3, 4])]).logits
    one_pass = model.run(corrupted, interventions=[ms.Patch("blocks.1.attn.hook_z", ms.Source(clean), head=2,
                                                            pos=[3, 4])]).logits
    z = torch.as_tensor(cache["blocks.1.attn.hook_z"])

    def patch(v):
        v[:, 3:5, 2] = z[:, 3:5, 2]
        return v
    assert_close(two_pass, tl_logits(tl, corrupted, {"blocks.1.attn.hook_z": patch}))
    assert_close(one_pass, two_pass, atol=1e-5)


def test_nested_counterfactual_is_one_call(ms, models, tokens):
    """Y(a, M(a')) where M(a') is itself computed under an intervention: the Source's
    own interventions run in its rows, in the same forward pass."""
    model, _ = models
    a, a_prime = tokens
    inner = [ms.Zero("blocks.0.attn.hook_z", head=1)]
    # two passes, by definition
    m_a_prime = model.run(a_prime, interventions=inner, cache="blocks.2.hook_mlp_out").cache
    want = model.run(a, interventions=[ms.Patch("blocks.2.hook_mlp_out", m_a_prime, pos=6)]).logits
    # one call
    got = model.run(a, interventions=[ms.Patch("blocks.2.hook_mlp_out", ms.Source(a_prime, interventions=inner),
                                               pos=6)]).logits
    assert_close(got, want, atol=1e-5)
    # a batch-1 source feeds every row
    one = model.run(a, interventions=[ms.Patch("blocks.2.hook_mlp_out", ms.Source(a_prime[:1]), pos=6)]).logits
    src = model.run(a_prime[:1], cache="blocks.2.hook_mlp_out").cache["blocks.2.hook_mlp_out"]
    want = model.run(a, interventions=[ms.Set("blocks.2.hook_mlp_out", src[:, 6:7], pos=6)]).logits
    assert_close(one, want, atol=1e-5)


def test_python_hooks(ms, models, tokens):
    """fn(value, site) sees the site's value; in-place changes and returned arrays both
    take effect; same result as the declared intervention."""
    model, _ = models
    seen = {}

    def look(value, site):
        seen[site] = value.copy()

    out = model.run(tokens[0], cache="blocks.*.attn.hook_pattern", hooks={"blocks.*.attn.hook_pattern": look})
    assert sorted(seen) == [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    for site, value in seen.items():
        assert_close(value, out.cache[site], atol=0)

    def zero_in_place(value, site):
        value[:, :, 1] = 0.0

    def zero_returned(value, site):
        new = value.copy()
        new[:, :, 1] = 0.0
        return new
    want = model.run(tokens[0], interventions=[ms.Zero("blocks.2.attn.hook_z", head=1)]).logits
    assert_close(model.run(tokens[0], hooks={"blocks.2.attn.hook_z": zero_in_place}).logits, want, atol=0)
    assert_close(model.run(tokens[0], hooks={"blocks.2.attn.hook_z": zero_returned}).logits, want, atol=0)


def test_hook_errors_propagate(ms, models, tokens):
    model, _ = models

    def broken(value, site):
        raise KeyError("inside the hook")
    with pytest.raises(KeyError, match="inside the hook"):
        model.run(tokens[0], hooks={"blocks.1.hook_resid_pre": broken})
    with pytest.raises(ValueError, match="shape"):
        model.run(tokens[0], hooks={"blocks.1.hook_resid_pre": lambda v, s: v[:, :2]})
    assert np.isfinite(model.run(tokens[0]).logits).all()


@pytest.mark.parametrize("make, match", [
    (lambda ms: ms.Add("blocks.0.hook_resid_pre", np.zeros(C + 1)), "vector"),
    (lambda ms: ms.Set("blocks.0.hook_resid_pre", np.zeros((3, T, C))), "value"),
    (lambda ms: ms.Zero("blocks.0.hook_resid_pre", pos=T), "pos"),
    (lambda ms: ms.Zero("blocks.0.attn.hook_z", head=H), "head"),
    (lambda ms: ms.Zero("blocks.0.attn.hook_z", index=DH), "index"),
    (lambda ms: ms.Zero("blocks.0.hook_resid_pre", head=0), "head"),
    (lambda ms: ms.Zero("blocks.0.hook_resid_pre", key_pos=0), "key_pos"),
    (lambda ms: ms.Zero("blocks.0.attn.hook_pattern", index=0), "index"),
    (lambda ms: ms.Zero("blocks.3.hook_resid_pre"), "layer"),
    (lambda ms: ms.Zero("blocks.0.hook_nothing"), "site"),
    (lambda ms: ms.Zero("blocks.0.hook_resid_pre", row=B), "row"),
    (lambda ms: ms.SubspacePatch("blocks.0.hook_resid_pre", np.ones((C, 2)), np.zeros((B, T, C))), "orthonormal"),
    (lambda ms: ms.SubspacePatch("blocks.0.hook_resid_pre", np.eye(C)[:, :2], np.zeros((B, T, C)), index=[0, 1]),
     "basis"),
    (lambda ms: ms.Patch("blocks.0.hook_resid_pre", {"blocks.1.hook_resid_pre": np.zeros((B, T, C))}), "source"),
    (lambda ms: ms.Patch("blocks.0.hook_resid_pre", np.zeros((B, T + 1, C))), "source"),
    (lambda ms: ms.Patch("blocks.0.hook_resid_pre", ms.Source(np.zeros((B, T - 1), int))), "source"),
    (lambda ms: "not an intervention", "interventions"),
])
def test_bad_interventions(ms, models, tokens, make, match):
    model, _ = models
    with pytest.raises((ValueError, TypeError), match=match):
        model.run(tokens[0], interventions=[make(ms)])
