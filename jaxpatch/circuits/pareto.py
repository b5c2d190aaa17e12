"""Pareto curves: how much of the behaviour the top-k circuit of a ranking recovers, for nested
k, several rankings (exact edge patching, EAP, EAP-IG, AtP* node scores...) evaluated in one
vectorised call of :func:`jaxpatch.evaluate_circuit`.

An *edge ranking* (``[U, V]`` scores, or an :class:`~jaxpatch.edges.EdgeResult`) gives the nested
circuits of its top-k valid edges by absolute score. A *node ranking* (``{"L1H1": score, ...}``,
or a ``(layer, head)`` :class:`~jaxpatch.PatchResult` such as AtP* on ``z``) gives the circuits
induced by the embedding and its top-k nodes (:func:`circuit_from_nodes`; unscored nodes come
last). Every curve is
plotted against the circuit's size in edges, so edge and node rankings share one axis; the area
under the curve integrates faithfulness over the fraction of the graph's edges kept (1 = the
whole behaviour from an empty circuit on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import InputError
from ..config import ModelConfig
from ..edges import EdgeResult
from ..model import HookedModel
from ..results import PatchResult
from ._graph import circuit_from_nodes, graph_of, up_index
from .evaluate import CircuitResult, evaluate_circuit


@dataclasses.dataclass
class ParetoCurve:
    """One ranking's curve: circuit sizes (edges, and as a fraction of the graph's edges), their
    faithfulness, and the area under faithfulness vs fraction."""

    name: str
    kind: str  # "edges" or "nodes"
    n_edges: np.ndarray
    fraction: np.ndarray
    faithfulness: np.ndarray
    auc: float


@dataclasses.dataclass
class ParetoResult:
    """Curves by ranking name, the :class:`CircuitResult` of every circuit evaluated (one call),
    and the metric."""

    curves: dict[str, ParetoCurve]
    circuits: CircuitResult
    metric: str

    def aucs(self) -> dict[str, float]:
        return {k: c.auc for k, c in self.curves.items()}

    def to_dataframe(self):
        import pandas as pd

        rows = [{"ranking": c.name, "kind": c.kind, "n_edges": int(n), "fraction": float(f), "faithfulness": float(v)}
                for c in self.curves.values() for n, f, v in zip(c.n_edges, c.fraction, c.faithfulness)]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return "ParetoResult(" + ", ".join(f"{k}: AUC {v:.3f}" for k, v in self.aucs().items()) + ")"


def _sizes(n: int, n_points: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, n, min(n_points, n + 1))).astype(int))


def _edge_scores(graph, scores) -> np.ndarray:
    if isinstance(scores, EdgeResult):
        scores = scores.scores()
    s = np.asarray(scores, np.float64)
    if s.shape != graph.valid.shape:
        raise InputError(f"Edge scores must have the graph's shape [U, V] = {graph.valid.shape}; got {s.shape}.")
    if not np.all(np.isfinite(s[graph.valid])):
        raise InputError("Edge scores contain NaN or inf on valid edges; a ranking needs finite scores.")
    return s


def _node_scores(config: ModelConfig, graph, scores) -> dict[str, float]:
    if isinstance(scores, PatchResult):
        if scores.axes != ("layer", "head"):
            raise InputError(f"A node ranking from a PatchResult needs axes ('layer', 'head') (heads' outputs, e.g. "
                             f"site 'z'); this one has {scores.axes}.")
        try:
            v = scores.normalized()
        except Exception:  # noqa: BLE001  (no corrupted baseline: raw effects rank as well)
            v = scores.effects()
        return {f"L{l}H{h}": float(v[l, h]) for l in range(v.shape[0]) for h in range(v.shape[1])}
    out = {}
    for k, v in dict(scores).items():
        up_index(graph, k, "node")
        out[k] = float(v)
    if not out:
        raise InputError("A node ranking must score at least one node.")
    if not all(np.isfinite(list(out.values()))):
        raise InputError("Node scores contain NaN or inf; a ranking needs finite scores.")
    return out


def nested_circuits(config: ModelConfig, scores, n_points: int = 20):
    """Nested top-k circuits of one ranking: ``(masks [n, U, V], kind)``.

    Edge rankings: the top ``k`` valid edges by ``|score|`` (ties by graph order), ``k`` at
    ``n_points`` sizes from 0 to every edge. Node rankings: ``embed`` plus the top ``k`` nodes,
    ``k`` from 0 to every node; nodes the ranking does not score (MLPs, for a ranking of heads)
    come after the scored ones, in graph order, so every curve ends at the full circuit.
    """
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 2:
        raise InputError(f"n_points must be an int >= 2, got {n_points!r}.")
    graph = graph_of(config)
    if isinstance(scores, (EdgeResult, np.ndarray)) or (hasattr(scores, "shape") and not isinstance(scores, PatchResult)):
        s = _edge_scores(graph, scores)
        flat = np.flatnonzero(graph.valid.ravel())
        order = flat[np.argsort(-np.abs(s.ravel()[flat]), kind="stable")]
        masks = []
        for k in _sizes(len(order), n_points):
            m = np.zeros(graph.valid.size, bool)
            m[order[:k]] = True
            masks.append(m.reshape(graph.valid.shape))
        return np.stack(masks), "edges"
    ns = _node_scores(config, graph, scores)
    nodes = sorted(ns, key=lambda k: -abs(ns[k]))  # stable: ties keep their given order
    nodes += [u for u in graph.up if u not in ns and u != "embed"]  # unscored nodes last: the curve ends full
    base = [] if "embed" in ns else ["embed"]
    masks = [circuit_from_nodes(config, base + nodes[:k]) for k in _sizes(len(nodes), n_points)]
    return np.stack(masks), "nodes"


def exact_edge_scores(model: HookedModel, clean_tokens, corrupt_tokens, *, direction: str = "noise",
                      metric="logit_diff", answer=None, wrong=None, answer_pos=-1, attention_mask=None) -> np.ndarray:
    """Exact edge patching of every valid edge alone (one vectorised call of
    :func:`jaxpatch.edges.exact_edge_patch`), mean over prompts, as ``[U, V]`` edge scores (0 off
    the graph): the exact ranking for :func:`pareto_curve`."""
    from .. import edges

    g = graph_of(model.config)
    pairs = [(g.up[i], g.down[j]) for i, j in np.argwhere(g.valid)]
    out = edges.exact_edge_patch(model, clean_tokens, corrupt_tokens, pairs, direction=direction, metric=metric,
                                 answer=answer, wrong=wrong, answer_pos=answer_pos, attention_mask=attention_mask)
    s = np.zeros(g.valid.shape)
    s[g.valid] = np.asarray(out).mean(-1)
    return s


def pareto_curve(model: HookedModel, clean_tokens, corrupt_tokens, rankings: Mapping[str, Any], *,
                 n_points: int = 20, ablation: str = "resample", reference_tokens=None, metric="logit_diff",
                 answer=None, wrong=None, answer_pos=-1, attention_mask=None,
                 chunk_size: int | None = None, mesh=None) -> ParetoResult:
    """Faithfulness of nested top-k circuits for several rankings, all in one vectorised call.

    Args:
        rankings: name -> edge scores (``[U, V]`` array or :class:`~jaxpatch.edges.EdgeResult`:
            exact edge patching, EAP, EAP-IG) or node scores (``{"L1H1": 0.8, ...}`` or a
            ``(layer, head)`` :class:`~jaxpatch.PatchResult`, e.g. AtP* on ``z``).
        n_points: circuit sizes per ranking (evenly spaced, empty to full).
        ablation, reference_tokens, metric, answer, wrong, answer_pos, attention_mask, chunk_size,
            mesh: as in :func:`jaxpatch.evaluate_circuit`.

    Returns:
        a :class:`ParetoResult` (``curves[name].auc``; :func:`plot_pareto` draws it).
    """
    if not rankings:
        raise InputError("Give at least one ranking: {name: edge scores [U, V] or node scores}.")
    parts, kinds = [], {}
    for name, scores in rankings.items():
        masks, kinds[name] = nested_circuits(model.config, scores, n_points)
        parts.append((name, masks))
    allm = np.concatenate([m for _, m in parts])
    labels = [f"{name}[{i}]" for name, m in parts for i in range(len(m))]
    res = evaluate_circuit(model, clean_tokens, corrupt_tokens, allm, ablation=ablation, reference_tokens=reference_tokens,
                           metrics=(metric,), answer=answer, wrong=wrong, answer_pos=answer_pos,
                           attention_mask=attention_mask, labels=labels, chunk_size=chunk_size, mesh=mesh)
    faith = res.faithfulness()
    curves, start = {}, 0
    for name, masks in parts:
        n = len(masks)
        ne = res.n_edges[start:start + n]
        frac = ne / res.n_valid
        f = faith[start:start + n]
        auc = float(np.sum((frac[1:] - frac[:-1]) * (f[1:] + f[:-1]) / 2))  # trapezoid over the fraction kept
        curves[name] = ParetoCurve(name, kinds[name], ne, frac, f, auc)
        start += n
    return ParetoResult(curves, res, res.metrics[0])


def plot_pareto(result: ParetoResult, ax=None, *, title: str | None = None):
    """Circuit size (edges) vs recovered fraction, one line per ranking (AUC in the legend).
    Returns the matplotlib figure."""
    from ..plots import _pyplot

    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    for c in result.curves.values():
        ax.plot(c.n_edges, c.faithfulness, marker="o", markersize=3, label=f"{c.name} ({c.kind}, AUC {c.auc:.3f})")
    n_valid = result.circuits.n_valid
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlim(0, n_valid)
    ax.set_xlabel(f"circuit size (edges of {n_valid})")
    ax.set_ylabel(f"recovered fraction ({result.metric}, faithfulness)")
    ax.set_title(title or f"Pareto curves ({result.circuits.ablation} ablation)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
