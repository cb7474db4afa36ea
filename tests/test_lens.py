"""ms.lens: the logit lens, the residual stream's decomposition and direct logit
attribution, against TransformerLens's ActivationCache on the same weights (the
unprocessed model, and for attributions the model with TransformerLens's weight
processing) and against HuggingFace's logits for every architecture."""
import re

import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import assert_close, hf_run, tl_model_from_hf
from test_architectures import make_hf

GPT2 = "deep4_eps"  # 4 layers, 6 heads, learned positions, LayerNorm with biases


@pytest.fixture(scope="module")
def gpt2(hf_models, ms_models):
    hf = hf_models[GPT2]
    return hf, ms_models[GPT2], tl_model_from_hf(hf)


@pytest.fixture(scope="module")
def tokens(gpt2):
    return np.random.default_rng(5).integers(0, gpt2[1].d_vocab, size=(3, 11))


def tl_cache(tl, tokens):
    return tl.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))[1]


def test_logit_lens_matches_transformer_lens(gpt2, tokens):
    hf, model, tl = gpt2
    cache = tl_cache(tl, tokens)
    for mid in (False, True):
        lens, labels = ms.lens.logit_lens(model, tokens, mid=mid, return_labels=True)
        resid, tl_labels = cache.accumulated_resid(incl_mid=mid, apply_ln=True, pos_slice=-1, return_labels=True)
        assert labels == tl_labels
        assert_close(lens, tl.unembed(resid[:, :, None]).squeeze(2).numpy(), what=f"lens mid={mid}")
    # the last row is the model's own logits (HuggingFace's)
    assert_close(lens[-1], hf_run(hf, tokens)["logits"][:, -1], what="final row")


def test_decompose_matches_transformer_lens(gpt2, tokens):
    _, model, tl = gpt2
    cache = tl_cache(tl, tokens)
    stack, labels = ms.lens.decompose(model, tokens, return_labels=True)
    ref, ref_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    assert labels == ref_labels
    assert_close(stack, ref.numpy(), what="by layer")
    heads, labels = ms.lens.decompose(model, tokens, by="head", return_labels=True)
    ref, ref_labels = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False, return_labels=True)
    assert labels == ref_labels
    assert_close(heads, ref.numpy(), what="by head")
    neurons, labels = ms.lens.decompose(model, tokens, by="neuron", return_labels=True)
    ref, ref_labels = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=True, return_labels=True)
    assert labels == ref_labels
    assert_close(neurons, ref.numpy(), what="by neuron")
    final = cache["blocks.3.hook_resid_post"][:, -1].numpy()
    for s in (stack, heads, neurons):
        assert_close(s.sum(0), final, what="the rows add up to the final residual stream")


def test_logit_attribution_matches_transformer_lens(gpt2, tokens):
    """TransformerLens's logit_attrs needs the final norm folded into W_U (fold_ln);
    centring the writing weights and the unembedding changes no logit difference."""
    hf, model, _ = gpt2
    tl = tl_model_from_hf(hf)
    tl.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    tl.setup()  # the new, parameter-free norms' hook points
    cache = tl_cache(tl, tokens)
    answer, incorrect = np.array([3, 40, 77]), np.array([9, 9, 200])
    attrs, labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, return_labels=True)
    stack, ref_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    ref = cache.logit_attrs(stack, torch.as_tensor(answer), torch.as_tensor(incorrect), pos_slice=-1)
    assert labels == ref_labels + ["final_norm_bias"]
    assert_close(attrs[:-1], ref.numpy(), what="logit difference by layer")


