"""Mixtures of experts (Mixtral; Qwen3-MoE: per-head query and key norms, the chosen
experts' probabilities used without renormalising; OLMoE: query and key norms over all
heads, q/k/v/o biases, the router's softmax over every expert; Qwen2-MoE: q/k/v biases
and a shared expert behind a sigmoid gate): the forward pass and its sites
against transformers (fp32, eager) and TransformerLens, interventions on the routing
against HuggingFace with a hook on its router, gradients against autograd, and
ms.experts against its definitions computed one run at a time."""
import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from conftest import ATOL
from test_architectures import hf_run, make_hf

torch.set_grad_enabled(False)

# 5 experts, 2 per token; odd sizes, grouped keys/values
MIXTRAL = ("mixtral", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                           intermediate_size=28, vocab_size=89, max_position_embeddings=64, num_local_experts=5,
                           num_experts_per_tok=2, rope_theta=1e4))
# the same sizes as Qwen3-MoE, with a head width of its own and no renormalisation
QWEN3_MOE = ("qwen3_moe", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                               num_hidden_layers=3, intermediate_size=50, moe_intermediate_size=28, vocab_size=89,
                               max_position_embeddings=64, num_experts=5, num_experts_per_tok=2,
                               norm_topk_prob=False, rope_theta=1e4))
# OLMoE: the same sizes again (head width 36 / 6), its experts intermediate_size wide,
# renormalised, with attention biases under the norms
OLMOE = ("olmoe", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                       intermediate_size=28, vocab_size=89, max_position_embeddings=64, num_experts=5,
                       num_experts_per_tok=2, norm_topk_prob=True, attention_bias=True, rope_theta=1e4))
# Qwen2-MoE: the same sizes, q/k/v biases, a shared expert wider than the routed ones
QWEN2_MOE = ("qwen2_moe", dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                               intermediate_size=50, moe_intermediate_size=28, shared_expert_intermediate_size=44,
                               vocab_size=89, max_position_embeddings=64, num_experts=5, num_experts_per_tok=2,
                               norm_topk_prob=False, rope_theta=1e4))
SPECS = [MIXTRAL, QWEN3_MOE, OLMOE, QWEN2_MOE]


@pytest.fixture(scope="module", params=SPECS, ids=lambda spec: spec[0])
def pair(request, tmp_path_factory):
    hf = make_hf(None, seed=2, spec=request.param)
    folder = tmp_path_factory.mktemp(request.param[0])
    hf.save_pretrained(folder)
    return hf, ms.Model.from_pretrained(folder)


def moe_of(hf, layer):
    """a decoder layer's sparse MoE block (Mixtral's block_sparse_moe, Qwen3-MoE's mlp)"""
    block = hf.model.layers[layer]
    return block.block_sparse_moe if hasattr(block, "block_sparse_moe") else block.mlp


def padded(model, seed, lengths, T, left):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.d_vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1 if left else 0
        if not left:
            mask[i, :n] = 1
    return tokens, mask


def hf_moe_outputs(hf, tokens, mask, gate_hooks=None):
    """logits, hidden states, router probabilities [layers, B, T, E] and MoE block
    outputs [layers, B, T, C] of HF's run; gate_hooks {layer: fn(router_logits)}"""
    outs, handles = {}, []
    for layer in range(len(hf.model.layers)):
        moe = moe_of(hf, layer)
        handles.append(moe.register_forward_hook(lambda m, i, o, layer=layer: outs.__setitem__(layer, o)))
        if gate_hooks and layer in gate_hooks:
            handles.append(moe.gate.register_forward_hook(lambda m, i, o, f=gate_hooks[layer]: f(o)))
    try:
        logits, hidden = hf_run(hf, tokens, mask)
    finally:
        for h in handles:
            h.remove()
    B, T = tokens.shape
    probs = np.stack([torch.softmax(outs[l][1], -1).numpy().reshape(B, T, -1) for l in sorted(outs)])
    block_out = np.stack([outs[l][0].numpy() for l in sorted(outs)])
    return logits, hidden, probs, block_out


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_and_sites_match_hf(pair, left):
    hf, model = pair
    assert (model.n_experts, model.experts_per_token) == (5, 2)
    tokens, mask = padded(model, 5, [9, 4, 1, 7], 9, left)
    logits, hidden, probs, block_out = hf_moe_outputs(hf, tokens, mask)
    out = model.run(tokens, attention_mask=mask, logits="all",
                    cache=["blocks.*.hook_resid_pre", "blocks.*.mlp.hook_expert_weights", "blocks.*.hook_mlp_out"])
    real = mask.astype(bool)
    np.testing.assert_allclose(out.logits[real], logits[real], atol=ATOL, rtol=0)
    for layer in range(model.n_layers):
        np.testing.assert_allclose(out.cache[f"blocks.{layer}.hook_resid_pre"][real], hidden[layer][real],
                                   atol=ATOL, rtol=0)
        assert out.cache[f"blocks.{layer}.mlp.hook_expert_weights"].shape == (4, 9, 5)
        np.testing.assert_allclose(out.cache[f"blocks.{layer}.mlp.hook_expert_weights"][real], probs[layer][real],
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.cache[f"blocks.{layer}.hook_mlp_out"][real], block_out[layer][real],
                                   atol=ATOL, rtol=0)
    # the experts matter: without them the block outputs would be 0
    assert np.abs(block_out).max() > 0.1


