"""Model.generate: greedy continuations equal HuggingFace's generate (alone and in padded
batches, with and without a steering vector added at every step), sampling follows
softmax(logits / temperature) restricted by top_k and top_p, EOS ends a row, text in
gives text out, the key/value cache gives what rerunning the whole sequence gives
(GPT-2 and a Llama with rotary and grouped keys; interventions at every position, at
one position, on the attention pattern), patches from another run act on the prompt
as a HuggingFace hook at the prompt step does, Python hooks act at every step (with and
without the cache, beside interventions), and bad arguments get clear errors."""
import numpy as np
import pytest
import torch

import mechscope as ms
from conftest import make_hf_model, save_hf

VOCAB = 61
CONFIG = dict(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=21)
    hf.generation_config.eos_token_id = None  # greedy runs to max_new_tokens, as stop_at_eos=False
    hf.generation_config.pad_token_id = 0
    folder = save_hf(hf, tmp_path_factory.mktemp("generate"))
    return hf, ms.Model.from_pretrained(folder)


PROMPTS = [[5, 17, 3, 40, 22], [9, 1, 33, 33, 7, 50, 12, 2, 44], [30]]


def hf_greedy(hf, prompt, n, steer=None):
    handle = None
    if steer is not None:  # add the vector to block 1's input (blocks.1.hook_resid_pre), every position
        vector = torch.as_tensor(steer, dtype=torch.float32)
        handle = hf.transformer.h[1].register_forward_pre_hook(
            lambda module, args, kwargs: ((args[0] + vector,) + args[1:], kwargs), with_kwargs=True)
    try:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    return out[0].tolist()


def padded(prompts, side):
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        at = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        tokens[i, at], mask[i, at] = p, 1
    return tokens, mask


def rows_of(out):
    mask = out.attention_mask if out.attention_mask is not None else np.ones(out.shape, np.int32)
    return [np.asarray(r)[m != 0].tolist() for r, m in zip(out, mask)]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("steer", [False, True])
def test_greedy_matches_hf_generate(models, side, steer):
    hf, model = models
    vector = None
    if steer:
        vector = 4.0 * np.random.default_rng(5).standard_normal(CONFIG["n_embd"]).astype(np.float32)
    interventions = [ms.Add("blocks.1.hook_resid_pre", vector)] if steer else None
    tokens, mask = padded(PROMPTS, side)
    out = model.generate(tokens, 12, do_sample=False, stop_at_eos=False, attention_mask=mask,
                         interventions=interventions, progress=False)
    want = [hf_greedy(hf, p, 12, vector) for p in PROMPTS]
    assert rows_of(out) == want
    if steer:  # the vector changes what the model says, so the comparison above means something
        plain = [hf_greedy(hf, p, 12) for p in PROMPTS]
        assert plain != want
    # one row alone gives what it gives in the batch
    alone = model.generate(np.array(PROMPTS[1]), 12, do_sample=False, stop_at_eos=False,
                           interventions=interventions, progress=False)
    assert alone.shape == (1, len(PROMPTS[1]) + 12) and alone.attention_mask is None
    assert rows_of(alone)[0] == want[1]


def test_sampling_follows_the_distribution(models):
    _, model = models
    n = 6000
    prompt = np.array([PROMPTS[0]] * n)
    logits = model.run(prompt[:1], logits="last").logits[0].astype(np.float64)
    temperature = 1.7
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    order = np.argsort(-p)

    def frequencies(**kw):
        out = model.generate(prompt, 1, seed=3, stop_at_eos=False, progress=False, temperature=temperature, **kw)
        return np.bincount(np.asarray(out)[:, -1], minlength=VOCAB) / n

    def check(freq, want):
        sigma = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12), np.abs(freq - want).max()

    assert p[order[0]] < 0.5  # a spread distribution, so that the checks below can tell samplers apart
    check(frequencies(), p)
    # top_k: the k most likely tokens only, in their renormalized proportions
    want = np.zeros_like(p)
    want[order[:4]] = p[order[:4]] / p[order[:4]].sum()
    check(frequencies(top_k=4), want)
    # top_p: the fewest most likely tokens whose probability reaches top_p
    k = int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1
    want = np.zeros_like(p)
    want[order[:k]] = p[order[:k]] / p[order[:k]].sum()
    check(frequencies(top_p=0.6), want)
    assert 1 < k < VOCAB


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
    _, model = models
    tokens, mask = padded(PROMPTS, "right")
    a = model.generate(tokens, 8, seed=7, attention_mask=mask, stop_at_eos=False, progress=False)
    b = model.generate(tokens, 8, seed=7, attention_mask=mask, stop_at_eos=False, progress=False)
    c = model.generate(tokens, 8, seed=8, attention_mask=mask, stop_at_eos=False, progress=False)
    assert rows_of(a) == rows_of(b) and rows_of(a) != rows_of(c)
    greedy = model.generate(tokens, 8, do_sample=False, attention_mask=mask, stop_at_eos=False, progress=False)
    top1 = model.generate(tokens, 8, top_k=1, seed=1, attention_mask=mask, stop_at_eos=False, progress=False)
    assert rows_of(top1) == rows_of(greedy)


