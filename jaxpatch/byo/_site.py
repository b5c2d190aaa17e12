"""The site primitive for plain JAX: ``x = jaxpatch.site("name", x, axes=(...))``.

A site is an identity outside jaxpatch. When jaxpatch runs a model (:mod:`jaxpatch.byo._model`) it
opens a *scope* for the duration of one trace: a context variable that holds this run's edits
(arrays, i.e. data: they may be traced values, vmapped over patches) and the names to capture. The
scope is set and reset around the model call, inside every transformation jaxpatch applies
(``jit``, the ``vmap`` over patches, ``grad``), so nothing outlives the trace and no value is kept
between calls: the interventions travel as arguments, as in the built-in models.

Layers as data. :func:`scan` is a drop-in for ``jax.lax.scan`` over stacked layers. Inside it,
each site gets a leading ``layer`` axis: edits select layers by comparing the (traced) iteration
index, and captures come out of the scan as stacked outputs.

The model's own ``jax.vmap``. A site reached inside it (an Equinox linear layer mapped over
positions, ``jax.vmap(lambda r: site("row", r))``) is handed to the scope through
``jax.custom_batching.custom_vmap``, whose rule sees the whole mapped array at the trace outside
the vmap: the site has the mapped axis first (``[pos, d_mlp]``), edits and captures work, and
gradients flow (AtP). A site reached inside any other transformation the model applies itself
(its own ``jax.lax.scan``, ``jax.checkpoint``...) would hand back values of a trace that has ended,
so it is an error naming the site, never a silently wrong or missing value.

Layout. Each site has *external* axes: ``("layer",)`` inside :func:`scan`, then ``("batch",)``
where jaxpatch vmaps a per-example model over the batch, then the axes the model code declared.
Edits index and broadcast against the external layout; captures are returned in it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend import core as jcore

try:  # to recognise a value of the model's own jax.vmap (no public name in jax 0.10)
    from jax._src.interpreters.batching import BatchTracer
except ImportError:  # pragma: no cover - then such sites are refused with an error, as other transformations
    class BatchTracer:  # type: ignore[no-redef]
        pass

from .._errors import InputError, JaxpatchError, UnknownSiteError
from ..interventions import ALL

Array = Any

_SCOPE: contextvars.ContextVar = contextvars.ContextVar("jaxpatch_site_scope", default=None)


class SiteError(JaxpatchError):
    """A site used in a way jaxpatch cannot honour (declared twice, wrong axes, reached inside a
    transformation jaxpatch does not own, an output that is not an array)."""


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What jaxpatch knows about one site after tracing the model once.

    Attributes:
        name: the site name (a ``jaxpatch.site`` name, a Flax module path, an Equinox pytree path).
        axes: external axis names (``layer`` first inside :func:`jaxpatch.scan`, then ``batch``).
        shape: external shape.
        dtype: the activation's dtype.
        layered: whether the site lives inside :func:`jaxpatch.scan` (a leading ``layer`` axis).
    """

    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: Any
    layered: bool = False

    def size(self, axis: str) -> int:
        return self.shape[self.axes.index(axis)]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SiteEdit:
    """One replacement and/or addition at one site (arrays: data, never static).

    Attributes:
        value: replacement, broadcastable to the site's external shape (after prepending unit axes).
        delta: addition, likewise.
        index: external axis name -> int indices selected along it (any of them; negative from the
            end; :data:`jaxpatch.interventions.ALL` selects the whole axis). Missing axes: whole.
        enabled: optional bool scalar ANDed with the selection (a sweep over several sites).
    """

    value: Array | None = None
    delta: Array | None = None
    index: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    enabled: Array | None = None

    def tree_flatten(self):
        keys = tuple(sorted(self.index))
        return (self.value, self.delta, tuple(self.index[k] for k in keys), self.enabled), keys

    @classmethod
    def tree_unflatten(cls, keys, children):
        value, delta, idx, enabled = children
        return cls(value, delta, dict(zip(keys, idx)), enabled)


def closest_first(name: str, valid) -> list[str]:
    """Every valid name, the closest to ``name`` first (difflib ratio), then the rest in order."""
    valid = list(valid)
    ranked = sorted(valid, key=lambda v: -difflib.SequenceMatcher(None, name, v).ratio())
    return ranked


def unknown_site_error(name: str, valid, what: str = "site") -> UnknownSiteError:
    ranked = closest_first(name, valid)
    if not ranked:
        return UnknownSiteError(f"Unknown {what} {name!r}: this model has no sites (did the forward pass reach any?).")
    return UnknownSiteError(f"Unknown {what} {name!r}. Valid {what}s, closest first: {ranked}")


