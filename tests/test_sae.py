"""mechscope.sae against SAELens: its files and SAEs (standard, JumpReLU, TopK), and its
HookedSAETransformer on the same GPT-2 weights (features, the spliced-in SAE, feature
ablations with the error term kept, the cross-entropy with the SAE spliced in, the
gradient through the features that attribution uses, and features clamped during
generation), and each feature's most active tokens against sorting every token."""
import json

import numpy as np
import pytest
import torch
from conftest import hf_run, tl_model_from_hf
from sae_lens import (GatedSAE, GatedSAEConfig, HookedSAETransformer, JumpReLUSAE, JumpReLUSAEConfig, SAE as LensSAE,
                      StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig)
from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                                      JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder,
                                      TranscoderConfig)
from sae_lens.saes.sae import SAEMetadata
from scipy.stats import spearmanr

import mechscope as ms

KINDS = {"standard": (StandardSAEConfig, StandardSAE), "jumprelu": (JumpReLUSAEConfig, JumpReLUSAE),
         "topk": (TopKSAEConfig, TopKSAE), "gated": (GatedSAEConfig, GatedSAE)}
# the small model's sites of 30 numbers per token: the residual stream, the heads'
# outputs before W_O (5 heads x 6, flattened as SAELens's hook_z SAEs read them), an MLP's output
SITES = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]


def lens_sae(kind, site, seed, d_in=30, d_sae=48, apply_b_dec_to_input=True, **cfg):
    """A SAELens SAE with random weights, about a third of its features active; cfg:
    more of its config (normalize_activations, rescale_acts_by_decoder_norm)"""
    cfg_cls, sae_cls = KINDS[kind]
    if kind == "topk":
        cfg.setdefault("k", 7)
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input,
                  reshape_activations="hook_z" if site.endswith("hook_z") else "none",
                  metadata=SAEMetadata(hook_name=site), **cfg)
    return random_weights(sae_cls(cfg), seed)


def random_weights(sae, seed):
    """SAELens's `sae` (or transcoder) with random weights of its shapes, about a third of
    its features active, in eval mode"""
    (d_in, d_sae), d_out = sae.W_enc.shape, sae.W_dec.shape[1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
        if hasattr(sae, "b_gate"):  # gated: a gate and a magnitude path through W_enc
            sae.b_gate.copy_(0.3 * torch.randn(d_sae, generator=g) - 0.2)
            sae.b_mag.copy_(0.3 * torch.randn(d_sae, generator=g))
            sae.r_mag.copy_(0.5 * torch.randn(d_sae, generator=g))
        else:
            sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g) - 0.2)
        sae.W_dec.copy_(torch.randn(d_sae, d_out, generator=g) / d_sae ** 0.5)
        sae.b_dec.copy_(0.2 * torch.randn(d_out, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.3 * torch.rand(d_sae, generator=g))
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(0.3 * torch.randn(d_out, d_in, generator=g))
    return sae.eval()


TRANSCODERS = {"transcoder": (TranscoderConfig, Transcoder), "skip_transcoder": (SkipTranscoderConfig, SkipTranscoder),
               "jumprelu_transcoder": (JumpReLUTranscoderConfig, JumpReLUTranscoder),
               "jumprelu_skip_transcoder": (JumpReLUSkipTranscoderConfig, JumpReLUSkipTranscoder)}
# an MLP's input and output in the small model (30 numbers per token each)
MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def lens_transcoder(kind, seed, site=MLP_IN, site_out=MLP_OUT, d_in=30, d_sae=48, d_out=30):
    """A SAELens transcoder with random weights, about a third of its features active"""
    cfg_cls, cls = TRANSCODERS[kind]
    return random_weights(cls(cfg_cls(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False,
                                      metadata=SAEMetadata(hook_name=site, hook_name_out=site_out))), seed)


def ours(lens):
    """mechscope's SAE (or transcoder) with the weights of SAELens's `lens`"""
    arch = lens.cfg.architecture()
    transcoder = arch in TRANSCODERS
    kind = ("jumprelu" if "jumprelu" in arch else "standard") if transcoder else arch
    gated = kind == "gated"

    def a(name):
        return getattr(lens, name).detach().numpy()

    return ms.sae.SAE(a("W_enc"), a("b_gate" if gated else "b_enc"), a("W_dec"), a("b_dec"), lens.cfg.metadata.hook_name,
                      architecture=kind, threshold=a("threshold") if kind == "jumprelu" else None,
                      k=lens.cfg.k if arch == "topk" else None,
                      site_out=lens.cfg.metadata.hook_name_out if transcoder else None,
                      W_skip=a("W_skip") if "skip" in arch else None,
                      b_mag=a("b_mag") if gated else None, r_mag=a("r_mag") if gated else None,
                      normalize_activations=lens.cfg.normalize_activations,
                      rescale_acts_by_decoder_norm=getattr(lens.cfg, "rescale_acts_by_decoder_norm", False))


def with_error_term(tl, lens, tokens, edit_features):
    """SAELens's logits with `lens` spliced in, its error term kept, and
    edit_features(acts, hook) at its features (hook_sae_acts_post; a transcoder's hooks
    are at its output site)"""
    tl.add_sae(lens, use_error_term=True)
    at = lens.cfg.metadata.hook_name_out or lens.cfg.metadata.hook_name
    try:
        return tl.run_with_hooks(torch.as_tensor(tokens), fwd_hooks=[(f"{at}.hook_sae_acts_post", edit_features)])
    finally:
        tl.reset_saes()


def zeroing(features):
    """a SAELens hook (at hook_sae_acts_post) that sets these features to 0"""
    def hook(acts, hook):
        acts[..., torch.as_tensor(features)] = 0.0
        return acts
    return hook


def setting(feature, value):
    """a SAELens hook (at hook_sae_acts_post) that sets one feature to a value"""
    def hook(acts, hook):
        acts[..., feature] = value
        return acts
    return hook


def features_and_splice_as_saelens(model, tl, lens, sae, tokens):
    """checks that mechscope's features and spliced run of `sae` are HookedSAETransformer's
    of `lens`, and that the splice changes the run; returns the features"""
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        _, cache = tl.run_with_cache_with_saes(t, saes=[lens])
        spliced = tl.run_with_saes(t, saes=[lens]).numpy()
    f = ms.sae.features(model, tokens, sae)
    np.testing.assert_allclose(f, cache[f"{sae.site}.hook_sae_acts_post"].numpy(), atol=1e-4, rtol=0)
    got = model.run(tokens, interventions=[ms.sae.splice(model, tokens, sae)]).logits
    np.testing.assert_allclose(got, spliced, atol=1e-4, rtol=0)
    assert np.abs(spliced - model.run(tokens).logits).max() > 1e-2  # the splice changes the run
    return f


@pytest.fixture(scope="module")
def models(small):
    hf, _, model = small
    return hf, model, tl_model_from_hf(hf, cls=HookedSAETransformer)


def _tokens(model, seed, batch=3, pos=8):
    return np.random.default_rng(seed).integers(0, model.d_vocab, (batch, pos))


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_saelens_files_load_and_encode_as_saelens(kind, apply_b_dec, tmp_path):
    lens = lens_sae(kind, "blocks.1.hook_resid_pre", seed=1, apply_b_dec_to_input=apply_b_dec)
    lens.save_model(tmp_path / "lens")
    sae = ms.sae.SAE.load(tmp_path / "lens")
    assert (sae.architecture, sae.site, sae.d_in, sae.d_sae) == (kind, "blocks.1.hook_resid_pre", 30, 48)
    x = np.random.default_rng(2).normal(size=(4, 5, 30)).astype(np.float32)
    with torch.no_grad():
        want_f = lens.encode(torch.from_numpy(x)).numpy()
        want_x = lens.decode(torch.from_numpy(want_f)).numpy()
    f = sae.encode(x)
    assert 0.1 < (want_f > 0).mean() < 0.6  # sparse, not empty
    np.testing.assert_allclose(f, want_f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sae.decode(f), want_x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sae.reconstruct(x), want_x, atol=1e-5, rtol=0)
    # and back: what mechscope writes, SAELens reads
    sae.save(tmp_path / "ours")
    again = LensSAE.load_from_disk(tmp_path / "ours")
    assert type(again) is type(lens) and again.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    with torch.no_grad():
        np.testing.assert_allclose(again.encode(torch.from_numpy(x)).numpy(), want_f, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(TRANSCODERS))
def test_saelens_transcoder_files_load_and_map_as_saelens(kind, tmp_path):
    lens = lens_transcoder(kind, seed=22, d_out=20)
    lens.save_model(tmp_path / "lens")
    tc = ms.sae.SAE.load(tmp_path / "lens")
    assert tc.is_transcoder and (tc.site, tc.site_out, tc.d_in, tc.d_sae, tc.d_out) == (MLP_IN, MLP_OUT, 30, 48, 20)
    assert (tc.W_skip is not None) == ("skip" in kind) and not tc.apply_b_dec_to_input
    x = np.random.default_rng(23).normal(size=(4, 5, 30)).astype(np.float32)
    with torch.no_grad():
        want_f = lens.encode(torch.from_numpy(x)).numpy()
        want_y = lens(torch.from_numpy(x)).numpy()
    assert 0.1 < (want_f > 0).mean() < 0.6
    np.testing.assert_allclose(tc.encode(x), want_f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tc.reconstruct(x), want_y, atol=1e-5, rtol=0)
    tc.save(tmp_path / "ours")
    again = LensSAE.load_from_disk(tmp_path / "ours")
    assert type(again) is type(lens) and again.cfg.metadata.hook_name_out == MLP_OUT
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want_y, atol=1e-5, rtol=0)


