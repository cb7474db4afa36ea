"""Plots of patching sweeps, causal traces, attributions and attention patterns
(matplotlib, imported when first used).

    grid = ms.patching.resid_pre(model, corrupted, clean.cache, metric)
    fig = ms.plot.heatmap(grid, tokens=model.to_str_tokens(corrupted[0]))
    fig.savefig("resid_pre.png")

    fig = ms.plot.trace(ms.tracing.trace(model, prompt, subject="Tom Baker"))

    attrs, labels = ms.lens.logit_attribution(model, tokens, answer, incorrect, return_labels=True)
    fig = ms.plot.components(attrs, labels)

    run = model.run(tokens, cache="blocks.1.attn.hook_pattern")
    fig = ms.plot.attention(run.cache["blocks.1.attn.hook_pattern"][0], tokens=model.to_str_tokens(tokens[0]))

    fig = ms.plot.composition(ms.weights.composition_scores(model, "K"))
"""
import numpy as np

__all__ = ["attention", "components", "composition", "heatmap", "trace"]

# the axes of each sweep's result, in TransformerLens's order
LAYOUTS = {
    "layer pos": "resid_pre, resid_mid, attn_out, mlp_out",
    "layer head": "attn_head_*_all_pos",
    "layer pos head": "attn_head_*_by_pos",
    "layer head pos": "attn_head_pattern_by_pos",
    "layer head dest src": "attn_head_pattern_dest_src_pos",
    "type layer pos": "block_every",
    "type layer head": "attn_head_all_pos_every",
    "type layer pos head": "attn_head_by_pos_every",
}
_TYPE_NAMES = {3: ["resid_pre", "attn_out", "mlp_out"], 5: ["output", "query", "key", "value", "pattern"]}


def _pyplot():
    try:
        import matplotlib.pyplot as plt  # picks a non-interactive backend where there is no display
    except ImportError:
        raise ImportError("mechscope.plot needs matplotlib: pip install matplotlib") from None
    return plt


def _infer_layout(values, tokens):
    """The layout whose axes fit the shape (position axes as long as the tokens,
    patch types 3 or 5), preferring those that use the tokens; an error if several fit."""
    n_tok = len(tokens) if tokens is not None else None
    fits = []
    for layout in LAYOUTS:
        axes = layout.split()
        if len(axes) != values.ndim:
            continue
        ok = True
        for name, size in zip(axes, values.shape):
            if name in ("pos", "dest", "src") and size != n_tok:
                ok = False
            if name == "type" and size not in _TYPE_NAMES:
                ok = False
        if ok:
            fits.append((sum(a in ("pos", "dest", "src") for a in axes), layout))
    best = [layout for n, layout in fits if n == max(n for n, _ in fits)] if fits else []
    if len(best) != 1:
        raise ValueError(f"layout: cannot tell the axes of a result of shape {list(values.shape)} "
                         f"({' or '.join(repr(b) for b in best) if best else 'no layout fits'}); "
                         f"pass tokens= or layout= one of {sorted(LAYOUTS)}")
    return best[0]


def _panels(values, layout, tokens):
    """-> list of (title, 2-D array [rows, cols], row label, col label, col tick labels)."""
    axes = layout.split()
    pos_labels = [f"{t}|{i}" for i, t in enumerate(tokens)] if tokens is not None else None
    if axes == ["layer", "pos"]:
        return [("", values, "layer", "position", pos_labels)]
    if axes == ["layer", "head"]:
        return [("", values, "layer", "head", None)]
    if axes == ["layer", "pos", "head"]:
        return [(f"head {h}", values[:, :, h], "layer", "position", pos_labels) for h in range(values.shape[2])]
    if axes == ["layer", "head", "pos"]:
        return [(f"head {h}", values[:, h, :], "layer", "destination", pos_labels) for h in range(values.shape[1])]
    if axes == ["layer", "head", "dest", "src"]:
        return [(f"layer {l} head {h}", values[l, h], "destination", "source", pos_labels)
                for l in range(values.shape[0]) for h in range(values.shape[1])]
    if axes[0] == "type":
        names = _TYPE_NAMES.get(values.shape[0], [f"type {i}" for i in range(values.shape[0])])
        out = []
        for i, name in enumerate(names):
            for title, v, rl, cl, ticks in _panels(values[i], " ".join(axes[1:]), tokens):
                out.append((f"{name} {title}".strip(), v, rl, cl, ticks))
        return out
    raise ValueError(f"layout: unknown {layout!r}; expected one of {sorted(LAYOUTS)}")