def _trace_state():
    return jcore.get_opaque_trace_state()


class Scope:
    """The state of one jaxpatch run of a model, alive only while the model is being traced.

    Args:
        edits: site name -> tuple of :class:`SiteEdit` (external layout).
        capture: names whose activations to record.
        discover: record every site reached (module outputs of Flax/Equinox models too), without
            raising on module outputs that cannot be addressed (they are listed as such).
        batch_index, batch_size: set when jaxpatch vmaps a per-example model: the example's index
            (traced) and the batch size, so that external layouts gain a ``batch`` axis.
    """

    def __init__(self, edits: Mapping[str, tuple], capture=frozenset(), *, discover: bool = False,
                 batch_index=None, batch_size: int | None = None, parent: "Scope | None" = None,
                 layer=None, n_layers: int | None = None):
        self.edits = edits
        self.capture = frozenset(capture)
        self.discover = discover
        self.batch_index = batch_index
        self.batch_size = batch_size
        self.parent = parent
        self.layer = layer
        self.n_layers = n_layers
        self.trace = _trace_state()
        self.captured: dict[str, Array] = {}
        self.infos: dict[str, SiteInfo] = {}
        #: module outputs reached that cannot be sites: name -> reason (discovery only).
        self.unaddressable: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    # -- entering and leaving ----------------------------------------------------------------
    def __enter__(self):
        self._token = _SCOPE.set(self)
        return self

    def __exit__(self, *exc):
        _SCOPE.reset(self._token)
        return False

    # -- queries -----------------------------------------------------------------------------
    def wants(self, name: str) -> bool:
        """Whether a module output named ``name`` must pass through :meth:`visit` in this run."""
        root = self.root()
        return root.discover or name in root.edits or name in root.capture

    def root(self) -> "Scope":
        return self if self.parent is None else self.parent.root()

    def _coords(self) -> dict[str, Any]:
        """External axes that are not axes of the activation as the model sees it, with the
        (traced) index this trace stands for: ``layer`` in a scan, ``batch`` in a per-example run."""
        c = {}
        if self.layer is not None:
            c["layer"] = (self.layer, self.n_layers)
        root = self.root()
        if root.batch_index is not None:
            c["batch"] = (root.batch_index, root.batch_size)
        return c

    # -- the site itself ---------------------------------------------------------------------
    def visit(self, name: str, x, axes=None, *, module_output: bool = False):
        """Apply this run's edits to activation ``x`` of site ``name``; record it if captured."""
        root = self.root()
        if not isinstance(name, str) or not name:
            raise SiteError(f"A site name must be a non-empty string; got {name!r}.")
        if _trace_state() != self.trace:
            if isinstance(x, BatchTracer):  # inside the model's own jax.vmap: visit at the level outside it
                return _escape_vmap(self, name, x, axes, module_output)
            msg = (f"Site {name!r} was reached inside a transformation that the model applies itself "
                   "(its own jax.lax.scan, jax.checkpoint, jax.grad...; jax.vmap is supported): its values belong to "
                   "a trace jaxpatch cannot reach. Scan over layers with jaxpatch.scan (a drop-in for jax.lax.scan), "
                   "or address the module that calls this one.")
            if module_output and root.discover:
                root.unaddressable[name] = ("reached inside a transformation the model applies itself (its own "
                                            "jax.lax.scan, jax.checkpoint...)")
                return x
            raise SiteError(msg)
        if not isinstance(x, (jax.Array, np.ndarray)) or isinstance(x, bool):
            if module_output and root.discover:
                root.unaddressable[name] = f"its output is a {type(x).__name__}, not an array"
                return x
            raise SiteError(f"Site {name!r}: the activation must be one array; got a {type(x).__name__}.")
        x = jnp.asarray(x)
        dup = self.counts.get(name, 0) > 0 or name in root.infos or name in root.unaddressable
        self.counts[name] = self.counts.get(name, 0) + 1
        if dup:
            if module_output and root.discover:
                root.unaddressable[name] = "called more than once in one forward pass (which call would a patch mean?)"
                root.infos.pop(name, None)
                return x
            raise SiteError(
                f"Site {name!r} is declared twice in one forward pass. Each site name must be reached once per "
                "forward (per layer inside jaxpatch.scan); give each occurrence its own name "
                f"(e.g. {name + '_0'!r}, {name + '_1'!r}).")
        coords = self._coords()
        try:
            local_axes = _check_axes(name, x, axes, batched_outside="batch" in coords)
        except SiteError as e:
            if module_output and root.discover:
                root.unaddressable[name] = f"the axes declared for it do not fit ({e})"
                return x
            raise
        ext_axes = tuple(coords) + local_axes
        ext_shape = tuple(n for _, n in coords.values()) + tuple(x.shape)
        info = SiteInfo(name, ext_axes, ext_shape, x.dtype, layered="layer" in coords)
        if self is root:
            root.infos[name] = info
        else:
            self.infos[name] = info
        for e in root.edits.get(name, ()):
            x = _apply_edit(name, x, e, info, coords)
        if name in root.capture:
            self.captured[name] = x
        return x


