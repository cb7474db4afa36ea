"""ms.train: AdamW, schedules and clipping against PyTorch, checkpoints against
transformers, and small end-to-end trainings on mechscope's own gradients."""
import json
import math

import numpy as np
import pytest
import torch
import transformers

import mechscope as ms
from mechscope import train

TINY = dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=13, n_positions=16)


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(5, 7)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32),
            "emb": rng.normal(size=(11, 3)).astype(np.float32)}


@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.1, 1.0), (0.01, 0.05)])
def test_adamw_matches_torch(weight_decay, clip):
    params = _random_params()
    tparams = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    # torch: biases (1-D) in a group without decay, as ms.train's default
    topt = torch.optim.AdamW([{"params": [tparams["w"], tparams["emb"]], "weight_decay": weight_decay},
                              {"params": [tparams["b"]], "weight_decay": 0.0}],
                             lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    opt = train.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    rng = np.random.default_rng(1)
    for step in range(6):
        grads = {n: (rng.normal(size=p.shape) * (step + 1)).astype(np.float32) for n, p in params.items()}
        for n, p in tparams.items():
            p.grad = torch.from_numpy(grads[n].copy())
        lr = 3e-2 * (0.5 + 0.1 * step)  # a changing rate, as a schedule gives
        for group in topt.param_groups:
            group["lr"] = lr
        if clip is not None:
            tnorm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
            norm = train.clip_grad_norm(grads, clip)
            assert norm == pytest.approx(float(tnorm), rel=1e-6)
        topt.step()
        opt.step(grads, lr=lr)
        for n in params:
            np.testing.assert_allclose(params[n], tparams[n].detach().numpy(), rtol=0, atol=1e-6, err_msg=n)
    assert opt.t == 6
    assert not np.allclose(params["w"], _random_params()["w"])  # it did move


def test_clip_grad_norm_only_scales_down():
    grads = {"a": np.full(4, 0.1, np.float32)}
    assert train.clip_grad_norm(grads, 10.0) == pytest.approx(0.2)
    np.testing.assert_array_equal(grads["a"], np.full(4, 0.1, np.float32))
    big = {"a": np.full(4, 3.0, np.float32), "b": np.full(1, 4.0, np.float32)}
    norm = train.clip_grad_norm(big, 1.0)
    assert norm == pytest.approx(math.sqrt(36 + 16))
    assert math.sqrt(float((big["a"] ** 2).sum() + (big["b"] ** 2).sum())) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("clip", [None, 100.0, 0.5])
def test_clipping_folded_into_adamw(clip):
    """fit's update (the clipping factor applied inside AdamW's pass) equals
    clip_grad_norm then step, and leaves the gradients as they were."""
    rng = np.random.default_rng(4)
    p1, p2 = _random_params(), _random_params()
    o1, o2 = train.AdamW(p1, lr=1e-2), train.AdamW(p2, lr=1e-2)
    for step in range(3):
        grads = {n: (rng.normal(size=p.shape) * 3).astype(np.float32) for n, p in p1.items()}
        kept = {n: g.copy() for n, g in grads.items()}
        orig = {n: g.copy() for n, g in grads.items()}
        kept["w"].flags.writeable = False  # read, never written
        norm = train._clipped_update(o2, kept, clip, 1e-2 * (step + 1))
        if clip is None:
            expected = train._global_norm(grads)
        else:
            expected = train.clip_grad_norm(grads, clip)
        o1.step(grads, lr=1e-2 * (step + 1))
        assert norm == expected
        for n in p1:
            np.testing.assert_allclose(p2[n], p1[n], rtol=1e-6, atol=1e-7, err_msg=n)
            np.testing.assert_array_equal(kept[n], orig[n])  # the gradients are left as they were
    assert not np.allclose(p1["w"], _random_params()["w"])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_formulas_and_torch_lambdalr(kind):
    total, warmup, r = 50, 7, 0.1
    f = train.lr_schedule(kind, total, warmup=warmup, min_lr_ratio=r)
    for s in range(total):
        if s < warmup:
            want = (s + 1) / warmup
        else:
            p = (s - warmup) / (total - warmup)
            want = {"cosine": r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)),
                    "linear": 1 - (1 - r) * p, "constant": 1.0}[kind]
        assert f(s) == pytest.approx(want, abs=1e-12)
    # the rates torch's LambdaLR gives an optimizer step by step are fit's rates
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, f)
    for s in range(total):
        assert topt.param_groups[0]["lr"] == pytest.approx(0.02 * f(s), rel=1e-12)
        topt.step()
        sched.step()
    # the schedule ends near the floor and peaks at the end of warmup
    if kind != "constant":
        assert f(total - 1) == pytest.approx(r, abs=0.03)
    assert f(warmup) == pytest.approx(1.0)


