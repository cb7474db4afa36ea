"""Causal tracing against a direct re-implementation of ROME's procedure on the
HuggingFace model (torch forward hooks), and its arguments."""
import numpy as np
import pytest
import torch

from conftest import assert_close, make_hf_model, save_hf

CONFIG = dict(n_embd=32, n_head=4, n_layer=4, vocab_size=53, n_positions=16, activation_function="gelu_new")
PROMPT = np.array([3, 17, 22, 41, 8, 30, 12])
SUBJECT = (1, 4)


@pytest.fixture(scope="module")
def models(ms, tmp_path_factory):
    hf = make_hf_model(CONFIG, seed=31)
    return hf, ms.Model.from_pretrained(save_hf(hf, tmp_path_factory.mktemp("trace") / "m"))


def rome_trace(hf, tokens, subject, noise, kind=None, window=10, samples=10):
    """ROME's calculate_hidden_flow, restated: row 0 clean, rows 1.. noised at the
    subject's token embeddings with RandomState(1) draws (the same for every state);
    restore row 0's state at (token, layer) into the others; score = softmax
    probability of the clean answer at the last position, averaged over rows 1..."""
    b, e = subject
    n_layers, T = hf.config.n_layer, len(tokens)
    inp = torch.as_tensor(np.tile(tokens, (samples + 1, 1)))

    def run(restore):
        handles = []
        prng = np.random.RandomState(1)

        def noise_embed(module, args, output):
            output[1:, b:e] += noise * torch.from_numpy(prng.randn(samples, e - b, output.shape[2]))
            return output
        handles.append(hf.transformer.wte.register_forward_hook(noise_embed))
        for t, module in restore:
            def put_back(module, args, output, t=t):
                h = output[0] if isinstance(output, tuple) else output
                h[1:, t] = h[0, t]
                return output
            handles.append(module.register_forward_hook(put_back))
        try:
            with torch.no_grad():
                logits = hf(inp).logits
        finally:
            for h in handles:
                h.remove()
        return torch.softmax(logits[1:, -1].double(), dim=-1).mean(0)

    with torch.no_grad():
        clean = torch.softmax(hf(inp[:1]).logits[0, -1].double(), dim=-1)
    answer = int(clean.argmax())
    low = float(run([])[answer])
    scores = np.zeros((T, n_layers))
    for t in range(T):
        for layer in range(n_layers):
            if kind is None:
                modules = [hf.transformer.h[layer]]
            else:
                lo, hi = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
                modules = [getattr(hf.transformer.h[l], kind) for l in range(lo, hi)]
            scores[t, layer] = float(run([(t, m) for m in modules])[answer])
    return dict(scores=scores, low_score=low, high_score=float(clean[answer]), answer=answer)


@pytest.mark.parametrize("kind, window", [(None, 10), ("mlp", 10), ("attn", 10), ("mlp", 3)])
def test_same_maps_as_rome(ms, models, kind, window):
    hf, model = models
    noise = 3 * ms.tracing.embedding_std(model, [PROMPT[SUBJECT[0]:SUBJECT[1]], PROMPT[:2]])
    ours = ms.tracing.trace(model, PROMPT, SUBJECT, kind=kind, window=window, noise=noise)
    ref = rome_trace(hf, PROMPT, SUBJECT, noise, kind=kind, window=window)
    assert ours.answer == ref["answer"]
    assert_close(ours.scores, ref["scores"], atol=1e-5, what="scores")
    assert ours.low_score == pytest.approx(ref["low_score"], abs=1e-5)
    assert ours.high_score == pytest.approx(ref["high_score"], abs=1e-5)
    assert ours.subject_range == SUBJECT and ours.kind == (kind or "") and ours.window == window
    # the noise matters and some states bring the answer back: a map, not a constant
    assert ours.high_score - ours.low_score > 1e-3
    assert np.ptp(ours.indirect_effect) > 1e-3
    # tokens before the subject are unaffected by the noise: restoring them changes nothing
    assert_close(ours.scores[:SUBJECT[0]], np.full((SUBJECT[0], 4), ours.low_score), atol=1e-6)


def test_embedding_std_as_rome(ms, models):
    """ROME: torch.cat of the subjects' embeddings, .std() (unbiased)."""
    hf, model = models
    subjects = [[1, 2, 3], [40], [7, 7]]
    with torch.no_grad():
        ref = torch.cat([hf.transformer.wte(torch.tensor(s)) for s in subjects]).std().item()
    assert ms.tracing.embedding_std(model, subjects) == pytest.approx(ref, rel=1e-6)


def test_answer_and_samples(ms, models):
    hf, model = models
    a = ms.tracing.trace(model, PROMPT, SUBJECT, answer=5, samples=3, seed=7, noise=1.0)
    assert a.answer == 5 and a.scores.shape == (7, 4)
    b = ms.tracing.trace(model, PROMPT, SUBJECT, answer=5, samples=3, seed=7, noise=1.0)
    assert_close(a.scores, b.scores, atol=0)  # reproducible from the seed
    c = ms.tracing.trace(model, PROMPT, SUBJECT, answer=5, samples=3, seed=8, noise=1.0)
    assert np.abs(a.scores - c.scores).max() > 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(subject=(3, 3)), "subject"),
    (dict(subject=(5, 9)), "subject"),
    (dict(subject="Paris"), "tokenizer"),
    (dict(kind="resid"), "kind"),
    (dict(window=0), "window"),
    (dict(samples=0), "samples"),
    (dict(answer=53), "answer"),
    (dict(noise=float("nan")), "noise"),
])
def test_bad_arguments(ms, models, kwargs, match):
    _, model = models
    args = dict(subject=SUBJECT)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ms.tracing.trace(model, PROMPT, **args)