def test_every_site_matches_transformer_lens(tmp_path):
    """Mixtral (TransformerLens 2.18 has no Qwen3-MoE)"""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_mixtral_weights
    hf = make_hf(None, seed=2, spec=MIXTRAL)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(tmp_path)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn=c.hidden_act, d_head=c.hidden_size // c.num_attention_heads,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=c.rope_theta, normalization_type="RMS", final_rms=True, gated_mlp=True, eps=c.rms_norm_eps,
        n_key_value_heads=c.num_key_value_heads, num_experts=c.num_local_experts,
        experts_per_token=c.num_experts_per_tok, original_architecture="MixtralForCausalLM",
        dtype=torch.float32, device="cpu", use_attn_scale=True)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_mixtral_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    tl.eval()
    tokens = np.random.default_rng(7).integers(0, model.d_vocab, (2, 8))
    logits, cache = tl.run_with_cache(torch.as_tensor(tokens))
    out = model.run(tokens, cache="*")
    np.testing.assert_allclose(out.logits, logits.numpy(), atol=ATOL, rtol=0)
    # every site of ours is one of TransformerLens's, in its order (it adds the experts'
    # own hooks, over each expert's tokens, and the chosen experts' indices)
    ref = {k: v.numpy() for k, v in cache.items()}
    assert set(out.cache) <= set(ref), set(out.cache) - set(ref)
    assert list(out.cache) == [k for k in ref if k in out.cache]
    for site, got in out.cache.items():
        want = ref[site].reshape(got.shape)  # TransformerLens flattens [batch * pos, experts]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=site)
    for layer in range(model.n_layers):
        chosen = ms.experts.routing(model, tokens).chosen[layer]
        indices = ref[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(2, 8, -1)
        want = np.zeros_like(chosen)
        np.put_along_axis(want, indices, True, axis=-1)
        assert (chosen == want).all()


def test_patching_matches_transformer_lens_definition(pair):
    """A sweep over the routing and the block outputs equals one intervened run per patch."""
    hf, model = pair
    rng = np.random.default_rng(3)
    clean = rng.integers(0, model.d_vocab, (2, 6))
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 17) % model.d_vocab
    cache = model.run(clean, cache="*").cache
    metric = ms.metrics.LogitDiff(np.array([4, 9]), np.array([7, 2]))
    for fn, suffix in (("mlp_out", "hook_mlp_out"), ("resid_pre", "hook_resid_pre")):
        grid = getattr(ms.patching, fn)(model, corrupted, cache, metric)
        for layer in range(model.n_layers):
            for p in range(6):
                one = metric.evaluate(model, corrupted, None,
                                      [ms.Patch(f"blocks.{layer}.{suffix}", cache, pos=p)])
                assert abs(grid[layer, p] - one) < 1e-4, (fn, layer, p)
    site = "blocks.1.mlp.hook_expert_weights"
    routed = ms.patching.sweep(model, corrupted, [ms.Patch(site, cache, pos=p) for p in range(6)], metric)
    for p in range(6):
        assert abs(routed[p] - metric.evaluate(model, corrupted, None, [ms.Patch(site, cache, pos=p)])) < 1e-4


