"""How parameters are laid out on a device mesh: the one module that maps the model's logical axis
names (:mod:`jaxpatch.models.axes`) to mesh axes.

A mesh has a ``"sweep"`` axis (patches are split over it: data parallel) and optionally a
``"model"`` axis (tensor parallel). The default rules shard query heads, key/value heads, the MLP
and the vocabulary over ``"model"``, and every weight's ``embed`` (d_model) axis over ``"sweep"``
(FSDP-style: at rest each device holds ``1 / mesh.size`` of the weights; a sweep gathers the
``"sweep"``-sharded parts when it uses them). A dimension the mesh axis does not divide is not
sharded over it; ``head_dim`` then takes ``"model"`` where ``kv_heads`` could not (grouped-query
models with fewer key/value heads than the model axis: Llama-3-70B's 8 on 16 devices).

    mesh = jax.make_mesh((2, 4), ("sweep", "model"))
    params = jaxpatch.partitioning.shard_params(model.params, mesh)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ._errors import InputError
from .models.axes import param_axes

SWEEP, MODEL = "sweep", "model"

#: (logical axis, mesh axis) in priority order; a mesh axis is used at most once per parameter.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("heads", MODEL),
    ("kv_heads", MODEL),
    ("mlp", MODEL),
    ("vocab", MODEL),
    ("head_dim", MODEL),  # only where kv_heads could not take it (grouped-query attention)
    ("embed", SWEEP),
)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


_MAKE = ("Make one with jax.make_mesh((n_sweep, n_model), ('sweep', 'model'), "
         "axis_types=(jax.sharding.AxisType.Auto,) * 2) or jax.sharding.Mesh(devices, ('sweep', 'model')).")


def check_mesh(mesh) -> None:
    names = tuple(mesh.axis_names)
    if SWEEP not in names or any(n not in (SWEEP, MODEL) for n in names):
        raise InputError(f"A jaxpatch mesh has axes ('sweep',) or ('sweep', 'model'); got {names}. " + _MAKE)
    types = getattr(mesh, "axis_types", None) or ()
    if any(getattr(t, "name", "Auto") != "Auto" for t in types):
        raise InputError(f"jaxpatch shards with automatic mesh axes; this mesh's axis types are {tuple(types)} "
                         "(jax.make_mesh makes Explicit axes by default). " + _MAKE)


def spec_for(axes: Sequence[str], shape: Sequence[int], sizes: dict[str, int],
             rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> P:
    """The :class:`PartitionSpec` of one parameter with logical ``axes`` and ``shape``."""
    spec: list[str | None] = [None] * len(axes)
    used: set[str] = set()
    for logical, mesh_axis in rules:
        if mesh_axis not in sizes or mesh_axis in used:
            continue
        for i, a in enumerate(axes):
            if a == logical and spec[i] is None and shape[i] % sizes[mesh_axis] == 0:
                spec[i] = mesh_axis
                used.add(mesh_axis)
                break
    return P(*spec)


def param_specs(params, mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
    """PartitionSpecs shaped like ``params`` (arrays or ``jax.ShapeDtypeStruct``)."""
    check_mesh(mesh)
    sizes = _axis_sizes(mesh)
    axes = param_axes(params)
    return jax.tree_util.tree_map(lambda a, p: spec_for(a, p.shape, sizes, rules), axes, params,
                                  is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(params, mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
    """:class:`NamedSharding` of each parameter on ``mesh``."""
    specs = param_specs(params, mesh, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
    """``params`` placed on ``mesh`` by the rules (each device gets only its shards)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def shard_shape(shape: Sequence[int], spec: P, sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for i, n in enumerate(shape):
        a = spec[i] if i < len(spec) else None
        names = (a,) if isinstance(a, str) else (a or ())
        out.append(n // math.prod(sizes[x] for x in names))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Parameter memory of a layout: ``total_bytes`` (the whole model), ``per_device_bytes`` (what
    each device holds: every device holds one shard of every parameter), ``share_bytes``
    (``total / devices``), ``overhead`` (``per_device / share - 1``) and the parameters that are
    not fully sharded (``replicated``: name -> the mesh axes it is replicated over)."""

    total_bytes: int
    per_device_bytes: int
    share_bytes: float
    overhead: float
    replicated: dict[str, tuple[str, ...]]


def layout(params, mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Layout:
    """Memory accounting of ``params`` (arrays or shapes, e.g. from ``jax.eval_shape``) on
    ``mesh`` (a :class:`jax.sharding.Mesh` or :class:`jax.sharding.AbstractMesh`)."""
    sizes = _axis_sizes(mesh)
    specs = param_specs(params, mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    total = per_dev = 0
    replicated = {}
    for (path, p), s in zip(flat, flat_specs):
        item = np.dtype(p.dtype).itemsize
        total += math.prod(p.shape) * item
        per_dev += math.prod(shard_shape(p.shape, s, sizes)) * item
        used = {x for a in s for x in ((a,) if isinstance(a, str) else (a or ()))}
        missing = tuple(a for a in sizes if a not in used and sizes[a] > 1)
        if missing:
            replicated[jax.tree_util.keystr(path)] = missing
    n = math.prod(sizes.values())
    share = total / n
    return Layout(int(total), int(per_dev), share, per_dev / share - 1.0, replicated)


@partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, i, layer):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


class StreamPlacer:
    """Places parameters on ``mesh`` one tensor at a time, for
    ``jaxpatch.load_pretrained(..., mesh=)``: each array goes straight to its shards
    (``jax.make_array_from_callback``), and stacked per-layer weights are filled in place layer by
    layer, so the host never holds more than one checkpoint tensor (plus its converted copy)."""

    def __init__(self, mesh, check, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
        check_mesh(mesh)
        self.mesh, self.check, self.rules, self.sizes = mesh, check, tuple(rules), _axis_sizes(mesh)

    def sharding(self, path: tuple[str, ...], shape) -> NamedSharding:
        from .models.axes import BLOCK, TOP

        axes = TOP[path[0]] if len(path) == 1 else ("layers",) + BLOCK[path[1]]
        return NamedSharding(self.mesh, spec_for(axes, shape, self.sizes, self.rules))

    def put(self, path, array):
        return jax.make_array_from_callback(array.shape, self.sharding(path, array.shape), lambda idx: array[idx])

    def zeros(self, path, shape, dtype):
        sh = self.sharding(path, shape)
        return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sh)()

    def set_layer(self, path, stacked, i: int, array):
        spec = stacked.sharding.spec
        layer_sh = NamedSharding(self.mesh, P(*tuple(spec)[1:]))
        layer = jax.make_array_from_callback(array.shape, layer_sh, lambda idx: array[idx])
        return _set_layer(stacked, np.int32(i), layer)