def test_logit_attribution_adds_up_to_the_logits(gpt2, tokens):
    hf, model, _ = gpt2
    logits = hf_run(hf, tokens)["logits"][:, -1]
    rows = np.arange(len(tokens))
    answer, incorrect = np.array([3, 40, 77]), np.array([9, 9, 200])
    for by in ("layer", "head", "neuron"):
        attrs = ms.lens.logit_attribution(model, tokens, answer, by=by)
        assert_close(attrs.sum(0), logits[rows, answer], what=f"logit, by {by}")
        diff = ms.lens.logit_attribution(model, tokens, answer, incorrect, by=by)
        assert_close(diff.sum(0), logits[rows, answer] - logits[rows, incorrect], what=f"difference, by {by}")
    # by head refines by layer: a layer's heads plus its share of the bias give its attn_out
    by_layer, layer_labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, return_labels=True)
    by_head, head_labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, by="head", return_labels=True)
    H = model.n_heads
    heads = by_head[:model.n_layers * H].reshape(model.n_layers, H, -1).sum(1)
    attn = by_layer[[layer_labels.index(f"{l}_attn_out") for l in range(model.n_layers)]]
    bias = by_head[head_labels.index("bias")]
    assert_close(heads.sum(0) + bias, attn.sum(0), what="heads + bias = attention outputs")
    # by neuron, the attributions (computed without the neuron stack) are the stack's
    # rows projected the slow way: centred, divided by the run's final scale, times
    # the norm's weight, on the unembedding's direction
    by_neuron, neuron_labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, by="neuron",
                                                         return_labels=True)
    stack, stack_labels = ms.lens.decompose(model, tokens, by="neuron", return_labels=True)
    assert neuron_labels == stack_labels + ["final_norm_bias"]
    scale = model.run(tokens, cache=["ln_final.hook_scale"], logits=None).cache["ln_final.hook_scale"][:, -1]
    weight = hf.transformer.ln_f.weight.detach().numpy()
    unembed = hf.lm_head.weight.detach().numpy()
    for b in range(len(tokens)):
        centred = stack[:, b] - stack[:, b].mean(-1, keepdims=True)
        slow = centred / scale[b] * weight @ (unembed[answer[b]] - unembed[incorrect[b]])
        assert_close(by_neuron[:-1, b], slow, what=f"neuron attributions, row {b}")
    d_mlp = model.d_mlp
    first = model.n_layers * H
    per_layer = by_neuron[first:first + model.n_layers * d_mlp].reshape(model.n_layers, d_mlp, -1).sum(1)
    mlps = by_layer[[layer_labels.index(f"{l}_mlp_out") for l in range(model.n_layers)]]
    assert_close(per_layer.sum(0) + by_neuron[neuron_labels.index("bias")], mlps.sum(0) + bias,
                 what="neurons + the MLP and attention output biases = MLP outputs + attention biases")


@pytest.mark.parametrize("name", ["llama_gqa3", "qwen2_bias", "gemma_gqa", "gemma2_softcap", "gemma3_local_rope",
                                  "phi3_partial_tied", "phi_parallel", "gptj_adjacent", "olmo2_post_norms",
                                  "olmo3_windows_yarn", "neox_parallel", "opt_relu", "neo_local",
                                  "bigcode_mq", "stablelm_partial"])
def test_other_architectures(name, tmp_path):
    hf = make_hf(name, seed=2)
    hf.save_pretrained(tmp_path)
    model = ms.Model.from_pretrained(str(tmp_path))
    tokens = np.random.default_rng(6).integers(0, model.d_vocab, size=(2, 9))
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens), output_hidden_states=True)
    logits = out.logits[:, -1].numpy()
    # the logits before Gemma 2's soft cap (the final norm's output is the last hidden state)
    head = hf.get_output_embeddings()
    linear = (out.hidden_states[-1][:, -1] @ head.weight.T + (0 if head.bias is None else head.bias)).numpy()
    if name != "gemma2_softcap":
        assert_close(linear, logits, what="the logits without a cap")
    lens = ms.lens.logit_lens(model, tokens)
    assert lens.shape == (model.n_layers + 1, 2, model.d_vocab)
    assert_close(lens[-1], logits, what="the lens's last row")
    for by in ("layer", "head", "neuron"):
        if model.arch.get("post_norms") and by != "layer":  # the outputs' norms: no additive shares
            with pytest.raises(ValueError, match="norms the attention's and the MLP's outputs"):
                ms.lens.decompose(model, tokens, by=by)
            with pytest.raises(ValueError, match="norms the attention's and the MLP's outputs"):
                ms.lens.direction_logits(model, np.ones(model.d_mlp), "blocks.0.mlp.hook_post")
            continue
        stack = ms.lens.decompose(model, tokens, by=by)
        final = model.run(tokens, cache=[f"blocks.{model.n_layers - 1}.hook_resid_post"],
                          logits=None).cache[f"blocks.{model.n_layers - 1}.hook_resid_post"][:, -1]
        assert_close(stack.sum(0), final, what=f"{name} decomposition by {by}")
        attrs = ms.lens.logit_attribution(model, tokens, [1, 2], [5, 0], by=by)
        assert_close(attrs.sum(0), linear[[0, 1], [1, 2]] - linear[[0, 1], [5, 0]], what=f"{name} by {by}")


