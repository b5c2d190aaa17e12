"""Interventions as data: pytrees of indices, masks and source arrays, applied with ``where``/add.

An :class:`Interventions` value maps canonical site names to a tuple of :class:`Edit` s, applied in
order when the forward pass reaches that site. An edit says *where* (layers, per-axis indices, an
optional boolean mask) and *what* (a replacement ``value`` and/or an additive ``delta``)::

    act = where(selected, value, act)      # if value is given
    act = act + where(selected, delta, 0)  # if delta is given

``selected`` is built inside the compiled program by comparing the edit's indices against
``arange`` along each named axis, so changing *which* layer/position/head an edit targets (or
switching it off with an empty selection) only changes array values: the program never recompiles.
Only the *structure* (which sites carry edits, which fields are set, array shapes) is static.

Per-layer sites: ``value``/``delta``/``mask`` are either one layer's activation shape (shared by
all selected layers) or carry a leading ``n_layers`` axis (``stacked=True``; e.g. a whole clean
cache), from which the forward takes the current layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError, JaxpatchError
from .config import ModelConfig
from .sites import SITES, parse

Array = Any

#: Axes an edit may index (``d_mlp`` indexes neurons).
INDEXABLE_AXES = ("batch", "pos", "head", "q_pos", "k_pos", "d_head", "d_model", "d_mlp")

#: An index entry that selects its whole axis. Sweeps use it for a joint patch whose components
#: index different axes (``[{"layer": 0, "pos": 3}, {"layer": 1}]``: the second component covers
#: every position). It is never a valid index otherwise (int32 minimum).
ALL = -(2**31)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Edit:
    """One replacement and/or addition at one site.

    Attributes:
        layers: int array of the layers it applies to (per-layer sites); ``None`` means every layer.
            A scalar or 1-D array; entries may be traced values.
        index: mapping axis name -> int array of selected indices along that axis (an edit with
            ``pos=[3, 4], head=2`` selects positions 3 and 4 of head 2). Negative indices count
            from the end. Missing axes are selected whole.
        mask: optional bool array broadcastable to the activation, ANDed with the indices.
        value: replacement, broadcastable to the activation; ``None`` for no replacement.
        delta: addition, broadcastable to the activation; ``None`` for no addition.
        grad_scale: optional factor on the *gradient* flowing back through the selected entries;
            the forward value is unchanged (0 stops the gradient: AtP*'s GradDrop).
        stacked: whether value/delta/mask carry a leading ``n_layers`` axis (static).
        paired: if True, ``layers`` and every ``index`` array are 1-D of one length K and the edit
            selects the K tuples ``(layers[k], index[a][k] for each axis a)`` (a set of components
            patched jointly), instead of the outer product of the per-axis selections (static).
    """

    layers: Array | None = None
    index: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    mask: Array | None = None
    value: Array | None = None
    delta: Array | None = None
    stacked: bool = False
    paired: bool = False
    grad_scale: Array | None = None

    def tree_flatten(self):
        keys = tuple(sorted(self.index))
        children = (self.layers, tuple(self.index[k] for k in keys), self.mask, self.value, self.delta, self.grad_scale)
        return children, (keys, self.stacked, self.paired)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, stacked, paired = aux
        layers, idx, mask, value, delta, grad_scale = children
        return cls(layers, dict(zip(keys, idx)), mask, value, delta, stacked, paired, grad_scale)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Interventions:
    """A set of edits keyed by canonical site name. Combine with ``a + b`` (applied a, then b)."""

    edits: Mapping[str, tuple[Edit, ...]] = dataclasses.field(default_factory=dict)

    def tree_flatten(self):
        keys = tuple(sorted(self.edits))
        return tuple(tuple(self.edits[k]) for k in keys), keys

    @classmethod
    def tree_unflatten(cls, keys, children):
        return cls(dict(zip(keys, (tuple(c) for c in children))))

    def __add__(self, other: "Interventions") -> "Interventions":
        if not isinstance(other, Interventions):
            return NotImplemented
        merged = {k: tuple(v) for k, v in self.edits.items()}
        for k, v in other.edits.items():
            merged[k] = merged.get(k, ()) + tuple(v)
        return Interventions(merged)

    def __bool__(self) -> bool:
        return bool(self.edits)

    def sites(self) -> tuple[str, ...]:
        return tuple(sorted(self.edits))


NONE = Interventions()


def combine(*ivs: Interventions | None) -> Interventions:
    """Join several :class:`Interventions` (``None`` entries are skipped); order is kept."""
    out = NONE
    for iv in ivs:
        if iv is not None:
            out = out + iv
    return out


# ----------------------------------------------------------------------------------------------
# Builders


def _site_and_layer(config: ModelConfig, name: str, layer) -> tuple[str, Any]:
    if name in SITES:
        canonical, parsed_layer = name, None
        if not SITES[name].per_layer and layer is not None:
            raise JaxpatchError(f"Site {name!r} is not per-layer; do not pass layer=.")
    else:
        canonical, parsed_layer = parse(name, config)
        if layer is not None and parsed_layer is not None:
            raise JaxpatchError(f"Site {name!r} already names layer {parsed_layer}; do not also pass layer=.")
    if parsed_layer is not None:
        layer = parsed_layer
    if layer is not None and SITES[canonical].per_layer:
        _check_range(layer, config.n_layers, f"layer for {canonical!r}", allow_negative=True)
        if _is_concrete(layer):
            layer = np.asarray(layer) % config.n_layers
        layer = jnp.asarray(layer, dtype=jnp.int32)
    return canonical, layer


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_range(idx, size: int | None, what: str, allow_negative: bool = True):
    """Range-check concrete indices; traced indices are checked where they become concrete."""
    if size is None or not _is_concrete(idx):
        return
    arr = np.asarray(idx)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must be integers, got dtype {arr.dtype}.")
    lo = -size if allow_negative else 0
    bad = arr[(arr < lo) | (arr >= size)]
    if bad.size:
        raise InputError(f"{what} {bad.tolist()} out of range: valid 0..{size - 1} (or negative from the end).")


def _axis_size(config: ModelConfig, axis: str, canonical: str) -> int | None:
    """Size of ``axis`` at site ``canonical`` (``head`` counts key/value heads at k/v sites)."""
    if axis == "batch":
        return None
    return SITES[canonical].axis_size(config, axis)


def edit(
    config: ModelConfig,
    name: str,
    *,
    value=None,
    delta=None,
    mask=None,
    layer=None,
    stacked: bool | None = None,
    **index,
) -> Interventions:
    """Build an :class:`Interventions` with one edit at site ``name``.

    Args:
        config: the model's config (for layer and axis ranges).
        name: a full site name (``"blocks.3.attn.hook_z"``) or a canonical one
            (``"blocks.attn.hook_z"``, then ``layer=`` selects layers; default all).
        value: replacement array (see :class:`Edit`).
        delta: array to add.
        mask: optional boolean mask.
        layer: layer(s) for a canonical per-layer name; may be a traced int.
        stacked: whether value/delta/mask have a leading ``n_layers`` axis; inferred from ``value``'s
            rank when omitted.
        **index: axis name -> index or indices (e.g. ``pos=3, head=[0, 5]``; ``neuron=`` is an alias
            of ``d_mlp=``). Valid axes are the site's own axes.

    Raises:
        UnknownSiteError: unknown site or layer out of range.
        InputError: an axis the site does not have, or an index out of range.
    """
    canonical, layer = _site_and_layer(config, name, layer)
    site = SITES[canonical]
    if "neuron" in index:
        index["d_mlp"] = index.pop("neuron")
    clean_index = {}
    for axis, idx in index.items():
        if idx is None:
            continue
        if axis not in site.axes or axis not in INDEXABLE_AXES:
            raise InputError(
                f"Site {canonical!r} has axes {site.axes}; cannot index axis {axis!r}. "
                f"Valid index axes here: {[a for a in site.axes if a in INDEXABLE_AXES]}."
            )
        _check_range(idx, _axis_size(config, axis, canonical), f"{axis} index for {canonical!r}")
        clean_index[axis] = jnp.asarray(idx, dtype=jnp.int32)
    if stacked is None:
        ref = value if value is not None else delta if delta is not None else mask
        stacked = bool(site.per_layer and ref is not None and jnp.ndim(ref) == len(site.axes) + 1)
    if stacked and not site.per_layer:
        raise JaxpatchError(f"Site {canonical!r} is not per-layer; it cannot take stacked values.")
    e = Edit(
        layers=layer,
        index=clean_index,
        mask=None if mask is None else jnp.asarray(mask, dtype=bool),
        value=None if value is None else jnp.asarray(value),
        delta=None if delta is None else jnp.asarray(delta),
        stacked=stacked,
    )
    return Interventions({canonical: (e,)})


def replace(config: ModelConfig, name: str, value, **kw) -> Interventions:
    """Replace the activation at ``name`` (where selected) by ``value``."""
    return edit(config, name, value=value, **kw)


def zero(config: ModelConfig, name: str, **kw) -> Interventions:
    """Zero-ablate the activation at ``name`` where selected."""
    return edit(config, name, value=jnp.zeros((), dtype=jnp.float32), **kw)


def add(config: ModelConfig, name: str, delta, **kw) -> Interventions:
    """Add ``delta`` to the activation at ``name`` where selected (steering; attribution deltas)."""
    return edit(config, name, delta=delta, **kw)


# ----------------------------------------------------------------------------------------------
# Application (inside the forward pass)


#: Axes that a suffix run (``pos_offset > 0``) covers only from the offset on.
OFFSET_AXES = ("pos", "q_pos")


def _axis_mask(idx: Array, axis: int, shape: tuple[int, ...], offset: int = 0) -> Array:
    n = shape[axis]
    idx = jnp.reshape(idx, (-1,))
    whole = jnp.any(idx == ALL)
    idx = idx % (n + offset)
    hit = jnp.any(jnp.arange(offset, offset + n, dtype=jnp.int32)[:, None] == idx[None, :], axis=-1) | whole
    return jnp.reshape(hit, [n if i == axis else 1 for i in range(len(shape))])


def _suffix(x, axes, shape, offset):
    """Slice full-sequence ``x`` to the suffix ``offset:`` along its position axes."""
    if x is None or offset == 0:
        return x
    for i, a in enumerate(axes):
        if a in OFFSET_AXES and x.shape[i] == shape[i] + offset:
            x = jax.lax.slice_in_dim(x, offset, None, axis=i)
    return x


def _take_layer(x, layer, stacked):
    if x is None or not stacked:
        return x
    return jax.lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)


def _lift(x, ndim):
    if x is None or jnp.ndim(x) >= ndim:
        return x
    return jnp.reshape(x, (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))


def _check_broadcast(what: str, canonical: str, arr, shape):
    try:
        ok = np.broadcast_shapes(np.shape(arr), tuple(shape)) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise InputError(
            f"{what} for site {canonical!r} has shape {tuple(np.shape(arr))}, not broadcastable to the "
            f"activation shape {tuple(shape)} (axes {SITES[canonical].axes})."
        )


def apply_edits(
    canonical: str, act: Array, edits: tuple[Edit, ...], layer: Array | None, pos_offset: int = 0
) -> Array:
    """Apply ``edits`` to activation ``act`` of site ``canonical`` at (traced) ``layer``.

    With ``pos_offset > 0`` the activation covers positions ``pos_offset..`` only; indices and
    full-length values/masks/deltas are in whole-sequence coordinates and are sliced here.
    """
    axes = SITES[canonical].axes
    shape = act.shape

    def prep(x):
        return _suffix(_lift(_take_layer(x, layer, stacked), len(shape)), axes, shape, pos_offset)

    for e in edits:
        stacked = e.stacked
        value, delta, mask = prep(e.value), prep(e.delta), prep(e.mask)
        sel = None if mask is None else mask
        if mask is not None:
            _check_broadcast("mask", canonical, mask, act.shape)
        if e.paired:
            sel = _paired_selection(e, axes, shape, layer, pos_offset, sel)
        else:
            for axis_name, idx in e.index.items():
                off = pos_offset if axis_name in OFFSET_AXES else 0
                m = _axis_mask(idx, axes.index(axis_name), act.shape, off)
                sel = m if sel is None else sel & m
            if e.layers is not None and layer is not None:
                on = jnp.any(jnp.reshape(e.layers, (-1,)) == layer)
                sel = on if sel is None else sel & on
        if value is not None:
            _check_broadcast("value", canonical, value, act.shape)
            value = value.astype(act.dtype)
            act = jnp.broadcast_to(value, shape) if sel is None else jnp.where(sel, value, act)
        if delta is not None:
            _check_broadcast("delta", canonical, delta, act.shape)
            delta = delta.astype(act.dtype)
            act = act + (delta if sel is None else jnp.where(sel, delta, jnp.zeros((), act.dtype)))
        if e.grad_scale is not None:
            scale = jnp.asarray(prep(e.grad_scale), act.dtype)
            act = grad_gate(act, scale if sel is None else jnp.where(sel, scale, jnp.ones((), act.dtype)))
    return act


@jax.custom_vjp
def grad_gate(x, scale):
    """Identity on the forward pass; multiplies the incoming gradient by ``scale`` on the way back.

    The forward value never depends on ``scale``, so vmapping over several scales (one per
    GradDrop layer) shares one forward pass and batches only the backward.
    """
    return x


def _gate_fwd(x, scale):
    return x, scale


def _gate_bwd(scale, ct):
    return (ct * scale).astype(ct.dtype), jnp.zeros_like(scale)


grad_gate.defvjp(_gate_fwd, _gate_bwd)


def _paired_selection(e: Edit, axes, shape, layer, pos_offset, sel):
    """OR over k of (layer == layers[k] AND index[a][k] for every axis a)."""
    ndim = len(shape)
    hits = None
    for axis_name, idx in e.index.items():
        i = axes.index(axis_name)
        n, off = shape[i], (pos_offset if axis_name in OFFSET_AXES else 0)
        idx = jnp.reshape(idx, (-1,))
        whole = (idx == ALL)[:, None]  # component k covers this whole axis
        idx = idx % (n + off)
        hit = (jnp.arange(off, off + n, dtype=jnp.int32)[None, :] == idx[:, None]) | whole  # [K, n]
        hit = jnp.reshape(hit, (hit.shape[0],) + tuple(n if j == i else 1 for j in range(ndim)))
        hits = hit if hits is None else hits & hit
    if e.layers is not None and layer is not None:
        on = jnp.reshape(jnp.reshape(e.layers, (-1,)) == layer, (-1,) + (1,) * ndim)
        hits = on if hits is None else hits & on
    if hits is None:
        return sel
    any_k = jnp.any(hits, axis=0)
    return any_k if sel is None else sel & any_k


def validate(ivs: Interventions, config: ModelConfig, batch: int, pos: int) -> None:
    """Check concrete indices against the actual batch/position sizes (traced ones are skipped)."""
    sizes = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": pos}
    for canonical, edits in ivs.edits.items():
        if canonical not in SITES:
            parse(canonical, config)
        for e in edits:
            for axis, idx in e.index.items():
                if axis in sizes:
                    _check_range(idx, sizes[axis], f"{axis} index for {canonical!r}")
