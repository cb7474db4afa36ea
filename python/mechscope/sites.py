"""Site names (TransformerLens's hook names) and their shapes."""
import fnmatch

from ._runtime import _core

# the core's site codes, in the order a forward pass visits them
SITE_CODES = {name: code for code, name in enumerate(_core.SITES)}
GLOBAL_BEFORE = ("hook_embed", "hook_pos_embed")
GLOBAL_AFTER = ("ln_final.hook_scale", "ln_final.hook_normalized")
PER_BLOCK = tuple(n for n in _core.SITES if n not in GLOBAL_BEFORE + GLOBAL_AFTER)
ATTENTION = ("attn.hook_attn_scores", "attn.hook_pattern")
HEADED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")


def all_site_names(n_layers):
    """Every site of a model, in TransformerLens's cache order."""
    names = list(GLOBAL_BEFORE)
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{s}" for s in PER_BLOCK]
    return names + list(GLOBAL_AFTER)


def parse(name, n_layers):
    """'blocks.3.attn.hook_z' -> (site code, layer, suffix). ValueError if unknown."""
    if name in GLOBAL_BEFORE or name in GLOBAL_AFTER:
        return SITE_CODES[name], 0, name
    if not isinstance(name, str):
        raise TypeError(f"site: expected a site name, got {type(name).__name__}")
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isascii() and parts[1].isdigit() \
            and parts[2] in PER_BLOCK:
        layer = int(parts[1])
        if parts[1] != str(layer):
            # one spelling per site, so that caches, hooks and interventions agree on names
            raise ValueError(f"site {name!r}: write the layer as {layer} ('blocks.{layer}.{parts[2]}')")
        if layer < n_layers:
            return SITE_CODES[parts[2]], layer, parts[2]
        raise ValueError(f"site {name!r}: layer {layer} out of range, the model has {n_layers} layers")
    raise ValueError(f"site {name!r}: unknown site name (e.g. 'blocks.0.hook_resid_pre', "
                     f"'blocks.0.attn.hook_pattern'; see Model.site_names)")


def resolve(patterns, n_layers, argument="cache"):
    """Names or glob patterns -> the matching site names, in forward order, no repeats."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{argument}: expected a site name or a list of names, "
                        f"got {type(patterns).__name__}") from None
    every = all_site_names(n_layers)
    chosen = set()
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{argument}: site names are strings, got {type(p).__name__}")
        if any(ch in p for ch in "*?["):
            hits = fnmatch.filter(every, p)
            if not hits:
                raise ValueError(f"{argument}: pattern {p!r} matches no site of this model")
            chosen.update(hits)
        else:
            parse(p, n_layers)  # raises with a clear message if unknown
            chosen.add(p)
    return [n for n in every if n in chosen]


def shape(suffix, cfg, batch, pos):
    """The TransformerLens shape of a site's value for a [batch, pos] run."""
    if suffix in ATTENTION:
        return (batch, cfg["n_heads"], pos, pos)
    if suffix in HEADED:
        return (batch, pos, cfg["n_heads"], cfg["d_head"])
    if suffix.endswith("hook_scale"):
        return (batch, pos, 1)
    if suffix.startswith("mlp."):
        return (batch, pos, cfg["d_mlp"])
    return (batch, pos, cfg["d_model"])