def test_encode_follows_the_definitions():
    """each architecture computed the slow way, one token and one feature at a time"""
    rng = np.random.default_rng(3)
    W_enc, b_enc = rng.normal(size=(6, 10)), rng.normal(size=10) * 0.5
    W_dec, b_dec, theta = rng.normal(size=(10, 6)), rng.normal(size=6), rng.random(10)
    x = rng.normal(size=(5, 6))
    for kind, extra in (("standard", {}), ("jumprelu", {"threshold": theta}), ("topk", {"k": 3})):
        sae = ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre", architecture=kind, **extra)
        got = sae.encode(x)
        for t in range(5):
            pre = [sum((x[t, j] - b_dec[j]) * W_enc[j, i] for j in range(6)) + b_enc[i] for i in range(10)]
            kth = sorted(pre)[-3]
            for i in range(10):
                keep = {"standard": True, "jumprelu": pre[i] > theta[i], "topk": pre[i] >= kth}[kind]
                want = max(pre[i], 0.0) if keep else 0.0
                assert abs(got[t, i] - want) < 1e-5, (kind, t, i)


def test_gated_and_normalized_encode_follow_the_definitions():
    """gated features, normalize_activations and rescale_acts_by_decoder_norm computed
    the slow way, one token and one feature at a time"""
    rng = np.random.default_rng(31)
    n, d, m = 4, 6, 10
    W_enc, b_enc, b_mag, r_mag = rng.normal(size=(d, m)), rng.normal(size=m) * 0.5, rng.normal(size=m), rng.normal(size=m)
    W_dec, b_dec = rng.normal(size=(m, d)), rng.normal(size=d)
    x = rng.normal(size=(n, d)) * 3 + 1
    site = "blocks.0.hook_resid_pre"

    def normalized(v, how):
        if how == "constant_norm_rescale":
            return [vi * d ** 0.5 / sum(u * u for u in v) ** 0.5 for vi in v]
        mu = sum(v) / d
        sd = (sum((u - mu) ** 2 for u in v) / (d - 1)) ** 0.5
        return [(vi - mu) / (sd + 1e-5) for vi in v]

    def mapped_back(y, v, how):
        if how == "constant_norm_rescale":
            return [yi * sum(u * u for u in v) ** 0.5 / d ** 0.5 for yi in y]
        mu = sum(v) / d
        sd = (sum((u - mu) ** 2 for u in v) / (d - 1)) ** 0.5
        return [yi * sd + mu for yi in y]

    for kind, how, rescale in (("gated", "none", False), ("gated", "layer_norm", False),
                               ("standard", "constant_norm_rescale", False), ("topk", "layer_norm", True)):
        extra = {"b_mag": b_mag, "r_mag": r_mag} if kind == "gated" else {"k": 3} if kind == "topk" else {}
        sae = ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, architecture=kind, normalize_activations=how,
                         rescale_acts_by_decoder_norm=rescale, **extra)
        f, recon = sae.encode(x), sae.reconstruct(x)
        norms = [sum(W_dec[i, j] ** 2 for j in range(d)) ** 0.5 for i in range(m)]
        for t in range(n):
            v = list(x[t]) if how == "none" else normalized(list(x[t]), how)
            lin = [sum((v[j] - b_dec[j]) * W_enc[j, i] for j in range(d)) for i in range(m)]
            if kind == "gated":
                want = [max(lin[i] * np.exp(r_mag[i]) + b_mag[i], 0.0) if lin[i] + b_enc[i] > 0 else 0.0
                        for i in range(m)]
            else:
                pre = [(lin[i] + b_enc[i]) * (norms[i] if rescale else 1.0) for i in range(m)]
                kth = sorted(pre)[-3]
                want = [max(p, 0.0) if kind == "standard" or p >= kth else 0.0 for p in pre]
            np.testing.assert_allclose(f[t], want, atol=1e-5, rtol=1e-5, err_msg=f"{kind} {how}")
            units = [want[i] / norms[i] if rescale else want[i] for i in range(m)]
            y = [sum(units[i] * W_dec[i, j] for i in range(m)) + b_dec[j] for j in range(d)]
            if how != "none":
                y = mapped_back(y, list(x[t]), how)
            np.testing.assert_allclose(recon[t], y, atol=1e-4, rtol=1e-5, err_msg=f"{kind} {how}")


# SAELens's SAEs that normalize each token or rescale by the decoder's norms: (kind, config)
NORMALIZED = [("standard", {"normalize_activations": "constant_norm_rescale"}),
              ("gated", {"normalize_activations": "layer_norm"}),
              ("jumprelu", {"normalize_activations": "layer_norm"}),
              ("topk", {"rescale_acts_by_decoder_norm": True}),
              ("topk", {"normalize_activations": "constant_norm_rescale", "rescale_acts_by_decoder_norm": True})]


@pytest.mark.parametrize("kind, cfg", NORMALIZED)
def test_normalized_saelens_files_load_and_map_as_saelens(kind, cfg, tmp_path):
    lens = lens_sae(kind, "blocks.1.hook_resid_pre", seed=32, **cfg)
    lens.save_model(tmp_path / "lens")
    sae = ms.sae.SAE.load(tmp_path / "lens")
    assert sae.normalize_activations == cfg.get("normalize_activations", "none")
    assert sae.rescale_acts_by_decoder_norm == cfg.get("rescale_acts_by_decoder_norm", False)
    x = (np.random.default_rng(33).normal(size=(4, 5, 30)) * 4 + 1).astype(np.float32)
    with torch.no_grad():
        want_f = lens.encode(torch.from_numpy(x)).numpy()
        want_x = lens.decode(torch.from_numpy(want_f)).numpy()  # maps back with the last encode's numbers
    assert 0.1 < (want_f > 0).mean() < 0.6
    f = sae.encode(x)
    np.testing.assert_allclose(f, want_f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sae.decode(f, x), want_x, atol=1e-4, rtol=0)
    np.testing.assert_allclose(sae.reconstruct(x), want_x, atol=1e-4, rtol=0)
    if sae.normalize_activations != "none":
        with pytest.raises(ValueError, match="decoding needs the tokens' values: decode\\(f, x\\)"):
            sae.decode(f)
    sae.save(tmp_path / "ours")
    again = LensSAE.load_from_disk(tmp_path / "ours")
    assert type(again) is type(lens)
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want_x, atol=1e-4, rtol=0)


