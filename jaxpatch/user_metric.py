"""User metrics as data: traced afresh on every call, compiled once per program structure.

A user metric is a Python callable. Compiled sweeps cannot take it as a ``jit`` static argument
keyed by the function's identity: a metric that closes over an array (``answer_tokens``), reads a
global or any other outside state would be traced once and keep the old values on the next call,
while the eagerly computed baselines used the new ones. Instead, every jaxpatch call traces the
metric again (cheap: no compilation) into a jaxpr whose closed-over constants are lifted into
ordinary arguments:

* :class:`TracedMetric` holds the jaxpr with the constants as leading inputs. It hashes and
  compares by the jaxpr's *structure* (its printed form and the constants' shapes and dtypes), so
  an unchanged metric hits the compile cache while a metric whose code path changed (a Python
  scalar or branch read from outside, which becomes part of the program) compiles anew.
* its constants travel as dynamic data (``ctx["metric_consts"]`` in the engines), so the compiled
  program always sees the values current at call time, exactly as the eager baselines do.

:func:`first_position_read` proves from the traced program which positions of a full-logits
input ``[batch, pos, vocab]`` a metric can depend on, so the TransformerLens compatibility layer
may skip unembedding positions the metric never reads. The analysis is a sound dataflow pass: it
only narrows the read set through slices, gathers and dynamic slices whose position indices it can
evaluate; any other use of the logits counts as reading every position.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ._errors import InputError


class TracedMetric:
    """A user metric traced at one input shape: ``(consts, x) -> value``.

    Hashable by structure (see module docstring); the constants are not part of it.

    Attributes:
        name: the user function's ``__name__`` (used to label results).
        in_aval: the traced input's shape/dtype (``[batch, ...]``).
        out_aval: the output's shape/dtype.
    """

    def __init__(self, jaxpr: jcore.Jaxpr, n_consts: int, key: tuple, name: str, in_aval, out_aval):
        self.jaxpr = jaxpr
        self.n_consts = n_consts
        self.key = key
        self.name = name
        self.in_aval = in_aval
        self.out_aval = out_aval

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, TracedMetric) and self.key == other.key

    def __repr__(self) -> str:
        return f"TracedMetric({self.name!r}, {self.in_aval.shape} -> {self.out_aval.shape})"

    def __call__(self, consts: Sequence[Any], x):
        """Evaluate on ``x``. If ``x`` stacks several batches of the traced size along its first
        axis (several corrupted sets or noise samples), the metric is applied to each batch
        separately (as the user wrote it, for one batch) and the results are concatenated."""
        b = self.in_aval.shape[0]
        if x.shape[1:] != self.in_aval.shape[1:] or x.shape[0] % b:
            raise InputError(f"Metric {self.name!r} was traced for inputs {self.in_aval.shape}; got {x.shape}.")
        x = x.astype(self.in_aval.dtype)
        if x.shape[0] == b:
            return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(self.jaxpr, ()))(*consts, x)[0]
        groups = x.reshape((x.shape[0] // b,) + self.in_aval.shape)
        out = jax.vmap(lambda g: jcore.jaxpr_as_fun(jcore.ClosedJaxpr(self.jaxpr, ()))(*consts, g)[0])(groups)
        return out.reshape((-1,) + out.shape[2:])


def trace(fn: Callable, example: jax.ShapeDtypeStruct) -> tuple[TracedMetric, tuple]:
    """Trace ``fn`` at ``example``'s shape: ``(TracedMetric, consts)``.

    Raises:
        InputError: ``fn`` fails to trace (not a JAX function of one array, or wrong shapes).
    """
    name = getattr(fn, "__name__", None) or type(fn).__name__
    # jax.make_jaxpr (and jax.jit) cache traces by function identity, which would freeze the
    # closed-over values of the first call: trace a fresh wrapper each time, and look through a
    # jitted metric to the function it wraps.
    inner = fn.__wrapped__ if hasattr(fn, "lower") and hasattr(fn, "__wrapped__") else fn
    try:
        closed = jax.make_jaxpr(lambda x: inner(x))(example)
    except InputError:
        raise
    except Exception as e:  # the user's code: say which metric and with what it was called
        raise InputError(
            f"Metric {name!r} failed when called on logits of shape {example.shape} ({example.dtype}): "
            f"{type(e).__name__}: {e}"
        ) from e
    if len(closed.out_avals) != 1:
        raise InputError(f"Metric {name!r} must return one array; it returned {len(closed.out_avals)} outputs.")
    consts = tuple(closed.consts)
    jaxpr = closed.jaxpr
    # Lift the constants into leading inputs so they become arguments, not baked-in values.
    lifted = jaxpr.replace(constvars=[], invars=list(jaxpr.constvars) + list(jaxpr.invars))
    const_avals = tuple((tuple(np.shape(c)), str(jnp.result_type(c))) for c in consts)
    key = (str(lifted), const_avals, tuple(example.shape), str(example.dtype))
    out = closed.out_avals[0]
    return TracedMetric(lifted, len(consts), key, name, example, jax.ShapeDtypeStruct(out.shape, out.dtype)), consts


# ----------------------------------------------------------------------------------------------
# Which positions of the logits can a metric read? A sound dataflow analysis of its jaxpr.

#: Primitives whose params hold one sub-jaxpr taking exactly the equation's inputs.
_CALL_PARAMS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
                "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
                "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


class _View:
    """A variable that is the metric's full-logits input itself (positions on ``axis``)."""

    def __init__(self, axis: int):
        self.axis = axis