def _draw(ax, panel, vmin, vmax, cmap):
    title, v, row_label, col_label, ticks = panel
    image = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_ylabel(row_label)
    ax.set_xlabel(col_label)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_yticks(range(v.shape[0]))
    if ticks is not None and len(ticks) == v.shape[1]:
        ax.set_xticks(range(v.shape[1]))
        ax.set_xticklabels(ticks, rotation=90, fontsize=7)
    if row_label == "destination" and ticks is not None and len(ticks) == v.shape[0]:
        ax.set_yticklabels(ticks, fontsize=7)
    return image


def heatmap(values, tokens=None, layout=None, title=None, cmap="RdBu", center=0.0, ncols=None,
            colorbar_label="metric", ax=None):
    """Heatmap of a sweep's result: layers down, positions (labelled with the tokens)
    or heads across; one panel per head or per patch type where the result has them.

    values: any array of mechscope.patching (or TransformerLens's patching).
    tokens: the token strings of the corrupted prompt (model.to_str_tokens(tokens[0])).
    layout: the names of the axes (see mechscope.plot.LAYOUTS), inferred if None.
    center: the value the diverging colour map puts at white (None: no centring).
    ax: a matplotlib Axes to draw into (results with one panel only).
    Returns the matplotlib Figure.
    """
    values = np.asarray(values, dtype=np.float64)
    if tokens is not None:
        tokens = [str(t) for t in tokens]
    layout = layout or _infer_layout(values, tokens)
    panels = _panels(values, layout, tokens)
    finite = values[np.isfinite(values)]
    if center is None or finite.size == 0:
        vmin, vmax = (finite.min(), finite.max()) if finite.size else (0, 1)
    else:
        span = max(np.abs(finite - center).max(), 1e-12)
        vmin, vmax = center - span, center + span
    return _figure(panels, vmin, vmax, cmap, ncols, colorbar_label, title, ax, f"{layout!r} result")


def attention(pattern, tokens=None, heads=None, title=None, cmap="Blues", ncols=None, ax=None):
    """Attention patterns, one panel per head: destination (query) positions down,
    source (key) positions across, labelled with the tokens; 0 white, 1 darkest.

    pattern: one row's pattern [heads, dest, src] (``run.cache["blocks.L.attn.hook_pattern"][row]``)
        or one head's [dest, src].
    tokens: the row's token strings (model.to_str_tokens(tokens[row])).
    heads: the heads to draw (default all).
    ax: a matplotlib Axes to draw into (one head only).
    Returns the matplotlib Figure.
    """
    values = np.asarray(pattern, dtype=np.float64)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"pattern: expected [heads, dest, src] or [dest, src] with dest == src, "
                         f"got shape {list(np.shape(pattern))}")
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if len(tokens) != values.shape[1]:
            raise ValueError(f"tokens: {len(tokens)} tokens for a pattern over {values.shape[1]} positions")
    heads = range(values.shape[0]) if heads is None else [int(h) for h in heads]
    for h in heads:
        if not 0 <= h < values.shape[0]:
            raise ValueError(f"heads: {h} out of range [0, {values.shape[0]})")
    ticks = [f"{t}|{i}" for i, t in enumerate(tokens)] if tokens is not None else None
    panels = [(f"head {h}", values[h], "destination", "source", ticks) for h in heads]
    return _figure(panels, 0.0, 1.0, cmap, ncols, "attention", title, ax, "plot of these heads")