def test_direction_logits_match_transformer_lens(gpt2):
    """vectors at residual sites, at the heads' hook_z (through W_O) and at an MLP's
    hook_post (through W_out), centred and read through TransformerLens's W_U with the
    final LayerNorm's weight folded in (fold_ln)"""
    hf, model, _ = gpt2
    tl = tl_model_from_hf(hf)
    tl.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    W_U, W_O, W_out = (tl.W_U.detach().numpy(), tl.W_O[2].detach().numpy(), tl.W_out[2].detach().numpy())
    H, dh = model.n_heads, model.d_head
    rng = np.random.default_rng(8)
    for site, width, into_residual in (("hook_embed", model.d_model, lambda v: v),
                                       ("blocks.2.hook_resid_mid", model.d_model, lambda v: v),
                                       ("blocks.1.hook_mlp_out", model.d_model, lambda v: v),
                                       ("blocks.2.attn.hook_z", H * dh,
                                        lambda v: np.einsum("nhd,hdm->nm", v.reshape(-1, H, dh), W_O)),
                                       ("blocks.2.mlp.hook_post", model.d_mlp, lambda v: v @ W_out)):
        v = rng.normal(size=(5, width)).astype(np.float32)
        r = into_residual(v)
        want = (r - r.mean(-1, keepdims=True)) @ W_U
        got = ms.lens.direction_logits(model, v, site)
        assert got.shape == (5, model.d_vocab)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=site)
        tol = 1e-6 * np.abs(got).max()  # one vector or several: other product kernels
        np.testing.assert_allclose(ms.lens.direction_logits(model, v[2], site), got[2], rtol=0, atol=tol)
        if site.endswith("hook_z"):  # also with the heads as an axis
            np.testing.assert_allclose(ms.lens.direction_logits(model, v.reshape(5, H, dh), site), got,
                                       rtol=0, atol=tol)