def first_position_read(metric: TracedMetric, consts: Sequence[Any], pos_axis: int = 1) -> int:
    """The smallest position ``s`` such that the metric's output provably does not depend on
    ``x[:, :s]`` (``x`` the traced input, positions on ``pos_axis``). ``0`` means "may read any
    position" (the safe answer whenever the analysis cannot prove more)."""
    n_pos = metric.in_aval.shape[pos_axis]
    env_known = {v: np.asarray(c) for v, c in zip(metric.jaxpr.invars[: metric.n_consts], consts)}
    dep = _analyse(metric.jaxpr, [None] * metric.n_consts + [_View(pos_axis)], env_known, n_pos)
    out = dep[0]
    if out is None:  # the metric does not read the logits at all
        return n_pos - 1
    return 0 if isinstance(out, _View) else int(out)


def _analyse(jaxpr, in_deps, known: dict, n_pos: int) -> list:
    """Dependency of each output: ``None`` (independent of the logits), ``_View`` (the logits
    themselves), or an int ``s`` (depends on positions ``>= s`` only). ``known``: concrete values
    of logits-independent variables (evaluated lazily, only to read indices)."""
    dep: dict = {}
    producer = {}
    for v, d in zip(jaxpr.invars, in_deps):
        dep[v] = d
    for v in jaxpr.constvars:
        dep[v] = None
    for eqn in jaxpr.eqns:
        for o in eqn.outvars:
            producer[o] = eqn

    def get(v):
        return None if isinstance(v, jcore.Literal) else dep.get(v)

    def value(v):
        """Concrete value of a logits-independent variable, or None if it cannot be had."""
        if isinstance(v, jcore.Literal):
            return np.asarray(v.val)
        if v in known:
            return known[v]
        eqn = producer.get(v)
        if eqn is None or eqn.effects or any(get(i) is not None for i in eqn.invars):
            return None
        args = [value(i) for i in eqn.invars]
        if any(a is None for a in args):
            return None
        try:
            outs = eqn.primitive.bind(*args, **eqn.params)
        except Exception:
            return None
        outs = outs if eqn.primitive.multiple_results else [outs]
        for o, val in zip(eqn.outvars, outs):
            known[o] = np.asarray(val)
        return known.get(v)

    def lo(d):
        if d is None:
            return None
        return 0 if isinstance(d, _View) else d

    def merge(ds):
        vals = [lo(d) for d in ds if d is not None]
        return min(vals) if vals else None

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [get(v) for v in eqn.invars]
        view = ins[0] if ins and isinstance(ins[0], _View) else None
        out = None
        if view is not None and name == "slice" and not any(isinstance(d, _View) for d in ins[1:]):
            a = view.axis
            out = merge([int(eqn.params["start_indices"][a])] + ins[1:])
        elif view is not None and name == "dynamic_slice" and not any(isinstance(d, _View) for d in ins[1:]):
            a = view.axis
            start = value(eqn.invars[1 + a])
            size = int(eqn.params["slice_sizes"][a])
            out = 0 if start is None else merge([int(np.clip(int(start), 0, n_pos - size))] + ins[1:])
        elif view is not None and name == "gather" and len(ins) == 2 and ins[1] is None:
            out = _gather_first(eqn, view.axis, value(eqn.invars[1]), n_pos)
        elif name in _CALL_PARAMS and eqn.params.get(_CALL_PARAMS[name]) is not None:
            sub = eqn.params[_CALL_PARAMS[name]]
            sub_jaxpr = getattr(sub, "jaxpr", sub)
            if len(sub_jaxpr.invars) == len(ins) and len(sub_jaxpr.outvars) == len(eqn.outvars):
                sub_known = {}
                for sv, v, d in zip(sub_jaxpr.invars, eqn.invars, ins):
                    if d is None:
                        val = value(v)
                        if val is not None:
                            sub_known[sv] = val
                outs = _analyse(sub_jaxpr, ins, sub_known, n_pos)
                for o, d in zip(eqn.outvars, outs):
                    dep[o] = d
                continue
            out = merge(ins)
        else:
            out = merge(ins)
        for o in eqn.outvars:
            dep[o] = out
    return [get(v) for v in jaxpr.outvars]


def _gather_first(eqn, axis: int, indices, n_pos: int) -> int:
    """First position a gather from the logits reads (0 when it cannot tell)."""
    if indices is None:
        return 0
    dn = eqn.params["dimension_numbers"]
    size = int(eqn.params["slice_sizes"][axis])
    if axis in tuple(dn.operand_batching_dims):
        return 0
    if axis not in tuple(dn.start_index_map):
        return 0  # the window starts at position 0
    j = tuple(dn.start_index_map).index(axis)
    idx = np.asarray(indices)
    starts = np.take(idx, j, axis=idx.ndim - 1) if idx.ndim else idx
    if starts.size == 0:
        return n_pos - 1
    # XLA clamps start indices into range (CLIP and PROMISE_IN_BOUNDS); FILL_OR_DROP reads nothing
    # out of range, so clamping gives a lower bound there too.
    return int(np.clip(starts, 0, n_pos - size).min())