def test_a_row_stops_at_eos(models):
    _, model = models
    tokens, mask = padded(PROMPTS, "right")
    plain = rows_of(model.generate(tokens, 10, do_sample=False, attention_mask=mask, stop_at_eos=False,
                                   progress=False))
    eos = plain[0][len(PROMPTS[0]) + 2]  # row 0's third new token
    out = model.generate(tokens, 10, do_sample=False, attention_mask=mask, eos_token_id=eos, progress=False)
    for prompt, full, got in zip(PROMPTS, plain, rows_of(out)):
        new = full[len(prompt):]
        end = new.index(eos) + 1 if eos in new else len(new)
        assert got == prompt + new[:end]
    assert len(rows_of(out)[0]) == len(PROMPTS[0]) + 3
    assert out.attention_mask is not None


def test_text_in_text_out():
    model = ms.demo.load_model()
    prompt = "When Mary and John went to the store , John gave a book to"
    text = model.generate(prompt, 1, do_sample=False, progress=False)
    assert text == prompt + " Mary"  # the demo model answers the indirect object
    texts = model.generate([prompt, "Mary Clark lives in"], 2, seed=0, progress=False)
    assert isinstance(texts, list) and len(texts) == 2 and texts[0].startswith(prompt)
    assert texts[1].startswith("Mary Clark lives in ")