def test_a_dataset_wide_scaling_factor_is_folded_in(tmp_path):
    """normalize_activations="expected_average_only_in": the SAE read x * s; loaded with
    norm_scaling_factor=s it reads x, and reconstructs x (its output divided by s)"""
    lens = lens_sae("standard", "blocks.1.hook_resid_pre", seed=34, normalize_activations="expected_average_only_in")
    lens.save_model(tmp_path / "lens")
    with pytest.raises(ValueError, match="give it as SAE.load\\(..., norm_scaling_factor=...\\)"):
        ms.sae.SAE.load(tmp_path / "lens")
    s = 0.37
    sae = ms.sae.SAE.load(tmp_path / "lens", norm_scaling_factor=s)
    assert sae.normalize_activations == "none"
    x = (np.random.default_rng(35).normal(size=(6, 30)) / s).astype(np.float32)
    with torch.no_grad():
        want_f = lens.encode(torch.from_numpy(x * s)).numpy()
        want_x = lens.decode(torch.from_numpy(want_f)).numpy() / s
    assert 0.1 < (want_f > 0).mean() < 0.6
    np.testing.assert_allclose(sae.encode(x), want_f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sae.reconstruct(x), want_x, atol=1e-4, rtol=0)
    lens.fold_activation_norm_scaling_factor(s)  # SAELens's own fold gives the same SAE
    np.testing.assert_allclose(sae.W_enc, lens.W_enc.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(sae.W_dec, lens.W_dec.detach().numpy(), rtol=1e-6)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="norm_scaling_factor: expected a positive finite number"):
            ms.sae.SAE.load(tmp_path / "lens", norm_scaling_factor=bad)
    plain = lens_sae("standard", "blocks.1.hook_resid_pre", seed=34)
    plain.save_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="norm_scaling_factor: the SAE in .* has normalize_activations 'none'"):
        ms.sae.SAE.load(tmp_path / "plain", norm_scaling_factor=s)


@pytest.mark.parametrize("kind, cfg, site", [(*NORMALIZED[0], "blocks.1.hook_resid_pre"),
                                             (*NORMALIZED[1], "blocks.0.attn.hook_z"),
                                             (*NORMALIZED[4], "blocks.1.hook_mlp_out")])
def test_normalized_and_gated_saes_on_the_model_match_hooked_sae_transformer(models, kind, cfg, site):
    """features, the splice, removals and clamps with the error term kept, and
    attribution (autograd through SAELens's features), for SAEs that map their output
    back per token"""
    _, model, tl = models
    lens = lens_sae(kind, site, seed=36, **cfg)
    sae = ours(lens)
    tokens = _tokens(model, 37)
    f = features_and_splice_as_saelens(model, tl, lens, sae, tokens)
    active = np.argsort(-(f > 0).sum((0, 1)))[:3]

    want = with_error_term(tl, lens, tokens, zeroing(active)).numpy()
    assert np.abs(want - model.run(tokens).logits).max() > 1e-2
    np.testing.assert_allclose(model.run(tokens, interventions=[ms.sae.ablate(model, tokens, sae, active)]).logits,
                               want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.run(tokens, hooks=ms.sae.edit(sae, ablate=active)).logits, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.run(tokens, hooks=ms.sae.edit(sae, clamp={7: 5.0})).logits,
                               with_error_term(tl, lens, tokens, setting(7, 5.0)).numpy(), atol=1e-4, rtol=0)
    answer, wrong = np.array([3, 17, 40]), np.array([9, 2, 33])
    got = ms.sae.attribution(model, tokens, sae, ms.metrics.LogitDiff(answer, wrong))
    want = autograd_attribution(tl, lens, tokens, answer, wrong)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("site", SITES)
def test_features_splice_and_ablation_match_hooked_sae_transformer(models, site):
    hf, model, tl = models
    lens = lens_sae("topk" if site.endswith("hook_z") else "standard", site, seed=4)
    sae = ours(lens)
    tokens = _tokens(model, 5)
    f = features_and_splice_as_saelens(model, tl, lens, sae, tokens)

    # features removed everywhere, the SAE's error kept (use_error_term)
    active = np.argsort(-(f > 0).sum((0, 1)))[:3]

    want = with_error_term(tl, lens, tokens, zeroing(active)).numpy()
    got = model.run(tokens, interventions=[ms.sae.ablate(model, tokens, sae, active)]).logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want - model.run(tokens).logits).max() > 1e-2


@pytest.mark.parametrize("kind", ["transcoder", "jumprelu_skip_transcoder"])
def test_transcoders_on_the_model_match_hooked_sae_transformer(models, kind):
    """a transcoder from an MLP's input to its output: features, splice, removals and
    clamped features with the error term, the spliced cross-entropy, generation with a
    clamped feature, and attribution (autograd through SAELens's features)"""
    _, model, tl = models
    lens = lens_transcoder(kind, seed=24)
    tc = ours(lens)
    tokens = _tokens(model, 25)
    t = torch.as_tensor(tokens)
    read = {}
    # spliced: the transcoder's output (its forward) in place of the MLP's. SAELens's
    # HookedSAETransformer splices encode + decode, which leaves a skip connection out,
    # so the spliced run is written with hooks, and compared to it only without a skip
    spliced_hooks = [(MLP_IN, lambda x, hook: read.update(x=x)), (MLP_OUT, lambda y, hook: lens(read["x"]))]
    with torch.no_grad():
        _, cache = tl.run_with_cache_with_saes(t, saes=[lens])
        spliced = tl.run_with_hooks(t, fwd_hooks=spliced_hooks).numpy()
        spliced_loss = float(tl.run_with_hooks(t, return_type="loss", fwd_hooks=spliced_hooks))
        if "skip" not in kind:
            np.testing.assert_allclose(tl.run_with_saes(t, saes=[lens]).numpy(), spliced, atol=1e-5, rtol=0)
    f = ms.sae.features(model, tokens, tc)
    np.testing.assert_allclose(f, cache[f"{MLP_OUT}.hook_sae_acts_post"].numpy(), atol=1e-4, rtol=0)
    got = model.run(tokens, interventions=[ms.sae.splice(model, tokens, tc)]).logits
    np.testing.assert_allclose(got, spliced, atol=1e-4, rtol=0)
    assert np.abs(spliced - model.run(tokens).logits).max() > 1e-2
    assert abs(ms.sae.reconstruction_loss(model, tokens, tc)["spliced"] - spliced_loss) < 1e-4

    active = np.argsort(-(f > 0).sum((0, 1)))[:3]

    want = with_error_term(tl, lens, tokens, zeroing(active)).numpy()
    np.testing.assert_allclose(model.run(tokens, interventions=[ms.sae.ablate(model, tokens, tc, active)]).logits,
                               want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.run(tokens, hooks=ms.sae.edit(tc, ablate=active)).logits, want, atol=1e-4, rtol=0)
    assert np.abs(want - model.run(tokens).logits).max() > 1e-2

    clamp = setting(7, 5.0)
    hooks = ms.sae.edit(tc, clamp={7: 5.0})
    assert list(hooks) == [MLP_IN, MLP_OUT]
    want = with_error_term(tl, lens, tokens, clamp).numpy()
    np.testing.assert_allclose(model.run(tokens, hooks=hooks).logits, want, atol=1e-4, rtol=0)
    # generation: greedy, the feature clamped at every step, each prompt alone in SAELens
    prompt = [int(v) for v in tokens[0, :4]]
    ids = prompt
    for _ in range(6):
        ids = ids + [int(with_error_term(tl, lens, [ids], clamp)[0, -1].argmax())]
    out = model.generate(np.array([prompt]), 6, do_sample=False, stop_at_eos=False, hooks=hooks, progress=False)
    assert np.asarray(out)[0].tolist() == ids

    # attribution: -f * d metric / d f through SAELens's features, error kept
    answer, wrong = np.array([3, 17, 40]), np.array([9, 2, 33])
    got = ms.sae.attribution(model, tokens, tc, ms.metrics.LogitDiff(answer, wrong))
    want = autograd_attribution(tl, lens, tokens, answer, wrong)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_edit_hook_matches_ablate_and_hooked_sae_transformer(models):
    """the hook's removal equals ablate's, also after an intervention upstream; clamping
    and scaling features equal SAELens's, with the error term kept"""
    _, model, tl = models
    site = "blocks.1.hook_resid_pre"
    lens = lens_sae("standard", site, seed=14)
    sae = ours(lens)
    tokens = _tokens(model, 15)
    feats = [1, 7, 30]
    got = model.run(tokens, hooks=ms.sae.edit(sae, ablate=feats)).logits
    want = model.run(tokens, interventions=[ms.sae.ablate(model, tokens, sae, feats)]).logits
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    upstream = ms.Zero("blocks.0.hook_attn_out")
    got = model.run(tokens, interventions=[upstream], hooks=ms.sae.edit(sae, ablate=feats)).logits
    want = model.run(tokens, interventions=[upstream, ms.sae.ablate(model, tokens, sae, feats,
                                                                    interventions=[upstream])]).logits
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    clamp, scale = {3: 4.0, 11: 0.0}, {20: 3.0, 41: -1.0}

    def set_features(acts, hook):
        for i, v in clamp.items():
            acts[..., i] = v
        for i, v in scale.items():
            acts[..., i] = acts[..., i] * v
        return acts

    want = with_error_term(tl, lens, tokens, set_features).numpy()
    got = model.run(tokens, hooks=ms.sae.edit(sae, clamp=clamp, scale=scale)).logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - model.run(tokens).logits).max() > 1e-2
    with pytest.raises(ValueError, match="give the features to edit"):
        ms.sae.edit(sae)
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 48\\)"):
        ms.sae.edit(sae, clamp={48: 1.0})
    with pytest.raises(ValueError, match="clamp: values must be finite"):
        ms.sae.edit(sae, clamp={2: float("nan")})