def test_routing_interventions_match_hf_with_a_router_hook(pair):
    hf, model = pair
    tokens, mask = padded(model, 9, [8, 5], 8, left=True)
    real = mask.astype(bool)

    # removing expert 3 at layer 1: where the chosen experts' probabilities are
    # renormalised, HF with its router logit at -inf; else HF's forward step for step
    # with its probability at 0 (-inf would rescale the others)
    if getattr(moe_of(hf, 1), "norm_topk_prob", True):
        def drop(o):
            o[:, 3] = -torch.inf
        logits, _, _, _ = hf_moe_outputs(hf, tokens, mask, {1: drop})
    else:
        moe_of(hf, 1).forward = moe_forward(moe_of(hf, 1), {}, 1, zero=3)
        try:
            logits, _, _, _ = hf_moe_outputs(hf, tokens, mask)
        finally:
            del moe_of(hf, 1).forward
    ours = model.run(tokens, attention_mask=mask, logits="all",
                     interventions=[ms.Zero("blocks.1.mlp.hook_expert_weights", index=3)]).logits
    np.testing.assert_allclose(ours[real], logits[real], atol=ATOL, rtol=0)
    plain = model.run(tokens, attention_mask=mask, logits="all").logits
    assert np.abs(plain - ours)[real].max() > 1e-2

    # the routing of another run at layer 2: HF with that run's router logits
    other, _ = padded(model, 10, [8, 5], 8, left=True)
    seen = {}
    hf_moe_outputs(hf, other, mask, {2: lambda o: seen.__setitem__("logits", o.clone())})
    def replace(o):
        o.copy_(seen["logits"])
    logits, _, _, _ = hf_moe_outputs(hf, tokens, mask, {2: replace})
    other_cache = model.run(other, attention_mask=mask, cache="blocks.2.mlp.hook_expert_weights").cache
    ours = model.run(tokens, attention_mask=mask, logits="all",
                     interventions=[ms.Patch("blocks.2.mlp.hook_expert_weights", other_cache)]).logits
    np.testing.assert_allclose(ours[real], logits[real], atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf(pair):
    hf, model = pair
    prompt = np.array([[5, 17, 33, 2, 61]])
    want = hf.generate(torch.as_tensor(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones_like(torch.as_tensor(prompt))).numpy()
    got = model.generate(prompt, 6, do_sample=False)
    np.testing.assert_array_equal(np.asarray(got)[:, :want.shape[1]], want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec[0])
def test_random_model_saves_as_a_checkpoint_transformers_loads(tmp_path, spec):
    config = dict(model_type=spec[0], **spec[1])
    model = ms.Model.from_config(config, seed=4)
    ms.train.save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                 "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[spec[0]]
    tokens = np.random.default_rng(1).integers(0, model.d_vocab, (2, 7))
    want = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.run(tokens).logits, want, atol=ATOL, rtol=0)


# ---- gradients against autograd ------------------------------------------------------------

def moe_forward(moe, deltas, layer, zero=None, drop=None):
    """HuggingFace's MixtralSparseMoeBlock.forward (Qwen2-MoE's: and its shared expert),
    step for step, with a leaf added to
    the router's probabilities (the site hook_expert_weights) so that autograd gives
    its gradient; zero: experts whose probability is set to 0 before it (ms.Zero);
    drop: an expert whose output is left out (the others' weights as they are)."""
    def forward(hidden_states):
        B, T, C = hidden_states.shape
        x = hidden_states.view(-1, C)
        router_logits = moe.gate(x)
        p = torch.softmax(router_logits, dim=1, dtype=torch.float)
        if zero is not None:
            p = p.clone()
            p[:, zero] = 0.0
        d = torch.zeros_like(p, requires_grad=True)
        deltas[f"blocks.{layer}.mlp.hook_expert_weights"] = d
        p = p + d
        weights, selected = torch.topk(p, moe.top_k, dim=-1)
        if getattr(moe, "norm_topk_prob", True):  # Mixtral always; Qwen3-MoE by its config
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(moe.experts):
            if e == drop:
                continue
            top, idx = torch.where(selected == e)  # token, slot
            out = out.index_add(0, top, expert(x[top]) * weights[top, idx, None])
        if hasattr(moe, "shared_expert"):  # Qwen2-MoE's, on every token
            out = out + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
        return out.view(B, T, C), router_logits
    return forward


def autograd(hf, tokens, mask, scalar_fn, zero=None):
    """value, {site: gradient}, {HF parameter: gradient} of HF's run with the sites as leaves"""
    deltas, handles = {}, []

    def leaf(name, value):
        d = torch.zeros_like(value, requires_grad=True)
        deltas[name] = d
        return value + d

    for layer, block in enumerate(hf.model.layers):
        moe = moe_of(hf, layer)
        moe.forward = moe_forward(moe, deltas, layer, zero if layer == 1 else None)
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: ((leaf(f"blocks.{layer}.hook_resid_pre", a[0]),) + a[1:], kw)
            if a else (a, dict(kw, hidden_states=leaf(f"blocks.{layer}.hook_resid_pre", kw["hidden_states"]))),
            with_kwargs=True))
        handles.append(moe.register_forward_hook(
            lambda m, a, o, layer=layer: (leaf(f"blocks.{layer}.hook_mlp_out", o[0]),) + tuple(o[1:])))
        handles.append(block.self_attn.register_forward_hook(
            lambda m, a, o, layer=layer: (leaf(f"blocks.{layer}.hook_attn_out", o[0]),) + tuple(o[1:])))
    hf.zero_grad()
    try:
        with torch.enable_grad():
            logits, _ = hf_run_grad(hf, tokens, mask)
            value = scalar_fn(logits)
            value.backward()
    finally:
        for h in handles:
            h.remove()
        for layer in range(len(hf.model.layers)):
            del moe_of(hf, layer).forward  # back to the class's own
    B, T = np.shape(tokens)
    sites = {k: v.grad.numpy().reshape(B, T, -1) for k, v in deltas.items()}
    params = {n[len("model."):] if n.startswith("model.") else n: p.grad.numpy().copy()
              for n, p in hf.named_parameters() if p.grad is not None}
    return float(value), sites, params