def test_bad_input():
    params = _random_params()
    for lr in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            train.AdamW(params, lr=lr)
    for betas in ((1.0, 0.9), (0.9, -0.1), (0.9, 1.5)):
        with pytest.raises(ValueError, match="betas"):
            train.AdamW(params, betas=betas)
    with pytest.raises(ValueError, match="weight_decay"):
        train.AdamW(params, weight_decay=-1)
    with pytest.raises(TypeError, match="params"):
        train.AdamW({"w": np.zeros(3, np.float64)})
    with pytest.raises(ValueError, match="no_decay"):
        train.AdamW(params, no_decay=["nope"])
    opt = train.AdamW(params)
    with pytest.raises(ValueError, match="grads"):
        opt.step({"w": np.zeros((5, 7), np.float32)})
    with pytest.raises(ValueError, match="warmup"):
        train.lr_schedule("cosine", 10, warmup=11)
    with pytest.raises(ValueError, match="schedule"):
        train.lr_schedule("exponential", 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        train.lr_schedule("cosine", 10, min_lr_ratio=2)
    for clip in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip_norm"):
            train.clip_grad_norm({"a": np.ones(2, np.float32)}, clip)

    model = ms.Model.from_config(TINY)
    data = [[0, 1, 2, 3]] * 4
    before = {n: a.copy() for n, a in model._weights.items()}
    cases = [(dict(lr=0.0), ValueError, "lr"), (dict(lr=float("nan")), ValueError, "lr"),
             (dict(warmup=20), ValueError, "warmup"), (dict(betas=(0.9, 1.0)), ValueError, "betas"),
             (dict(clip_norm=0), ValueError, "clip_norm"), (dict(clip_norm=-2.0), ValueError, "clip_norm"),
             (dict(steps=0), ValueError, "steps"), (dict(schedule="step"), ValueError, "schedule"),
             (dict(batch_size=0), ValueError, "batch_size")]
    for kw, exc, word in cases:
        args = dict(steps=10, batch_size=2)
        args.update(kw)
        with pytest.raises(exc, match=word):
            train.fit(model, data, **args)
    with pytest.raises(ValueError, match="data"):
        train.fit(model, [[0, 1, 99]], steps=2)
    with pytest.raises(ValueError, match="data"):
        train.fit(model, [[0, 1]] + [[1] * 17], steps=2)  # longer than n_ctx
    with pytest.raises(TypeError, match="data"):
        train.fit(model, "0 1 2", steps=2)
    # nothing was trained by a refused call
    for n, a in model._weights.items():
        np.testing.assert_array_equal(a, before[n])


def _hf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    hf.eval()
    return hf(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("config", [
    TINY,
    dict(TINY, tie_word_embeddings=False, activation_function="relu", n_inner=40),
    dict(model_type="llama", hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=17, max_position_embeddings=16, tie_word_embeddings=False),
    # Gemma: norms that start at 0 (they scale by 1 + weight) and a scaled embedding
    dict(model_type="gemma", hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=1, head_dim=8, vocab_size=17, max_position_embeddings=16),
    dict(model_type="gemma2", hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=8, vocab_size=17, max_position_embeddings=16, query_pre_attn_scalar=10,
         attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    dict(model_type="gemma3_text", hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=8, vocab_size=17, max_position_embeddings=16, query_pre_attn_scalar=8,
         rope_local_base_freq=100.0, layer_types=["sliding_attention", "full_attention"]),
    # Phi-3: fused q|k|v and gate|up, written back fused; partial rotary, tied, a window
    dict(model_type="phi3", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=17, max_position_embeddings=16, original_max_position_embeddings=16,
         partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=4, pad_token_id=0),
    # Phi: one norm read twice, the unembedding's bias
    dict(model_type="phi", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         vocab_size=17, max_position_embeddings=16, partial_rotary_factor=0.5),
    # OLMo 2: the outputs' norms and the whole-width query and key norms, no input norms
    dict(model_type="olmo2", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=17, max_position_embeddings=16),
    dict(model_type="olmo3", hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=17, max_position_embeddings=16, sliding_window=3),
    # GPT-J: adjacent rotary pairs
    dict(model_type="gptj", n_embd=32, n_inner=40, n_layer=2, n_head=4, vocab_size=17, n_positions=16,
         rotary_dim=4),
    # OPT: the positions' table two rows longer than the core's, q, k and v separate
    dict(model_type="opt", hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4, vocab_size=17,
         max_position_embeddings=16),
    # GPT-Neo: q, k and v separate without biases, its layer kinds and window in the config
    dict(model_type="gpt_neo", hidden_size=32, num_layers=2, num_heads=4, vocab_size=17, max_position_embeddings=16,
         window_size=3, attention_types=[[["global", "local"], 1]]),
    # GPT-BigCode: one key/value head, c_attn's rows q | k | v
    dict(model_type="gpt_bigcode", n_embd=32, n_inner=40, n_layer=2, n_head=4, vocab_size=17, n_positions=16),
    # StableLM: LayerNorms with biases around a SwiGLU block, partial rotary
    dict(model_type="stablelm", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=17, max_position_embeddings=16, use_qkv_bias=True),
])
def test_checkpoint_loads_in_transformers_and_mechscope(tmp_path, config):
    model = ms.Model.from_config(config, seed=3)
    for a in train._trainable(model).values():  # weights away from their init, as after training
        a += np.random.default_rng(a.size).normal(0, 0.05, a.shape).astype(np.float32)
    train._sync_core(model)
    path = train.save_pretrained(model, tmp_path / "ckpt", extra_config={"pad_token_id": 1})
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["pad_token_id"] == 1 and cfg["model_type"] == config["model_type"]
    ids = np.random.default_rng(0).integers(0, model.d_vocab, size=(2, 9))
    ours = model.run(ids).logits
    np.testing.assert_allclose(_hf_logits(path, ids), ours, atol=1e-5, rtol=0)
    again = ms.Model.from_pretrained(path)
    for n, a in model._weights.items():
        np.testing.assert_array_equal(again._weights[n], a)
    np.testing.assert_array_equal(again.run(ids).logits, ours)


def test_in_place_updates_reach_the_core_for_fused_families():
    # Llama's core fuses q|k|v and gate|up into copies: after an in-place update the
    # trainer refreshes them, so the model runs exactly as one built from the new arrays
    cfg = dict(model_type="llama", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=17, max_position_embeddings=16)
    model = ms.Model.from_config(cfg, seed=1)
    params = train._trainable(model)
    assert model._derived_core  # the fused matrices
    for a in params.values():
        a *= 1.5
    train._sync_core(model)
    ids = np.arange(8)[None] % 17
    fresh = ms.Model.from_arrays(cfg, {n: a.copy() for n, a in params.items()})
    np.testing.assert_array_equal(model.run(ids).logits, fresh.run(ids).logits)
    # GPT-2's core reads the HF arrays themselves: nothing to refresh
    gpt = ms.Model.from_config(TINY)
    train._trainable(gpt)
    assert gpt._derived_core == []


# ---- end to end, on mechscope's gradients ----------------------------------------------

def _copy_task(n=64, seed=0):
    """<bos> x1 x2 x3 | x1 x2 x3: the second half is predictable from the first."""
    rng = np.random.default_rng(seed)
    return [[0] + list(x) + [1] + list(x) for x in rng.integers(2, 13, size=(n, 3))]


def _copy_accuracy(model, data):
    ids = np.array(data)
    pred = model.run(ids).logits.argmax(-1)
    return float((pred[:, 4:7] == ids[:, 5:8]).mean())


def test_fit_learns_a_copy_task_and_is_deterministic(tmp_path):
    data = _copy_task()
    runs = []
    for _ in range(2):
        model = ms.Model.from_config(TINY, seed=0)
        hist = train.fit(model, data, steps=250, batch_size=16, lr=5e-3, warmup=20, schedule="cosine",
                         weight_decay=0.01, clip_norm=1.0, seed=7, progress=False)
        runs.append((model, hist))
    (m1, h1), (m2, h2) = runs
    for n in m1._weights:  # same seed, same data: bit-identical weights
        np.testing.assert_array_equal(m1._weights[n], m2._weights[n])
    np.testing.assert_array_equal(h1.loss, h2.loss)
    assert h1.loss.shape == (250,) and h1.lr.shape == (250,) and np.all(np.isfinite(h1.grad_norm))
    # the copied half is learned: the loss falls from ln(11)-ish to the unpredictable first half
    assert h1.loss[:5].mean() > 2.0
    assert h1.loss[-20:].mean() < 1.3
    assert _copy_accuracy(m1, data) > 0.95
    # the trained weights are what the core runs, and what transformers loads
    path = train.save_pretrained(m1, tmp_path / "copy")
    ids = np.array(data[:3])
    np.testing.assert_allclose(_hf_logits(path, ids), m1.run(ids).logits, atol=1e-5, rtol=0)
    # another seed gives other weights
    m3 = ms.Model.from_config(TINY, seed=0)
    train.fit(m3, data, steps=5, batch_size=16, seed=8, progress=False)
    m4 = ms.Model.from_config(TINY, seed=0)
    train.fit(m4, data, steps=5, batch_size=16, seed=7, progress=False)
    assert not np.array_equal(m3._weights["h.0.attn.c_attn.weight"], m4._weights["h.0.attn.c_attn.weight"])


def test_fit_matches_torch_training_step_by_step():
    # the same minibatches, AdamW and schedule in PyTorch on the HF model, in float64:
    # the weights after a few steps agree (mechscope's gradients and optimizer against
    # autograd's). AdamW divides by sqrt(v), so a weight whose gradient is near zero
    # turns float32 rounding into visible steps: PyTorch's own float32 run ends 1.9e-5
    # from this float64 one, mechscope's 1.4e-5 (2.7e-5 with OpenBLAS's AVX2 kernels).
    data = _copy_task(n=32, seed=2)
    rows = [d[:4 + (i % 4)] for i, d in enumerate(data)]  # ragged: padded batches
    model = ms.Model.from_config(TINY, seed=5)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **{k: v for k, v in TINY.items() if k != "model_type"}, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        attn_implementation="eager"))
    hf.load_state_dict({("transformer." + k): torch.from_numpy(v.copy()) for k, v in model._weights.items()},
                       strict=False)
    hf.tie_weights()
    hf = hf.double()
    batches = []

    def batch_fn(rng):
        pick = [rows[i] for i in rng.choice(len(rows), size=8, replace=False)]
        batches.append(pick)
        return pick

    steps = 4
    train.fit(model, batch_fn, steps=steps, lr=1e-2, warmup=2, schedule="linear", weight_decay=0.1,
              betas=(0.9, 0.99), clip_norm=0.5, seed=0, progress=False)
    decay = [p for n, p in hf.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in hf.named_parameters() if p.dim() < 2]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, train.lr_schedule("linear", steps, warmup=2))
    with torch.enable_grad():
        for pick in batches:
            width = max(len(r) for r in pick)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in pick])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in pick])
            loss = hf(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            topt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
            topt.step()
            sched.step()
    ref = {n[len("transformer."):]: p.detach().numpy() for n, p in hf.named_parameters()}
    for n, a in model._weights.items():
        np.testing.assert_allclose(a, ref[n], atol=5e-5, rtol=0, err_msg=n)