def test_feature_clamping_during_generation_matches_hooked_sae_transformer(models):
    """ms.sae.edit as a generate hook: the greedy continuation with a feature clamped
    at every step is SAELens's (its SAE spliced in with the error term, the feature
    set at hook_sae_acts_post), for each prompt of a left-padded batch"""
    _, model, tl = models
    site = "blocks.1.hook_resid_pre"
    lens = lens_sae("standard", site, seed=16)
    sae = ours(lens)
    prompts = [[5, 17, 3, 40, 22, 8], [9, 1, 33], [30, 2, 2, 41]]
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros(tokens.shape, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
    clamp = {5: 6.0}

    def set_feature(acts, hook):
        acts[..., 5] = 6.0
        return acts

    kw = dict(do_sample=False, stop_at_eos=False, attention_mask=mask, progress=False)
    got = model.generate(tokens, 10, hooks=ms.sae.edit(sae, clamp=clamp), **kw)
    plain = model.generate(tokens, 10, **kw)
    want = []
    for p in prompts:  # SAELens's greedy decoding, the whole sequence rerun at each step
        for _ in range(10):
            p = p + [int(with_error_term(tl, lens, [p], set_feature)[0, -1].argmax())]
        want.append(p)
    rows = [np.asarray(r)[m != 0].tolist() for r, m in zip(got, got.attention_mask)]
    assert rows == want
    assert not np.array_equal(np.asarray(got), np.asarray(plain))  # the clamp changes what the model says


def test_ablation_at_some_positions_and_in_padded_rows(models):
    """pos= removes the features at those positions only; a padded row's real tokens get
    what the row gets alone (HF with the same edit at its block's input)"""
    hf, model, _ = models
    site = "blocks.1.hook_resid_pre"
    lens = lens_sae("jumprelu", site, seed=6)
    sae = ours(lens)
    tokens = _tokens(model, 7)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    feats, pos = [0, 5, 11, 20], [4, 5]
    got = model.run(tokens, attention_mask=mask,
                    interventions=[ms.sae.ablate(model, tokens, sae, feats, pos=pos, attention_mask=mask)]).logits
    for row in range(3):
        real = np.flatnonzero(mask[row])
        x = hf_run(hf, tokens[row:row + 1, real])["hidden"][1][0]  # blocks.1.hook_resid_pre
        f = sae.encode(x)
        delta = np.zeros_like(x)
        for p in pos:
            if mask[row, p]:
                k = int(np.searchsorted(real, p))
                delta[k] = -(f[k, feats] @ sae.W_dec[feats])
        handle = hf.transformer.h[1].register_forward_pre_hook(
            lambda mod, args, kwargs: ((args[0] + torch.from_numpy(delta),) + args[1:], kwargs), with_kwargs=True)
        try:
            want = hf_run(hf, tokens[row:row + 1, real])["logits"][0]
        finally:
            handle.remove()
        np.testing.assert_allclose(got[row, real], want, atol=1e-4, rtol=0)


def test_reconstruction_loss_matches_hooked_sae_transformer(models):
    _, model, tl = models
    site = "blocks.1.hook_mlp_out"
    lens = lens_sae("standard", site, seed=8)
    sae = ours(lens)
    tokens = _tokens(model, 9, batch=4, pos=10)
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        clean = float(tl(t, return_type="loss"))
        spliced = float(tl.run_with_saes(t, saes=[lens], return_type="loss"))
        zero = float(tl.run_with_hooks(t, return_type="loss", fwd_hooks=[(site, lambda a, hook: a * 0.0)]))
    got = ms.sae.reconstruction_loss(model, tokens, sae)
    for name, want in (("clean", clean), ("spliced", spliced), ("zero", zero)):
        assert abs(got[name] - want) < 1e-4, (name, got[name], want)
    assert abs(got["recovered"] - (zero - spliced) / (zero - clean)) < 1e-3
    # padded rows: the positions whose token and next token are real, as model.grad's cross-entropy
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, 7:] = 0
    padded = ms.sae.reconstruction_loss(model, tokens, sae, attention_mask=mask)
    assert abs(padded["clean"] - model.grad(tokens, "cross_entropy", attention_mask=mask).value) < 1e-5


def test_attribution_is_the_gradient_through_the_features(models):
    """-f * d metric / d f, with the SAE spliced in and its error kept (SAELens's
    use_error_term), by PyTorch's autograd; the metric: each row's logit difference
    at its last token, summed over the rows"""
    _, model, tl = models
    site = "blocks.1.hook_resid_pre"
    lens = lens_sae("standard", site, seed=10)
    sae = ours(lens)
    tokens = _tokens(model, 11)
    answer, wrong = np.array([3, 17, 40]), np.array([9, 2, 33])
    got = ms.sae.attribution(model, tokens, sae, ms.metrics.LogitDiff(answer, wrong))
    want = autograd_attribution(tl, lens, tokens, answer, wrong)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def autograd_attribution(tl, lens, tokens, answer, wrong):
    """-f * d metric / d f by PyTorch's autograd through SAELens's features (its SAE
    spliced in, error kept); the metric: each row's logit difference answer - wrong at
    its last token, summed over the rows"""
    kept = {}

    def keep(acts, hook):
        acts.retain_grad()
        kept["f"] = acts
        return acts

    with torch.enable_grad():
        logits = with_error_term(tl, lens, tokens, keep)
        rows = torch.arange(len(answer))
        (logits[rows, -1, torch.as_tensor(answer)] - logits[rows, -1, torch.as_tensor(wrong)]).sum().backward()
    want = (-kept["f"] * kept["f"].grad).detach().numpy()
    assert np.abs(want).max() > 1e-2  # not all zero, so the comparison means something
    return want


def saelens_feature_attribution(tl, up, down, tokens, feature, at, read="hook_sae_acts_pre"):
    """-f * d pre / d f by autograd through SAELens: both spliced in with their error
    terms, f at up's hook_sae_acts_post, pre = down's `read` (hook_sae_acts_pre, or
    hook_sae_acts_post for its activation) of `feature` at each row's position `at`,
    summed over the rows"""
    kept = {}

    def keep(acts, hook):
        acts.retain_grad()
        kept["f"] = acts
        return acts

    def keep_read(acts, hook):
        kept["pre"] = acts
        return acts

    hook_of = {id(s): s.cfg.metadata.hook_name_out or s.cfg.metadata.hook_name for s in (up, down)}
    tl.add_sae(up, use_error_term=True)
    tl.add_sae(down, use_error_term=True)
    try:
        with torch.enable_grad():
            tl.run_with_hooks(torch.as_tensor(tokens), fwd_hooks=[(f"{hook_of[id(up)]}.hook_sae_acts_post", keep),
                                                                  (f"{hook_of[id(down)]}.{read}", keep_read)])
            kept["pre"][torch.arange(len(tokens)), torch.as_tensor(at), feature].sum().backward()
    finally:
        tl.reset_saes()
    grad = kept["f"].grad
    want = (-kept["f"] * (grad if grad is not None else 0.0)).detach().numpy()
    if read == "hook_sae_acts_pre":
        assert np.abs(want).max() > 1e-3  # not all zero, so the comparison means something
    return want


