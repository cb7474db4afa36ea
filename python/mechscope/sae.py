"""Sparse autoencoders (SAEs) and transcoders at a site of a model: their features on any text, what
removing features does, how much of the model a spliced-in SAE keeps, and each
feature's attribution to a metric from one backward pass.

    sae = ms.sae.SAE.load("path/to/sae")              # a SAELens folder: cfg.json + sae_weights.safetensors
    f = ms.sae.features(model, tokens, sae)           # [batch, pos, d_sae]
    model.run(tokens, interventions=[ms.sae.ablate(model, tokens, sae, [12, 40])])
    ms.sae.reconstruction_loss(model, tokens, sae)    # cross-entropy clean / spliced / zero-ablated
    a = ms.sae.attribution(model, tokens, sae, metric)  # [batch, pos, d_sae]
    e = ms.sae.feature_attribution(model, tokens, sae, later_sae, 12)  # ... to a later SAE's feature 12
    top = ms.sae.top_activations(model, tokens, sae, k=10)  # each feature's most active tokens
    top.examples(model, tokens, feature=7)            # ... as text, the token marked
    ms.sae.logit_effects(model, sae).table(model, 7)  # the tokens feature 7 promotes and suppresses
    model.run(tokens, hooks=ms.sae.edit(sae, clamp={7: 5.0}))  # features edited as the run goes
    x = ms.extract(model, texts, site, positions="all")[site]  # activations to train one on
    sae = ms.sae.train(x, d_sae=512, site=site, k=16)   # TopK (or l1=... for ReLU + L1)

An SAE reads the site's value x (per token; a site with heads, such as
``blocks.L.attn.hook_z``, flattened to heads x d_head) and computes

    pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    features = ReLU(pre)                                  architecture "standard"
               ReLU(pre) where pre > threshold, else 0    "jumprelu" (a threshold per feature)
               ReLU(pre) at the k largest pre, else 0     "topk"
               (pre > 0) * ReLU(magnitude path's pre)     "gated" (see SAE)
    reconstruction = features @ W_dec + b_dec

(with SAELens's normalize_activations "constant_norm_rescale" or "layer_norm", x is
normalized per token first and the reconstruction mapped back; see SAE)

as SAELens defines them, with its names and shapes (W_enc [d_in, d_sae], W_dec
[d_sae, d_in]). ``ablate`` removes features' decoded parts from the site and keeps the
SAE's error (x minus its reconstruction), so only the removed features change; ``splice``
replaces the site by the reconstruction, error and all. ``attribution`` is attribution
patching on the features (as in sparse feature circuits, Marks et al. 2024): the change
of the metric when feature i at position p is removed, estimated to first order as
-features[p, i] * (W_dec[i] . d metric / d x[p]), for every feature and position at once.

A transcoder (SAELens's transcoder, skip_transcoder, jumprelu_transcoder and
jumprelu_skip_transcoder) encodes one site and stands in for another, usually an MLP's
input and output: the same functions take it, reading its input site and writing its
output site (``site_out``), with the gradient at the output in ``attribution``.

The products are NumPy's (one matrix product each); the runs and the gradient are the C
core's.
"""
import json
import numbers
import os

import numpy as np

from ._progress import progress_bar
from . import sites as _sites
from .checkpoint import is_present, read_json_object, read_safetensors
from .interventions import Add, Set, Zero
from .lens import direction_logits
from .metrics import positions

__all__ = ["SAE", "train", "features", "ablate", "splice", "edit", "reconstruction_loss", "attribution",
           "feature_attribution",
           "top_activations", "TopActivations", "logit_effects", "LogitEffects"]

ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
# how an SAE normalizes each token before encoding (SAELens's normalize_activations; the
# reconstruction is mapped back with the same token's numbers)
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# SAELens's transcoder architectures: (how features are computed, has a skip connection)
TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