def composition(scores, title=None, cmap="Blues", ax=None):
    """Composition scores between heads (mechscope.weights.composition_scores,
    [layer, head, layer, head]) as one map: the writing head L{l}H{h} down, the
    reading head across, both in layer order. Returns the matplotlib Figure."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4 or scores.shape[:2] != scores.shape[2:]:
        raise ValueError(f"scores: expected [layer, head, layer, head], got shape {list(scores.shape)}")
    L, H = scores.shape[:2]
    labels = [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
    flat = scores.reshape(L * H, L * H)
    finite = flat[np.isfinite(flat)]
    vmax = max(float(finite.max()), 1e-12) if finite.size else 1.0
    panel = ("", flat, "writing head", "reading head", labels)
    fig = _figure([panel], 0.0, vmax, cmap, 1, "composition score", title, ax, "composition map")
    target = ax if ax is not None else fig.axes[0]
    target.set_yticks(range(L * H))
    target.set_yticklabels(labels, fontsize=7)
    return fig


def _figure(panels, vmin, vmax, cmap, ncols, colorbar_label, title, ax, what):
    """Panels drawn side by side with one colour bar (or into ``ax`` if there is one panel)."""
    plt = _pyplot()
    if ax is not None:
        if len(panels) != 1:
            raise ValueError(f"ax: the {what} has {len(panels)} panels; leave ax=None")
        image = _draw(ax, panels[0], vmin, vmax, cmap)
        if title:
            ax.set_title(title, fontsize=10)
        ax.figure.colorbar(image, ax=ax, shrink=0.8, label=colorbar_label)
        return ax.figure
    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = (n + ncols - 1) // ncols
    cols = panels[0][1].shape[1]
    width = max(4.0, min(16.0, 1.0 + 0.45 * cols * ncols))
    height = 0.5 + 2.6 * nrows + 0.12 * panels[0][1].shape[0] * nrows
    fig, axs = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, constrained_layout=True)
    image = None
    for panel_ax, panel in zip(axs.flat, panels):
        image = _draw(panel_ax, panel, vmin, vmax, cmap)
    for panel_ax in list(axs.flat)[n:]:
        panel_ax.axis("off")
    fig.colorbar(image, ax=axs, shrink=0.8, label=colorbar_label)
    if title:
        fig.suptitle(title)
    return fig


def trace(result, title=None, ax=None):
    """ROME's causal-tracing plot of a mechscope.tracing.TraceResult: tokens down
    (subject tokens marked *), layers across, the probability of the answer with
    that state restored."""
    plt = _pyplot()
    colors = {"": "Purples", "mlp": "Greens", "attn": "Reds"}
    scores = np.asarray(result.scores)
    b, e = result.subject_range
    labels = result.str_tokens or [str(int(t)) for t in result.tokens]
    labels = [f"{t}*" if b <= i < e else t for i, t in enumerate(labels)]
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.5 + 0.2 * scores.shape[1], 1.0 + 0.3 * scores.shape[0]),
                               constrained_layout=True)
    else:
        fig = ax.figure
    image = ax.pcolor(scores, cmap=colors.get(result.kind, "Purples"), vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(scores.shape[0]) + 0.5)
    ax.set_yticklabels(labels)
    ax.set_xticks(np.arange(scores.shape[1]) + 0.5)
    ax.set_xticklabels(range(scores.shape[1]))
    what = {"": "single restored layer", "mlp": f"MLP over a window of {result.window}",
            "attn": f"attention over a window of {result.window}"}[result.kind]
    ax.set_xlabel(f"layer ({what})")
    ax.set_title(title or "Impact of restoring the state after corrupted input")
    answer = result.answer_str if result.answer_str is not None else result.answer
    fig.colorbar(image, ax=ax, label=f"p({str(answer).strip()})")
    return fig


def components(values, labels, title=None, top=None, xlabel="logit attribution", ax=None):
    """Bar chart of one value per component (mechscope.lens's results): the mean over
    the batch with its standard error where ``values`` is [components, batch].

    top: show only the ``top`` components of largest mean magnitude, in their order.
    Returns the matplotlib Figure.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise ValueError(f"values: expected [components] or [components, batch], got shape {list(values.shape)}")
    if len(labels) != values.shape[0]:
        raise ValueError(f"labels: {len(labels)} labels for {values.shape[0]} components")
    mean = values if values.ndim == 1 else values.mean(1)
    err = None if values.ndim == 1 or values.shape[1] < 2 else values.std(1, ddof=1) / np.sqrt(values.shape[1])
    keep = np.arange(len(mean))
    if top is not None:
        keep = np.sort(np.argsort(-np.abs(mean), kind="stable")[:top])
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, min(16.0, 1.0 + 0.3 * len(keep))), 3.5), constrained_layout=True)
    else:
        fig = ax.figure
    x = np.arange(len(keep))
    colors = np.where(mean[keep] >= 0, "tab:blue", "tab:red")
    ax.bar(x, mean[keep], yerr=None if err is None else err[keep], color=colors)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([str(labels[i]) for i in keep], rotation=90, fontsize=8)
    ax.set_ylabel(xlabel)
    if title:
        ax.set_title(title)
    return fig