LLAMA = dict(model_type="llama", hidden_size=24, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=40, vocab_size=VOCAB, max_position_embeddings=40, initializer_range=0.4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_cache_gives_what_rerunning_gives(models, family, side):
    model = models[1] if family == "gpt2" else ms.Model.from_config(LLAMA, seed=3)
    width = CONFIG["n_embd"] if family == "gpt2" else LLAMA["hidden_size"]
    rng = np.random.default_rng(8)
    cases = [
        None,
        [ms.Add("blocks.1.hook_resid_pre", 3.0 * rng.standard_normal(width).astype(np.float32))],
        [ms.Zero("blocks.0.hook_resid_post", pos=1)],  # one prompt position: computed at the first step only
        [ms.Scale("blocks.1.attn.hook_pattern", 0.0, head=1, key_pos=0),
         ms.Scale("blocks.0.mlp.hook_post", 2.0, index=[0, 3, 5])],
    ]
    changed = sum(cached_equals_rerun(model, side, interventions=interventions) for interventions in cases)
    assert changed >= 4  # the interventions change the continuations, so the equalities above mean something


def cached_equals_rerun(model, side, **edits):
    """asserts that generating PROMPTS (padded on `side`) with `edits` (interventions= or
    hooks=) gives the same tokens with the cache and rerunning, greedy and sampled;
    returns how many of the two differ from generating without the edits"""
    tokens, mask = padded(PROMPTS, side)
    changed = 0
    for sample in (False, True):
        kw = dict(do_sample=sample, seed=11, stop_at_eos=False, attention_mask=mask, progress=False)
        cached = model.generate(tokens, 10, use_cache=True, **kw, **edits)
        rerun = model.generate(tokens, 10, use_cache=False, **kw, **edits)
        assert np.array_equal(np.asarray(cached), np.asarray(rerun))
        assert np.array_equal(cached.attention_mask, rerun.attention_mask)
        plain = model.generate(tokens, 10, use_cache=False, **kw)
        changed += not np.array_equal(np.asarray(plain), np.asarray(rerun))
    return changed


def steering_hook(vector, seen=None):
    """a Python hook that adds `vector` at every position it is given (and notes the
    shapes it sees)"""
    def hook(value, site):
        if seen is not None:
            seen.append(value.shape)
        value += vector
    return hook


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_steering_hook_matches_hf_generate(models, side):
    """hooks act at every step: a hook adding a vector at block 1's input gives HF's
    greedy continuations with the vector added there; with the cache the hook sees
    the prompt, then each row's newest token"""
    hf, model = models
    vector = 4.0 * np.random.default_rng(5).standard_normal(CONFIG["n_embd"]).astype(np.float32)
    tokens, mask = padded(PROMPTS, side)
    seen = []
    out = model.generate(tokens, 12, do_sample=False, stop_at_eos=False, attention_mask=mask,
                         hooks={"blocks.1.hook_resid_pre": steering_hook(vector, seen)}, progress=False)
    want = [hf_greedy(hf, p, 12, vector) for p in PROMPTS]
    assert rows_of(out) == want
    assert want != [hf_greedy(hf, p, 12) for p in PROMPTS]
    assert seen == [(3, 9, CONFIG["n_embd"])] + [(3, 1, CONFIG["n_embd"])] * 11
    seen.clear()
    rerun = model.generate(tokens, 12, do_sample=False, stop_at_eos=False, attention_mask=mask, use_cache=False,
                           hooks={"blocks.1.hook_resid_pre": steering_hook(vector, seen)}, progress=False)
    assert rows_of(rerun) == want
    assert seen == [(3, 9 + i, CONFIG["n_embd"]) for i in range(12)]  # the whole sequence at every step


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_hooks_with_and_without_the_cache(models, family, side):
    """hooks that act on each position alone give the same tokens whether a step
    computes only the newest token (the cache) or reruns everything: on the residual
    stream (a new array returned), on an MLP's output (changed in place), on the keys
    (which the cache then keeps as changed) and on the attention pattern ([batch,
    heads, 1, keys] at a cached step)"""
    model = models[1] if family == "gpt2" else ms.Model.from_config(LLAMA, seed=3)
    key = "blocks.0.attn.hook_k" if family == "gpt2" else "blocks.0.attn.hook_rot_k"

    def clamp_one(value, site):
        value[..., 3] = np.maximum(value[..., 3], 2.0)

    def squash(value, site):
        return 3.0 * np.tanh(value)

    def no_first_key(value, site):
        assert value.ndim == 4 and value.shape[1] == model.n_heads
        value[:, 1, :, 0] = 0.0

    changed = sum(cached_equals_rerun(model, side, hooks=hooks)
                  for hooks in ({"blocks.*.hook_resid_mid": squash}, {"blocks.0.hook_mlp_out": clamp_one},
                                {key: squash}, {"blocks.1.attn.hook_pattern": no_first_key}))
    assert changed >= 6  # the hooks change the continuations, so the equalities above mean something


def test_hooks_and_interventions_together(models):
    """at one site the interventions act first and the hook sees their result, at
    every step, as in a run"""
    _, model = models
    tokens, mask = padded(PROMPTS, "left")
    vector = np.random.default_rng(6).standard_normal(CONFIG["n_embd"]).astype(np.float32)
    site = "blocks.1.hook_resid_pre"
    seen = []

    def double(value, site):
        seen.append(value.copy())
        return 2.0 * value

    kw = dict(do_sample=False, stop_at_eos=False, attention_mask=mask, progress=False)
    both = model.generate(tokens, 6, interventions=[ms.Add(site, vector)], hooks={site: double}, **kw)
    # the same as one hook that adds, then doubles
    alone = model.generate(tokens, 6, hooks={site: lambda v, s: 2.0 * (v + vector)}, **kw)
    assert np.array_equal(np.asarray(both), np.asarray(alone))
    # what the hook saw at the first step is the run's value after the Add
    first = model.run(tokens, attention_mask=mask, interventions=[ms.Add(site, vector)], cache=site).cache[site]
    np.testing.assert_allclose(seen[0][mask != 0], first[mask != 0], atol=1e-6)


def hf_greedy_patched(hf, prompts, n, clean, pos):
    """HF's greedy generate with block 1's input at prompt positions `pos` replaced by
    `clean` (the clean prompts' values there), at the step that computes the prompt."""
    width = len(prompts[0])
    value = torch.as_tensor(clean)

    def patch(module, args, kwargs):
        if args[0].shape[1] != width:  # a later step: the new token alone
            return None
        hidden = args[0].clone()
        hidden[:, pos] = value[:, pos]
        return (hidden,) + args[1:], kwargs

    handle = hf.transformer.h[1].register_forward_pre_hook(patch, with_kwargs=True)
    try:
        out = hf.generate(torch.tensor(prompts), max_new_tokens=n, do_sample=False)
    finally:
        handle.remove()
    return out.tolist()


def test_patching_from_another_run_matches_hf(models):
    """A patch from a clean run (its cache, or a Source run beside) acts on the prompt's
    positions and leaves the new tokens alone: HF's generate with a hook writing the
    clean values at the prompt step gives the same continuation, with and without the
    cache."""
    hf, model = models
    clean = [[51, 38, 31, 16, 18, 2], [4, 1, 10, 49, 39, 55]]
    corrupt = [[51, 38, 30, 37, 18, 2], [4, 1, 59, 44, 39, 55]]  # positions 2 and 3 differ
    with torch.no_grad():
        hf_clean = hf(torch.tensor(clean), output_hidden_states=True).hidden_states[1].numpy()
    cache = model.run(np.array(clean), cache="blocks.1.hook_resid_pre")
    site = "blocks.1.hook_resid_pre"
    cases = [(ms.Patch(site, cache, pos=2), [2]),
             (ms.Patch(site, ms.Source(np.array(clean)), pos=[1, 2, 3]), [1, 2, 3]),
             (ms.Patch(site, ms.Source(np.array(clean))), slice(None)),
             (ms.Patch(site, cache, pos=-3), [3])]  # a negative position counts from the prompt's end
    changed = 0
    plain = hf.generate(torch.tensor(corrupt), max_new_tokens=10, do_sample=False).tolist()
    for patch, pos in cases:
        want = hf_greedy_patched(hf, corrupt, 10, hf_clean, pos)
        for use_cache in (True, False):
            out = model.generate(np.array(corrupt), 10, do_sample=False, stop_at_eos=False, interventions=[patch],
                                 use_cache=use_cache, progress=False)
            assert np.asarray(out).tolist() == want, (patch, use_cache)
        changed += want != plain
    assert changed == len(cases)  # every patch changes the continuation


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patches_from_other_runs_with_and_without_the_cache(models, family):
    """Left-padded prompts; Sources of one row and of a row per prompt, a Source that
    itself patches from a Source, a subspace patch and a mean ablation, beside a steering
    vector that acts on the new tokens too and a zeroing at a position counted from the
    prompt's end: the cache gives what rerunning gives."""
    model = models[1] if family == "gpt2" else ms.Model.from_config(LLAMA, seed=3)
    width = CONFIG["n_embd"] if family == "gpt2" else LLAMA["hidden_size"]
    rng = np.random.default_rng(12)
    tokens, mask = padded(PROMPTS, "left")
    other = rng.integers(0, VOCAB, tokens.shape)
    one = ms.Source(other[:1])
    per_row = ms.Source(other, mask, interventions=[ms.Patch("blocks.0.hook_resid_post", one, pos=[-1, -2])])
    basis = np.linalg.qr(rng.standard_normal((width, 3)))[0].astype(np.float32)
    reference = model.run(rng.integers(0, VOCAB, (4, tokens.shape[1])), cache="blocks.0.mlp.hook_post")
    steer = ms.Add("blocks.1.hook_resid_pre", 2.0 * rng.standard_normal(width).astype(np.float32))
    cases = [
        [ms.Patch("blocks.1.hook_resid_pre", one, pos=-1), steer],
        [ms.Patch("blocks.1.hook_resid_pre", per_row, pos=[-1, -3]), ms.Zero("blocks.0.hook_resid_post", pos=-2)],
        [ms.SubspacePatch("blocks.1.hook_resid_pre", basis, per_row, pos=-1), steer],
        [ms.MeanAblate("blocks.0.mlp.hook_post", reference, pos=-1)],
    ]
    changed = 0
    for interventions in cases:
        kw = dict(do_sample=True, seed=4, stop_at_eos=False, attention_mask=mask, interventions=interventions,
                  progress=False)
        cached = model.generate(tokens, 8, use_cache=True, **kw)
        rerun = model.generate(tokens, 8, use_cache=False, **kw)
        assert np.array_equal(np.asarray(cached), np.asarray(rerun))
        plain = model.generate(tokens, 8, use_cache=False, **dict(kw, interventions=None))
        changed += not np.array_equal(np.asarray(plain), np.asarray(rerun))
    assert changed >= 3
    # a negative position names the prompt's token at every step
    for use_cache in (True, False):
        kw = dict(do_sample=False, stop_at_eos=False, attention_mask=mask, use_cache=use_cache, progress=False)
        last = model.generate(tokens, 6, interventions=[ms.Zero("blocks.0.hook_resid_post", pos=-1)], **kw)
        named = model.generate(tokens, 6, interventions=[ms.Zero("blocks.0.hook_resid_post", pos=tokens.shape[1] - 1)],
                               **kw)
        assert np.array_equal(np.asarray(last), np.asarray(named))


def test_a_state_resumed_by_fewer_rows(models):
    """A run of fewer rows than its state appends to the state's first rows and leaves
    the others as they were: resuming them later gives the whole run's logits."""
    _, model = models
    core = model._core
    tokens = np.random.default_rng(6).integers(0, VOCAB, (3, 9)).astype(np.int32)
    whole = model.run(tokens, logits="all").logits
    _, state = core.run(tokens[:, :6], None, [], np.full((3, 1), 5, np.int32), np.empty((3, 1, VOCAB), np.float32),
                        None, record=True, capacity=9)
    out = np.empty((2, 2, VOCAB), np.float32)
    core.run(tokens[:2, :8], None, [], np.array([[6, 7]] * 2, np.int32), out, None, state=state,
             start_pos=np.full(2, 6, np.int32), record=True)
    np.testing.assert_allclose(out, whole[:2, 6:8], rtol=0, atol=2e-5)
    # rows 0-1 now hold 8 tokens, row 2 still 6: each resumes where it is
    out = np.empty((3, 1, VOCAB), np.float32)
    core.run(tokens[:, :9], None, [], np.full((3, 1), 8, np.int32), out, None, state=state,
             start_pos=np.array([8, 8, 6], np.int32))
    np.testing.assert_allclose(out[:, 0], whole[:, 8], rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="resumes after 8 real tokens, but its base row has 6"):
        core.run(tokens[:, :9], None, [], np.full((3, 1), 8, np.int32), out, None, state=state,
                 start_pos=np.array([8, 8, 8], np.int32))


def test_the_cache_with_rows_ending_at_eos(models):
    _, model = models
    tokens, mask = padded(PROMPTS, "left")
    plain = rows_of(model.generate(tokens, 10, do_sample=False, attention_mask=mask, stop_at_eos=False,
                                   progress=False))
    eos = plain[1][len(PROMPTS[1]) + 1]  # row 1 ends early, the other rows go on after it
    kw = dict(do_sample=False, attention_mask=mask, eos_token_id=eos, progress=False)
    cached, rerun = model.generate(tokens, 10, **kw), model.generate(tokens, 10, use_cache=False, **kw)
    assert rows_of(cached) == rows_of(rerun)
    lengths = [len(r) - len(p) for r, p in zip(rows_of(cached), PROMPTS)]
    assert lengths[1] <= 2 and max(lengths) > lengths[1]  # row 1 ended while another went on


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resuming_a_state_gives_the_whole_run(models, family):
    """A state recorded with room for more tokens, resumed by a run of several new
    tokens per row (attention in groups of four queries), then appended to: the logits
    are those of one run of the whole sequence."""
    model = models[1] if family == "gpt2" else ms.Model.from_config(LLAMA, seed=3)
    tokens = np.random.default_rng(4).integers(0, VOCAB, (3, 17)).astype(np.int32)
    mask = np.ones(tokens.shape, np.int32)
    mask[1, :4] = 0  # a left-padded row
    whole = model.run(tokens, attention_mask=mask, logits="all").logits
    core, V = model._core, VOCAB
    last = np.array([[5], [5], [5]], np.int32)
    _, state = core.run(tokens[:, :6], mask[:, :6], [], last, np.empty((3, 1, V), np.float32), None,
                        record=True, capacity=17)
    at = np.arange(6, 12, dtype=np.int32)[None].repeat(3, axis=0)
    out = np.empty((3, 6, V), np.float32)
    core.run(tokens[:, :12], mask[:, :12], [], at, out, None, state=state, start_pos=np.full(3, 6, np.int32),
             record=True)
    np.testing.assert_allclose(out, whole[:, 6:12], rtol=0, atol=2e-5)
    at = np.arange(12, 17, dtype=np.int32)[None].repeat(3, axis=0)
    out = np.empty((3, 5, V), np.float32)
    core.run(tokens, mask, [], at, out, None, state=state, start_pos=np.full(3, 12, np.int32))
    np.testing.assert_allclose(out, whole[:, 12:], rtol=0, atol=2e-5)


def test_a_recorded_state_is_checked(models):
    _, model = models
    core = model._core
    tokens = np.array([PROMPTS[0]], np.int32)
    logits = np.empty((1, 1, VOCAB), np.float32)
    last = np.array([[len(PROMPTS[0]) - 1]], np.int32)
    _, state = core.run(tokens, None, [], last, logits, None, record=True, capacity=6)
    grown = np.array([PROMPTS[0] + [4]], np.int32)
    at_end = np.array([[len(PROMPTS[0])]], np.int32)
    core.run(grown, None, [], at_end, logits, None, state=state, start_pos=np.array([len(PROMPTS[0])], np.int32))
    # appending: the state is full after one more token
    _, same = core.run(grown, None, [], at_end, logits, None, state=state, start_pos=np.array([5], np.int32),
                       record=True)
    assert same is state
    again = np.array([PROMPTS[0] + [4, 4]], np.int32)
    with pytest.raises(ValueError, match="row 0 has 7 real tokens, more than the 6 the state has room for"):
        core.run(again, None, [], np.array([[6]], np.int32), logits, None, state=state,
                 start_pos=np.array([6], np.int32), record=True)
    with pytest.raises(ValueError, match="record_capacity: row 0 has 7 real tokens, more than 6"):
        core.run(again, None, [], np.array([[6]], np.int32), logits, None, record=True, capacity=6)
    with pytest.raises(ValueError, match=r"record_capacity: -1 out of range \[0, 40\]"):
        core.run(tokens, None, [], last, logits, None, record=True, capacity=-1)
    with pytest.raises(ValueError, match="capacity: only for a run that records"):
        core.run(tokens, None, [], last, logits, None, capacity=8)
    _, packed = core.run(tokens, None, [], last, logits, None, record=True)  # no room: cannot be appended to
    with pytest.raises(ValueError, match="appends to a state recorded with room"):
        core.run(grown, None, [], at_end, logits, None, state=packed, start_pos=np.array([5], np.int32),
                 record=True)
    with pytest.raises(ValueError, match="not a state this model recorded"):
        ms.Model.from_config(CONFIG, seed=1)._core.run(grown, None, [], at_end, logits, None, state=state,
                                                       start_pos=np.array([5], np.int32))
    with pytest.raises(ValueError, match="not a state"):
        core.run(grown, None, [], at_end, logits, None, state=object(), start_pos=np.array([5], np.int32))
    with pytest.raises(ValueError, match="recorded for 1 rows, fewer than the run's 2"):
        core.run(np.repeat(grown, 2, axis=0), None, [], np.repeat(at_end, 2, axis=0), np.empty((2, 1, VOCAB), np.float32),
                 None, state=state, start_pos=np.array([5, 5], np.int32))
    with pytest.raises(ValueError, match="start_pos: expected 1 positions"):
        core.run(grown, None, [], at_end, logits, None, state=state, start_pos=np.array([5, 5], np.int32))
    with pytest.raises(ValueError, match="needed with a state"):
        core.run(grown, None, [], at_end, logits, None, state=state)
    with pytest.raises(ValueError, match="only with a state"):
        core.run(grown, None, [], at_end, logits, None, start_pos=np.array([5], np.int32))
    # a row resuming after more tokens than its base row has would read past them
    longer = np.array([PROMPTS[0] + [4, 4, 4]], np.int32)
    with pytest.raises(ValueError, match="resumes after 7 real tokens, but its base row has 6"):
        core.run(longer, None, [], np.array([[7]], np.int32), logits, None, state=state,
                 start_pos=np.array([7], np.int32))
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(tokens, 2, use_cache=1, progress=False)


def test_bad_input(models):
    _, model = models
    tokens = np.array([PROMPTS[0]])
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate(tokens, bad, progress=False)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.generate(tokens, 2, temperature=bad, progress=False)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="top_k"):
            model.generate(tokens, 2, top_k=bad, progress=False)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            model.generate(tokens, 2, top_p=bad, progress=False)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(tokens, 2, eos_token_id=VOCAB, progress=False)
    with pytest.raises(ValueError, match="exceed the model's 40 positions"):
        model.generate(tokens, 36, progress=False)
    with pytest.raises(ValueError, match="no real token"):
        model.generate(tokens, 2, attention_mask=np.zeros(tokens.shape, np.int32), progress=False)
    with pytest.raises(ValueError, match="attention_mask: shape"):
        model.generate(tokens, 2, attention_mask=np.ones((1, 3), np.int32), progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        model.generate(tokens.astype(np.float32), 2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        model.generate(tokens, 2, interventions=[ms.Set("blocks.0.hook_resid_post", np.nan)], progress=False)
    # a patch from another run acts on the prompt, where right-padded rows put new tokens
    right, right_mask = padded(PROMPTS, "right")
    cache = model.run(right, attention_mask=right_mask, cache="blocks.1.hook_resid_pre")
    for patch in (ms.Patch("blocks.1.hook_resid_pre", cache, pos=0),
                  ms.Patch("blocks.1.hook_resid_pre", ms.Source(right, right_mask), pos=0)):
        with pytest.raises(ValueError, match="pad the prompts on the left"):
            model.generate(right, 2, attention_mask=right_mask, interventions=[patch], progress=False)
    with pytest.raises(ValueError, match=r"source: 'blocks.1.hook_resid_pre' has shape \[3, 9, 32\], this run "
                                         r"needs \[1, 5, 32\]"):
        model.generate(tokens, 2, interventions=[ms.Patch("blocks.1.hook_resid_pre", cache)], progress=False)
    # hooks: a dict of callables, each returning the shape it was given (or None)
    with pytest.raises(TypeError, match="hooks: expected a dict"):
        model.generate(tokens, 2, hooks=[lambda v, s: v], progress=False)
    with pytest.raises(TypeError, match="is not callable"):
        model.generate(tokens, 2, hooks={"blocks.0.hook_resid_post": 3}, progress=False)
    with pytest.raises(ValueError, match="matches no site"):
        model.generate(tokens, 2, hooks={"blocks.9.*": lambda v, s: v}, progress=False)
    for use_cache in (True, False):
        steps = []

        def wrong_at_step_2(value, site):
            steps.append(value.shape)
            return value if len(steps) < 2 else value[:, :0]

        with pytest.raises(ValueError, match=r"returned shape \[1, 0, 32\], expected \[1, 1, 32\]" if use_cache
                           else r"returned shape \[1, 0, 32\], expected \[1, 6, 32\]"):
            model.generate(tokens, 4, hooks={"blocks.0.hook_resid_post": wrong_at_step_2}, use_cache=use_cache,
                           progress=False)

        def raises(value, site):
            raise KeyError("from the hook")

        with pytest.raises(KeyError, match="from the hook"):
            model.generate(tokens, 2, hooks={"blocks.0.hook_resid_post": raises}, use_cache=use_cache,
                           progress=False)
    with pytest.raises(ValueError, match="NaN"):
        model.generate(tokens, 2, hooks={"blocks.0.hook_resid_post": lambda v, s: v * np.nan}, progress=False)
    # greedy ignores the sampling arguments, as HF does
    assert model.generate(tokens, 2, do_sample=False, temperature=0, progress=False).shape == (1, 7)