def _escape_vmap(scope: "Scope", name: str, x, axes, module_output: bool):
    """A site the model reaches inside its own ``jax.vmap``: hand the whole mapped activation to
    the scope. ``custom_vmap``'s rule runs at the trace outside that vmap with the mapped axis
    leading, so the site (and its edits and captures) sees the array as the code around the vmap
    does, e.g. ``[pos, d_mlp]`` for a linear layer mapped over positions. Nested vmaps escape one
    level per rule. ``axes`` name the escaped array's axes (mapped axis first)."""

    @custom_vmap
    def identity(a):
        return a

    @identity.def_vmap
    def rule(axis_size, in_batched, a):
        return scope.visit(name, a, axes, module_output=module_output), in_batched[0]

    return identity(x)


def _check_axes(name, x, axes, batched_outside: bool) -> tuple[str, ...]:
    if axes is None:  # dim<k>: the k-th axis counting the batch axis as 0
        if not batched_outside and x.ndim == 0:
            raise SiteError(f"Site {name!r} is a scalar; a site of a batched model needs a leading 'batch' axis.")
        if batched_outside:
            return tuple(f"dim{i + 1}" for i in range(x.ndim))
        return ("batch",) + tuple(f"dim{i}" for i in range(1, x.ndim))
    if isinstance(axes, str):
        axes = (axes,)
    axes = tuple(axes)
    if len(axes) != x.ndim or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
        raise SiteError(f"Site {name!r}: axes {axes} must name each of the activation's {x.ndim} axes once "
                        f"(shape {tuple(x.shape)}).")
    if "layer" in axes:
        raise SiteError(f"Site {name!r}: 'layer' is not a declared axis; it comes from jaxpatch.scan (the layer is data).")
    if batched_outside and "batch" in axes:
        raise SiteError(f"Site {name!r}: jaxpatch vmaps this per-example model over the batch, so its sites have no "
                        f"'batch' axis; got axes {axes}.")
    if not batched_outside and axes[0] != "batch":
        raise SiteError(f"Site {name!r}: the first axis must be 'batch' (prompts/examples); got axes {axes}. "
                        "Declare it first, or build the model with batched=False and declare per-example axes.")
    return axes


def _prep(name, a, info: SiteInfo, coords, what):
    """``a`` lifted to the external rank, checked, then indexed down to the local activation."""
    a = jnp.asarray(a)
    rank = len(info.shape)
    if a.ndim > rank:
        raise InputError(f"{what} for site {name!r} has shape {a.shape}; the site's shape is {info.shape} (axes {info.axes}).")
    a = jnp.reshape(a, (1,) * (rank - a.ndim) + a.shape)
    try:
        ok = np.broadcast_shapes(a.shape, info.shape) == info.shape
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"{what} for site {name!r} has shape {a.shape}, not broadcastable to the site's shape "
                         f"{info.shape} (axes {info.axes}).")
    for i, _ in coords.values():
        a = a[0] if a.shape[0] == 1 else jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)
    return a


def _apply_edit(name, x, e: SiteEdit, info: SiteInfo, coords):
    local_axes = info.axes[len(coords):]
    sel = None
    for axis, idx in e.index.items():
        if axis not in info.axes:
            raise InputError(f"Site {name!r} has axes {info.axes}; cannot index axis {axis!r}.")
        idx = jnp.reshape(jnp.asarray(idx, jnp.int32), (-1,))
        whole = jnp.any(idx == ALL)
        if axis in coords:
            i, n = coords[axis]
            m = jnp.any(idx % n == i) | whole  # a scalar: this layer / example is selected
        else:
            k = local_axes.index(axis)
            n = x.shape[k]
            hit = jnp.any(jnp.arange(n, dtype=jnp.int32)[:, None] == (idx % n)[None, :], axis=-1) | whole
            m = jnp.reshape(hit, [n if j == k else 1 for j in range(x.ndim)])
        sel = m if sel is None else sel & m
    if e.enabled is not None:
        sel = e.enabled if sel is None else sel & e.enabled
    if sel is not None and jnp.ndim(sel) < x.ndim:
        sel = jnp.reshape(sel, (1,) * (x.ndim - jnp.ndim(sel)) + jnp.shape(sel))
    if e.value is not None:
        v = _prep(name, e.value, info, coords, "value").astype(x.dtype)
        x = jnp.broadcast_to(v, x.shape) if sel is None else jnp.where(sel, v, x)
    if e.delta is not None:
        d = _prep(name, e.delta, info, coords, "delta").astype(x.dtype)
        x = x + (d if sel is None else jnp.where(sel, d, jnp.zeros((), x.dtype)))
    return x


