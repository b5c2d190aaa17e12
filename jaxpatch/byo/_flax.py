"""Flax models as :class:`~jaxpatch.byo.Patchable`: every submodule's output is a site, named by
its module path, with no change to the model code.

* **linen**: ``nn.intercept_methods`` sees every module method call while the model is traced;
  the output of each submodule's ``__call__`` goes through the current jaxpatch scope when this run
  addresses its path (``"blocks_0.attn"``), and is left untouched otherwise.
* **nnx**: the model is split into a graph definition and its state (the params pytree: data).
  Each run merges a fresh copy and, on the copy only, gives the addressed submodules (paths such
  as ``"blocks.0.mlp"``) a subclass whose ``__call__`` routes the output through the scope.

flax is imported lazily: the core install does not need it.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Callable, Mapping

from .._errors import InputError
from ._model import Patchable
from ._site import module_output


def resolve_axes(axes: Mapping[str, tuple] | None, name: str):
    """The axes declared for module path ``name``: the first ``fnmatch`` pattern of ``axes`` that
    matches it (``{"blocks_*": ("batch", "pos", "d_model")}``), else ``None`` (default names)."""
    if not axes:
        return None
    if not isinstance(axes, Mapping):
        raise InputError(f"axes must map module paths (fnmatch patterns) to axis names; got {type(axes).__name__}.")
    for pattern, a in axes.items():
        if fnmatch.fnmatchcase(name, pattern):
            return tuple(a)
    return None


def from_flax(module, variables, *, call: Callable | None = None, axes: Mapping[str, tuple] | None = None,
              output: Callable | None = None, name: str | None = None) -> Patchable:
    """A Flax linen model as a :class:`Patchable`; each submodule's ``__call__`` output is a site
    named by its module path (``"blocks_0.attn.out"``), batched (first axis ``batch``).

    Args:
        module: the linen module.
        variables: its variables (``module.init(...)``): the params pytree.
        call: ``(module, variables, inputs) -> outputs``; default ``module.apply(variables, inputs)``.
        axes: module-path pattern -> axis names (``batch`` first) for sites; others get
            ``batch, dim1, dim2...``.
        output: optional selector of the array metrics read from the outputs.

    A module called more than once per forward pass (shared weights) or returning a tuple is not
    a site (the error for it says why).
    """
    import flax.linen as nn

    def fn(variables, inputs):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if context.method_name != "__call__" or not path:
                return out
            n = ".".join(str(p) for p in path)
            return module_output(n, out, resolve_axes(axes, n))

        with nn.intercept_methods(interceptor):
            if call is None:
                return module.apply(variables, inputs)
            return call(module, variables, inputs)

    return Patchable(fn, variables, batched=True, output=output, name=name or type(module).__name__)


@functools.lru_cache(maxsize=None)
def _sited_class(cls, name: str, axes):
    """A subclass of nnx module class ``cls`` whose ``__call__`` output is site ``name``."""

    def __call__(self, *args, **kwargs):
        return module_output(name, cls.__call__(self, *args, **kwargs), axes)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def from_nnx(model, *, call: Callable | None = None, axes: Mapping[str, tuple] | None = None,
             output: Callable | None = None, name: str | None = None) -> Patchable:
    """A Flax nnx model as a :class:`Patchable`; each submodule's ``__call__`` output is a site
    named by its path (``"blocks.0.mlp"``, ``"linear1"``), batched (first axis ``batch``).

    Args:
        model: the nnx module (not modified: every run works on a fresh ``nnx.merge`` copy).
        call: ``(module, inputs) -> outputs``; default ``module(inputs)``.
        axes, output: as for :func:`from_flax`.

    State updates made during the forward pass (batch-norm statistics, RNG counters) are not kept:
    patch a model in evaluation mode.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    def fn(state, inputs):
        from ._site import current_scope

        m = nnx.merge(graphdef, state)
        scope = current_scope()
        if scope is not None:
            for path, sub in nnx.iter_modules(m):
                if not path:
                    continue
                n = ".".join(str(p) for p in path)
                if scope.wants(n) and callable(sub):
                    sub.__class__ = _sited_class(type(sub), n, resolve_axes(axes, n))
        return m(inputs) if call is None else call(m, inputs)

    return Patchable(fn, state, batched=True, output=output, name=name or type(model).__name__)