@pytest.mark.parametrize("pair", ["hook_z_to_residual", "transcoder_to_transcoder"])
def test_feature_attribution_is_the_gradient_through_both_saes(models, pair):
    """an upstream SAE's features attributed to a later SAE's feature: SAELens's autograd
    with both spliced in (error terms kept), rows padded on the left, at each row's last
    real token and at given positions"""
    _, model, tl = models
    if pair == "hook_z_to_residual":
        up, down = lens_sae("standard", "blocks.0.attn.hook_z", seed=50), lens_sae("jumprelu", SITES[0], seed=51)
    else:
        up = lens_transcoder("skip_transcoder", seed=52, site="blocks.0.ln2.hook_normalized",
                             site_out="blocks.0.hook_mlp_out")
        down = lens_transcoder("jumprelu_transcoder", seed=53)
    tokens = _tokens(model, 54, batch=3, pos=7)
    mask = np.ones_like(tokens)
    mask[1, :2] = 0
    for pos, at in ((None, [6, 6, 6]), ([3, 5, 6], [3, 5, 6])):
        # one target feature, and three in one call (one backward pass, the batch copied)
        both = ms.sae.feature_attribution(model, tokens, ours(up), ours(down), [4, 30, 4], pos=pos,
                                          attention_mask=mask)
        assert both.shape == (3,) + tokens.shape + (up.cfg.d_sae,)
        for k, feature in enumerate((4, 30)):
            got = ms.sae.feature_attribution(model, tokens, ours(up), ours(down), feature, pos=pos, attention_mask=mask)
            want = _saelens_rows(tl, up, down, tokens, mask, feature, at)
            np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0, err_msg=f"{pair} {feature}")
            np.testing.assert_allclose(both[k], got, atol=1e-5 * np.abs(want).max(), rtol=0)
        np.testing.assert_allclose(both[2], both[0], atol=1e-5 * np.abs(both[0]).max(), rtol=0)


def _saelens_rows(tl, up, down, tokens, mask, feature, at, read="hook_sae_acts_pre"):
    """saelens_feature_attribution on each row alone (its padded rows would need an
    attention mask), at padded positions `at`: [batch, pos, d_sae]"""
    want = np.zeros(tokens.shape + (up.cfg.d_sae,), np.float32)
    for r in range(len(tokens)):
        real = np.flatnonzero(mask[r])
        want[r, real] = saelens_feature_attribution(tl, up, down, tokens[r:r + 1, real], feature,
                                                    [int(np.searchsorted(real, at[r]))], read)[0]
    return want


@pytest.mark.parametrize("kind", ["jumprelu", "topk_rescaled", "gated", "standard"])
def test_feature_attribution_of_the_activation_is_the_gradient_through_both_saes(models, kind):
    """of="activation": the target feature's activation (SAELens's hook_sae_acts_post)
    differentiated by SAELens's autograd, both SAEs spliced in, for four target features
    in one call: one inactive at every row's position, three active at some (0 at the rows
    where they are not); batch_size 1 and 2 (the features split over passes) and an
    intervention (one pass per feature) give the same"""
    _, model, tl = models
    up = lens_sae("standard", "blocks.0.hook_resid_post", seed=62)
    cfg = {"jumprelu": ("jumprelu", {}), "topk_rescaled": ("topk", dict(rescale_acts_by_decoder_norm=True)),
           "gated": ("gated", {}), "standard": ("standard", {})}[kind]
    down = lens_sae(cfg[0], "blocks.1.hook_resid_post", seed=63, **cfg[1])
    tokens = _tokens(model, 64, batch=3, pos=7)
    mask = np.ones_like(tokens)
    mask[2, :3] = 0
    at = [6, 4, 6]
    x = model.run(tokens, cache=[down.cfg.metadata.hook_name], attention_mask=mask, logits=None).cache[
        down.cfg.metadata.hook_name][np.arange(3), at]
    active = ours(down).encode(x) > 0  # [row, feature]
    # a feature active at no row's position, and three active at some of them
    features = [int(np.flatnonzero(~active.any(0))[0]), *np.flatnonzero(active.any(0))[:3].tolist()]
    assert len(features) == 4 and not active[:, features].all()
    got = ms.sae.feature_attribution(model, tokens, ours(up), ours(down), features, pos=at, of="activation",
                                     attention_mask=mask)
    for k, feature in enumerate(features):
        want = _saelens_rows(tl, up, down, tokens, mask, feature, at, read="hook_sae_acts_post")
        scale = max(np.abs(want).max(), 1e-3)
        np.testing.assert_allclose(got[k], want, atol=1e-4 * scale, rtol=0, err_msg=f"{kind} {feature}")
        for r in range(3):
            assert np.any(got[k, r]) == bool(active[r, feature]), (kind, feature, r)
    for kwargs in (dict(batch_size=1), dict(batch_size=2), dict(interventions=[ms.Scale(SITES[0], 1.0)])):
        again = ms.sae.feature_attribution(model, tokens, ours(up), ours(down), features, pos=at, of="activation",
                                           attention_mask=mask, **kwargs)
        np.testing.assert_allclose(again, got, atol=1e-5 * np.abs(got).max(), rtol=0, err_msg=str(kwargs))


def test_feature_attribution_ranks_the_exact_removals(models):
    """each (position, upstream feature) removed alone, exactly: the change of the later
    feature's pre-activation, against feature_attribution's estimates (Spearman printed)"""
    _, model, _ = models
    up, down = ours(lens_sae("standard", "blocks.0.hook_resid_post", seed=55, d_sae=24)), ours(
        lens_sae("standard", "blocks.1.hook_mlp_out", seed=56))
    tokens = _tokens(model, 57, batch=1, pos=6)
    feature = 9

    def pre(interventions=None):
        x = model.run(tokens, cache=[down.site], logits=None, interventions=interventions).cache[down.site][0, -1]
        return float((x - down.b_dec) @ down.W_enc[:, feature] + down.b_enc[feature])

    estimate = ms.sae.feature_attribution(model, tokens, up, down, feature)[0]
    base = pre()
    active = np.argwhere(ms.sae.features(model, tokens, up)[0] > 0)
    exact = np.array([pre([ms.sae.ablate(model, tokens, up, [i], pos=[p])]) - base for p, i in active])
    rho = spearmanr(estimate[active[:, 0], active[:, 1]], exact).statistic
    print(f"feature attribution vs exact removal of {len(active)} (position, feature) pairs: Spearman {rho:.3f}")
    assert rho > 0.8


