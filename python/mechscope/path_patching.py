"""Path patching: a head's effect along chosen paths only (Wang et al. 2022, the
indirect-object-identification circuit; Goldowsky-Dill et al. 2023).

Activation patching replaces a head's output and lets everything after it change.
Path patching asks how much of that effect travels by one route: from a sender head
straight to the logits (through the residual stream, every later head held at its
value in the unpatched run), or from the sender to the queries, keys or values of
chosen receiver heads. Exposed as ``mechscope.patching.path``.
"""
import numpy as np

from . import metrics as _metrics
from ._progress import progress_bar
from .interventions import Patch, Source, _full_site_value

_INPUTS = ("q", "k", "v")


def path(model, corrupted_tokens, clean_cache, metric, receivers=None, *, freeze_mlps=False, attention_mask=None,
         interventions=None, progress=None):
    """Path patching from every head (the sender) of the corrupted run: [n_layers, n_heads].

    For each sender head, the clean run's output of that head (``hook_z``, every position)
    is written into the corrupted run while every head of a later layer is held at its
    value in the corrupted run (and, with ``freeze_mlps=True``, every MLP from the
    sender's layer on), so that the sender acts only along the paths below. The metric
    is recorded for each sender.

    receivers: None, the path from the sender to the logits (directly through the
        residual stream; MLPs recompute unless frozen). Or a list of (layer, head,
        input) with input "q", "k" or "v": the sender acts only through those inputs of
        those heads. The run with the sender patched and the other heads held gives the
        receivers' inputs; they are written into the corrupted run, whose rest then
        runs freely. Two plans: one run per layer with that layer's senders side by side
        (the batch repeated once per head), then one sweep; with base interventions, one
        pass per sender instead (the held run as a Source). For "k" and "v" the head
        is a key/value head. A sender in the last receiver's layer or after it has no
        such path: its value is the corrupted run's metric.
    clean_cache: the clean run's cache with every ``blocks.L.attn.hook_z``.
    metric: a mechscope.metrics metric or a function of the logits returning a number.
    interventions: applied in every run (the corrupted run whose values hold the
        heads too), as in the other patching functions.
    progress: True, False or None (a bar once the work takes more than a second).

    The denoising direction, as in the other patching functions; noising is the same
    call with clean and corrupted swapped.
    """
    from .patching import sweep  # patching exposes this function: imported when called

    tokens, mask = model._check_tokens(corrupted_tokens, attention_mask)
    L, H = model.n_layers, model.n_heads
    receivers = _check_receivers(model, receivers)
    held_sites = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    if freeze_mlps:
        held_sites += [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    held = model.run(tokens, attention_mask=mask, cache=held_sites, logits=None, interventions=interventions).cache

    def patches_of(layer, head):
        """The sender's clean output, the later heads (and MLPs) held."""
        out = [Patch(f"blocks.{layer}.attn.hook_z", clean_cache, head=head)]
        out += [Patch(f"blocks.{later}.attn.hook_z", held) for later in range(layer + 1, L)]
        if freeze_mlps:
            out += [Patch(f"blocks.{later}.hook_mlp_out", held) for later in range(layer, L)]
        return out

    senders = [(layer, head) for layer in range(L) for head in range(H)]
    if receivers is None:  # one sweep: each sender is one patch of several writes
        values = sweep(model, tokens, [patches_of(*s) for s in senders], metric, attention_mask=mask,
                       interventions=interventions, progress=progress)
        return np.asarray(values, np.float32).reshape(L, H)

    last = max(layer for layer, _, _ in receivers)
    out = np.empty((L, H), np.float32)
    out[last:] = _value(model, tokens, mask, metric, interventions)
    if not interventions:
        out[:last] = _through_receivers(model, tokens, mask, clean_cache, held, metric, receivers, last,
                                        freeze_mlps, progress)
        return out
    # base interventions are written for the batch's own rows: one pass per sender, the
    # held run as a Source of the receivers' run
    with progress_bar(progress, "path patching", "sender", total=last * H) as bar:
        for layer, head in senders:
            if layer >= last:
                break
            source = Source(tokens, mask, list(interventions) + patches_of(layer, head))
            into = [Patch(f"blocks.{r_layer}.attn.hook_{kind}", source, head=r_head)
                    for r_layer, r_head, kind in receivers if r_layer > layer]
            out[layer, head] = _value(model, tokens, mask, metric, list(interventions) + into)
            bar.update(1)
    return out


def _through_receivers(model, tokens, mask, clean_cache, held, metric, receivers, last, freeze_mlps, progress):
    """Path patching through receivers, senders of layers < last: [last, n_heads].

    Two plans: for each layer, one run of its senders side by side (the batch repeated
    once per head, each copy with its own head's clean output and the later heads held),
    caching the receivers' inputs; then one sweep writing each sender's receiver inputs
    into the corrupted run."""
    from .patching import sweep

    L, H = model.n_layers, model.n_heads
    B = tokens.shape[0]
    tiled = np.tile(tokens, (H, 1))
    tiled_mask = None if mask is None else np.tile(mask, (H, 1))
    with progress_bar(progress, "path patching: the senders' runs", "layer", total=last) as bar:
        patches = _sent(model, tiled, tiled_mask, clean_cache, held, receivers, last, freeze_mlps, bar, B)
    values = sweep(model, tokens, patches, metric, attention_mask=mask, progress=progress)
    return np.asarray(values, np.float32).reshape(last, H)


def _sent(model, tiled, tiled_mask, clean_cache, held, receivers, last, freeze_mlps, bar, B):
    """The first plan of _through_receivers: each sender's patch of the receivers' inputs."""
    L, H = model.n_layers, model.n_heads
    patches = []
    for layer in range(last):
        site = f"blocks.{layer}.attn.hook_z"
        # the held value of the layer's heads, with copy h's head h the clean one (the
        # layer's other heads are the corrupted run's anyway: their inputs are unchanged)
        z = np.tile(held[site], (H, 1, 1, 1))
        clean = np.asarray(_full_site_value(clean_cache, site, "clean_cache"), np.float32)
        if clean.shape != held[site].shape:
            raise ValueError(f"clean_cache: {site!r} has shape {list(clean.shape)}, the corrupted run's is "
                             f"{list(held[site].shape)}")
        for h in range(H):
            z[h * B:(h + 1) * B, :, h] = clean[:, :, h]
        writes = [Patch(site, z)]
        writes += [Patch(f"blocks.{k}.attn.hook_z", np.tile(held[f"blocks.{k}.attn.hook_z"], (H, 1, 1, 1)))
                   for k in range(layer + 1, L)]
        if freeze_mlps:
            writes += [Patch(f"blocks.{k}.hook_mlp_out", np.tile(held[f"blocks.{k}.hook_mlp_out"], (H, 1, 1)))
                       for k in range(layer, L)]
        names = sorted({f"blocks.{r}.attn.hook_{kind}" for r, _, kind in receivers if r > layer})
        sent = model.run(tiled, attention_mask=tiled_mask, cache=names, logits=None, interventions=writes).cache
        bar.update(1)
        for h in range(H):
            patches.append([Patch(f"blocks.{r}.attn.hook_{kind}", sent[f"blocks.{r}.attn.hook_{kind}"][h * B:(h + 1) * B],
                                  head=r_head) for r, r_head, kind in receivers if r > layer])
    return patches


def _check_receivers(model, receivers):
    if receivers is None:
        return None
    if isinstance(receivers, tuple) and len(receivers) == 3 and isinstance(receivers[2], str):
        receivers = [receivers]  # one receiver
    checked = []
    for r in receivers:
        if not (isinstance(r, (tuple, list)) and len(r) == 3):
            raise ValueError(f"receivers: expected (layer, head, 'q' | 'k' | 'v') entries, got {r!r}")
        layer, head, kind = r
        if kind not in _INPUTS:
            raise ValueError(f"receivers: the input of a receiver head is 'q', 'k' or 'v', got {kind!r}")
        heads = model.n_heads if kind == "q" else model.n_kv_heads
        for name, value, size in (("layer", layer, model.n_layers), ("head", head, heads)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
                raise ValueError(f"receivers: {name} {value!r} of {r!r} out of range [0, {size})")
        if layer == 0:
            raise ValueError(f"receivers: {r!r} is in layer 0, which no head sends to")
        checked.append((int(layer), int(head), kind))
    if not checked:
        raise ValueError("receivers: empty; None for the path to the logits")
    return checked


def _value(model, tokens, mask, metric, interventions):
    """The metric of one run (the batch mean for the built-in metrics)."""
    if isinstance(metric, _metrics.Metric):
        return metric.evaluate(model, tokens, mask, interventions)
    from .patching import _one_number

    logits = model.run(tokens, attention_mask=mask, logits="all", interventions=interventions).logits
    return _one_number(metric(logits))