def hf_run_grad(hf, tokens, mask):
    t = torch.as_tensor(tokens, dtype=torch.long)
    m = torch.as_tensor(mask, dtype=torch.long)
    return hf(t, attention_mask=m, position_ids=(m.cumsum(1) - 1).clamp(min=0)).logits, None


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_gradients_match_autograd(pair, left):
    from test_grad import check, rel, torch_cross_entropy, torch_metric
    hf, model = pair
    tokens, mask = padded(model, 21, [7, 4, 1], 7, left)
    sites = [f"blocks.{l}.{s}" for l in range(3) for s in
             ("hook_resid_pre", "hook_attn_out", "mlp.hook_expert_weights", "hook_mlp_out")]
    # the reference forward is HuggingFace's
    with torch.no_grad():
        plain = hf_run_grad(hf, tokens, mask)[0].numpy()
    value, ref_sites, ref_params = autograd(hf, tokens, mask, torch_cross_entropy(tokens, mask))
    real = mask.astype(bool)
    g = model.grad(tokens, "cross_entropy", sites=sites, weights=True, attention_mask=mask)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    assert any(k.endswith("gate.weight") for k in g.weights)  # the router's gradient, named as HF names it
    assert np.abs(g["blocks.1.mlp.hook_expert_weights"]).max() > 1e-3
    # under an intervention on the routing, with a metric
    metric = ms.metrics.LogProb([3, 5, 8])
    zero = [ms.Zero("blocks.1.mlp.hook_expert_weights", index=2)]
    value, ref_sites, ref_params = autograd(hf, tokens, mask, torch_metric(metric, mask), zero=2)
    g = model.grad(tokens, metric, sites=sites, weights=True, attention_mask=mask, interventions=zero)
    assert abs(g.value - value) < 1e-5 * max(1, abs(value))
    check(g, ref_sites, ref_params, mask)
    assert rel(model.run(tokens, attention_mask=mask, logits="all").logits[real], plain[real]) < 1e-5


def test_training_a_mixture_lowers_its_loss():
    model = ms.Model.from_config(dict(model_type="mixtral", **MIXTRAL[1]), seed=0)
    rng = np.random.default_rng(0)
    data = [np.tile(rng.integers(0, 89, 4), 3) for _ in range(32)]  # repeated 4-grams: learnable
    before = model.grad(np.array(data[:8]), "cross_entropy").value
    ms.train.fit(model, data, steps=100, batch_size=8, lr=1e-2, warmup=5, seed=0, progress=False)
    # 32 sequences of a repeated 4-gram: the model learns to copy and memorises the rest
    assert before > 4.0  # about ln(89) = 4.5
    assert model.grad(np.array(data[:8]), "cross_entropy").value < 0.5