def test_feature_attribution_bad_input(models):
    _, model, _ = models
    up, down = ours(lens_sae("standard", SITES[0], seed=58)), ours(lens_sae("standard", "blocks.0.hook_mlp_out", seed=59))
    tokens = _tokens(model, 60)
    with pytest.raises(ValueError, match="target: it reads 'blocks.0.hook_mlp_out', which comes before "
                                         "'blocks.1.hook_resid_pre'"):
        ms.sae.feature_attribution(model, tokens, up, down, 3)
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 48\\)"):
        ms.sae.feature_attribution(model, tokens, down, up, 48)
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 48\\)"):
        ms.sae.feature_attribution(model, tokens, down, up, [[1, 2]])
    with pytest.raises(ValueError, match="of: expected 'pre' or 'activation', got 'post'"):
        ms.sae.feature_attribution(model, tokens, down, up, 1, of="post")
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1 or None, got 0"):
        ms.sae.feature_attribution(model, tokens, down, up, [1, 2], batch_size=0)
    normed = ours(lens_sae("standard", SITES[0], seed=61, normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match="target: an SAE that normalizes each token"):
        ms.sae.feature_attribution(model, tokens, down, normed, 1)
    with pytest.raises(ValueError, match="pos: position out of range"):
        ms.sae.feature_attribution(model, tokens, down, up, 1, pos=8)


def test_attribution_ranks_the_exact_removals(models):
    """each (position, feature) removed alone, exactly, in one run each: attribution's
    first-order estimates order them alike (Spearman's rho printed)"""
    _, model, _ = models
    site = "blocks.1.hook_resid_pre"
    lens = lens_sae("standard", site, seed=12, d_sae=24)
    sae = ours(lens)
    tokens = _tokens(model, 13, batch=1, pos=6)
    metric = ms.metrics.LogitDiff(np.array([5]), np.array([8]))
    estimate = ms.sae.attribution(model, tokens, sae, metric)[0]
    base = float(metric.evaluate(model, tokens, None, None))
    active = np.argwhere(ms.sae.features(model, tokens, sae)[0] > 0)
    exact = np.array([float(metric.evaluate(model, tokens, None,
                                            [ms.sae.ablate(model, tokens, sae, [i], pos=[p])])) - base
                      for p, i in active])
    rho = spearmanr(estimate[active[:, 0], active[:, 1]], exact).statistic
    print(f"attribution vs exact removal of {len(active)} (position, feature) pairs: Spearman {rho:.3f}")
    assert rho > 0.8


@pytest.mark.parametrize("which", ["resid", "hook_z", "topk_rescaled", "transcoder"])
def test_logit_effects_are_each_features_extreme_tokens(models, which):
    """each feature's k most promoted and most suppressed tokens are those of its decoder
    row's direction_logits at the site it writes (sorted in full), in batches of any size;
    an SAE that rescales by the decoder's norms reads each row at unit norm"""
    _, model, _ = models
    lens = {"resid": lambda: lens_sae("standard", "blocks.1.hook_resid_pre", seed=40),
            "hook_z": lambda: lens_sae("jumprelu", "blocks.0.attn.hook_z", seed=41),
            "topk_rescaled": lambda: lens_sae("topk", "blocks.1.hook_mlp_out", seed=42,
                                              rescale_acts_by_decoder_norm=True),
            "transcoder": lambda: lens_transcoder("skip_transcoder", seed=43)}[which]()
    sae = ours(lens)
    rows = sae.W_dec / np.linalg.norm(sae.W_dec, axis=1, keepdims=True) if which == "topk_rescaled" else sae.W_dec
    full = ms.lens.direction_logits(model, rows, sae.site_out)  # [d_sae, vocab]
    for features, batch_size in ((None, 7), ([30, 2, 17], 256)):
        eff = ms.sae.logit_effects(model, sae, features=features, k=5, batch_size=batch_size)
        feats = np.arange(sae.d_sae) if features is None else np.array(features)
        assert eff.features.tolist() == feats.tolist() and eff.promoted.shape == (len(feats), 5)
        for i, j in enumerate(feats):
            order = np.argsort(-full[j], kind="stable")
            assert eff.promoted[i].tolist() == order[:5].tolist(), (which, j)
            assert eff.suppressed[i].tolist() == order[::-1][:5].tolist(), (which, j)
            np.testing.assert_allclose(eff.promoted_values[i], full[j, order[:5]], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(eff.suppressed_values[i], full[j, order[::-1][:5]], rtol=1e-5, atol=1e-5)


def test_logit_effects_table_and_bad_input(models):
    model = ms.demo.load_model()
    rng = np.random.default_rng(44)
    d = model.d_model
    sae = ms.sae.SAE(rng.normal(size=(d, 12)), np.zeros(12), rng.normal(size=(12, d)), np.zeros(d),
                     "blocks.1.hook_resid_post")
    eff = ms.sae.logit_effects(model, sae, k=3)
    table = eff.table(model, 4)
    assert [t for t, _ in table["promoted"]] == [model.tokenizer.decode([int(t)]) for t in eff.promoted[4]]
    assert [v for _, v in table["suppressed"]] == eff.suppressed_values[4].tolist()
    assert table["promoted"][0][1] > table["promoted"][2][1] > 0 > table["suppressed"][2][1] > table["suppressed"][0][1]
    with pytest.raises(ValueError, match="feature: 12 is not among these features"):
        eff.table(model, 12)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="k: expected an integer >= 1"):
            ms.sae.logit_effects(model, sae, k=bad)
    with pytest.raises(ValueError, match=f"k: the model has {model.d_vocab} tokens"):
        ms.sae.logit_effects(model, sae, k=model.d_vocab + 1)
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 12\\)"):
        ms.sae.logit_effects(model, sae, features=[12])
    assert d == model.n_heads * model.d_head  # so an SAE of the queries has this width
    q = ms.sae.SAE(rng.normal(size=(d, 12)), np.zeros(12), rng.normal(size=(12, d)), np.zeros(d),
                   "blocks.1.attn.hook_q")
    with pytest.raises(ValueError, match="does not add into the residual stream"):
        ms.sae.logit_effects(model, q)


def _brute_top(f, real, k):
    """each feature's k largest activations > 0 over the real tokens, ties by (row, pos),
    by sorting every candidate: (values, rows, pos) [F, k], NaN / -1 past the last"""
    n, T, F = f.shape
    values, rows, pos = np.full((F, k), np.nan), np.full((F, k), -1), np.full((F, k), -1)
    for j in range(F):
        found = sorted((-f[r, p, j], r, p) for r in range(n) for p in range(T) if real[r, p] and f[r, p, j] > 0)
        for i, (v, r, p) in enumerate(found[:k]):
            values[j, i], rows[j, i], pos[j, i] = -v, r, p
    return values, rows, pos


@pytest.mark.parametrize("batch_size", [1, 4, 13])
def test_top_activations_are_each_features_largest(models, batch_size):
    """the k largest activations of each feature over the real tokens of a padded set,
    where they are, and how often each feature is active, as sorting every token's
    features (from runs of the same batches) gives them"""
    _, model, _ = models
    site = "blocks.1.hook_resid_pre"
    sae = ours(lens_sae("standard", site, seed=17))
    rng = np.random.default_rng(18)
    tokens = rng.integers(0, model.d_vocab, (13, 9))
    mask = np.ones(tokens.shape, np.int32)
    for r, n in enumerate(rng.integers(2, 10, 13)):
        mask[r, n:] = 0  # rows padded on the right
    f = np.concatenate([ms.sae.features(model, tokens[lo:lo + batch_size], sae, attention_mask=mask[lo:lo + batch_size])
                        for lo in range(0, 13, batch_size)])
    real = mask != 0
    top = ms.sae.top_activations(model, tokens, sae, k=6, attention_mask=mask, batch_size=batch_size, progress=False)
    values, rows, pos = _brute_top(f, real, 6)
    np.testing.assert_array_equal(top.features, np.arange(48))
    np.testing.assert_array_equal(top.values, values.astype(np.float32))
    np.testing.assert_array_equal(top.rows, rows)
    np.testing.assert_array_equal(top.pos, pos)
    np.testing.assert_allclose(top.density, (f[real] > 0).mean(axis=0))
    assert np.isnan(top.values).any() and not np.isnan(top.values).all()  # some features have fewer than 6
    assert real[top.rows[top.rows >= 0], top.pos[top.pos >= 0]].all()
    # some tokens left out: the same as their positions being padding, for the same runs
    ignored = tokens[0, :2]
    skip = ms.sae.top_activations(model, tokens, sae, k=6, attention_mask=mask, ignore_tokens=ignored,
                                  batch_size=batch_size, progress=False)
    kept = real & ~np.isin(tokens, ignored)
    assert kept.sum() < real.sum()
    values, rows, pos = _brute_top(f, kept, 6)
    np.testing.assert_array_equal(skip.values, values.astype(np.float32))
    np.testing.assert_array_equal(skip.rows, rows)
    np.testing.assert_array_equal(skip.pos, pos)
    np.testing.assert_allclose(skip.density, (f[kept] > 0).mean(axis=0))
    some = ms.sae.top_activations(model, tokens, sae, k=2, features=[40, 3], attention_mask=mask,
                                  batch_size=batch_size, progress=False)
    np.testing.assert_array_equal(some.features, [40, 3])
    np.testing.assert_array_equal(some.rows, rows[[40, 3], :2])
    np.testing.assert_array_equal(some.values, top.values[[40, 3], :2])


def test_top_activations_break_ties_by_the_earliest_token(models):
    """rows that are the same tokens give the same activations (each run alone): the
    earliest rows win, whatever the batch that found them"""
    _, model, _ = models
    sae = ours(lens_sae("standard", "blocks.1.hook_resid_pre", seed=19))
    row = np.random.default_rng(20).integers(0, model.d_vocab, 7)
    tokens = np.stack([row] * 9)
    top = ms.sae.top_activations(model, tokens, sae, k=4, batch_size=1, progress=False)
    f = ms.sae.features(model, row[None], sae)[0]  # [pos, d_sae]
    for j in range(48):
        if (f[:, j] > 0).any():
            best = int(np.argmax(f[:, j]))
            np.testing.assert_array_equal(top.rows[j], [0, 1, 2, 3])
            np.testing.assert_array_equal(top.pos[j], [best] * 4)