class SAE:
    """A sparse autoencoder at one site (see the module's docstring for what it computes),
    or a transcoder from one site to another.

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; site: the
    site name it reads (TransformerLens's, as SAELens's hook_name); threshold [d_sae]
    for "jumprelu"; k for "topk"; apply_b_dec_to_input: subtract b_dec from x before
    encoding (an SAE's default, SAELens's; a transcoder cannot).

    A "gated" SAE (Rajamanoharan et al. 2024) has two paths through W_enc: b_enc is the
    gate's bias (SAELens's b_gate), and b_mag, r_mag [d_sae] the magnitude path's,
    features = (pre + b_enc > 0) * ReLU(pre * exp(r_mag) + b_mag), pre = x' @ W_enc.

    normalize_activations (SAELens's): "none"; "constant_norm_rescale", each token
    scaled to norm sqrt(d_in) before encoding and the reconstruction scaled back;
    "layer_norm", each token centred and divided by its standard deviation (+ 1e-5)
    and the reconstruction multiplied by it and the mean added back. A transcoder
    normalizes its input only. rescale_acts_by_decoder_norm (topk only): the
    pre-activations are multiplied by the decoder rows' norms and the features divided
    by them before decoding, as if the decoder's rows had unit norm.

    A transcoder (site_out given, SAELens's hook_name_out) reads `site` and stands in
    for `site_out`, often an MLP's input and output (blocks.L.ln2.hook_normalized ->
    blocks.L.hook_mlp_out): W_dec [d_sae, d_out], b_dec [d_out], and with W_skip
    [d_out, d_in] a skip connection, reconstruct(x) = decode(encode(x)) + x @ W_skip.T."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, site, *, architecture="standard", threshold=None, k=None,
                 apply_b_dec_to_input=None, site_out=None, W_skip=None, b_mag=None, r_mag=None,
                 normalize_activations="none", rescale_acts_by_decoder_norm=False):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
        for name, value in (("site", site), ("site_out", site_out)):
            if not isinstance(value, str) and (name == "site" or value is not None):
                raise TypeError(f"{name}: expected a site name, got {type(value).__name__}")
        self.is_transcoder = site_out is not None
        self.W_enc = _matrix(W_enc, "W_enc")
        d_in, d_sae = self.W_enc.shape
        self.W_dec = _matrix(W_dec, "W_dec", None if self.is_transcoder else (d_sae, d_in))
        if self.W_dec.shape[0] != d_sae:
            raise ValueError(f"W_dec: expected [{d_sae}, d_out], got shape {list(self.W_dec.shape)}")
        self.b_enc = _vector(b_enc, "b_enc", d_sae)
        self.b_dec = _vector(b_dec, "b_dec", self.W_dec.shape[1])
        self.site, self.architecture = site, architecture
        self.site_out = site_out if self.is_transcoder else site
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = not self.is_transcoder
        if apply_b_dec_to_input and self.is_transcoder:
            raise ValueError("apply_b_dec_to_input: a transcoder's b_dec is of its output site, not its input")
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.W_skip = None
        if W_skip is not None:
            if not self.is_transcoder:
                raise ValueError("W_skip: only a transcoder (site_out given) has a skip connection")
            self.W_skip = _matrix(W_skip, "W_skip", (self.d_out, d_in))
        self.threshold = self.k = None
        if architecture == "jumprelu":
            if threshold is None:
                raise ValueError("threshold: a jumprelu SAE needs one threshold per feature")
            self.threshold = _vector(threshold, "threshold", d_sae)
        elif threshold is not None:
            raise ValueError(f"threshold: only used by jumprelu SAEs, not {architecture!r}")
        if architecture == "topk":
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d_sae:
                raise ValueError(f"k: a topk SAE needs an int in [1, {d_sae}], got {k!r}")
            self.k = int(k)
        elif k is not None:
            raise ValueError(f"k: only used by topk SAEs, not {architecture!r}")
        self.b_mag = self.r_mag = None
        if architecture == "gated":
            if b_mag is None or r_mag is None:
                raise ValueError("b_mag, r_mag: a gated SAE needs its magnitude path's bias and log-scale per feature")
            self.b_mag, self.r_mag = _vector(b_mag, "b_mag", d_sae), _vector(r_mag, "r_mag", d_sae)
        elif b_mag is not None or r_mag is not None:
            raise ValueError(f"b_mag, r_mag: only used by gated SAEs, not {architecture!r}")
        if normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations: expected one of {', '.join(NORMALIZATIONS)}, got "
                             f"{normalize_activations!r} (fold a dataset-wide scaling factor into the weights: "
                             "SAE.load(..., norm_scaling_factor=...))")
        if normalize_activations == "layer_norm" and d_in < 2:
            raise ValueError("normalize_activations: layer_norm needs d_in >= 2 (a standard deviation)")
        self.normalize_activations = normalize_activations
        if rescale_acts_by_decoder_norm and architecture != "topk":
            raise ValueError(f"rescale_acts_by_decoder_norm: only used by topk SAEs, not {architecture!r}")
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        # what one unit of each feature adds to the SAE's output (before the output is
        # mapped back from the normalized scale): W_dec's rows, or with
        # rescale_acts_by_decoder_norm those rows divided by their norms
        self._W_out = self.W_dec
        if self.rescale_acts_by_decoder_norm:
            norms = np.linalg.norm(self.W_dec.astype(np.float64), axis=1).astype(np.float32)
            if not (norms > 0).all():
                raise ValueError("rescale_acts_by_decoder_norm: W_dec has a row of zeros")
            self._decoder_norms = norms
            self._W_out = self.W_dec / norms[:, None]

    @property
    def d_in(self):
        return self.W_enc.shape[0]

    @property
    def d_sae(self):
        return self.W_enc.shape[1]

    @property
    def d_out(self):
        return self.W_dec.shape[1]

    def __repr__(self):
        extra = f", k={self.k}" if self.k else ""
        if self.normalize_activations != "none":
            extra += f", normalize_activations={self.normalize_activations!r}"
        if self.is_transcoder:
            skip = ", skip" if self.W_skip is not None else ""
            return (f"SAE(transcoder {self.site!r} -> {self.site_out!r}, d_in={self.d_in}, d_sae={self.d_sae}, "
                    f"d_out={self.d_out}, {self.architecture!r}{extra}{skip})")
        return f"SAE({self.site!r}, d_in={self.d_in}, d_sae={self.d_sae}, {self.architecture!r}{extra})"

    # ---- the maps ----------------------------------------------------------------------

    def encode(self, x):
        """[..., d_in] -> features [..., d_sae] (float32)."""
        x = self._normalized(self._input(x))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc
        if self.architecture == "gated":
            magnitude = np.maximum(pre * np.exp(self.r_mag) + self.b_mag, 0.0)
            return np.where(pre + self.b_enc > 0, magnitude, 0.0).astype(np.float32)
        pre += self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre *= self._decoder_norms
        return _activation(pre, self.architecture, self.threshold, self.k)

    def decode(self, f, x=None):
        """features [..., d_sae] -> reconstruction [..., d_in] (float32; a transcoder's
        [..., d_out], without its skip connection). An SAE that normalizes each token
        maps the reconstruction back with x's numbers, so it needs x [..., d_in] too."""
        f = np.asarray(f, dtype=np.float32)
        if f.ndim < 1 or f.shape[-1] != self.d_sae:
            raise ValueError(f"features: expected shape [..., {self.d_sae}], got {list(f.shape)}")
        scale, shift = self._output_scale(x, f.shape[:-1])
        return (f @ self._W_out + self.b_dec) * scale + shift

    def reconstruct(self, x):
        """[..., d_in] -> decode(encode(x), x) (+ x @ W_skip.T for a skip transcoder)."""
        x = self._input(x)
        out = self.decode(self.encode(x), x)
        if self.W_skip is not None:
            out += x @ self.W_skip.T
        return out

    def _decoded(self, f, x, rows=None):
        """what features f [..., n] (W_dec's `rows`, or all) add to the SAE's output at
        tokens x [..., d_in]: the reconstruction's part that removing them takes away"""
        W = self._W_out if rows is None else self._W_out[rows]
        scale, _ = self._output_scale(x, f.shape[:-1])
        return (f @ W) * scale

    def _normalized(self, x):
        """x [..., d_in] as the encoder reads it (normalize_activations)"""
        if self.normalize_activations == "constant_norm_rescale":
            norm = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-30))
            return x * (np.float32(self.d_in ** 0.5) / norm)
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(-1, keepdims=True)
            return centred / (centred.std(-1, ddof=1, keepdims=True) + np.float32(1e-5))
        return x

    def _output_scale(self, x, lead_shape):
        """(scale, shift) that map the decoder's output back to the site's scale at
        tokens x: (1, 0) unless the SAE normalizes each token (a transcoder never maps
        back: its output is another site)"""
        if self.normalize_activations == "none" or self.is_transcoder:
            return np.float32(1.0), np.float32(0.0)
        if x is None:
            raise ValueError(f"x: this SAE normalizes each token (normalize_activations="
                             f"{self.normalize_activations!r}), so decoding needs the tokens' values: decode(f, x)")
        x = self._input(x)
        if x.shape[:-1] != tuple(lead_shape):
            raise ValueError(f"x: expected shape {list(lead_shape) + [self.d_in]} (the features' tokens), "
                             f"got {list(x.shape)}")
        if self.normalize_activations == "constant_norm_rescale":
            return np.linalg.norm(x, axis=-1, keepdims=True) / np.float32(self.d_in ** 0.5), np.float32(0.0)
        mean = x.mean(-1, keepdims=True)
        return (x - mean).std(-1, ddof=1, keepdims=True), mean

    def _input(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x: expected shape [..., {self.d_in}] (the SAE's d_in), got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("x: contains NaN or infinity")
        return x

    # ---- files -----------------------------------------------------------------------------

    @classmethod
    def load(cls, folder, *, norm_scaling_factor=None):
        """A SAELens folder: cfg.json and sae_weights.safetensors (SAELens 6's config,
        with hook_name under "metadata", or an older one with it at the top).

        An SAE trained with normalize_activations="expected_average_only_in" read
        activations multiplied by one dataset-wide factor, which its folder does not
        hold: give it as norm_scaling_factor and it is folded into the weights (W_enc
        times it, W_dec and b_dec divided by it), as SAELens does."""
        folder = os.fspath(folder)
        cfg_path, weights_path = os.path.join(folder, "cfg.json"), os.path.join(folder, "sae_weights.safetensors")
        for path in (cfg_path, weights_path):
            if not is_present(path, "SAE"):
                raise ValueError(f"SAE {folder}: no {os.path.basename(path)} (a SAELens folder has cfg.json "
                                 "and sae_weights.safetensors)")
        cfg = read_json_object(cfg_path, "SAE")
        meta = cfg.get("metadata") or {}
        site = meta.get("hook_name", cfg.get("hook_name"))
        if not isinstance(site, str):
            raise ValueError(f"SAE {cfg_path}: no hook_name (the site the SAE reads)")
        head = meta.get("hook_head_index", cfg.get("hook_head_index"))
        if head is not None:
            raise ValueError(f"SAE {cfg_path}: hook_head_index {head!r} (an SAE of one head) is not supported")
        norm = cfg.get("normalize_activations", "none") or "none"
        if norm == "expected_average_only_in":
            if norm_scaling_factor is None:
                raise ValueError(f"SAE {cfg_path}: normalize_activations 'expected_average_only_in': the SAE read "
                                 "activations scaled by a dataset-wide factor that its folder does not hold; give it "
                                 "as SAE.load(..., norm_scaling_factor=...)")
        elif norm_scaling_factor is not None:
            raise ValueError(f"norm_scaling_factor: the SAE in {folder} has normalize_activations {norm!r}, "
                             "not 'expected_average_only_in'")
        elif norm not in NORMALIZATIONS:
            raise ValueError(f"SAE {cfg_path}: normalize_activations {norm!r} is not supported "
                             f"(supported: {', '.join(NORMALIZATIONS)}, expected_average_only_in)")
        arch = cfg.get("architecture", "standard")
        site_out, skip = None, False
        if arch in TRANSCODERS:
            arch, skip = TRANSCODERS[arch]
            site_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
            if not isinstance(site_out, str):
                raise ValueError(f"SAE {cfg_path}: a transcoder with no hook_name_out (the site it writes)")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if arch == "standard" and cfg.get("activation_fn_str") == "topk":  # SAELens 5's topk
            arch = "topk"
        if arch not in ARCHITECTURES:
            raise ValueError(f"SAE {cfg_path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        rescale = bool(cfg.get("rescale_acts_by_decoder_norm"))
        if rescale and arch != "topk":
            raise ValueError(f"SAE {cfg_path}: rescale_acts_by_decoder_norm is supported for topk SAEs only")
        if cfg.get("activation_fn_str", "relu") not in ("relu", "topk"):
            raise ValueError(f"SAE {cfg_path}: activation_fn_str {cfg['activation_fn_str']!r} is not supported")
        if norm_scaling_factor is not None:
            if (isinstance(norm_scaling_factor, bool) or not isinstance(norm_scaling_factor, numbers.Real)
                    or not np.isfinite(norm_scaling_factor) or norm_scaling_factor <= 0):
                raise ValueError(f"norm_scaling_factor: expected a positive finite number, got {norm_scaling_factor!r}")
            if site_out is not None:
                raise ValueError(f"norm_scaling_factor: folding a scaling factor into a transcoder ({cfg_path}) "
                                 "is not supported")
        w = read_safetensors(weights_path)
        names = ("W_enc", "b_gate", "b_mag", "r_mag") if arch == "gated" else ("W_enc", "b_enc")
        missing = [n for n in names + ("W_dec", "b_dec") + (("W_skip",) if skip else ()) if n not in w]
        if missing:
            raise ValueError(f"SAE {weights_path}: no tensor {missing[0]}")
        threshold = w.get("threshold")
        if threshold is None and "log_threshold" in w:
            threshold = np.exp(w["log_threshold"])
        W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
        if norm_scaling_factor is not None:
            s = np.float32(norm_scaling_factor)
            W_enc, W_dec, b_dec, norm = W_enc * s, W_dec / s, b_dec / s, "none"
        gated = arch == "gated"
        sae = cls(W_enc, w["b_gate"] if gated else w["b_enc"], W_dec, b_dec, site, architecture=arch,
                  threshold=threshold if arch == "jumprelu" else None,
                  k=cfg.get("k", kwargs.get("k")) if arch == "topk" else None,
                  apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", site_out is None),
                  site_out=site_out, W_skip=w["W_skip"] if skip else None,
                  b_mag=w["b_mag"] if gated else None, r_mag=w["r_mag"] if gated else None,
                  normalize_activations=norm, rescale_acts_by_decoder_norm=rescale)
        for key in ("d_in", "d_sae") + (("d_out",) if site_out is not None else ()):
            if key in cfg and cfg[key] != getattr(sae, key):
                raise ValueError(f"SAE {cfg_path}: {key} is {cfg[key]!r}, but the weights have "
                                 f"{getattr(sae, key)}")
        return sae

    def save(self, folder):
        """Write cfg.json and sae_weights.safetensors as SAELens 6 does (what load reads)."""
        from .train import write_safetensors

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        cfg = {"architecture": self._saelens_architecture(), "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations,
               "reshape_activations": "hook_z" if self.site.endswith("hook_z") else "none",
               # SAELens reads a file without a version of 6 or later in its older layout,
               # hook_name at the top, and would lose the site: this file is in 6's layout
               "metadata": {"sae_lens_version": "6.0.0", "hook_name": self.site, "hook_head_index": None}}
        if self.k is not None:
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        if self.is_transcoder:
            cfg["d_out"] = self.d_out
            cfg["metadata"]["hook_name_out"] = self.site_out
        with open(os.path.join(folder, "cfg.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.architecture == "gated":
            tensors.update(b_gate=self.b_enc, b_mag=self.b_mag, r_mag=self.r_mag)
        else:
            tensors["b_enc"] = self.b_enc
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip
        write_safetensors(os.path.join(folder, "sae_weights.safetensors"), tensors)

    def _saelens_architecture(self):
        if not self.is_transcoder:
            return self.architecture
        for name, (arch, skip) in TRANSCODERS.items():
            if arch == self.architecture and skip == (self.W_skip is not None):
                return name
        raise ValueError(f"save: SAELens has no {self.architecture!r} transcoder")


def _activation(pre, architecture, threshold=None, k=None):
    """An SAE's features from its pre-activations [..., d_sae] (float32), by architecture."""
    if architecture == "standard":
        return np.maximum(pre, 0.0)
    if architecture == "jumprelu":
        return np.where(pre > threshold, np.maximum(pre, 0.0), 0.0).astype(np.float32)
    # topk: the k largest pre-activations of each token, through a ReLU
    flat = pre.reshape(-1, pre.shape[-1])
    top = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    out = np.zeros_like(flat)
    rows = np.arange(flat.shape[0])[:, None]
    out[rows, top] = np.maximum(flat[rows, top], 0.0)
    return out.reshape(pre.shape)


def _matrix(a, name, shape=None):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2 or (shape is not None and a.shape != shape):
        want = f"[{shape[0]}, {shape[1]}]" if shape else "a matrix"
        raise ValueError(f"{name}: expected {want}, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return a


def _vector(a, name, n):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}], got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return a


# ---- on a model ------------------------------------------------------------------------------

def _check(model, sae):
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a mechscope.sae.SAE, got {type(sae).__name__}")
    for site, d, verb in ((sae.site, sae.d_in, "reads"), (sae.site_out, sae.d_out, "writes")):
        code, layer, suffix = _sites.parse(site, model)
        if suffix in _sites.ATTENTION:
            raise ValueError(f"sae: site {site!r} is an attention pattern, not a per-token activation")
        width = int(np.prod(_sites.shape(suffix, model._shape_cfg, 1, 1)[2:]))
        if width != d:
            raise ValueError(f"sae: site {site!r} has {width} numbers per token in this model, "
                             f"but the SAE {verb} {d}")


def _out_shape(model, sae, batch, pos):
    """the shape of the site the SAE writes (its own site, or a transcoder's site_out)"""
    return _sites.shape(_sites.parse(sae.site_out, model)[2], model._shape_cfg, batch, pos)


def _site_values(model, tokens, sae, attention_mask, interventions):
    """(tokens, mask or None, the site's value as the SAE reads it, [batch, pos, d_in])"""
    _check(model, sae)
    tokens, mask = model._check_tokens(tokens, attention_mask)
    x = model.run(tokens, attention_mask=mask, cache=[sae.site], logits=None,
                  interventions=interventions).cache[sae.site]
    return tokens, mask, x.reshape(x.shape[0], x.shape[1], -1)


def _real(mask, shape):
    """1 at real tokens, 0 at padding, broadcastable to [batch, pos, ...]"""
    if mask is None:
        return np.ones(shape[:2] + (1,), np.float32)
    return np.asarray(mask, np.float32)[:, :, None]


def features(model, tokens, sae, *, attention_mask=None, interventions=None):
    """The SAE's features at every token: [batch, pos, d_sae] (0 at padding), from one run
    (with `interventions`, if given)."""
    tokens, mask, x = _site_values(model, tokens, sae, attention_mask, interventions)
    return sae.encode(x) * _real(mask, x.shape)


def ablate(model, tokens, sae, features, *, pos=None, attention_mask=None, interventions=None):
    """An intervention (ms.Add) that removes the given features' decoded parts from the
    site, at every position or at `pos`, and keeps the rest of the site's value (other
    features, b_dec and the SAE's error): x -> x - sum over features i of f_i W_dec[i]
    (scaled back per token if the SAE normalizes its input).

    It holds the values of these tokens' run (with `interventions`): use it in runs of
    the same tokens, after the same interventions."""
    feats = _feature_index(features, sae.d_sae)
    tokens, mask, x = _site_values(model, tokens, sae, attention_mask, interventions)
    f = sae.encode(x)[..., feats]
    delta = -sae._decoded(f, x, feats) * _real(mask, x.shape)
    delta = delta.reshape(_out_shape(model, sae, *x.shape[:2]))
    if pos is not None:
        delta = delta[:, _positions(pos, x.shape[1])]
    return Add(sae.site_out, delta, pos=pos)


def splice(model, tokens, sae, *, attention_mask=None, interventions=None):
    """An intervention (ms.Set) that replaces the site's value by the SAE's
    reconstruction at every token: the model run with the SAE spliced in."""
    tokens, mask, x = _site_values(model, tokens, sae, attention_mask, interventions)
    return Set(sae.site_out, sae.reconstruct(x).reshape(_out_shape(model, sae, *x.shape[:2])))


def edit(sae, *, ablate=(), clamp=None, scale=None):
    """Hooks for ``model.run(tokens, hooks=...)`` and ``model.generate(..., hooks=...)``
    that edit features as the run goes: at every token, the site's value x becomes
    x + (f' - f) @ W_dec, where f are its features and f' the same with `ablate`
    features set to 0, `clamp` ({feature: value}) set to a value and `scale` ({feature:
    factor}) multiplied; the SAE's error and the other features are kept. Unlike
    ``ablate``, which holds the values of one run, the hooks encode whatever reaches the
    site, so they stay exact after any other intervention upstream (at the cost of a
    call into Python at the site).

    Returns {site: hook} for an SAE; for a transcoder, one hook that reads its input
    site and one that adds (f' - f) @ W_dec at its output site. Merge with other hooks
    as a dict: hooks={**ms.sae.edit(...), other_site: fn}."""
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a mechscope.sae.SAE, got {type(sae).__name__}")
    removed = _feature_index(list(ablate), sae.d_sae) if len(ablate) else np.zeros(0, np.int64)
    clamp, scale = dict(clamp or {}), dict(scale or {})
    if not (removed.size or clamp or scale):
        raise ValueError("give the features to edit: ablate=[...], clamp={feature: value} or scale={feature: factor}")
    for name, given in (("clamp", clamp), ("scale", scale)):
        if given:
            _feature_index(list(given), sae.d_sae)
            if not all(np.isfinite(float(v)) for v in given.values()):
                raise ValueError(f"{name}: values must be finite numbers")
    c_idx, c_val = np.array(list(clamp), np.int64), np.array(list(clamp.values()), np.float32)
    s_idx, s_val = np.array(list(scale), np.int64), np.array(list(scale.values()), np.float32)

    def change(x):  # x [batch, pos, d_in] -> what the edit adds to the output [batch, pos, d_out]
        f = sae.encode(x)
        g = f.copy()
        g[..., removed] = 0.0
        g[..., s_idx] *= s_val
        g[..., c_idx] = c_val
        return sae._decoded(g - f, x)

    if not sae.is_transcoder:
        def hook(value, site):
            x = value.reshape(value.shape[0], value.shape[1], -1)
            return (x + change(x)).reshape(value.shape)
        return {sae.site: hook}

    read = {}

    def read_input(value, site):
        read["x"] = value.reshape(value.shape[0], value.shape[1], -1).copy()

    def write_output(value, site):
        if "x" not in read:
            raise ValueError(f"edit: the transcoder's output site {sae.site_out!r} came before its input "
                             f"site {sae.site!r} in the run")
        x = read.pop("x")
        return value + change(x).reshape(value.shape)

    return {sae.site: read_input, sae.site_out: write_output}


def reconstruction_loss(model, tokens, sae, *, attention_mask=None):
    """The mean next-token cross-entropy of the model as it is ("clean"), with the SAE
    spliced in ("spliced") and with the site zero-ablated ("zero"), and the share of
    the zero-ablation's loss the SAE recovers, ("zero" - "spliced") / ("zero" - "clean")
    ("recovered", SAELens's CE loss score). Positions are those whose token and next
    token are both real."""
    tokens, mask = model._check_tokens(tokens, attention_mask)
    ce = {}
    for name, edit in (("clean", None), ("spliced", splice(model, tokens, sae, attention_mask=mask)),
                       ("zero", Zero(sae.site_out))):
        logits = model.run(tokens, attention_mask=mask, interventions=None if edit is None else [edit]).logits
        ce[name] = _cross_entropy(logits, tokens, mask)
    gap = ce["zero"] - ce["clean"]
    ce["recovered"] = (ce["zero"] - ce["spliced"]) / gap if gap != 0 else float("nan")
    return ce


def attribution(model, tokens, sae, metric, *, attention_mask=None, interventions=None):
    """Each feature's estimated effect on `metric` when it is removed at one position,
    [batch, pos, d_sae]: -f[b, p, i] * (W_dec[i] . d metric[b] / d x[b, p]) (W_dec[i]
    scaled back per token if the SAE normalizes its input), from one forward and one
    backward pass (0 at padding). metric: as model.grad's (a metric
    object, or "cross_entropy")."""
    _check(model, sae)
    tokens, mask = model._check_tokens(tokens, attention_mask)
    g = model.grad(tokens, metric, sites=list(dict.fromkeys([sae.site, sae.site_out])), attention_mask=mask,
                   interventions=interventions, progress=False)
    return _removal_estimates(sae, g, mask)[0]


def _removal_estimates(sae, g, mask, copies=1):
    """-f[b, p, i] * (what feature i adds to the output site . the gradient there), from
    a gradient run g that holds sae's input site's values and its output site's gradient,
    its rows `copies` copies of the batch, each with its own gradient: [copies, batch,
    pos, d_sae], 0 at padding."""
    x, dy = g.activations[sae.site], g[sae.site_out]
    B, T = x.shape[0] // copies, x.shape[1]
    x = x[:B].reshape(B, T, -1)
    f = sae.encode(x)
    scale, _ = sae._output_scale(x, f.shape[:-1])
    return -f * scale * _real(mask, f.shape) * (dy.reshape(copies, B, T, -1) @ sae._W_out.T)


def feature_attribution(model, tokens, sae, target, feature, *, pos=None, of="pre", attention_mask=None,
                        interventions=None, batch_size=None, progress=None):
    """Each feature of `sae` at each position, attributed to a feature of a later SAE (or
    transcoder) `target`: the change of that target feature at position `pos` of each
    row (None: its last real token) when feature i of `sae` is removed at position q,
    estimated to first order as -f[b, q, i] * (W_dec[i] . d target / d x[b, q]).
    feature: one target feature -> [batch, pos, d_sae], or a list of K -> [K, batch,
    pos, d_sae] (0 at padding).

    of="pre": the target feature's pre-activation, the linear part of its encoder,
    (x - b_dec) @ W_enc[:, feature] + b_enc[feature] (a gated SAE's gate), read at
    target's site. of="activation": its activation, whose gradient is the
    pre-activation's times d activation / d pre-activation at that token: 0 where the
    feature is inactive there; where it is active 1 (ReLU, JumpReLU, TopK), the decoder
    row's norm (TopK with rescale_acts_by_decoder_norm) or exp(r_mag) (gated: the
    magnitude path). The gradient at `sae`'s output site comes from a backward pass
    seeded at target's site (model.grad's seeds), which runs only the blocks up to it;
    one pass takes batch_size target features, the batch copied once for each (None: as
    many as keep a pass within about 2048 real tokens; one per feature with
    interventions, which may be shaped for the batch). An edge of a feature circuit,
    with every path between the two sites."""
    _check(model, sae)
    _check(model, target)
    if of not in ("pre", "activation"):
        raise ValueError(f"of: expected 'pre' or 'activation', got {of!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected an integer >= 1 or None, got {batch_size!r}")
    one = np.ndim(feature) == 0
    feats = _feature_index(feature, target.d_sae)
    if target.normalize_activations != "none":
        raise ValueError(f"target: an SAE that normalizes each token (normalize_activations="
                         f"{target.normalize_activations!r}) has no linear pre-activation to differentiate")
    order = {n: i for i, n in enumerate(_sites.all_site_names(model))}
    if order[sae.site_out] > order[target.site]:
        raise ValueError(f"target: it reads {target.site!r}, which comes before {sae.site_out!r}, where `sae` "
                         "writes: its features cannot change the target's")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    B, T = tokens.shape
    at = positions(pos, mask, B, T)
    rows = np.arange(B)
    shape = _sites.shape(_sites.parse(target.site, model)[2], model._shape_cfg, B, T)[2:]
    sites = list(dict.fromkeys([sae.site, sae.site_out]))
    if interventions:
        per_pass = 1
    elif batch_size is None:  # the copies' tokens, about as many as a training step's
        per_pass = max(1, 2048 // int(B * T if mask is None else mask.sum()))
    else:
        per_pass = int(batch_size)
    out = np.empty((len(feats), B, T, sae.d_sae), np.float32)
    with progress_bar(progress, "feature attribution", "target feature", total=len(feats)) as bar:
        for lo in range(0, len(feats), per_pass):
            chunk = feats[lo:lo + per_pass]
            K = len(chunk)
            seed = np.zeros((K, B, T, target.d_in), np.float32)
            seed[:, rows, at] = target.W_enc[:, chunk].T[:, None, :]
            g = model.grad(np.tile(tokens, (K, 1)), seeds={target.site: seed.reshape((K * B, T) + shape)},
                           sites=sites, attention_mask=None if mask is None else np.tile(mask, (K, 1)),
                           interventions=interventions, progress=False)
            out[lo:lo + K] = _removal_estimates(sae, g, mask, copies=K)
            bar.update(K)
    if of == "activation":
        out *= _activation_slopes(model, tokens, mask, target, feats, at, interventions).T[:, :, None, None]
    return out[0] if one else out


def _activation_slopes(model, tokens, mask, target, feats, at, interventions):
    """d activation / d pre-activation of target's features `feats` at each row's
    position `at` (the run with the interventions): [batch, len(feats)], 0 where inactive"""
    x = model.run(tokens, cache=[target.site], attention_mask=mask, logits=None,
                  interventions=interventions).cache[target.site]
    x = x.reshape(x.shape[0], x.shape[1], -1)[np.arange(len(at)), at]
    active = target.encode(x)[:, feats] > 0
    if target.architecture == "gated":
        slope = np.exp(target.r_mag[feats])
    elif target.rescale_acts_by_decoder_norm:
        slope = target._decoder_norms[feats]
    else:
        slope = np.ones(len(feats), np.float32)
    return np.where(active, slope, 0.0).astype(np.float32)


class TopActivations:
    """Each feature's most active tokens in a set of texts (top_activations' result).

    features [F]: the SAE's feature indices, in the order asked.
    values [F, k]: the k largest activations of each feature, largest first (NaN where
        the feature is active at fewer than k tokens).
    rows, pos [F, k]: where each was found (row of the tokens, padded position; -1
        where values is NaN).
    density [F]: the share of real tokens at which the feature is active (> 0).
    """

    def __init__(self, features, values, rows, pos, density):
        self.features, self.values, self.rows, self.pos, self.density = features, values, rows, pos, density

    def __repr__(self):
        return (f"TopActivations({len(self.features)} features, k={self.values.shape[1]}, "
                f"median density {float(np.median(self.density)):.3g})")

    def examples(self, model, tokens, feature, *, window=8, attention_mask=None, mark=("\u00ab", "\u00bb")):
        """The texts around each of a feature's top tokens: [(activation, text)], the
        `window` tokens before the token and up to 3 after it, the token between the
        `mark` pair (a token that is part of a character marks the character: with
        byte-level BPE a character of 4 bytes can need 3 tokens after the one marked).
        tokens (and attention_mask): those top_activations read; feature: an SAE
        feature index among self.features."""
        i = _row_of(self.features, feature)
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window: expected an integer >= 0, got {window!r}")
        ids, mask = model._check_tokens(tokens, attention_mask)
        decode = model._need_tokenizer().decode

        def text(row, positions):
            return decode([int(t) for t in ids[row, positions]])

        out = []
        for value, r, p in zip(self.values[i], self.rows[i], self.pos[i]):
            if r < 0:
                break
            if r >= ids.shape[0] or p >= ids.shape[1]:
                raise ValueError(f"tokens: shape {list(ids.shape)} has no position ({r}, {p}); pass the tokens "
                                 "top_activations read")
            real = np.ones(ids.shape[1], bool) if mask is None else mask[r] != 0
            keep = np.flatnonzero(real)
            at = int(np.searchsorted(keep, p))
            before, after = keep[max(at - window, 0):at], keep[at + 1:at + 4]
            whole = text(r, [*before, p, *after])
            # the token's text is what it adds to the text before it. Compared, not cut at
            # lengths: with byte-level BPE a token can be part of a character, which then
            # shows once the tokens after it complete it (the whole character is marked)
            a = len(os.path.commonprefix([text(r, before), whole]))
            for j in range(len(after) + 1):
                b = len(os.path.commonprefix([text(r, [*before, p, *after[:j]]), whole]))
                if b > a:
                    break
            word = whole[a:max(a, b)]
            space = word[:len(word) - len(word.lstrip())] if word.strip() else ""
            out.append((float(value), whole[:a] + space + mark[0] + word[len(space):] + mark[1] + whole[a + len(word):]))
        return out


def top_activations(model, tokens, sae, *, k=10, features=None, attention_mask=None, ignore_tokens=(),
                    batch_size=32, progress=None):
    """The k tokens at which each feature is most active, over every real token of
    `tokens` ([n, pos] ids or texts; run batch_size rows at a time, so n can be large),
    and how often each feature is active. features: the SAE's feature indices to keep
    (default: all). ignore_tokens: token ids left out of both (e.g. BOS, whose
    activations are often far larger than the rest; the runs still see them). Ties
    are broken by row, then position. Returns TopActivations."""
    _check(model, sae)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    feats = np.arange(sae.d_sae) if features is None else _feature_index(features, sae.d_sae)
    ignore = np.asarray(list(ignore_tokens) if not isinstance(ignore_tokens, numbers.Integral) else [ignore_tokens])
    if ignore.size and (ignore.dtype.kind not in "iu" or ignore.ndim != 1):
        raise ValueError(f"ignore_tokens: expected token ids, got {ignore_tokens!r}")
    tokens, mask = model._check_tokens(tokens, attention_mask)
    n, T = tokens.shape
    F = len(feats)
    # the best k so far, kept as [k, F] (a candidate's row * T + pos identifies it)
    best_v = np.full((k, F), -np.inf, np.float32)
    best_at = np.full((k, F), -1, np.int64)
    active = np.zeros(F, np.int64)
    n_real = 0
    with progress_bar(progress, "top activations", "row", total=n) as bar:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            sub_mask = None if mask is None else mask[lo:hi]
            f = sae.encode(_site_values(model, tokens[lo:hi], sae, sub_mask, None)[2])
            real = np.ones((hi - lo, T), bool) if sub_mask is None else sub_mask != 0
            real &= ~np.isin(tokens[lo:hi], ignore)
            at = (np.arange(lo, hi)[:, None] * T + np.arange(T)[None, :])[real]
            f = f[real][:, feats]  # [tokens, F], real tokens only, in row-major order
            n_real += len(f)
            active += (f > 0).sum(axis=0)
            best_v, best_at = _merge_top(best_v, best_at, f, at)
            bar.update(hi - lo)
    found = np.isfinite(best_v)
    values = np.where(found, best_v, np.nan).T.copy()
    rows = np.where(found, best_at // T, -1).T.copy()
    pos = np.where(found, best_at % T, -1).T.copy()
    density = active / max(n_real, 1)
    return TopActivations(feats, values, rows, pos, density)


class LogitEffects:
    """The tokens each feature promotes and suppresses directly (logit_effects' result).

    features [F]: the SAE's feature indices, in the order asked.
    promoted, promoted_values [F, k]: the k tokens whose logits the feature's decoder row
        raises most (ms.lens.direction_logits), largest first.
    suppressed, suppressed_values [F, k]: the k it lowers most, most negative first.
    """

    def __init__(self, features, promoted, promoted_values, suppressed, suppressed_values):
        self.features, self.promoted, self.promoted_values = features, promoted, promoted_values
        self.suppressed, self.suppressed_values = suppressed, suppressed_values

    def __repr__(self):
        return f"LogitEffects({len(self.features)} features, k={self.promoted.shape[1]})"

    def table(self, model, feature):
        """{"promoted": [(token text, value)], "suppressed": [...]} of one feature."""
        decode = model._need_tokenizer().decode
        i = _row_of(self.features, feature)
        return {name: [(decode([int(t)]), float(v)) for t, v in zip(ids[i], values[i])]
                for name, ids, values in (("promoted", self.promoted, self.promoted_values),
                                          ("suppressed", self.suppressed, self.suppressed_values))}


def logit_effects(model, sae, *, features=None, k=10, batch_size=256):
    """For each feature, the k tokens its decoder row promotes and the k it suppresses
    directly: the row written at the SAE's output site (a transcoder's site_out) and read
    through the final norm's linear part and the unembedding, as
    ``ms.lens.direction_logits`` (an attn.hook_z SAE's row goes through W_O first).
    features: indices (None: all), computed `batch_size` at a time ([batch_size, vocab]
    logits at once). Returns a LogitEffects."""
    _check(model, sae)
    feats = np.arange(sae.d_sae) if features is None else _feature_index(features, sae.d_sae)
    for name, value in (("k", k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if k > model.d_vocab:
        raise ValueError(f"k: the model has {model.d_vocab} tokens, got k={k}")
    F = len(feats)
    out = {name: np.zeros((F, k), dtype) for name, dtype in (("up", np.int64), ("up_v", np.float32),
                                                                ("down", np.int64), ("down_v", np.float32))}
    for start in range(0, F, batch_size):
        rows = feats[start:start + batch_size]
        logits = direction_logits(model, sae._W_out[rows], sae.site_out)  # [n, vocab]
        for key, sign in (("up", -1.0), ("down", 1.0)):
            part = np.argpartition(sign * logits, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(logits, part, 1)
            order = np.argsort(sign * vals, axis=1, kind="stable")
            out[key][start:start + len(rows)] = np.take_along_axis(part, order, 1)
            out[key + "_v"][start:start + len(rows)] = np.take_along_axis(vals, order, 1)
    return LogitEffects(feats, out["up"], out["up_v"], out["down"], out["down_v"])


def _row_of(features, feature):
    """the index of `feature` in a result's features (ValueError if it is not there)"""
    hit = np.flatnonzero(features == feature) if isinstance(feature, numbers.Integral) else []
    if isinstance(feature, bool) or len(hit) == 0:
        raise ValueError(f"feature: {feature!r} is not among these features")
    return int(hit[0])


def _merge_top(best_v, best_at, f, at):
    """The k largest activations > 0 of each feature in best_v [k, F] (found at tokens
    best_at [k, F]; sorted by value, then token; -inf past the last) and in f [n, F]
    (found at tokens at [n], later than all of best_at's), sorted the same way. Only the
    new values above a feature's k-th best are candidates (a tie goes to the earlier
    token, which is already kept), so a batch costs one comparison of f and a sort of
    its few candidates."""
    k, F = best_v.shape
    tok, feat = np.nonzero(f > np.maximum(best_v[-1], 0)[None, :])
    kept_i, kept_j = np.nonzero(np.isfinite(best_v))
    cand_j = np.concatenate([kept_j, feat])
    cand_v = np.concatenate([best_v[kept_i, kept_j], f[tok, feat]])
    cand_at = np.concatenate([best_at[kept_i, kept_j], at[tok]])
    order = np.lexsort((cand_at, -cand_v, cand_j))  # by feature, then value (largest first), then token
    cand_j, cand_v, cand_at = cand_j[order], cand_v[order], cand_at[order]
    rank = np.arange(len(cand_j)) - np.searchsorted(cand_j, np.arange(F))[cand_j]  # place within its feature
    top = rank < k
    new_v = np.full((k, F), -np.inf, np.float32)
    new_at = np.full((k, F), -1, np.int64)
    new_v[rank[top], cand_j[top]] = cand_v[top]
    new_at[rank[top], cand_j[top]] = cand_at[top]
    return new_v, new_at


def _feature_index(features, d_sae):
    idx = np.asarray(features)
    if idx.ndim == 0:
        idx = idx[None]
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= d_sae:
        raise ValueError(f"features: expected feature indices in [0, {d_sae}), got {features!r}")
    return idx.astype(np.int64)


def _positions(pos, n_pos):
    idx = np.asarray(pos)
    if idx.ndim == 0:
        idx = idx[None]
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < -n_pos or idx.max() >= n_pos:
        raise ValueError(f"pos: expected positions in [0, {n_pos}), got {pos!r}")
    return idx % n_pos


def _cross_entropy(logits, tokens, mask):
    """mean -log p(next token) over positions whose token and next token are real;
    one row at a time in float32 (the log-sum-exp after subtracting the row's maximum,
    summed in float64), so that a large vocabulary needs no float64 copy of the logits"""
    tokens = np.asarray(tokens)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        if mask is None:
            keep = np.arange(logits.shape[1] - 1)
        else:
            keep = np.flatnonzero((mask[b, :-1] == 1) & (mask[b, 1:] == 1))
        if keep.size == 0:
            continue
        rows = logits[b, keep]
        top = rows.max(1, keepdims=True)
        lse = np.log(np.exp(rows - top).sum(1, dtype=np.float64)) + top[:, 0]
        total += float((lse - rows[np.arange(keep.size), tokens[b, keep + 1]]).sum())
        count += keep.size
    if count == 0:
        raise ValueError("tokens: no position has a real token and a real next token")
    return total / count


from .sae_training import train  # noqa: E402  (ms.sae.train; it builds SAEs of this module)
