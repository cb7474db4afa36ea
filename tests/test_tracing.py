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