def test_top_activation_examples_mark_the_token():
    """examples: the text before each top token, the token marked, and what follows"""
    model = ms.demo.load_model()
    rng = np.random.default_rng(21)
    d = model.d_model
    sae = ms.sae.SAE(rng.normal(size=(d, 40)) / d ** 0.5, rng.normal(size=40) * 0.3 - 1.0, rng.normal(size=(40, d)),
                     np.zeros(d), "blocks.1.hook_resid_post")
    texts = ms.demo.ioi_prompts(model, n=12)["text"]
    texts = texts[:6] + [" ".join(t.split()[:5]) for t in texts[6:]]  # some rows padded
    tokens = model.to_tokens(texts)
    top = ms.sae.top_activations(model, tokens, sae, k=3, progress=False)
    feature = int(np.nanargmax(top.values[:, 0]))
    shown = top.examples(model, tokens, feature, window=3)
    assert [v for v, _ in shown] == [float(v) for v in top.values[feature] if np.isfinite(v)]
    for (_, text), r, p in zip(shown, top.rows[feature], top.pos[feature]):
        words = model.to_str_tokens(tokens[r])
        n_real = int(tokens.attention_mask[r].sum())
        want = words[max(p - 3, 0):p] + ["\u00ab" + words[p] + "\u00bb"] + words[p + 1:min(p + 4, n_real)]
        assert text == " ".join(want)
    with pytest.raises(ValueError, match="feature: 40 is not among these features"):
        top.examples(model, tokens, 40)
    with pytest.raises(ValueError, match="window: expected an integer >= 0"):
        top.examples(model, tokens, feature, window=-1)
    with pytest.raises(ValueError, match="pass the tokens top_activations read"):
        top.examples(model, tokens[:1, :2], feature)


def test_top_activation_examples_of_byte_level_tokens():
    """with a byte-level BPE tokenizer (SmolLM2's), where a token can be part of a
    character: each example is the decoded window with one non-empty marked span, and
    a token inside a character marks the whole character"""
    model = ms.Model.from_pretrained("smollm2")
    rng = np.random.default_rng(26)
    d = model.d_model
    sae = ms.sae.SAE(rng.normal(size=(d, 64)) / d ** 0.5, rng.normal(size=64) * 0.3 - 0.5, rng.normal(size=(64, d)),
                     np.zeros(d), "blocks.3.hook_resid_post")
    texts = ["\u00dcn\u00efc\u00f6d\u00e9, \u65e5\u672c\u8a9e and emoji \U0001f642 in one line.",
             "When Mary and John went to the store, John gave a drink to",
             "def fibonacci(n):\n    return n if n < 2 else"]
    tokens = model.to_tokens(texts)
    top = ms.sae.top_activations(model, tokens, sae, k=40, progress=False)
    shown = 0
    marked = set()
    for i, feature in enumerate(top.features):
        for (_, text), r, p in zip(top.examples(model, tokens, int(feature), window=3), top.rows[i], top.pos[i]):
            real = np.flatnonzero(tokens.attention_mask[r] != 0)
            at = int(np.searchsorted(real, p))
            window = [int(t) for t in tokens[r, real[max(at - 3, 0):at + 4]]]
            assert text.count("\u00ab") == 1 and text.count("\u00bb") == 1 and "\u00ab\u00bb" not in text
            assert text.replace("\u00ab", "").replace("\u00bb", "") == model.tokenizer.decode(window)
            marked.add(text[text.index("\u00ab") + 1:text.index("\u00bb")])
            shown += 1
    assert shown > 500
    assert "\u8a9e" in marked  # a character of three bytes, each its own token: marked whole
    # a character of four bytes, each its own token, found at its first byte: the three
    # tokens after it complete it
    tokens = model.to_tokens(["a\U00010348 b c"])
    assert len(tokens[0]) == 7  # a, the four bytes, " b", " c"
    top = ms.sae.TopActivations(np.array([0]), np.array([[1.0]]), np.array([[0]]), np.array([[1]]), np.array([1.0]))
    assert top.examples(model, tokens, 0) == [(1.0, "a\u00ab\U00010348\u00bb")]


