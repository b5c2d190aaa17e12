"""Names of the residual graph's nodes and edges, and circuits as boolean masks over its edges.

The graph is :class:`jaxpatch.edges.EdgeGraph`: upstream nodes (``embed``, ``L{l}H{h}``,
``MLP{l}``) write to the residual stream; downstream nodes (``L{l}H{h}.q``, ``L{l}H{h}.k``/``.v``
or ``L{l}KV{k}.k``/``.v`` under grouped-query attention, ``MLP{l}.in``, ``logits``) read it. A
circuit is a boolean mask ``[U, V]`` over the graph's valid edges.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import numpy as np

from .._errors import InputError
from ..config import ModelConfig
from ..edges import EdgeGraph


def graph_of(config: ModelConfig) -> EdgeGraph:
    return EdgeGraph.of(config)


def _suggest(name, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown(kind: str, name, valid: Sequence[str]) -> InputError:
    shown = list(valid[:6]) + (["..."] if len(valid) > 6 else [])
    return InputError(f"Unknown {kind} {name!r}.{_suggest(name, valid)} Valid {kind}s look like {shown} "
                      f"({len(valid)} in this model).")


def up_index(graph: EdgeGraph, name, kind: str = "component") -> int:
    """Index of upstream node ``name`` (``embed``, ``L0H3``, ``MLP2``); unknown names raise with the
    closest valid ones."""
    if isinstance(name, str) and name in graph.up:
        return graph.up.index(name)
    raise _unknown(kind, name, graph.up)


def down_index(graph: EdgeGraph, name, kind: str = "receiver") -> int:
    """Index of downstream node ``name`` (``L1H0.q``, ``MLP0.in``, ``logits``)."""
    if isinstance(name, str) and name in graph.down:
        return graph.down.index(name)
    raise _unknown(kind, name, graph.down)


def as_group(spec, what: str) -> tuple[str, ...]:
    """One entry of a list of components/receivers: a name, or a set of names acting jointly."""
    if isinstance(spec, str):
        return (spec,)
    try:
        group = tuple(spec)
    except TypeError:
        raise InputError(f"Each {what} must be a name or a list/tuple/set of names; got {spec!r}.") from None
    if not group:
        raise InputError(f"Empty {what} set: each {what} must name at least one node.")
    if len(set(group)) != len(group):
        raise InputError(f"{what} set {list(group)} names a node twice.")
    return group


def group_label(group: tuple[str, ...]) -> str:
    return "+".join(group)


def node_mask(graph: EdgeGraph, groups: Iterable, what: str = "component") -> np.ndarray:
    """``[G, U]`` bool: which upstream nodes each group contains."""
    groups = [as_group(g, what) for g in groups]
    out = np.zeros((len(groups), len(graph.up)), bool)
    for i, g in enumerate(groups):
        for n in g:
            out[i, up_index(graph, n, what)] = True
    return out


def circuit_mask(graph: EdgeGraph, edges) -> np.ndarray:
    """``[U, V]`` bool of a circuit given as ``(upstream, downstream)`` name pairs. Unknown names
    and pairs that are not edges of the graph (downstream node before upstream) raise."""
    m = np.zeros(graph.valid.shape, bool)
    bad = []
    for e in edges:
        try:
            u, d = e
        except (TypeError, ValueError):
            raise InputError(f"An edge is a pair (upstream, downstream), e.g. ('L0H1', 'L1H0.k'); got {e!r}.") from None
        i, j = up_index(graph, u, "upstream node"), down_index(graph, d, "downstream node")
        if not graph.valid[i, j]:
            bad.append((u, d))
        m[i, j] = True
    if bad:
        raise InputError(f"Edges not in the residual graph (the downstream node reads the stream before the upstream "
                         f"node writes it): {bad[:5]}{' ...' if len(bad) > 5 else ''}. An edge goes from a node to a "
                         f"node of a later layer (a head's write may feed its own layer's MLP unless attention and "
                         f"MLP run in parallel).")
    return m


def _owners(graph: EdgeGraph, config: ModelConfig) -> list[set[str]]:
    """For each downstream node, the upstream node(s) it belongs to (its head or MLP; a key/value
    head under grouped-query attention belongs to every query head of its group)."""
    N, K = config.n_heads, config.n_kv_heads
    group = N // K
    out = []
    for d in graph.down:
        if d == "logits":
            out.append({"logits"})
            continue
        node, kind = d.rsplit(".", 1)
        if kind == "in":
            out.append({node})
        elif "KV" in node:
            layer, k = node[1:].split("KV")
            out.append({f"L{layer}H{h}" for h in range(int(k) * group, (int(k) + 1) * group)})
        else:
            out.append({node})
    return out


def circuit_from_nodes(config: ModelConfig, nodes: Iterable[str]) -> np.ndarray:
    """``[U, V]`` mask of the circuit induced by a set of nodes: every edge from a node in the set
    to an input of a node in the set, or to the logits. Give ``"embed"`` to let the tokens in
    (without it no edge leaves the embedding). A key/value input under grouped-query attention is
    in the circuit when any query head reading it is."""
    g = graph_of(config)
    nodes = list(nodes)
    for n in nodes:
        up_index(g, n, "node")
    keep = set(nodes)
    up = np.array([u in keep for u in g.up])
    down = np.array([bool(o & (keep | {"logits"})) for o in _owners(g, config)])
    return up[:, None] & down[None, :] & g.valid


def check_circuits(graph: EdgeGraph, circuits) -> np.ndarray:
    """Circuits as ``[C, U, V]`` bool. Accepts one ``[U, V]`` mask, a ``[C, U, V]`` stack, or a list
    whose items are masks or lists of ``(upstream, downstream)`` edges."""
    U, V = graph.valid.shape
    if isinstance(circuits, np.ndarray) or hasattr(circuits, "__array__") and not isinstance(circuits, (list, tuple)):
        arr = np.asarray(circuits)
        if arr.ndim == 2:
            arr = arr[None]
        masks = [arr[i] for i in range(arr.shape[0])] if arr.ndim == 3 else None
        if masks is None:
            raise InputError(f"A circuit mask has shape [U, V] = ({U}, {V}) (or [C, U, V] for several); got {arr.shape}.")
    else:
        items = list(circuits)
        if items and isinstance(items[0], tuple) and len(items[0]) == 2 and all(isinstance(x, str) for x in items[0]):
            items = [items]  # one circuit given as a list of edges
        masks = [circuit_mask(graph, c) if not hasattr(c, "shape") else np.asarray(c) for c in items]
    if not masks:
        raise InputError("Give at least one circuit.")
    out = np.zeros((len(masks), U, V), bool)
    for i, m in enumerate(masks):
        if m.shape != (U, V):
            raise InputError(f"Circuit {i}: a mask over the graph's edges has shape [U, V] = ({U}, {V}); got {m.shape}.")
        if m.dtype != bool:
            raise InputError(f"Circuit {i}: a mask must be boolean (True = edge in the circuit); got dtype {m.dtype}.")
        extra = m & ~graph.valid
        if extra.any():
            i_, j_ = np.argwhere(extra)[0]
            raise InputError(f"Circuit {i} marks {int(extra.sum())} pair(s) that are not edges of the residual graph, "
                             f"e.g. ({graph.up[i_]!r}, {graph.down[j_]!r}) (the downstream node reads before the upstream "
                             f"node writes). Mask only entries where EdgeGraph.valid is True.")
        out[i] = m
    return out