@pytest.mark.parametrize("name", [GPT2, "llama_gqa3", "gemma_gqa", "neox_parallel"])
def test_direction_logits_add_up_to_the_logits(name, hf_models, ms_models, tmp_path):
    """the final residual stream's direction_logits over its final-norm scale, plus the
    norm's bias through the unembedding, are the model's logits (HuggingFace's); and
    the heads' hook_z and the MLP's hook_post give the sums of logit_attribution's
    heads and neurons of their layer"""
    if name == GPT2:
        hf, model = hf_models[name], ms_models[name]
    else:
        hf = make_hf(name, seed=3)
        hf.save_pretrained(tmp_path)
        model = ms.Model.from_pretrained(str(tmp_path))
    tokens = np.random.default_rng(9).integers(0, model.d_vocab, size=(3, 7))
    with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
    last, layer = model.n_layers - 1, model.n_layers - 1
    sites = [f"blocks.{last}.hook_resid_post", "ln_final.hook_scale", f"blocks.{layer}.attn.hook_z",
             f"blocks.{layer}.mlp.hook_post"]
    cache = model.run(tokens, cache=sites, logits=None).cache
    x, scale = cache[sites[0]], cache[sites[1]]
    rest = logits - ms.lens.direction_logits(model, x.reshape(-1, model.d_model), sites[0]).reshape(
        logits.shape) / scale
    norm = hf.get_decoder().norm if hasattr(hf, "get_decoder") and hasattr(hf.get_decoder(), "norm") else None
    bias = {GPT2: lambda: hf.transformer.ln_f.bias, "neox_parallel": lambda: hf.gpt_neox.final_layer_norm.bias,
            "llama_gqa3": lambda: None, "gemma_gqa": lambda: None}[name]()
    want = np.zeros(model.d_vocab) if bias is None else \
        bias.detach().numpy() @ hf.get_output_embeddings().weight.detach().numpy().T
    assert norm is None or not hasattr(norm, "bias") or norm.bias is None
    np.testing.assert_allclose(rest, np.broadcast_to(want, rest.shape), atol=1e-4 * np.abs(logits).max(), rtol=0)

    answer, incorrect = np.array([1, 4, 7]), np.array([2, 2, 0])
    rows = np.arange(3)
    for by, site in (("head", sites[2]), ("neuron", sites[3])):
        attrs, labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, by=by, return_labels=True)
        mine = [i for i, label in enumerate(labels) if label.startswith(f"L{layer}{by[0].upper()}")]
        want = attrs[mine].sum(0)
        d = ms.lens.direction_logits(model, cache[site][:, -1].reshape(3, -1), site) / scale[:, -1]
        np.testing.assert_allclose(d[rows, answer] - d[rows, incorrect], want, atol=1e-4 * np.abs(want).max(),
                                   rtol=0, err_msg=f"{name} {by}")


def test_direction_logits_bad_input(gpt2):
    _, model, _ = gpt2
    with pytest.raises(ValueError, match="site 'blocks.0.attn.hook_q': does not add into the residual stream"):
        ms.lens.direction_logits(model, np.ones(model.d_model), "blocks.0.attn.hook_q")
    with pytest.raises(ValueError, match="vectors: expected shape \\[n, 48\\] or \\[48\\]"):
        ms.lens.direction_logits(model, np.ones((2, 23)), "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="vectors: contains NaN"):
        ms.lens.direction_logits(model, np.full(model.d_model, np.nan), "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown site name"):
        ms.lens.direction_logits(model, np.ones(model.d_model), "blocks.0.hook_resid")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_what_they_give_alone(gpt2, side):
    _, model, _ = gpt2
    rng = np.random.default_rng(8)
    rows = [rng.integers(0, model.d_vocab, size=n) for n in (7, 4, 9)]
    T = max(len(r) for r in rows)
    tokens = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int32)
    for i, r in enumerate(rows):
        at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        tokens[i, at], mask[i, at] = r, 1
    lens = ms.lens.logit_lens(model, tokens, attention_mask=mask)
    attrs = ms.lens.logit_attribution(model, tokens, [1, 2, 3], [4, 5, 6], by="head", attention_mask=mask)
    for i, r in enumerate(rows):
        assert_close(lens[:, i], ms.lens.logit_lens(model, r)[:, 0], what=f"lens row {i}")
        alone = ms.lens.logit_attribution(model, r, [1, 2, 3][i], [4, 5, 6][i], by="head")
        assert_close(attrs[:, i], alone[:, 0], what=f"attribution row {i}")


def test_positions_and_interventions(gpt2, tokens):
    _, model, _ = gpt2
    at3 = ms.lens.logit_lens(model, tokens, pos=3)
    assert_close(at3[-1], model.run(tokens, logits=[3]).logits[:, 0], what="pos=3")
    per_row = ms.lens.decompose(model, tokens, pos=[0, 5, -1])
    full = ms.lens.decompose(model, tokens[1:2, :6])
    assert_close(per_row[:, 1], full[:, 0], what="a position per row")
    # under an intervention: zeroing a head zeroes its row and the rest still add up
    zero = [ms.Zero("blocks.1.attn.hook_z", head=2)]
    attrs, labels = ms.lens.logit_attribution(model, tokens, 3, 9, by="head", interventions=zero, return_labels=True)
    assert np.all(attrs[labels.index("L1H2")] == 0)
    logits = model.run(tokens, logits="last", interventions=zero).logits
    assert_close(attrs.sum(0), logits[:, 3] - logits[:, 9], what="sum under the intervention")