@pytest.mark.parametrize("spec", [MIXTRAL, QWEN2_MOE], ids=lambda spec: spec[0])
def test_two_byte_experts_equal_their_float32_widening(tmp_path, spec):
    """bf16 expert matrices (and Qwen2-MoE's shared expert) stay 2-byte (widened panel by
    panel in the products): the same logits, removals and gradients as the checkpoint
    widened at load"""
    make_hf(None, seed=2, spec=spec).to(torch.bfloat16).save_pretrained(tmp_path)
    half, wide = ms.Model.from_pretrained(tmp_path), ms.Model.from_pretrained(tmp_path, dtype="float32")
    assert (half.dtype, wide.dtype) == ("bfloat16", "float32")
    tokens = np.random.default_rng(6).integers(0, half.d_vocab, (2, 7))
    np.testing.assert_allclose(half.run(tokens).logits, wide.run(tokens).logits, atol=1e-5, rtol=0)
    metric = ms.metrics.LogProb([1, 2])
    np.testing.assert_allclose(ms.experts.ablate(half, tokens, metric), ms.experts.ablate(wide, tokens, metric),
                               atol=1e-5, rtol=0)
    g_half = half.grad(tokens, "cross_entropy", weights=True)
    g_wide = wide.grad(tokens, "cross_entropy", weights=True)
    for name, g in g_wide.weights.items():
        np.testing.assert_allclose(g_half.weights[name], g, atol=1e-6, rtol=0, err_msg=name)


# ---- ms.experts against its definitions ---------------------------------------------------

def test_routing_load_and_coactivation(pair):
    hf, model = pair
    tokens, mask = padded(model, 12, [9, 6, 3], 9, left=False)
    r = ms.experts.routing(model, tokens, attention_mask=mask)
    _, _, probs, _ = hf_moe_outputs(hf, tokens, mask)
    real = mask.astype(bool)
    for layer in range(model.n_layers):
        top = torch.topk(torch.as_tensor(probs[layer]), 2, dim=-1).indices.numpy()
        want = np.zeros(probs[layer].shape, bool)
        np.put_along_axis(want, top, True, axis=-1)
        assert (r.chosen[layer][real] == want[real]).all()
        assert not r.chosen[layer][~real].any()
        assert (r.chosen[layer][real].sum(-1) == 2).all()
    c = r.chosen[:, real]  # [layers, tokens, experts]
    np.testing.assert_allclose(r.load, c.mean(1))
    lift = r.coactivation(1)
    for i in range(5):
        for j in range(5):
            p_i, p_j, p_ij = c[1, :, i].mean(), c[1, :, j].mean(), (c[1, :, i] & c[1, :, j]).mean()
            if i == j or p_i == 0 or p_j == 0:
                assert np.isnan(lift[i, j])
            else:
                assert lift[i, j] == pytest.approx(p_ij / (p_i * p_j))
    # a layer's choices tell everything about themselves: its entropy in bits
    sets = [tuple(row) for row in c[0]]
    _, counts = np.unique(np.array(sets), axis=0, return_counts=True)
    p = counts / counts.sum()
    assert r.mutual_information(0, 0) == pytest.approx(-(p * np.log2(p)).sum())
    assert 0 <= r.mutual_information(0, 2) <= r.mutual_information(0, 0) + 1e-12


def test_ablate_and_interaction_equal_one_run_each(pair):
    hf, model = pair
    tokens, mask = padded(model, 4, [7, 5], 7, left=True)
    metric = ms.metrics.LogitDiff(np.array([3, 8]), np.array([11, 1]))

    def without(*units):
        zeros = [ms.Zero(f"blocks.{layer}.mlp.hook_expert_weights", index=e) for layer, e in units]
        return metric.evaluate(model, tokens, mask, zeros)

    grid = ms.experts.ablate(model, tokens, metric, attention_mask=mask)
    assert grid.shape == (3, 5)
    for layer in range(3):
        for e in range(5):
            assert grid[layer, e] == pytest.approx(without((layer, e)), abs=1e-4)
    base = without()
    assert np.abs(grid - base).max() > 1e-2

    result = ms.experts.interaction(model, tokens, metric, layer=1, attention_mask=mask)
    assert result.base == pytest.approx(base, abs=1e-5)
    for i in range(5):
        assert result.single[i] == pytest.approx(without((1, i)) - base, abs=1e-4)
        for j in range(5):
            if i != j:
                both = without((1, i), (1, j))
                assert result.pair[i, j] == pytest.approx(both - base, abs=1e-4)
                want = both - without((1, i)) - without((1, j)) + base
                assert result.interaction[i, j] == pytest.approx(want, abs=2e-4)
    # experts of different layers
    units = [(0, 1), (2, 4), (2, 0)]
    cross = ms.experts.interaction(model, tokens, metric, units=units, attention_mask=mask)
    both = without((0, 1), (2, 4))
    assert cross.pair[0, 1] == pytest.approx(both - base, abs=1e-4)
    per_row = ms.experts.ablate(model, tokens, metric, layers=[2], attention_mask=mask, per_row=True)
    assert per_row.shape == (1, 5, 2)
    np.testing.assert_allclose(per_row.mean(-1), grid[2:], atol=1e-5)


