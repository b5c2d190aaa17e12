"""A user metric evaluated without its full logits: only the logits it reads are computed.

A TransformerLens-style metric takes full logits ``[B, T, V]`` and usually reads a handful of them
(``logits[range(B), -1, answer] - logits[range(B), -1, wrong]``). A sweep that hands each patched
run's metric the whole array computes a full-vocabulary unembedding per read row and, where the
metric reads only some positions, writes a zero-padded ``[B, T, V]`` array, though the metric
then gathers two numbers per prompt.

:func:`evaluate` runs the metric's traced program (:class:`jaxpatch.user_metric.TracedMetric`) on
a *proxy* of the logits instead: an int32 array holding each element's flat index
``(b * T + t) * V + v``. Operations that only move, select or drop elements (slices, reshapes,
transposes, broadcasts, gathers, dynamic slices, concatenations, selects, calls of sub-programs)
are applied to the proxy exactly as the metric applies them to the logits, so their results hold
the indices of the logits they would hold. Where any other operation (arithmetic, a reduction,
a softmax) consumes such a value, the logits at those indices are computed then:

* few of them (a logit difference): each is one dot product of its final residual row with its
  token's unembedding column (:func:`jaxpatch.models.logits_elements`);
* many (a softmax over the vocabulary): the read rows are unembedded once, with the same matmul
  as the full-logits path, and the values looked up in that table.

Nothing else changes: the metric's own arithmetic runs on the same values as before, so the
result equals the full-logits evaluation up to the summation order of a dot product (tested
against it; ``jaxpatch.sweep.LAZY_LOGITS = False`` is that slow twin). Indices of positions the
metric was proved not to read (:func:`jaxpatch.user_metric.first_position_read`) cannot reach a
computed value; if one did, it would read NaN (reported by the sweep), never another position.
A gather that fills out-of-range reads (``mode="fill"``) marks them with index -1 and the fill
value is restored when the value is computed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

#: Compute logits one dot product each while they are at most this share of the read rows'
#: full-vocabulary logits (one element's gathered row and column cost about as much as a few
#: hundred matmul multiply-adds); otherwise unembed the read rows once and look them up.
ELEMENT_SHARE = 1 / 64

#: Primitives that only move, select or drop elements, with the operand positions that carry them
#: (the others are indices or predicates, which never derive from the logits here).
_STRUCTURAL = {
    "slice": (0,), "squeeze": (0,), "reshape": (0,), "broadcast_in_dim": (0,), "transpose": (0,),
    "rev": (0,), "copy": (0,), "copy_p": (0,), "dynamic_slice": (0,), "gather": (0,),
}
#: Sub-program calls whose inputs map one to one onto the callee's (evaluated through).
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


class _Proxy:
    """Logits not computed yet: ``index`` (int32, the value's shape) holds each element's flat
    index into the ``[B, T, V]`` logits, -1 where a filling gather read out of range (``fill``)."""

    __slots__ = ("index", "fill")

    def __init__(self, index, fill=None):
        self.index = index
        self.fill = fill


class Logits:
    """The logits ``[B, T, V]`` of final residual rows ``x`` ``[B, T - first, D]`` (positions
    ``first..T-1``), computed where a metric reads them.

    ``row_logits(x)`` -> ``[B, R, V]`` (the unembedding of whole rows); ``element_logits(h, v)``:
    rows ``h`` ``[..., D]`` and one token id each ``[...]`` -> ``[...]``."""

    def __init__(self, x, n_pos: int, n_vocab: int, dtype, row_logits: Callable, element_logits: Callable):
        self.x, self.T, self.V, self.dtype = x, int(n_pos), int(n_vocab), jnp.dtype(dtype)
        self.first = self.T - int(x.shape[1])
        self._rows, self._table = row_logits, None
        self._elements = element_logits
        self.finite = []  # every computed value's "all finite"
        self.counts = {"elements": 0, "tables": 0}

    def fits(self) -> bool:
        """Whether flat indices of the ``[B, T, V]`` logits fit the int32 proxy."""
        return int(self.x.shape[0]) * self.T * self.V < 2**31

    def proxy(self) -> _Proxy:
        B, T, V = int(self.x.shape[0]), self.T, self.V
        shape = (B, T, V)
        flat = (lax.broadcasted_iota(jnp.int32, shape, 0) * T + lax.broadcasted_iota(jnp.int32, shape, 1)) * V
        return _Proxy(flat + lax.broadcasted_iota(jnp.int32, shape, 2))

    def compute(self, p: _Proxy):
        """The logits at ``p``'s indices (NaN at an unread position; ``p.fill`` where it says -1)."""
        B, R = int(self.x.shape[0]), int(self.x.shape[1])
        T, V = self.T, self.V
        e = jnp.maximum(p.index, 0)
        b, t, v = e // (T * V), (e // V) % T, e % V
        r = t - self.first
        size = int(np.prod(p.index.shape))
        if size <= ELEMENT_SHARE * B * R * V:
            vals = self._elements(self.x[b, jnp.maximum(r, 0)], v)
            self.counts["elements"] += size
        else:
            if self._table is None:
                self._table = self._rows(self.x)
                self.counts["tables"] += 1
            vals = self._table[b, jnp.maximum(r, 0), v]
        vals = vals.astype(self.dtype)
        self.finite.append(jnp.all(jnp.isfinite(vals)))
        vals = jnp.where(r >= 0, vals, jnp.asarray(np.nan, self.dtype))
        if p.fill is not None:
            vals = jnp.where(p.index >= 0, vals, jnp.asarray(p.fill, self.dtype))
        return vals


def evaluate(jaxpr: jcore.Jaxpr, args, logits: Logits):
    """Evaluate ``jaxpr`` (a traced metric, its last input the logits) on ``args`` (its other
    inputs) with the logits computed only where read: ``outputs`` (a list)."""
    outs = _run(jaxpr, (), list(args) + [logits.proxy()], logits)
    return [logits.compute(o) if isinstance(o, _Proxy) else o for o in outs]


def _lazy_eqn(eqn, name: str, ins, lazy, logits: Logits):
    """Outputs of an equation some of whose inputs are proxies, kept as proxies where the
    equation only moves elements; ``None``: compute the proxies and run the equation as it is."""
    if name in _STRUCTURAL:
        data = _STRUCTURAL[name]
        if any(lazy[i] for i in range(len(ins)) if i not in data) or not all(lazy[i] for i in data):
            return None
        p = ins[0]
        params = dict(eqn.params)
        if name == "gather" and params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
            fill = np.nan if params["fill_value"] is None else float(params["fill_value"])
            if p.fill is not None and not _same(fill, p.fill):
                return None  # two different fills in one value: compute it
            params["fill_value"] = -1
            p = _Proxy(p.index, fill)
        out = eqn.primitive.bind(p.index, *ins[1:], **eqn.primitive.get_bind_params(params))
        return [_Proxy(out, p.fill)]
    if name == "convert_element_type" and jnp.dtype(eqn.params["new_dtype"]) == logits.dtype:
        return [ins[0]]
    if name in ("concatenate", "select_n"):
        data = range(len(ins)) if name == "concatenate" else range(1, len(ins))
        if name == "select_n" and lazy[0]:
            return None
        if not all(lazy[i] for i in data):
            return None
        fills = [ins[i].fill for i in data if ins[i].fill is not None]
        if any(not _same(f, fills[0]) for f in fills):
            return None
        fill = fills[0] if fills else None
        args = [a.index if isinstance(a, _Proxy) else a for a in ins]
        return [_Proxy(eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params)), fill)]
    if name in _CALLS and eqn.params.get(_CALLS[name]) is not None:
        sub = eqn.params[_CALLS[name]]
        closed = sub if hasattr(sub, "consts") else jcore.ClosedJaxpr(sub, ())
        if len(closed.jaxpr.invars) != len(ins):
            return None
        return _run(closed.jaxpr, closed.consts, ins, logits)
    return None


def _same(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b))


def _run(jaxpr, consts, args, logits: Logits):
    """Evaluate ``jaxpr``; outputs that are still proxies stay proxies."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, a in zip(jaxpr.constvars, consts):
        env[v] = a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        lazy = [isinstance(a, _Proxy) for a in ins]
        if any(lazy):
            outs = _lazy_eqn(eqn, eqn.primitive.name, ins, lazy, logits)
            if outs is not None:
                for o, val in zip(eqn.outvars, outs):
                    env[o] = val
                continue
            ins = [logits.compute(a) if isinstance(a, _Proxy) else a for a in ins]
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        for o, val in zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]):
            env[o] = val
    return [read(v) for v in jaxpr.outvars]
