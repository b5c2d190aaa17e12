"""Equinox models as :class:`~jaxpatch.byo.Patchable`: every submodule's output is a site, named
by its pytree path (``"blocks.0.attn"``), with no change to the model code.

The model is partitioned into its arrays (the params pytree: data) and the rest (static). Each
run recombines them and, on that copy only, wraps each addressed submodule with ``eqx.tree_at``
in a :class:`_Sited` module whose ``__call__`` routes the output through the jaxpatch scope.

Equinox layers take one example; by default jaxpatch vmaps the model over the batch itself
(``batched=False``), so module outputs are sites with a leading ``batch`` axis. A submodule the
model calls inside its own ``jax.vmap`` (a ``Linear`` mapped over positions) is a site too, with
the mapped axis after ``batch`` (``[batch, pos, d_out]``; see :mod:`jaxpatch.byo._site`).

equinox is imported lazily: the core install does not need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from .._errors import InputError
from ._flax import resolve_axes
from ._model import Patchable
from ._site import current_scope, module_output


def module_paths(tree, prefix: tuple = ()) -> list[tuple]:
    """Pytree paths (tuples of field names, list indices, dict keys) of every ``eqx.Module`` in
    ``tree`` below the root, parents before children."""
    import equinox as eqx

    out = []

    def walk(node, path):
        if isinstance(node, eqx.Module):
            if path:
                out.append(path)
            for f in dataclasses.fields(node):
                if f.metadata.get("static", False):
                    continue
                walk(getattr(node, f.name, None), path + (f.name,))
        elif isinstance(node, (list, tuple)):
            for i, c in enumerate(node):
                walk(c, path + (i,))
        elif isinstance(node, dict):
            for k, c in node.items():
                walk(c, path + (k,))

    walk(tree, prefix)
    return out


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _get(node, path):
    for p in path:
        node = getattr(node, p) if isinstance(p, str) and not isinstance(node, dict) else node[p]
    return node


def _sited_type():
    import equinox as eqx

    class _Sited(eqx.Module):
        """A submodule whose output is a jaxpatch site (used only inside a jaxpatch run)."""

        inner: Any
        site_name: str = eqx.field(static=True)
        site_axes: Any = eqx.field(static=True)

        def __call__(self, *args, **kwargs):
            return module_output(self.site_name, self.inner(*args, **kwargs), self.site_axes)

        def __getattr__(self, item):  # the model may read its submodules' fields
            if item in ("inner", "site_name", "site_axes") or item.startswith("__"):
                raise AttributeError(item)
            return getattr(self.inner, item)

    return _Sited


_SITED = None


def from_equinox(model, *, call: Callable | None = None, batched: bool = False,
                 axes: Mapping[str, tuple] | None = None, output: Callable | None = None,
                 name: str | None = None) -> Patchable:
    """An Equinox model as a :class:`Patchable`; each submodule's output is a site named by its
    pytree path (``"blocks.0.attn"``, ``"layers.1"``).

    Args:
        model: the Equinox module (not modified).
        call: ``(model, inputs) -> outputs``; default ``model(inputs)``.
        batched: ``False`` (default): ``call`` takes one example and jaxpatch vmaps it over the
            batch, so sites have a leading ``batch`` axis added; ``True``: ``call`` takes the batch
            (e.g. ``lambda m, x: jax.vmap(m)(x)``: the batch is then the mapped axis of each site).
        axes: pytree-path pattern -> axis names as the module sees them (without ``batch`` when
            ``batched=False``); others get ``dim1, dim2...`` after ``batch``.
        output: optional selector of the array metrics read from the outputs.
    """
    import equinox as eqx

    global _SITED
    if _SITED is None:
        _SITED = _sited_type()
    if not isinstance(model, eqx.Module):
        raise InputError(f"from_equinox takes an eqx.Module; got {type(model).__name__}.")
    params, static = eqx.partition(model, eqx.is_array)
    paths = module_paths(model)

    def fn(params, inputs):
        m = eqx.combine(params, static)
        scope = current_scope()
        if scope is not None:
            wanted = [p for p in paths if scope.wants(path_name(p))]
            for p in sorted(wanted, key=len, reverse=True):  # children first: parents wrap them
                n = path_name(p)
                m = eqx.tree_at(lambda t, p=p: _get(t, p), m,
                                replace_fn=lambda sub, n=n: _SITED(sub, n, resolve_axes(axes, n)))
        return m(inputs) if call is None else call(m, inputs)

    return Patchable(fn, params, batched=batched, output=output, name=name or type(model).__name__)