def test_contributions_and_logit_attribution(pair):
    hf, model = pair
    tokens, mask = padded(model, 31, [8, 5, 6], 8, left=True)
    pos = np.array([7, 5, 4])  # the last real token, the last, a middle one
    parts = ms.experts.contributions(model, tokens, 1, pos, attention_mask=mask)
    shared = hasattr(moe_of(hf, 1), "shared_expert")
    assert parts.shape == (3, 5 + shared, model.d_model)
    # HuggingFace's experts on HuggingFace's ln2 output, weighted by its router
    seen = {}
    handle = hf.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", o))
    try:
        _, _, probs, block_out = hf_moe_outputs(hf, tokens, mask)
    finally:
        handle.remove()
    rows = np.arange(3)
    x = seen["x"][rows, pos]
    p = torch.as_tensor(probs[1][rows, pos])
    top = torch.topk(p, 2, dim=-1)
    for r in range(3):
        for e in range(5):
            if e in top.indices[r]:
                w = p[r, e] / top.values[r].sum() if getattr(moe_of(hf, 1), "norm_topk_prob", True) else p[r, e]
                want = (moe_of(hf, 1).experts[e](x[r:r + 1]) * w).numpy()[0]
                np.testing.assert_allclose(parts[r, e], want, atol=ATOL, rtol=0)
            else:
                assert not parts[r, e].any()
    if shared:  # the shared expert's part, last
        moe = moe_of(hf, 1)
        want = (torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)).numpy()
        np.testing.assert_allclose(parts[:, 5], want, atol=ATOL, rtol=0)
        assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(parts.sum(1), block_out[1][rows, pos], atol=ATOL, rtol=0)
    # onto the logits: a layer's experts add up to its MLP row of ms.lens.logit_attribution
    answer, incorrect = np.array([3, 8, 20]), np.array([11, 1, 5])
    attrs = ms.experts.logit_attribution(model, tokens, answer, incorrect, pos, attention_mask=mask)
    layers, labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, pos, attention_mask=mask,
                                               return_labels=True)
    for layer in range(3):
        np.testing.assert_allclose(attrs[layer].sum(0), layers[labels.index(f"{layer}_mlp_out")], atol=1e-4, rtol=0)
    assert np.abs(attrs).max() > 0.1
    # a removed expert writes nothing
    zero = [ms.Zero("blocks.2.mlp.hook_expert_weights", index=4)]
    attrs = ms.experts.logit_attribution(model, tokens, answer, incorrect, pos, attention_mask=mask,
                                         interventions=zero)
    assert not attrs[2, 4].any()
    assert attrs.shape == (3, 5 + shared, 3)


def test_dropping_an_expert_matches_hf(pair):
    """ablate(reroute=False): the expert's weighted output left out, the routing kept"""
    hf, model = pair
    tokens, mask = padded(model, 13, [7, 5], 7, left=False)
    correct, wrong = np.array([3, 8]), np.array([11, 1])
    metric = ms.metrics.LogitDiff(correct, wrong)  # at each row's last real token
    grid = ms.experts.ablate(model, tokens, metric, reroute=False, attention_mask=mask)
    rerouted = ms.experts.ablate(model, tokens, metric, attention_mask=mask)
    last = mask.sum(1) - 1
    for layer in range(3):
        moe = moe_of(hf, layer)
        for e in range(5):
            moe.forward = moe_forward(moe, {}, layer, drop=e)
            try:
                with torch.no_grad():
                    logits = hf_run_grad(hf, tokens, mask)[0].numpy()[[0, 1], last]
            finally:
                del moe.forward
            want = (logits[[0, 1], correct] - logits[[0, 1], wrong]).mean()
            assert grid[layer, e] == pytest.approx(want, abs=1e-4), (layer, e)
    assert np.abs(grid - rerouted).max() > 1e-2  # the two removals differ


