"""A model brought by the user: a pure function with sites, ``fn(params, inputs) -> outputs``.

:class:`Patchable` wraps any such function (plain JAX with :func:`jaxpatch.site`, or a Flax or
Equinox model through :mod:`jaxpatch.byo`'s adapters) so that jaxpatch can run it with edits and
captures given as data:

    run(model, params, inputs, edits, capture) -> (outputs, captures)

``run`` is pure; :func:`jaxpatch.activation_patch` vmaps it over a pytree of patch indices and
:func:`jaxpatch.attribution_patch` differentiates it with respect to zero deltas.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from ..interventions import ALL
from ._site import Scope, SiteEdit, SiteError, SiteInfo, unknown_site_error


def _batch_size(inputs) -> int:
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves:
        raise InputError("The model's inputs hold no arrays: jaxpatch needs a leading batch axis to patch over.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise InputError(f"Every input array needs the same leading batch axis; got leading sizes {sorted(map(str, sizes))}.")
    return sizes.pop()


def run(model: "Patchable", params, inputs, edits: Mapping[str, tuple] | None = None, capture=frozenset(),
        discover: bool = False):
    """One forward pass with ``edits`` applied and ``capture`` recorded (pure; call under jit).

    Returns:
        ``(outputs, captures, infos, unaddressable)``: captures in each site's external layout
        (``[layer, batch, ...]`` for sites inside :func:`jaxpatch.scan`, else ``[batch, ...]``).
    """
    edits = dict(edits or {})
    capture = frozenset(capture)
    if model.batched:
        with Scope(edits, capture, discover=discover) as scope:
            out = model.fn(params, inputs)
        caps, infos, bad = scope.captured, scope.infos, scope.unaddressable
    else:
        B = _batch_size(inputs)
        scopes: list[Scope] = []

        def one(x, b):
            with Scope(edits, capture, discover=discover, batch_index=b, batch_size=B) as s:
                o = model.fn(params, x)
            scopes.append(s)
            return o, s.captured

        out, caps = jax.vmap(one)(inputs, jnp.arange(B, dtype=jnp.int32))
        infos, bad = scopes[-1].infos, scopes[-1].unaddressable
        caps = {k: (jnp.moveaxis(v, 1, 0) if infos[k].layered else v) for k, v in caps.items()}
    missing = [n for n in list(edits) + sorted(capture) if n not in infos]
    if missing and not discover:
        raise _unknown(missing[0], infos, bad)
    if model.output is not None:
        out = model.output(out)
    return out, caps, infos, bad


def _unknown(name, infos, bad):
    if name in bad:
        return SiteError(f"{name!r} cannot be a site: {bad[name]}. Valid sites: {sorted(infos)}")
    return unknown_site_error(name, list(infos))


class Patchable:
    """A model as a pure function with named intervention points, for jaxpatch's sweeps.

    Args:
        fn: ``fn(params, inputs) -> outputs``, pure, calling :func:`jaxpatch.site` (or built by an
            adapter: :func:`jaxpatch.byo.from_flax`, :func:`~jaxpatch.byo.from_nnx`,
            :func:`~jaxpatch.byo.from_equinox`).
        params: the parameters pytree passed to ``fn`` (data: changing values never recompiles).
        batched: ``True`` if ``fn`` takes a batch (leading axis of every input); ``False`` if it
            takes one example (Equinox style): jaxpatch then vmaps it over the batch and each site
            gains a leading ``batch`` axis.
        output: optional ``outputs -> array`` selecting what metrics read (e.g. ``lambda o: o["logits"]``).
        name: a label for results and reprs.

    Outputs must be one array ``[batch, ...]`` (after ``output``): built-in metrics read
    ``[batch, classes]`` or ``[batch, pos, vocab]`` (at ``answer_pos``); a user metric gets the
    whole output and returns ``[batch]``.
    """

    def __init__(self, fn: Callable, params, *, batched: bool = True, output: Callable | None = None,
                 name: str | None = None):
        if not callable(fn):
            raise InputError(f"fn must be a function (params, inputs) -> outputs; got {type(fn).__name__}.")
        self.fn = fn
        self.params = params
        self.batched = bool(batched)
        self.output = output
        self.name = name or getattr(fn, "__name__", "model")
        self._site_cache: dict = {}
        self._jit_run = jax.jit(self._run_pure, static_argnames=("capture",))

    def __repr__(self) -> str:
        return f"Patchable({self.name!r}, batched={self.batched})"

    # -- structure ---------------------------------------------------------------------------
    def site_infos(self, inputs) -> dict[str, SiteInfo]:
        """Every site one forward pass on inputs shaped like ``inputs`` reaches (traced once per
        input structure, with ``jax.eval_shape``; nothing is computed)."""
        return self._discover(inputs)[0]

    def sites(self, inputs) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """``name -> (axes, shape)`` of every site, in the order the forward pass reaches them."""
        return {k: (v.axes, v.shape) for k, v in self.site_infos(inputs).items()}

    def _discover(self, inputs):
        key = jax.tree_util.tree_structure(inputs), tuple(
            (tuple(np.shape(x)), str(jnp.result_type(x))) for x in jax.tree_util.tree_leaves(inputs))
        if key not in self._site_cache:
            box = {}

            def f(params, x):
                out, _, infos, bad = run(self, params, x, discover=True)
                box["infos"], box["bad"] = infos, bad
                return out

            box["out"] = jax.eval_shape(f, self.params, inputs)
            self._site_cache[key] = (dict(box["infos"]), dict(box["bad"]), box["out"])
        return self._site_cache[key]

    def check_sites(self, names, inputs) -> dict[str, SiteInfo]:
        """``{name: SiteInfo}`` for ``names``, or an error listing the valid sites, closest first."""
        infos, bad, _ = self._discover(inputs)
        out = {}
        for n in names:
            if n not in infos:
                raise _unknown(n, infos, bad)
            out[n] = infos[n]
        return out

    def output_shape(self, inputs):
        return self._discover(inputs)[2]

    # -- running -----------------------------------------------------------------------------
    def _run_pure(self, params, inputs, edits, capture=frozenset()):
        out, caps, _, _ = run(self, params, inputs, edits, capture)
        return out, caps

    def __call__(self, inputs, interventions: Mapping[str, tuple] | None = None):
        """Outputs of one forward pass (with ``interventions`` applied: see :meth:`replace` etc.)."""
        return self.run_with_cache(inputs, (), interventions)[0]

    def run_with_cache(self, inputs, names=None, interventions: Mapping[str, tuple] | None = None):
        """``(outputs, {name: activation})``; ``names`` default to every site."""
        if names is None:
            names = tuple(self.site_infos(inputs))
        names = (names,) if isinstance(names, str) else tuple(names)
        ivs = dict(interventions or {})
        infos = self.check_sites(list(names) + list(ivs), inputs)
        check_edits(ivs, infos)
        return self._jit_run(self.params, inputs, ivs, capture=frozenset(names))

    # -- interventions (data) ----------------------------------------------------------------
    @staticmethod
    def edit(name: str, *, value=None, delta=None, **index) -> dict[str, tuple[SiteEdit, ...]]:
        """One edit at site ``name``: ``{name: (SiteEdit,)}``. ``index``: axis -> indices (the
        site's external axes, e.g. ``layer=1, pos=3``). Combine with :func:`combine`."""
        if value is None and delta is None:
            raise InputError("An edit needs value= and/or delta=.")
        idx = {a: jnp.asarray(i, jnp.int32) for a, i in index.items() if i is not None}
        return {name: (SiteEdit(value=value, delta=delta, index=idx),)}

    @classmethod
    def replace(cls, name: str, value, **index):
        return cls.edit(name, value=value, **index)

    @classmethod
    def add(cls, name: str, delta, **index):
        return cls.edit(name, delta=delta, **index)

    @classmethod
    def zero(cls, name: str, **index):
        return cls.edit(name, value=jnp.zeros((), jnp.float32), **index)


def check_edits(edits: Mapping[str, tuple], infos: Mapping[str, SiteInfo]) -> None:
    """Refuse edits that index an axis the site does not have, or out of range (a wrapped index
    would patch another position silently). Traced indices are checked where they are built."""
    for name, es in edits.items():
        info = infos[name]
        for e in es:
            if not isinstance(e, SiteEdit):
                raise InputError(f"Edits at {name!r} must be SiteEdit s (from model.replace/zero/add/edit); got {type(e).__name__}.")
            for axis, idx in e.index.items():
                if axis not in info.axes:
                    raise InputError(f"Site {name!r} has axes {info.axes}; cannot index axis {axis!r}.")
                if isinstance(idx, jax.core.Tracer):
                    continue
                arr = np.asarray(idx)
                if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
                    raise InputError(f"{axis} index for site {name!r} must be integers; got dtype {arr.dtype}.")
                n = info.size(axis)
                bad = arr[((arr < -n) | (arr >= n)) & (arr != ALL)]
                if bad.size:
                    raise InputError(f"{axis} index {sorted(set(bad.tolist()))} out of range for site {name!r}: valid 0..{n - 1} "
                                     f"(or negative from the end); the site has axes {info.axes}, shape {info.shape}.")


def combine(*edits: Mapping[str, tuple] | None) -> dict[str, tuple]:
    """Join edit dicts (applied in order at each site)."""
    out: dict[str, tuple] = {}
    for e in edits:
        for k, v in (e or {}).items():
            out[k] = out.get(k, ()) + tuple(v)
    return out


def patchable(fn: Callable, params, *, batched: bool = True, output: Callable | None = None,
              name: str | None = None) -> Patchable:
    """Wrap a pure JAX function with :func:`jaxpatch.site` calls (see :class:`Patchable`)."""
    return Patchable(fn, params, batched=batched, output=output, name=name)


def is_patchable(model: Any) -> bool:
    return isinstance(model, Patchable)