def _slow_class_means(ie, b, e):
    """ROME's token classes of one trace, written out: [6, layers], NaN for a class
    the prompt lacks."""
    T, L = ie.shape
    nan = np.full(L, np.nan)
    middle = [ie[t] for t in range(b + 1, e - 1)]
    further = [ie[t] for t in range(e + 1, T - 1)]
    return np.stack([ie[b], np.mean(middle, 0) if middle else nan, ie[e - 1], ie[e] if e < T - 1 else nan,
                     np.mean(further, 0) if further else nan, ie[T - 1]])


def test_average_indirect_effect_is_the_mean_of_traces(ms, models):
    _, model = models
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 53, T) for T in (7, 8, 6, 9, 7)]
    subjects = [(1, 4), (0, 1), (2, 4), (3, 7), (1, 3)]
    top = [int(np.argmax(model.run(p[None], logits="last").logits[0])) for p in prompts]
    answers = list(top)
    answers[2] = (top[2] + 1) % 53  # not what the model predicts: left out, as ROME does
    avg = ms.tracing.average_indirect_effect(model, prompts, subjects, answers, samples=4, n_boot=200)
    assert list(avg.kept) == [0, 1, 3, 4] and avg.rows == list(ms.tracing.TOKEN_CLASSES)
    # the slow way: one trace per fact (ROME's noise scale over the subjects), then means
    noise = 3 * ms.tracing.embedding_std(model, [p[b:e] for p, (b, e) in zip(prompts, subjects)])
    total, count, lows = np.zeros((6, 4)), np.zeros(6), []
    for i in avg.kept:
        r = ms.tracing.trace(model, prompts[i], subjects[i], answers[i], noise=noise, samples=4)
        per = _slow_class_means(r.scores.astype(np.float64) - r.low_score, *subjects[i])
        for c in range(6):
            if np.isfinite(per[c]).all():
                total[c] += per[c]
                count[c] += 1
        lows.append(r.low_score)
    assert_close(avg.aie, total / count[:, None], atol=1e-6, what="aie")
    # one-token and two-token subjects have no middle; prompt 3 has no further tokens
    assert list(avg.counts) == list(count) and count[1] == 2 and count[4] == 3
    assert avg.low_score == pytest.approx(np.mean(lows), abs=1e-7)
    # the AIE is not flat, and the interval brackets it
    assert np.ptp(avg.aie) > 1e-3
    assert (avg.low <= avg.aie + 1e-12).all() and (avg.aie <= avg.high + 1e-12).all()
    assert "AverageTrace" in repr(avg)
    import matplotlib
    matplotlib.use("Agg")
    fig = avg.plot()
    assert len(fig.axes) == 2
    matplotlib.pyplot.close(fig)


def test_average_indirect_effect_by_position_and_its_bootstrap(ms, models):
    from mechscope import mediation as med
    _, model = models
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 53, 6) for _ in range(5)]
    subjects = [(1, 3)] * 5
    for method in ("percentile", "bca"):
        avg = ms.tracing.average_indirect_effect(model, prompts, subjects, by="position", samples=3, noise=1.0,
                                                 kind="mlp", window=3, n_boot=300, boot_seed=7, method=method)
        per = np.stack([ms.tracing.trace(model, p, s, kind="mlp", window=3, noise=1.0, samples=3).indirect_effect
                        for p, s in zip(prompts, subjects)]).astype(np.float64)
        assert_close(avg.aie, per.mean(0), atol=1e-6, what="aie")
        ref = med.weighted_mean_ci(avg.per_prompt.reshape(5, -1).T, n_boot=300, seed=7, method=method)
        assert_close(avg.low, ref["low"].reshape(6, 4), atol=1e-12, what="low")
        assert_close(avg.high, ref["high"].reshape(6, 4), atol=1e-12, what="high")
        assert avg.rows == list(range(6)) and list(avg.kept) == list(range(5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(subjects=[(1, 3)]), "subjects"),
    (dict(by="token"), "by"),
    (dict(by="position", prompts=[PROMPT, PROMPT[:6]]), "position"),
    (dict(answers=[0]), "answers"),
    (dict(answers=[99, 99]), "answers"),
    (dict(correct_only="yes"), "correct_only"),
])
def test_average_indirect_effect_bad_arguments(ms, models, kwargs, match):
    _, model = models
    args = dict(prompts=[PROMPT, PROMPT], subjects=[SUBJECT, SUBJECT])
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ms.tracing.average_indirect_effect(model, **args)


def test_average_indirect_effect_needs_a_correct_fact(ms, models):
    _, model = models
    top = int(np.argmax(model.run(PROMPT[None], logits="last").logits[0]))
    with pytest.raises(ValueError, match="predicts none"):
        ms.tracing.average_indirect_effect(model, [PROMPT], [SUBJECT], [(top + 1) % 53])