def test_bad_input_is_refused_by_name(models, tmp_path):
    _, model, _ = models
    rng = np.random.default_rng(0)
    W_enc, b_enc, W_dec, b_dec = rng.normal(size=(30, 8)), np.zeros(8), rng.normal(size=(8, 30)), np.zeros(30)
    with pytest.raises(ValueError, match="W_dec: expected \\[8, 30\\]"):
        ms.sae.SAE(W_enc, b_enc, W_dec.T, b_dec, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="architecture: expected one of"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre", architecture="matching_pursuit")
    with pytest.raises(ValueError, match="threshold: a jumprelu SAE needs"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre", architecture="jumprelu")
    with pytest.raises(ValueError, match="k: a topk SAE needs an int in \\[1, 8\\]"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre", architecture="topk", k=9)
    site = "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="b_mag, r_mag: a gated SAE needs"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, architecture="gated", b_mag=np.zeros(8))
    with pytest.raises(ValueError, match="b_mag, r_mag: only used by gated SAEs"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, b_mag=np.zeros(8), r_mag=np.zeros(8))
    with pytest.raises(ValueError, match="r_mag: expected shape \\[8\\]"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, architecture="gated", b_mag=np.zeros(8), r_mag=np.zeros(7))
    with pytest.raises(ValueError, match="normalize_activations: expected one of none, constant_norm_rescale, "
                                         "layer_norm, got 'expected_average_only_in' \\(fold"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm: only used by topk SAEs"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, rescale_acts_by_decoder_norm=True)
    zero_row = W_dec.copy()
    zero_row[3] = 0.0
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm: W_dec has a row of zeros"):
        ms.sae.SAE(W_enc, b_enc, zero_row, b_dec, site, architecture="topk", k=2, rescale_acts_by_decoder_norm=True)
    normed = ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, site, normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="x: expected shape \\[2, 30\\] \\(the features' tokens\\)"):
        normed.decode(np.zeros((2, 8)), np.ones((3, 30)))
    bad = W_enc.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="W_enc: contains NaN"):
        ms.sae.SAE(bad, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre")
    sae = ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="x: expected shape \\[..., 30\\]"):
        sae.encode(np.zeros((2, 29)))
    tokens = _tokens(model, 1)
    with pytest.raises(ValueError, match="has 120 numbers per token in this model, but the SAE reads 30"):
        ms.sae.features(model, tokens, ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.mlp.hook_post"))
    with pytest.raises(ValueError, match="attention pattern"):
        ms.sae.features(model, tokens, ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, "blocks.0.attn.hook_pattern"))
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 8\\)"):
        ms.sae.ablate(model, tokens, sae, [8])
    with pytest.raises(ValueError, match="pos: expected positions in \\[0, 8\\)"):
        ms.sae.ablate(model, tokens, sae, [1], pos=[8])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="k: expected an integer >= 1"):
            ms.sae.top_activations(model, tokens, sae, k=bad)
        with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
            ms.sae.top_activations(model, tokens, sae, batch_size=bad)
    with pytest.raises(ValueError, match="features: expected feature indices in \\[0, 8\\)"):
        ms.sae.top_activations(model, tokens, sae, features=[-1])
    with pytest.raises(ValueError, match="ignore_tokens: expected token ids"):
        ms.sae.top_activations(model, tokens, sae, ignore_tokens=["<bos>"])
    # transcoders
    W30 = rng.normal(size=(8, 30))
    with pytest.raises(ValueError, match="apply_b_dec_to_input: a transcoder's b_dec"):
        ms.sae.SAE(W_enc, b_enc, W30, b_dec, MLP_IN, site_out=MLP_OUT, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="W_skip: only a transcoder"):
        ms.sae.SAE(W_enc, b_enc, W_dec, b_dec, MLP_IN, W_skip=np.zeros((30, 30)))
    with pytest.raises(ValueError, match="W_skip: expected \\[30, 30\\]"):
        ms.sae.SAE(W_enc, b_enc, W30, b_dec, MLP_IN, site_out=MLP_OUT, W_skip=np.zeros((30, 20)))
    with pytest.raises(ValueError, match="b_dec: expected shape \\[20\\]"):
        ms.sae.SAE(W_enc, b_enc, rng.normal(size=(8, 20)), b_dec, MLP_IN, site_out=MLP_OUT)
    wide = ms.sae.SAE(W_enc, b_enc, rng.normal(size=(8, 20)), np.zeros(20), MLP_IN, site_out=MLP_OUT)
    with pytest.raises(ValueError, match="has 30 numbers per token in this model, but the SAE writes 20"):
        ms.sae.features(model, tokens, wide)
    backwards = ms.sae.SAE(W_enc, b_enc, W30, b_dec, "blocks.1.hook_mlp_out", site_out="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="output site 'blocks.0.hook_mlp_out' came before its input"):
        model.run(tokens, hooks=ms.sae.edit(backwards, clamp={1: 2.0}))
    lens_transcoder("transcoder", seed=2).save_model(tmp_path / "tc")
    tc_cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    del tc_cfg["metadata"]["hook_name_out"]
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(tc_cfg))
    with pytest.raises(ValueError, match="a transcoder with no hook_name_out"):
        ms.sae.SAE.load(tmp_path / "tc")
    # files
    with pytest.raises(ValueError, match="no cfg.json"):
        ms.sae.SAE.load(tmp_path)
    lens = lens_sae("standard", "blocks.0.hook_resid_pre", seed=1)
    lens.save_model(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    for change, message in ((dict(normalize_activations="covariance_whitening"),
                             "normalize_activations 'covariance_whitening' is not supported"),
                            (dict(architecture="matching_pursuit"), "architecture 'matching_pursuit' is not supported"),
                            (dict(architecture="gated"), "no tensor b_gate"),
                            (dict(rescale_acts_by_decoder_norm=True), "rescale_acts_by_decoder_norm is supported "
                                                                      "for topk SAEs only"),
                            (dict(d_sae=47), "d_sae is 47, but the weights have 48"),
                            (dict(metadata=dict(cfg["metadata"], hook_head_index=2)), "hook_head_index 2"),
                            (dict(metadata={}), "no hook_name")):
        (tmp_path / "a" / "cfg.json").write_text(json.dumps(dict(cfg, **change)))
        with pytest.raises(ValueError, match=message):
            ms.sae.SAE.load(tmp_path / "a")


# ---- training ---------------------------------------------------------------------------

def _torch_loss(p, x, k, l1, y=None):
    """the training loss of mechscope.sae_training's docstring, in PyTorch (a
    transcoder's, to targets y, if given)"""
    pre = (x if y is not None else x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if k is None:
        f = torch.relu(pre)
    else:
        vals, idx = torch.topk(pre, k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = ((x_hat - (x if y is None else y)) ** 2).sum() / x.shape[0]
    if l1:
        loss = loss + l1 * (f * p["W_dec"].norm(dim=1)).sum() / x.shape[0]
    return loss


@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("k, l1", [(5, None), (None, 0.3)])
def test_training_gradients_match_autograd(k, l1, transcoder):
    from mechscope.sae_training import loss_and_grads

    rng = np.random.default_rng(4)
    d_out = 9 if transcoder else 12
    p = {"W_enc": rng.normal(size=(12, 20)), "b_enc": rng.normal(size=20) * 0.3,
         "W_dec": rng.normal(size=(20, d_out)), "b_dec": rng.normal(size=d_out) * 0.3}
    p = {n: a.astype(np.float32) for n, a in p.items()}
    x = rng.normal(size=(16, 12)).astype(np.float32)
    y = rng.normal(size=(16, d_out)).astype(np.float32) if transcoder else None
    loss, grads, _, _ = loss_and_grads(p, x, k, l1 or 0.0, y)
    tp = {n: torch.tensor(a, requires_grad=True) for n, a in p.items()}
    with torch.enable_grad():
        want = _torch_loss(tp, torch.from_numpy(x), k, l1, None if y is None else torch.from_numpy(y))
        want.backward()
    assert abs(loss - float(want)) < 1e-4 * abs(float(want))
    for n in p:
        ref = tp[n].grad.numpy()
        np.testing.assert_allclose(grads[n], ref, atol=1e-4 * np.abs(ref).max(), rtol=0, err_msg=n)


def _planted(seed, n=6000, d_in=16, m=24, active=3, codes=False):
    """activations made of `active` of m unit directions at a time (the planted
    features): (x, directions), and the codes if asked"""
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(m, d_in))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    c = np.zeros((n, m))
    for row in c:
        row[rng.choice(m, active, replace=False)] = rng.uniform(0.5, 1.5, active)
    return ((c @ D).astype(np.float32), D) + ((c,) if codes else ())


# an L1 penalty shrinks the features, so its reconstruction leaves more unexplained
@pytest.mark.parametrize("k, l1, max_fvu", [(3, None, 0.1), (None, 0.5, 0.2)])
def test_training_recovers_planted_features(k, l1, max_fvu):
    """the planted directions each have a decoder row close to them (cosine 0.95 on
    average; the mean and the worst printed), and the reconstruction leaves little of
    the variance unexplained"""
    x, D = _planted(5)
    sae = ms.sae.train(x, d_sae=48, site="blocks.0.hook_resid_pre", k=k, l1=l1, steps=3000, batch_size=128,
                       lr=3e-3, seed=1, progress=False)
    rows = sae.W_dec / np.linalg.norm(sae.W_dec, axis=1, keepdims=True)
    best = (D @ rows.T).max(1)
    fvu = float(sae.history["fvu"][-100:].mean())
    print(f"k={k} l1={l1}: best cosine per planted feature mean {best.mean():.3f} min {best.min():.3f}; "
          f"FVU {fvu:.4f}; L0 {sae.history['l0'][-100:].mean():.2f}")
    assert best.mean() > 0.95 and fvu < max_fvu
    assert sae.history["loss"][-100:].mean() < 0.2 * sae.history["loss"][:10].mean()


def test_training_a_transcoder_recovers_planted_features():
    """pairs (x, y) that share sparse codes, x = codes @ A and y = codes @ D: the trained
    transcoder's decoder rows find D's directions, and it maps x to y"""
    x, A, codes = _planted(6, d_in=16, codes=True)
    rng = np.random.default_rng(7)
    D = rng.normal(size=(A.shape[0], 10))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    y = (codes @ D).astype(np.float32)
    tc = ms.sae.train(x, d_sae=48, site=MLP_IN, k=3, targets=y, site_out=MLP_OUT, steps=3000, batch_size=128,
                      lr=3e-3, seed=1, progress=False)
    assert tc.is_transcoder and (tc.d_in, tc.d_out, tc.site_out) == (16, 10, MLP_OUT)
    rows = tc.W_dec / np.linalg.norm(tc.W_dec, axis=1, keepdims=True)
    best = (D @ rows.T).max(1)
    fvu = float(((tc.reconstruct(x) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    print(f"transcoder: best cosine per planted feature mean {best.mean():.3f} min {best.min():.3f}; FVU {fvu:.4f}")
    assert best.mean() > 0.95 and fvu < 0.1


def test_training_bad_input_is_refused_by_name():
    x = np.random.default_rng(0).normal(size=(50, 8))
    site = "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="give k .* or l1"):
        ms.sae.train(x, 16, site=site)
    with pytest.raises(ValueError, match="give k .* or l1"):
        ms.sae.train(x, 16, site=site, k=2, l1=0.1)
    with pytest.raises(ValueError, match="k: 20 features per token, but the SAE has d_sae=16"):
        ms.sae.train(x, 16, site=site, k=20)
    bad = x.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="activations: contain NaN or infinity"):
        ms.sae.train(bad, 16, site=site, k=2)
    with pytest.raises(ValueError, match="activations: expected \\[n, d_in\\]"):
        ms.sae.train(x[0], 16, site=site, k=2)
    with pytest.raises(ValueError, match="lr"):
        ms.sae.train(x, 16, site=site, k=2, lr=-1.0)
    with pytest.raises(TypeError, match="site: expected the site name"):
        ms.sae.train(x, 16, site=None, k=2)
    with pytest.raises(ValueError, match="a transcoder needs both targets"):
        ms.sae.train(x, 16, site=site, k=2, targets=x)
    with pytest.raises(ValueError, match="targets: 49 rows, but activations have 50"):
        ms.sae.train(x, 16, site=site, k=2, targets=x[1:], site_out="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="targets: contain NaN"):
        ms.sae.train(x, 16, site=site, k=2, targets=bad, site_out="blocks.0.hook_mlp_out")
