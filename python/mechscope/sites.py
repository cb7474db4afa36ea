"""Site names (TransformerLens's hook names) and their shapes."""
import fnmatch
import re

from ._runtime import _core

# the core's site codes, in the order a forward pass visits them
SITE_CODES = {name: code for code, name in enumerate(_core.SITES)}
GLOBAL_BEFORE = ("hook_embed", "hook_pos_embed")
GLOBAL_AFTER = ("ln_final.hook_scale", "ln_final.hook_normalized")
PER_BLOCK = tuple(n for n in _core.SITES if n not in GLOBAL_BEFORE + GLOBAL_AFTER)
ATTENTION = ("attn.hook_attn_scores", "attn.hook_pattern")
HEADED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z")
KV_HEADED = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")

# why a site is missing from an architecture (TransformerLens has no such hook there either)
_WHY_ABSENT = {
    "hook_pos_embed": "rotary models have no position embedding",
    "attn.hook_rot_q": "only rotary models rotate queries",
    "attn.hook_rot_k": "only rotary models rotate keys",
    "mlp.hook_pre_linear": "only gated MLPs have an up projection",
    "hook_resid_mid": "parallel attention and MLP blocks have no residual between them",
    "mlp.hook_expert_weights": "only a mixture of experts routes tokens",
    "mlp.hook_pre": "a mixture of experts runs each expert on its own tokens; its sites are "
                    "mlp.hook_expert_weights and hook_mlp_out",
    **{f"{ln}_post.{hook}": "only Gemma 2 and 3, OLMo 2 and 3 and EXAONE 4 norm the attention's and the MLP's "
                            "outputs"
       for ln in ("ln1", "ln2") for hook in ("hook_scale", "hook_normalized")},
    **{f"{ln}.{hook}": "this model (OLMo 2 and 3, EXAONE 4) norms the attention's and the MLP's outputs, "
                       "not their inputs"
       for ln in ("ln1", "ln2") for hook in ("hook_scale", "hook_normalized")},
}


def absent_sites(arch):
    """{site suffix: why} of the sites an architecture does not have."""
    absent = set()
    if arch["rotary_dim"]:
        absent.add("hook_pos_embed")
    else:
        absent.update(("attn.hook_rot_q", "attn.hook_rot_k"))
    if not arch["gated_mlp"]:
        absent.add("mlp.hook_pre_linear")
    if arch.get("n_experts"):
        absent.update(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"))
    else:
        absent.add("mlp.hook_expert_weights")
    if arch["parallel"]:
        absent.add("hook_resid_mid")
    if not arch.get("post_norms"):
        absent.update(f"{ln}_post.{hook}" for ln in ("ln1", "ln2") for hook in ("hook_scale", "hook_normalized"))
    if not arch.get("input_norms", 1):
        absent.update(f"{ln}.{hook}" for ln in ("ln1", "ln2") for hook in ("hook_scale", "hook_normalized"))
    why = dict(_WHY_ABSENT)
    if arch.get("n_experts"):  # one reason for the three MLP sites a mixture lacks
        why["mlp.hook_pre_linear"] = why["mlp.hook_post"] = why["mlp.hook_pre"]
    return {s: why[s] for s in absent}


def _layers_and_absent(model):
    if isinstance(model, int):  # GPT-2's sites
        return model, absent_sites({"rotary_dim": 0, "gated_mlp": 0, "parallel": 0})
    return model.n_layers, model._absent_sites


def all_site_names(model):
    """Every site of a model (or of a GPT-2 model of n layers), in TransformerLens's cache order."""
    n_layers, absent = _layers_and_absent(model)
    names = [s for s in GLOBAL_BEFORE if s not in absent]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{s}" for s in PER_BLOCK if s not in absent]
    return names + list(GLOBAL_AFTER)


def parse(name, model):
    """'blocks.3.attn.hook_z' -> (site code, layer, suffix). ValueError if unknown or
    absent from the model's architecture."""
    if not isinstance(name, str):
        raise TypeError(f"site: expected a site name, got {type(name).__name__}")
    n_layers, absent = _layers_and_absent(model)
    suffix = name if name in GLOBAL_BEFORE else name.split(".", 2)[-1]
    if suffix in absent:
        raise ValueError(f"site {name!r}: this model has no such site ({absent[suffix]})")
    if name in GLOBAL_BEFORE or name in GLOBAL_AFTER:
        return SITE_CODES[name], 0, name
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


def resolve(patterns, model, argument="cache"):
    """Names or glob patterns, or a function name -> bool (TransformerLens's
    names_filter) -> the matching site names, in forward order, no repeats."""
    if patterns is None:
        return []
    if callable(patterns):
        chosen = [n for n in all_site_names(model) if patterns(n)]
        if not chosen:
            raise ValueError(f"{argument}: the function picks no site of this model")
        return chosen
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{argument}: expected a site name or a list of names, "
                        f"got {type(patterns).__name__}") from None
    every = all_site_names(model)
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
            parse(p, model)  # raises with a clear message if unknown
            chosen.add(p)
    return [n for n in every if n in chosen]