def test_bad_input(gpt2, tokens):
    _, model, _ = gpt2
    with pytest.raises(ValueError, match="by: expected one of"):
        ms.lens.decompose(model, tokens, by="neurons")
    with pytest.raises(ValueError, match="answer: token id out of range"):
        ms.lens.logit_attribution(model, tokens, model.d_vocab)
    with pytest.raises(ValueError, match="incorrect: expected one token per row"):
        ms.lens.logit_attribution(model, tokens, 1, [1, 2])
    with pytest.raises(TypeError, match="answer: expected token ids"):
        ms.lens.logit_attribution(model, tokens, 1.5)
    with pytest.raises(ValueError, match="pos: position out of range"):
        ms.lens.logit_lens(model, tokens, pos=11)
    mask = np.ones_like(tokens)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="pos: row 0 would be read at position 10, which is padding"):
        ms.lens.logit_lens(model, tokens, pos=-1, attention_mask=mask)
    neox = ms.Model.from_config(dict(model_type="gpt_neox", hidden_size=16, num_attention_heads=2,
                                     num_hidden_layers=1, intermediate_size=20, vocab_size=30,
                                     max_position_embeddings=16))
    with pytest.raises(ValueError, match="hook_resid_mid"):
        ms.lens.logit_lens(neox, [1, 2, 3], mid=True)


def test_two_byte_weights():
    """A bfloat16 model's matrices stay 2-byte; the lens reads them widened."""
    model = ms.Model.from_config(dict(model_type="llama", hidden_size=24, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, intermediate_size=40,
                                      vocab_size=50, max_position_embeddings=40, initializer_range=0.4,
                                      tie_word_embeddings=False), seed=1, dtype="bfloat16")
    assert model.dtype == "bfloat16"
    tokens = np.random.default_rng(2).integers(0, 50, size=(2, 7))
    logits = model.run(tokens, logits="last").logits
    assert_close(ms.lens.logit_lens(model, tokens)[-1], logits, what="the lens's last row")
    attrs = ms.lens.logit_attribution(model, tokens, 4, 7, by="head")
    assert_close(attrs.sum(0), logits[:, 4] - logits[:, 7], what="attributions")


# ---- test_prompt: TransformerLens's report, and the definitions ------------------------------

@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """a byte-level BPE of 300 tokens (the GPT-2 model's vocabulary) learned from short
    English sentences, as transformers' GPT2TokenizerFast"""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast
    folder = tmp_path_factory.mktemp("bpe300")
    text = ["When John and Mary went to the store, John gave a drink to Mary.",
            "The Eiffel Tower is in the city of Paris.", "Why did the elephant cross the road?"] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    GPT2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                      bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(folder)
    tok = GPT2TokenizerFast.from_pretrained(folder)  # TransformerLens reloads it by its folder
    assert len(tok) <= 300
    return tok


def _same_report(ours, theirs):
    """the two reports agree: the same words, token strings and ranks; logits and
    percentages as printed, within one unit of the last digit (rounding)"""
    number = r"(-?\d+\.\d\d)"
    ours, theirs = " ".join(ours.split()), " ".join(theirs.split())  # rich may wrap long lines
    a, b = re.split(number, ours), re.split(number, theirs)
    assert len(a) == len(b), (ours, theirs)
    assert a[0::2] == b[0::2], (ours, theirs)
    assert_close(np.array(a[1::2], float), np.array(b[1::2], float), atol=0.0101, what="printed numbers")


@pytest.mark.parametrize("answer", ["the road to Paris", ["Mary", " John", "store"]],
                         ids=["multi-token answer", "several answers"])
