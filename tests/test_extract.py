"""mechscope.extract: values equal Model.run's caches in input order (bucketing on and
off, every kind of positions), the early exit changes no value, the folder layout
resumes after an interruption without redoing finished chunks, and bad input is
refused before any work."""
import json
import os

import numpy as np
import pytest

import mechscope as ms

RESID = "blocks.*.hook_resid_post"


@pytest.fixture(scope="module")
def demo():
    return ms.Model.from_pretrained(ms.demo.DEMO_DIR)


@pytest.fixture(scope="module")
def prompts(demo):
    """30 demo prompts cut to lengths 3..15: a ragged dataset."""
    rng = np.random.default_rng(0)
    clean = ms.demo.ioi_prompts(demo, n=30)["clean"]
    return [row[:rng.integers(3, 16)].copy() for row in clean]


def reference(model, prompts, names):
    """Model.run's caches of every prompt, all prompts in one padded batch."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], mask[i, :len(p)] = p, 1
    return model.run(tokens, attention_mask=mask, cache=names, logits=None).cache


def check_against(acts, ref, prompts, expected_positions, atol):
    rows = [(i, int(p)) for i, ps in enumerate(expected_positions) for p in ps]
    assert acts.index.tolist() == [list(r) for r in rows]  # input order
    assert acts.n_prompts == len(prompts)
    for site in acts:
        want = np.stack([ref[site][i, p] for i, p in rows])
        got = np.asarray(acts[site])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=site)


@pytest.mark.parametrize("bucket", [True, False])
def test_values_equal_model_run_in_input_order(demo, prompts, bucket):
    names = ms.sites.resolve([RESID, "blocks.1.attn.hook_z", "hook_embed", "blocks.2.ln2.hook_scale",
                              "blocks.3.mlp.hook_post"], demo.n_layers)
    ref = reference(demo, prompts, names)
    # one batch of all prompts in input order is the reference's own batch: equal to the bit
    acts = ms.extract(demo, prompts, names, positions="all", batch_size=len(prompts), bucket=False)
    check_against(acts, ref, prompts, [range(len(p)) for p in prompts], atol=0)
    # smaller batches (sorted by length or not) round like other matrix sizes: 1e-6 of the scale
    acts = ms.extract(demo, prompts, names, positions="all", batch_size=4, chunk_size=11, bucket=bucket)
    check_against(acts, ref, prompts, [range(len(p)) for p in prompts], atol=1e-6 * 32)
    for site in names:
        assert acts[site].shape[1:] == ref[site].shape[2:]


def test_position_kinds(demo, prompts):
    names = ["blocks.2.hook_resid_post"]
    ref = reference(demo, prompts, names)
    atol = 1e-6 * 32
    last = ms.extract(demo, prompts, names, positions="last", batch_size=8)
    check_against(last, ref, prompts, [[len(p) - 1] for p in prompts], atol)
    assert last[names[0]].shape == (len(prompts), demo.d_model)  # one row per prompt
    ints = ms.extract(demo, prompts, names, positions=[0, -2], batch_size=8)
    check_against(ints, ref, prompts, [[0, len(p) - 2] for p in prompts], atol)
    name_ids = set(demo.tokenizer.ids[n] for n in ms.demo.tasks()["first_names"])

    def names_in(tokens):  # every position holding a first name (none in short prompts)
        return [i for i, t in enumerate(tokens) if int(t) in name_ids]
    picked = ms.extract(demo, prompts, names, positions=names_in, batch_size=8)
    check_against(picked, ref, prompts, [names_in(p) for p in prompts], atol)


def test_texts_and_generators(demo):
    texts = ["When Mary and John went to the store , John gave a book to",
             "Mary Smith lives in", "The home of Mary Smith is"]
    acts = ms.extract(demo, texts, "blocks.3.hook_resid_post", chunk_size=2)
    for i, t in enumerate(texts):
        want = demo.run(t, cache="blocks.3.hook_resid_post", logits=None).cache["blocks.3.hook_resid_post"][0, -1]
        np.testing.assert_allclose(acts["blocks.3.hook_resid_post"][i], want, rtol=0, atol=1e-6 * 32)
    streamed = ms.extract(demo, (t for t in texts), "blocks.3.hook_resid_post", chunk_size=2)
    # the same chunks, hence the same batches: the same values to the bit
    np.testing.assert_array_equal(np.asarray(streamed["blocks.3.hook_resid_post"]),
                                  np.asarray(acts["blocks.3.hook_resid_post"]))


def test_early_exit_changes_no_value(ms_models):
    """A run without logits stops after the deepest cached block; its caches equal those
    of a full run, for any deepest site (embedding only, a middle block, ln_final)."""
    model = ms_models["deep4_eps"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model.d_vocab, (3, 9))
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    full = model.run(tokens, attention_mask=mask, cache=model.site_names, logits="all").cache
    for deepest in (["hook_embed", "hook_pos_embed"], ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_pre"],
                    [f"blocks.{model.n_layers // 2}.hook_resid_mid", "blocks.0.hook_resid_post"],
                    ["ln_final.hook_normalized"]):
        out = model.run(tokens, attention_mask=mask, cache=deepest, logits=None)
        assert out.logits is None
        for name in deepest:
            np.testing.assert_array_equal(out.cache[name], full[name], err_msg=name)


def test_folder_layout_and_dask_view(demo, prompts, tmp_path):
    acts = ms.extract(demo, prompts, RESID, positions="all", batch_size=8, chunk_size=7, out=tmp_path / "x")
    mem = ms.extract(demo, prompts, RESID, positions="all", batch_size=8, chunk_size=7)
    files = sorted(os.listdir(tmp_path / "x"))
    assert files == sorted([f"blocks.{i}.hook_resid_post.npy" for i in range(4)] + ["index.npy", "manifest.json"])
    assert isinstance(acts["blocks.0.hook_resid_post"], np.memmap)
    for site in mem:
        np.testing.assert_array_equal(np.asarray(acts[site]), mem[site])
    again = ms.Activations.open(tmp_path / "x")
    np.testing.assert_array_equal(again.index, mem.index)
    # the same extraction again: nothing to do, the finished folder is returned
    calls = []
    orig = demo.run
    demo.run = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        ms.extract(demo, prompts, RESID, positions="all", batch_size=8, chunk_size=7, out=tmp_path / "x")
    finally:
        del demo.run
    assert calls == []
    lazy = again.dask("blocks.3.hook_resid_post", rows_per_chunk=50)
    np.testing.assert_array_equal(lazy.compute(), mem["blocks.3.hook_resid_post"])


def test_resumed_equals_uninterrupted(demo, prompts, tmp_path):
    whole = ms.extract(demo, prompts, RESID, batch_size=3, chunk_size=8, out=tmp_path / "whole")

    def interrupted():  # Ctrl-C while the third chunk is being read
        for i, p in enumerate(prompts):
            if i == 20:
                raise KeyboardInterrupt
            yield p
    with pytest.raises(KeyboardInterrupt):
        ms.extract(demo, interrupted(), RESID, batch_size=3, chunk_size=8, out=tmp_path / "resumed")
    manifest = json.load(open(tmp_path / "resumed" / "manifest.json"))
    assert sorted(manifest["chunks"]) == ["0", "1"] and not manifest["complete"]
    with pytest.raises(ValueError, match="not finished"):
        ms.Activations.open(tmp_path / "resumed")
    # resuming runs only the prompts of the unfinished chunks (20..29: 4 batches of <= 3)
    batches = []
    orig = demo.run
    demo.run = lambda tokens, **k: batches.append(len(tokens)) or orig(tokens, **k)
    try:
        resumed = ms.extract(demo, prompts, RESID, batch_size=3, chunk_size=8, out=tmp_path / "resumed")
    finally:
        del demo.run
    assert sum(batches) == len(prompts) - 16
    for site in whole:
        np.testing.assert_array_equal(np.asarray(resumed[site]), np.asarray(whole[site]))
    np.testing.assert_array_equal(np.asarray(resumed.index), np.asarray(whole.index))


def test_interrupted_inside_a_chunk_resumes_after_its_last_batch(demo, prompts, tmp_path):
    kw = dict(batch_size=4, chunk_size=16, positions="all")
    whole = ms.extract(demo, prompts, RESID, out=tmp_path / "whole", **kw)
    batches = []
    orig = demo.run

    def run_until_ctrl_c(tokens, **k):  # Ctrl-C during the 7th batch (3rd of chunk 1)
        if len(batches) == 6:
            raise KeyboardInterrupt
        batches.append(len(tokens))
        return orig(tokens, **k)
    demo.run = run_until_ctrl_c
    try:
        with pytest.raises(KeyboardInterrupt):
            ms.extract(demo, prompts, RESID, out=tmp_path / "resumed", **kw)
    finally:
        del demo.run
    manifest = json.load(open(tmp_path / "resumed" / "manifest.json"))
    assert list(manifest["chunks"]) == ["0"] and manifest["partial"]["1"]["batches"] == [0, 1]
    batches.clear()
    demo.run = lambda tokens, **k: batches.append(len(tokens)) or orig(tokens, **k)
    try:
        resumed = ms.extract(demo, prompts, RESID, out=tmp_path / "resumed", **kw)
    finally:
        del demo.run
    # chunk 1 has 14 prompts (batches of 4, 4, 4, 2): its first two batches are not redone
    assert batches == [4, 2]
    for site in whole:
        np.testing.assert_array_equal(np.asarray(resumed[site]), np.asarray(whole[site]))
    # another batch size is another batching: the unfinished chunk is redone whole
    demo.run = run_until_ctrl_c
    batches.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            ms.extract(demo, prompts, RESID, out=tmp_path / "other", **kw)
    finally:
        del demo.run
    batches.clear()
    demo.run = lambda tokens, **k: batches.append(len(tokens)) or orig(tokens, **k)
    try:
        other = ms.extract(demo, prompts, RESID, out=tmp_path / "other", **dict(kw, batch_size=7))
    finally:
        del demo.run
    assert batches == [7, 7]
    for site in whole:
        np.testing.assert_allclose(np.asarray(other[site]), np.asarray(whole[site]), rtol=0, atol=1e-6 * 32)


def test_bad_input_before_work(demo, prompts, tmp_path):
    calls = []
    orig = demo.run
    demo.run = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(ValueError, match="data: empty"):
            ms.extract(demo, [], RESID)
        with pytest.raises(ValueError, match="data: empty"):
            ms.extract(demo, iter(()), RESID)
        with pytest.raises(TypeError, match="data: .*single string"):
            ms.extract(demo, "Mary Smith lives in", RESID)
        with pytest.raises(ValueError, match="unknown site name"):
            ms.extract(demo, prompts, "blocks.0.hook_nonsense")
        with pytest.raises(ValueError, match="layer 9 out of range"):
            ms.extract(demo, prompts, "blocks.9.hook_resid_post")
        with pytest.raises(ValueError, match="matches no site"):
            ms.extract(demo, prompts, "blocks.*.hook_nothing")
        with pytest.raises(ValueError, match="attention site"):
            ms.extract(demo, prompts, "blocks.0.attn.hook_pattern")
        # a callable that picks a position past the end of the last prompt only
        seen = []

        def past_the_end_at_last(tokens):
            seen.append(1)
            return len(tokens) if len(seen) == len(prompts) else 0
        n_last = len(prompts[-1])
        with pytest.raises(ValueError, match=f"positions: the callable returned {n_last} for prompt "
                                             f"{len(prompts) - 1}, which has {n_last} tokens"):
            ms.extract(demo, prompts, RESID, positions=past_the_end_at_last)
        with pytest.raises(ValueError, match="positions: position -16 for prompt 0"):
            ms.extract(demo, prompts, RESID, positions=-16)
        with pytest.raises(ValueError, match="positions"):
            ms.extract(demo, prompts, RESID, positions="first")
        with pytest.raises(ValueError, match="data: prompt 2 has token id 500"):
            ms.extract(demo, prompts[:2] + [np.array([0, 500])] + prompts, RESID)
        with pytest.raises(ValueError, match="batch_size"):
            ms.extract(demo, prompts, RESID, batch_size=0)
        with pytest.raises(TypeError, match="model"):
            ms.extract("gpt2", prompts, RESID)
    finally:
        del demo.run
    assert calls == []
    # a folder with another extraction (other sites, other positions, other data)
    ms.extract(demo, prompts[:5], RESID, out=tmp_path / "a")
    demo.run = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(ValueError, match="holds a different extraction .*sites"):
            ms.extract(demo, prompts[:5], "blocks.0.hook_resid_pre", out=tmp_path / "a")
        with pytest.raises(ValueError, match="holds a different extraction .*positions"):
            ms.extract(demo, prompts[:5], RESID, positions="all", out=tmp_path / "a")
        with pytest.raises(ValueError, match="holds a different extraction .*data"):
            ms.extract(demo, prompts[5:10], RESID, out=tmp_path / "a")
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="not empty"):
            ms.extract(demo, prompts, RESID, out=tmp_path / "b")
    finally:
        del demo.run
    assert calls == []
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    # overwrite=True replaces the other extraction
    acts = ms.extract(demo, prompts[:5], "blocks.0.hook_resid_pre", out=tmp_path / "a", overwrite=True)
    assert acts.sites == ["blocks.0.hook_resid_pre"]


def test_sites_of_other_architectures():
    """extract takes the sites of the model's own architecture: a rotary model's rotated
    queries, a mixture of experts' routing; and refuses what it lacks by name."""
    import mechscope as ms
    from test_architectures import CONFIGS
    from test_experts import MIXTRAL
    prompts = [[1, 2, 3, 4], [5, 6]]
    for family, kw, site in (("llama", CONFIGS["llama_gqa3"][1], "blocks.1.attn.hook_rot_q"),
                             ("mixtral", MIXTRAL[1], "blocks.2.mlp.hook_expert_weights")):
        model = ms.Model.from_config(dict(model_type=family, **kw), seed=1)
        got = ms.extract(model, prompts, site, positions="all")[site]
        want = np.concatenate([model.run([p], cache=site).cache[site][0] for p in prompts])
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="hook_pos_embed.*rotary"):
            ms.extract(model, prompts, "hook_pos_embed")
