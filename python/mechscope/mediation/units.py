"""Units: the mediators whose effects a study measures.

A unit is a part of one site's value (a site, a head, neurons or dimensions, some
positions, or a linear subspace of them), or a named group of such parts treated as
one mediator (all of them set together). The helpers enumerate the usual families:

    ms.mediation.neurons(model, layer=6, pos=-1)      # every MLP neuron of a layer
    ms.mediation.heads(model, pos=-1)                 # every head of every layer
    ms.mediation.layer_outputs(model, pos=-1)         # every attn and MLP output
    ms.mediation.Unit("blocks.2.hook_resid_post", pos=-1, basis=Q, label="probe")
    ms.mediation.group("name movers", [Unit(...), Unit(...)])
"""
import numpy as np

from .. import sites
from ..interventions import Patch

__all__ = ["Unit", "group", "neurons", "heads", "layer_outputs"]


class Unit:
    """One mediator. site, pos, head, index as for mechscope.Patch (None = all); basis:
    an orthonormal [dims, k] matrix over the touched dimensions, so that only the
    part of the value inside that subspace is set; label: a name for tables.

    pos may be "last": the last position of the run (every row's last real token
    when the batch is left-padded or has no padding)."""

    def __init__(self, site, pos=None, head=None, index=None, basis=None, label=None):
        if not isinstance(site, str):
            raise TypeError(f"site: expected a site name, got {type(site).__name__}")
        self.parts = [(site, pos, head, index, None if basis is None else np.asarray(basis, np.float64))]
        self.label = label if label is not None else _default_label(site, pos, head, index, basis)

    def __repr__(self):
        return f"Unit({self.label!r})"


def group(label, units):
    """Several units set together, reported as one mediator named `label`."""
    units = list(units)
    if not units or not all(isinstance(u, Unit) for u in units):
        raise TypeError("units: expected a non-empty list of mediation.Unit")
    g = Unit.__new__(Unit)
    g.parts = [p for u in units for p in u.parts]
    g.label = str(label)
    return g


def _default_label(site, pos, head, index, basis):
    label = site
    if head is not None:
        label += f"[head {head}]"
    if index is not None:
        label += f"[{index}]"
    if pos is not None:
        label += f"@{pos}"
    if basis is not None:
        label += f"<subspace {np.shape(basis)[-1] if np.ndim(basis) > 1 else 1}>"
    return label


def neurons(model, layer, pos=None, site="mlp.hook_post"):
    """Every neuron (coordinate) of blocks.{layer}.{site}: d_mlp units for MLP sites,
    d_model for the residual stream and layer outputs."""
    name = f"blocks.{layer}.{site}"
    _, _, suffix = sites.parse(name, model.n_layers)
    if suffix in sites.ATTENTION or suffix in sites.HEADED:
        raise ValueError(f"site: {site!r} has heads; use mediation.heads")
    width = sites.shape(suffix, model._shape_cfg, 1, 1)[-1]
    return [Unit(name, pos=pos, index=i, label=f"L{layer}N{i}") for i in range(width)]


def heads(model, layers=None, pos=None, site="attn.hook_z"):
    """Every attention head (its hook_z by default) of the given layers (default all)."""
    layers = range(model.n_layers) if layers is None else ([layers] if np.isscalar(layers) else layers)
    out = []
    for layer in layers:
        sites.parse(f"blocks.{layer}.{site}", model.n_layers)
        out += [Unit(f"blocks.{layer}.{site}", pos=pos, head=h, label=f"L{layer}H{h}") for h in range(model.n_heads)]
    return out


def layer_outputs(model, pos=None, kinds=("attn", "mlp")):
    """Every layer's attention output and MLP output (hook_attn_out, hook_mlp_out)."""
    out = []
    for layer in range(model.n_layers):
        for kind in kinds:
            if kind not in ("attn", "mlp"):
                raise ValueError(f"kinds: expected 'attn' or 'mlp', got {kind!r}")
            out.append(Unit(f"blocks.{layer}.hook_{kind}_out", pos=pos, label=f"{kind}{layer}"))
    return out


# ---------------------------------------------------------------- checks and boxes

def _resolve_pos(pos, mask, n_pos, label):
    """pos "last" -> the run's last position, refused unless every row ends there."""
    if isinstance(pos, str):
        if pos != "last":
            raise ValueError(f"units: {label!r}: pos must be None, an int, a list of ints or 'last', got {pos!r}")
        if mask is not None and not np.asarray(mask)[:, -1].all():
            raise ValueError(f"units: {label!r}: pos='last' needs every row to end at the last position "
                             "(left-pad the batch, or give the position)")
        return n_pos - 1
    return pos


def check_units(model, units, batch, n_pos, mask):
    """Validate every unit against the model and the run's shape before any work.
    -> list of lists of (Patch over the part, basis or None, suffix)."""
    if isinstance(units, Unit):
        units = [units]
    try:
        units = list(units)
    except TypeError:
        raise TypeError("units: expected a list of mediation.Unit") from None
    if not units:
        raise ValueError("units: empty list")
    out = []
    for i, unit in enumerate(units):
        if not isinstance(unit, Unit):
            raise TypeError(f"units[{i}]: expected a mediation.Unit, got {type(unit).__name__}")
        parts = []
        for site, pos, head, index, basis in unit.parts:
            pos = _resolve_pos(pos, mask, n_pos, unit.label)
            patch = Patch(site, None, pos=pos, head=head, index=index)
            try:
                code, layer, suffix, a, b, c, _ = patch._box(model, batch, n_pos)
            except (ValueError, TypeError) as e:
                raise type(e)(f"units[{i}] ({unit.label!r}): {e}") from None
            if basis is not None:
                if c is not None:
                    raise ValueError(f"units[{i}] ({unit.label!r}): a subspace needs a token site, not {site!r}")
                Q = basis[:, None] if basis.ndim == 1 else basis
                if Q.ndim != 2 or Q.shape[0] != b.size:
                    raise ValueError(f"units[{i}] ({unit.label!r}): basis must be [{b.size}, k] (one row per "
                                     f"touched dimension), got {list(basis.shape)}")
                if not np.allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-4):
                    raise ValueError(f"units[{i}] ({unit.label!r}): basis columns must be orthonormal")
                basis = Q
            parts.append((patch, basis, suffix, (code, layer, a, b, c)))
        if any(p[1] is not None for p in parts) and len({(p[3][0], p[3][1]) for p in parts}) > 1:
            # the subspace value is computed from the base run's value at its site,
            # which an earlier part of the same group would change
            raise ValueError(f"units[{i}] ({unit.label!r}): a group with a subspace part must keep all "
                             "its parts at one site")
        out.append(parts)
    return units, out
