"""Plot helpers: every sweep layout and a causal trace render to PNG."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOKENS = ["<bos>", "When", "Mary", "and", "John"]


@pytest.fixture(autouse=True)
def close_figures():
    """Each test's figures closed after it, so that they do not pile up in pyplot."""
    yield
    plt.close("all")


@pytest.mark.parametrize("shape, layout, panels", [
    ((3, 5), "layer pos", 1),
    ((3, 4), "layer head", 1),
    ((3, 5, 4), "layer pos head", 4),
    ((3, 4, 5), "layer head pos", 4),  # could be "type layer pos" too: needs layout=
    ((2, 2, 5, 5), "layer head dest src", 4),
    ((3, 3, 5), "type layer pos", 3),  # could be "layer head pos" too
    ((5, 3, 4), "type layer head", 5),
    ((5, 3, 5, 4), "type layer pos head", 20),
])
def test_heatmap_layouts(ms, tmp_path, shape, layout, panels):
    values = np.random.default_rng(0).normal(size=shape)
    tokens = TOKENS if layout != "layer head" and layout != "type layer head" else None
    ambiguous = shape in ((3, 4, 5), (3, 3, 5))
    if ambiguous:
        with pytest.raises(ValueError, match="layout"):
            ms.plot.heatmap(values, tokens=tokens)
    fig = ms.plot.heatmap(values, tokens=tokens, layout=layout if ambiguous else None)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == panels
    # the colour scale is centred on 0 and covers every value
    lo, hi = images[0].images[0].get_clim()
    assert lo == pytest.approx(-hi) and hi >= np.abs(values).max() - 1e-12
    if tokens is not None and "dest" not in layout:
        assert [t.get_text() for t in images[0].get_xticklabels()] == [f"{t}|{i}" for i, t in enumerate(TOKENS)]
    fig.savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000
    # explicit layout gives the same
    assert len([ax for ax in ms.plot.heatmap(values, tokens=tokens, layout=layout).axes if ax.images]) == panels


def test_heatmap_ambiguous_layout(ms):
    with pytest.raises(ValueError, match="layout"):
        ms.plot.heatmap(np.zeros((3, 4, 5, 4)))  # positions, but no tokens to tell them
    with pytest.raises(ValueError, match="layout"):
        ms.plot.heatmap(np.zeros(7))


def test_trace_plot(ms, tmp_path):
    result = ms.tracing.TraceResult(
        scores=np.random.default_rng(1).uniform(size=(5, 3)).astype(np.float32), low_score=0.1,
        high_score=0.9, subject_range=(2, 4), answer=7, kind="mlp", window=10, noise=0.3,
        tokens=np.arange(5), str_tokens=TOKENS, answer_str=" Paris")
    fig = ms.plot.trace(result)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["<bos>", "When", "Mary*", "and*", "John"]
    fig.savefig(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000


def test_components_plot(ms, tmp_path):
    labels = ["embed", "pos_embed", "0_attn_out", "0_mlp_out"]
    values = np.array([[1.0, 2.0], [-0.5, -0.7], [0.1, 0.3], [3.0, 2.5]])
    fig = ms.plot.components(values, labels, top=3, title="attribution")
    fig.savefig(tmp_path / "components.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "pos_embed", "0_mlp_out"]
    assert np.allclose([b.get_height() for b in ax.patches], [1.5, -0.6, 2.75])
    assert (tmp_path / "components.png").stat().st_size > 0
    with pytest.raises(ValueError, match="labels: 3 labels for 4 components"):
        ms.plot.components(values, labels[:3])


def test_attention_plot(ms, tmp_path):
    """One panel per head, tokens on both axes, the colours fixed to [0, 1]; from a run."""
    model = ms.Model.from_config(dict(n_embd=16, n_head=4, n_layer=1, vocab_size=20, n_positions=8), seed=0)
    pattern = model.run(np.arange(5)[None], cache="blocks.0.attn.hook_pattern").cache["blocks.0.attn.hook_pattern"][0]
    fig = ms.plot.attention(pattern, tokens=TOKENS, heads=[0, 3], title="layer 0")
    fig.savefig(tmp_path / "attention.png")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == ["head 0", "head 3"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == [f"{t}|{i}" for i, t in enumerate(TOKENS)]
    image = panels[1].get_images()[0]
    assert image.get_clim() == (0.0, 1.0)
    np.testing.assert_array_equal(image.get_array(), pattern[3])
    fig, ax = plt.subplots()
    assert ms.plot.attention(pattern[2], ax=ax) is fig
    with pytest.raises(ValueError, match="tokens: 4 tokens for a pattern over 5 positions"):
        ms.plot.attention(pattern, tokens=TOKENS[:4])
    with pytest.raises(ValueError, match=r"pattern: expected \[heads, dest, src\]"):
        ms.plot.attention(pattern[:, :, :3])
    with pytest.raises(ValueError, match=r"heads: 4 out of range \[0, 4\)"):
        ms.plot.attention(pattern, heads=[4])
    with pytest.raises(ValueError, match="ax: the plot of these heads has 4 panels"):
        ms.plot.attention(pattern, ax=ax)