def test_plot(pair):
    import matplotlib
    matplotlib.use("Agg")
    hf, model = pair
    result = ms.experts.interaction(model, [[1, 2, 3, 4]], ms.metrics.LogitDiff(3, 5), layer=0)
    fig = result.plot()
    assert len(fig.axes) == 2


# ---- refused ---------------------------------------------------------------------------------

def test_bad_input(pair, tmp_path):
    hf, model = pair
    with pytest.raises(ValueError, match="mlp.hook_pre.*mixture of experts"):
        model.run([[1, 2]], cache="blocks.0.mlp.hook_pre")
    with pytest.raises(ValueError, match="hook_post.*mixture of experts"):
        model.run([[1, 2]], interventions=[ms.Zero("blocks.0.mlp.hook_post")])
    with pytest.raises(ValueError, match="index"):
        model.run([[1, 2]], interventions=[ms.Zero("blocks.0.mlp.hook_expert_weights", index=5)])
    with pytest.raises(ValueError, match="by='neuron'.*mixture of experts"):
        ms.lens.logit_attribution(model, [[1, 2, 3]], 4, 5, by="neuron")
    metric = ms.metrics.LogitDiff(3, 5)
    with pytest.raises(ValueError, match="not both"):
        ms.experts.interaction(model, [[1, 2]], metric, layer=0, units=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="units"):
        ms.experts.interaction(model, [[1, 2]], metric, units=[(0, 1), (0, 9)])
    with pytest.raises(ValueError, match="layers"):
        ms.experts.ablate(model, [[1, 2]], metric, layers=[3])
    with pytest.raises(TypeError, match="metric"):
        ms.experts.ablate(model, [[1, 2]], lambda logits: 0.0)
    dense = ms.Model.from_config(dict(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8), seed=0)
    with pytest.raises(ValueError, match="not a mixture of experts"):
        ms.experts.routing(dense, [[1, 2]])
    with pytest.raises(ValueError, match="hook_expert_weights.*routes"):
        dense.run([[1, 2]], cache="blocks.0.mlp.hook_expert_weights")
    for spec in SPECS:
        bad = dict(model_type=spec[0], **spec[1])
        bad["num_experts_per_tok"] = 6
        with pytest.raises(ValueError, match="num_experts_per_tok"):
            ms.Model.from_config(bad)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ms.Model.from_config(dict(model_type="qwen3_moe", **QWEN3_MOE[1], mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="clip_qkv"):
        ms.Model.from_config(dict(model_type="olmoe", **OLMOE[1], clip_qkv=8.0))
    with pytest.raises(ValueError, match="use_sliding_window"):
        ms.Model.from_config(dict(model_type="qwen2_moe", **QWEN2_MOE[1], use_sliding_window=True))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ms.Model.from_config(dict(model_type="qwen2_moe", **QWEN2_MOE[1], mlp_only_layers=[0]))


@pytest.mark.parametrize("spec, part, name", [
    (MIXTRAL, "w3", r"layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight"),
    (QWEN3_MOE, "up_proj", r"layers\.1\.mlp\.experts\.3\.up_proj\.weight"),
    (OLMOE, "down_proj", r"layers\.1\.mlp\.experts\.3\.down_proj\.weight"),
    (QWEN2_MOE, "shared_expert.up_proj", r"layers\.1\.mlp\.shared_expert\.up_proj\.weight"),
    (QWEN2_MOE, "shared_expert_gate", r"layers\.1\.mlp\.shared_expert_gate\.weight")],
    ids=["mixtral", "qwen3_moe", "olmoe", "qwen2_moe_shared", "qwen2_moe_shared_gate"])
def test_a_non_finite_expert_weight_is_named(tmp_path, spec, part, name):
    """named as HuggingFace names it"""
    hf = make_hf(None, seed=2, spec=spec)
    module = moe_of(hf, 1) if part.startswith("shared") else moe_of(hf, 1).experts[3]
    for attr in part.split("."):
        module = getattr(module, attr)
    module.weight[0, 0] = float("nan")
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=name + ".*non-finite"):
        ms.Model.from_pretrained(tmp_path)
