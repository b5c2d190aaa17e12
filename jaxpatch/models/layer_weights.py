"""Per-layer weights: each layer's matmul reads its own array, not a slice copied out of a stack.

A suffix run loops over layers with a traced layer index (``fori_loop`` from a traced start). A
weight stacked ``[L, ...]`` then reaches the layer's matmul through a dynamic slice, and XLA's CPU
backend materialises that slice: a copy of every weight matrix, per layer, per chunk (3 x 7 MB per
layer for GPT-2 small; 2.7 % of the packed ``resid_pre`` sweep's device time, profiled). With the
weight held as ``L`` separate arrays (:class:`PerLayer`: :func:`per_layer_blocks` of each layer's
:func:`layer_split`, made once per sweep by ``jaxpatch.sweep.suffix_blocks``, one small program
call per layer), each matmul is a ``lax.switch`` over the layers whose branch ``l`` multiplies by
array ``l`` in place (:func:`mm`): no copy, and one small dot per branch to compile.

Only the large matmul weights are split (:data:`SPLIT`); norms and biases stay stacked (their
slices are small). :func:`value` gives a layer's whole weight where a rare path needs it as an
array (a switch returning it: one copy, as before).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

#: The stacked block weights :func:`per_layer_blocks` splits into per-layer arrays: the matmul
#: weights, under their plain or matmul-major names (see ``transformer.matmul_major_blocks``).
SPLIT = ("W_QKV:fused", "W_Q", "W_K", "W_V", "W_O", "W_Q:matmul_major", "W_K:matmul_major", "W_V:matmul_major",
         "W_O:matmul_major", "W_in", "W_gate", "W_out")


@jax.tree_util.register_pytree_node_class
class PerLayer:
    """One stacked block weight ``[L, ...]`` held as ``L`` separate arrays (a pytree of them)."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)

    def tree_flatten(self):
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, aux, arrays):
        return cls(arrays)


class LayerWeight:
    """Layer ``layer`` (traced or not) of a :class:`PerLayer` weight, seen through ``fn`` (a
    static reshaping of each layer's array: a transpose, a column slice). Not an array: matmuls
    read it through :func:`mm`, other uses through :func:`value`."""

    def __init__(self, arrays, layer, fn: Callable[[Any], Any] | None = None):
        self.arrays, self.layer, self.fn = arrays, layer, fn or (lambda a: a)

    def map(self, fn) -> "LayerWeight":
        """The same layer's weight seen through ``fn`` after this view's own function."""
        inner = self.fn
        return LayerWeight(self.arrays, self.layer, lambda a: fn(inner(a)))


def layer_split(blocks: dict, layer, layout: Callable[[dict], dict] | None = None) -> dict:
    """The weights named in :data:`SPLIT` of layer ``layer`` (may be traced) of stacked
    ``blocks``, laid out by ``layout`` (a function of stacked blocks, e.g.
    ``transformer.matmul_major_blocks``, applied to the one-layer slice: each array is written once,
    straight from the stack). One small program serves every layer (see :func:`per_layer_blocks`)."""
    one = {k: jax.lax.dynamic_slice_in_dim(a, layer, 1) for k, a in blocks.items()}
    laid = (layout or (lambda b: b))(one)
    return {k: a[0] for k, a in laid.items() if k in SPLIT}


def per_layer_blocks(blocks: dict, layers: list[dict] | None = None, layout=None) -> dict:
    """``blocks`` with the weights named in :data:`SPLIT` as :class:`PerLayer`, from ``layers``
    (each layer's :func:`layer_split`; computed here when not given). The entries not split are
    the stacked ones (a layout renames only split weights)."""
    if layers is None:
        L = next(a.shape[0] for a in blocks.values())
        layers = [layer_split(blocks, i, layout) for i in range(L)]
    out = {k: a for k, a in blocks.items() if k not in SPLIT}
    out.update({k: PerLayer(one[k] for one in layers) for k in layers[0]})
    return out


def is_per_layer(blocks: dict) -> bool:
    """Whether ``blocks`` holds :class:`PerLayer` weights (made by :func:`per_layer_blocks`)."""
    return any(isinstance(v, PerLayer) for v in blocks.values())


def at(w, layer):
    """Layer ``layer`` of a stacked weight: a :class:`LayerWeight` view of a :class:`PerLayer`
    one, a dynamic slice of an array."""
    if isinstance(w, PerLayer):
        return LayerWeight(w.arrays, layer)
    return jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def mm(spec: str, x, w):
    """``jnp.einsum(spec, x, w)`` where ``w`` is an array or a :class:`LayerWeight` (then a switch
    over the layers, each branch multiplying by its own array in place)."""
    if not isinstance(w, LayerWeight):
        return jnp.einsum(spec, x, w)
    # Every branch computes the same function of its own array: trace it once (tracing one
    # einsum per branch made a sweep's first call 0.4 s slower for GPT-2 small).
    same = jax_core.jaxpr_as_fun(jax.make_jaxpr(lambda x, a: jnp.einsum(spec, x, w.fn(a)))(x, w.arrays[0]))
    return jax.lax.switch(w.layer, [lambda x, a=a: same(x, a)[0] for a in w.arrays], x)


def value(w):
    """``w`` as an array (a :class:`LayerWeight`'s layer copied out: rare paths only)."""
    if not isinstance(w, LayerWeight):
        return w
    return jax.lax.switch(w.layer, [lambda a=a: w.fn(a) for a in w.arrays])


def map_weight(w, fn):
    """``fn(w)`` for an array; the same view through ``fn`` for a :class:`LayerWeight`."""
    return w.map(fn) if isinstance(w, LayerWeight) else fn(w)