def shape(suffix, cfg, batch, pos):
    """The TransformerLens shape of a site's value for a [batch, pos] run."""
    if suffix in ATTENTION:
        return (batch, cfg["n_heads"], pos, pos)
    if suffix in KV_HEADED:
        return (batch, pos, cfg.get("n_kv_heads", cfg["n_heads"]), cfg["d_head"])
    if suffix in HEADED:
        return (batch, pos, cfg["n_heads"], cfg["d_head"])
    if suffix.endswith("hook_scale"):
        return (batch, pos, 1)
    if suffix == "mlp.hook_expert_weights":
        return (batch, pos, cfg["n_experts"])
    if suffix.startswith("mlp.") and suffix != "hook_mlp_out":
        return (batch, pos, cfg["d_mlp"])
    return (batch, pos, cfg["d_model"])


# TransformerLens's shorthands (its utils.get_act_name): other words for a site, and
# the part of the block a site is in
_SHORT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                  "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_PART_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_IN_ATTENTION = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_IN_MLP = ("pre", "post", "mid", "pre_linear")


def act_name(name, layer=None, part=None):
    """A site's full name from TransformerLens's shorthand, as its utils.get_act_name
    reads it: act_name("resid_pre", 3) == "blocks.3.hook_resid_pre", act_name("pattern", 0)
    == "blocks.0.attn.hook_pattern", act_name("normalized", 2, "ln1") ==
    "blocks.2.ln1.hook_normalized", act_name("embed") == "hook_embed",
    act_name("scale") == "ln_final.hook_scale", act_name("k6") == "blocks.6.attn.hook_k".
    A full name is returned as it is."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if ("." in name or name.startswith("hook_")) and layer is None and part is None:
        return name
    packed = re.fullmatch(r"([a-z_]+?)(\d+)([a-z_]*\d*)", name)
    if packed is not None and layer is None:  # "k6", "scale4ln1"
        name, layer, part = packed.group(1), int(packed.group(2)), packed.group(3) or None
    name = _SHORT_ALIASES.get(name, name)
    if name in _IN_ATTENTION:
        part = "attn"
    elif name in _IN_MLP:
        part = "mlp"
    elif part in _PART_ALIASES:
        part = _PART_ALIASES[part]
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{part}." if part else "") + f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = "ln_final." + full
    return full


class Cache(dict):
    """A run's cached sites, {full name: array}, also read by TransformerLens's
    shorthand: cache["resid_pre", 3], cache["pattern", -1], cache["z", 5, "attn"],
    cache["embed"] (see act_name)."""

    def __init__(self, *args, n_layers=None, **kw):
        super().__init__(*args, **kw)
        self.n_layers = n_layers

    def __getitem__(self, key):
        if isinstance(key, str) and dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        if isinstance(key, tuple):
            if not key or len(key) > 3:
                raise KeyError(key)
            name, layer, part = (tuple(key) + (None, None))[:3]
            if isinstance(layer, int) and layer < 0 and self.n_layers is not None:
                layer += self.n_layers  # cache["resid_post", -1]: the last block's
            full = act_name(name, layer, part)
        elif isinstance(key, str):
            full = act_name(key)
        else:
            raise KeyError(key)
        if not dict.__contains__(self, full):
            named = f"{key!r} is {full!r}, which" if full != key else f"{key!r}:"
            raise KeyError(f"{named} this cache does not hold (it holds {len(self)} sites; ask run for it "
                           "with cache=)")
        return dict.__getitem__(self, full)