def test_test_prompt_prints_as_transformer_lens(gpt2, bpe_tokenizer, hf_dirs, answer, capsys):
    from transformer_lens import utils
    hf = gpt2[0]
    tl = tl_model_from_hf(hf)
    tl.set_tokenizer(bpe_tokenizer)
    model = ms.Model.from_pretrained(hf_dirs[GPT2], tokenizer=bpe_tokenizer)
    prompt = "When John and Mary went to the store, John gave a drink to"
    utils.test_prompt(prompt, answer, tl, top_k=7)
    theirs = capsys.readouterr().out
    check = ms.lens.test_prompt(model, prompt, answer, top_k=7)
    ours = capsys.readouterr().out
    assert ours.strip() == str(check)
    _same_report(ours, theirs)
    # the arrays, from the definitions on HuggingFace's logits
    z = hf_run(hf, check.tokens)["logits"].astype(np.float64)
    P = len(check.prompt_tokens)
    n_pos = check.ranks.shape[0]
    assert check.tokens.shape == (len(check.answer_tokens), P + n_pos)
    for p in range(n_pos):
        at = z[:, P - 1 + p]  # [answers, vocab]
        target = check.tokens[:, P + p]
        probs = np.exp(at - at.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert_close(check.logits[p], at[np.arange(len(target)), target], what="logits")
        assert_close(check.probs[p], probs[np.arange(len(target)), target], atol=1e-5, what="probs")
        np.testing.assert_array_equal(check.ranks[p], [(row > row[t]).sum() for row, t in zip(at, target)])
        np.testing.assert_array_equal(check.top_ids[p], np.argsort(-at[0])[:7])
        assert_close(check.top_probs[p], np.sort(probs[0])[::-1][:7], atol=1e-5, what="top probs")
    assert check.top_strings[0] == [bpe_tokenizer.decode([int(i)]) for i in check.top_ids[0]]
    quiet = ms.lens.test_prompt(model, prompt, answer, top_k=7, print_details=False)
    assert capsys.readouterr().out == ""
    np.testing.assert_array_equal(quiet.ranks, check.ranks)


def test_test_prompt_bad_input(gpt2, bpe_tokenizer, hf_dirs):
    model = ms.Model.from_pretrained(hf_dirs[GPT2], tokenizer=bpe_tokenizer)
    with pytest.raises(TypeError, match="prompt: expected a string"):
        ms.lens.test_prompt(model, [1, 2], "a")
    for answer in ([], "", ["a", 3], None):
        with pytest.raises(TypeError, match="answer: expected a non-empty string"):
            ms.lens.test_prompt(model, "the", answer)
    for top_k in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k: expected an integer >= 0"):
            ms.lens.test_prompt(model, "the", "road", top_k=top_k)
    with pytest.raises(ValueError, match="this model has none"):
        ms.lens.test_prompt(gpt2[1], "the", "road")


@pytest.mark.parametrize("side", ["right", "left"])
def test_to_tokens_pads_either_side_as_transformer_lens(gpt2, bpe_tokenizer, hf_dirs, side):
    """to_tokens(padding_side=) gives TransformerLens's tokens and padding; each row's
    last real token then reads as the text alone"""
    tl = tl_model_from_hf(gpt2[0])
    tl.set_tokenizer(bpe_tokenizer)
    model = ms.Model.from_pretrained(hf_dirs[GPT2], tokenizer=bpe_tokenizer)
    texts = ["The Eiffel Tower is in", "Why did the elephant cross the road to Paris", "John"]
    tokens = model.to_tokens(texts, padding_side=side)
    np.testing.assert_array_equal(tokens, tl.to_tokens(texts, padding_side=side).numpy())
    assert model.to_str_tokens(texts) == tl.to_str_tokens(texts)
    lengths = [len(model.to_tokens(t)[0]) for t in texts]
    assert tokens.attention_mask.sum(1).tolist() == lengths
    real = tokens.attention_mask[:, ::-1] if side == "left" else tokens.attention_mask
    assert all(row[:n].all() and not row[n:].any() for row, n in zip(real, lengths))
    last = model.run(tokens, logits="last").logits
    for i, text in enumerate(texts):
        assert_close(last[i], model.run(model.to_tokens(text), logits="last").logits[0], what=text)
    with pytest.raises(ValueError, match="padding_side: expected 'right' or 'left'"):
        model.to_tokens(texts, padding_side="middle")