def site(name: str, x, axes=None):
    """Mark an intervention point in a pure JAX function: returns ``x`` (or ``x`` as patched).

    Outside a jaxpatch run this is the identity, so the model runs unchanged. Inside one, jaxpatch
    can capture, replace, add to or zero the activation, and sweep over its axes.

    Args:
        name: the site's name, unique in one forward pass (per layer inside :func:`scan`).
        x: the activation (one array).
        axes: one name per axis of ``x``, ``"batch"`` first (e.g. ``("batch", "pos", "d_model")``);
            for a per-example model (``batched=False``) the axes without ``batch``. Inside the
            model's own ``jax.vmap``, name the mapped array's axes, the mapped axis first. Default:
            ``batch``, ``dim1``, ``dim2``...

    Returns:
        the (possibly edited) activation, same shape and dtype.

    Raises:
        SiteError: the name is reached twice in one forward pass, the axes do not fit, or the site
            is inside a transformation the model applies itself (use :func:`scan` for layers).

    Example::

        def apply(params, x):
            h = jaxpatch.site("hidden", jnp.tanh(x @ params["w1"]), axes=("batch", "neuron"))
            return h @ params["w2"]
    """
    scope = _SCOPE.get()
    if scope is None:
        return x
    return scope.visit(name, x, axes)


def module_output(name: str, out, axes=None):
    """For the Flax and Equinox adapters: route a submodule's output through the current scope
    when this run addresses it (or discovers sites); otherwise return it untouched."""
    scope = _SCOPE.get()
    if scope is None or not scope.wants(name):
        return out
    return scope.visit(name, out, axes, module_output=True)


def current_scope() -> Scope | None:
    return _SCOPE.get()


def scan(f: Callable, init, xs=None, length: int | None = None, reverse: bool = False, unroll: int | bool = 1):
    """``jax.lax.scan`` whose body may contain sites: the iteration index is their ``layer``.

    Outside a jaxpatch run this is exactly ``jax.lax.scan``. Inside one, every site of the body gets
    a leading ``layer`` axis (size ``length``): edits select layers by the iteration index (data,
    so a sweep over layers compiles once) and captures are stacked ``[layer, ...]``. One level of
    ``jaxpatch.scan`` is supported (a nested one raises).
    """
    scope = _SCOPE.get()
    if scope is None:
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)
    if scope.layer is not None:
        raise SiteError("jaxpatch.scan inside jaxpatch.scan: sites carry one layer axis; flatten the nesting "
                        "(scan over layers once).")
    if _trace_state() != scope.trace:
        raise SiteError("jaxpatch.scan inside a transformation the model applies itself (its own jax.vmap, "
                        "jax.checkpoint...): the stacked captures could not leave it. Scan outside the vmap (vmap "
                        "inside the layer), or let jaxpatch vmap a per-example model (batched=False).")
    leaves = jax.tree_util.tree_leaves(xs)
    n = length if length is not None else (leaves[0].shape[0] if leaves else None)
    if n is None:
        raise SiteError("jaxpatch.scan needs xs or length= to know the number of layers.")
    children: list[Scope] = []

    def body(carry, inp):
        i, x = inp
        child = Scope({}, frozenset(), parent=scope, layer=i, n_layers=n)
        children.append(child)
        with child:
            carry, y = f(carry, x)
        return carry, (y, child.captured)

    carry, (ys, caps) = jax.lax.scan(body, init, (jnp.arange(n, dtype=jnp.int32), xs), length=n,
                                     reverse=reverse, unroll=unroll)
    child = children[-1]
    for name, info in child.infos.items():
        if name in scope.root().infos:
            raise SiteError(f"Site {name!r} is declared twice in one forward pass (inside and outside jaxpatch.scan, "
                            "or in two scans); give each its own name.")
        scope.root().infos[name] = info
    root = scope.root()
    for name, v in child.unaddressable.items():
        root.unaddressable[name] = v
    scope.captured.update(caps)
    return carry, ys
