"""Circuit evaluation: run the model with every edge outside a circuit ablated, many circuits in
one compiled program, and report faithfulness against the clean and ablated baselines.

A circuit is a set of edges of the residual graph (:class:`jaxpatch.edges.EdgeGraph`), given as a
boolean mask ``[U, V]`` (or ``(upstream, downstream)`` name pairs, or the edges among a node set,
:func:`circuit_from_nodes`). The clean prompt runs; each edge *outside* the circuit carries the
corrupted run's value of its upstream node (``ablation="resample"``) or its mean over reference
prompts (``"mean"``), each edge inside carries the value computed in this run (see
:mod:`jaxpatch.circuits._engine`). The full circuit is the clean run; the empty circuit is the
corrupted run (or every node mean-ablated).

Faithfulness of a circuit = ``(m(circuit) - m(empty)) / (m(clean) - m(empty))``, means over
prompts: 1 = the circuit alone recovers the behaviour, 0 = nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import metrics as _metrics
from .._errors import InputError, JaxpatchError
from ..model import HookedModel, check_tokens
from . import _engine
from ._graph import check_circuits, graph_of

ABLATIONS = ("resample", "mean", "zero")


@dataclasses.dataclass
class CircuitResult:
    """Metric values of circuits run alone.

    Attributes:
        metrics: metric names.
        per_prompt: ``[n_circuits, n_metrics, batch]`` metric of each circuit's run.
        clean: ``[n_metrics, batch]`` the clean run (the full circuit).
        ablated: ``[n_metrics, batch]`` the empty circuit: the corrupted run (resample), or every
            node mean- or zero-ablated.
        n_edges: ``[n_circuits]`` edges in each circuit; ``n_valid``: edges in the graph.
        ablation: ``"resample"``, ``"mean"`` or ``"zero"``.
        labels: a name per circuit.
        info: timings, chunk size, rounding floor of the gap.
    """

    metrics: tuple[str, ...]
    per_prompt: np.ndarray
    clean: np.ndarray
    ablated: np.ndarray
    n_edges: np.ndarray
    n_valid: int
    ablation: str
    labels: list[str]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _m(self, metric):
        if metric is None:
            return 0
        if metric not in self.metrics:
            raise InputError(f"Metric {metric!r} was not computed; this result has {list(self.metrics)}.")
        return self.metrics.index(metric)

    def values(self, metric: str | None = None) -> np.ndarray:
        """Mean metric over prompts per circuit ``[n_circuits]``."""
        return self.per_prompt[:, self._m(metric)].mean(-1)

    def faithfulness(self, metric: str | None = None) -> np.ndarray:
        """``(m - m_empty) / (m_clean - m_empty)`` per circuit (means over prompts); raises if the
        gap is rounding noise."""
        i = self._m(metric)
        return _metrics.normalise(self.values(metric), self.clean[i], self.ablated[i], "denoise", self.metrics[i],
                                  float(self.info.get("gap_floor", 0.0)))

    def to_dataframe(self):
        import pandas as pd

        data: dict[str, Any] = {"circuit": self.labels, "n_edges": self.n_edges}
        for m in self.metrics:
            data[m] = self.values(m)
            try:
                data[f"{m}_faithfulness"] = self.faithfulness(m)
            except JaxpatchError:  # a zero or rounding-noise gap
                data[f"{m}_faithfulness"] = np.full(len(self.labels), np.nan)
        return pd.DataFrame(data)

    def __repr__(self) -> str:
        return (f"CircuitResult({len(self.labels)} circuits, {self.ablation} ablation, sizes "
                f"{self.n_edges.min()}..{self.n_edges.max()} of {self.n_valid} edges, metrics={list(self.metrics)})")


def _mean_outputs(model, reference_tokens, B, T, clean):
    ref = check_tokens(model.config, reference_tokens) if reference_tokens is not None else clean
    if ref.shape[1] != T:
        raise InputError(f"reference_tokens have {ref.shape[1]} positions; the prompts have {T}.")
    up = _engine.up_outputs(model.config, model.params, ref)  # [U, R, T, D]
    mean = jnp.mean(up, axis=1, keepdims=True)
    return jnp.broadcast_to(mean, (mean.shape[0], B) + mean.shape[2:])


def ablated_outputs(model, ablation, clean, corrupt, reference_tokens, attention_mask):
    """Upstream outputs ``[U, B, T, D]`` an ablated edge carries: the corrupted run's
    (``"resample"``), their mean over ``reference_tokens`` per position (``"mean"``), or zeros."""
    cfg = model.config
    if ablation == "resample":
        return _engine.up_outputs(cfg, model.params, corrupt, attention_mask)
    B, T = clean.shape
    if ablation == "mean":
        return _mean_outputs(model, reference_tokens, B, T, clean)
    U = 1 + cfg.n_layers * (cfg.n_heads + 1)
    return jnp.zeros((U, B, T, cfg.d_model), model.dtype)


def evaluate_circuit(
    model: HookedModel,
    clean_tokens,
    corrupt_tokens=None,
    circuits=None,
    *,
    ablation: str = "resample",
    reference_tokens=None,
    metrics=("logit_diff",),
    answer=None,
    wrong=None,
    answer_pos=-1,
    attention_mask=None,
    labels=None,
    chunk_size: int | None = None,
    mesh=None,
) -> CircuitResult:
    """Run each circuit alone (every other edge ablated) and measure it; all circuits vmapped.

    Args:
        model: a :class:`~jaxpatch.HookedModel` (any family).
        clean_tokens: ``[batch, pos]`` prompts showing the behaviour (the run).
        corrupt_tokens: ``[batch, pos]`` corrupted prompts: the values ablated edges carry
            (``ablation="resample"``); with ``"mean"`` optional.
        circuits: one ``[U, V]`` boolean mask over :class:`~jaxpatch.edges.EdgeGraph` edges, a
            ``[C, U, V]`` stack, or a list of masks and/or lists of ``(upstream, downstream)``
            edges (see :func:`circuit_mask`, :func:`circuit_from_nodes`).
        ablation: ``"resample"`` (the corrupted run's values), ``"mean"`` (each upstream node's
            output averaged over ``reference_tokens``, default the clean prompts, per position) or
            ``"zero"`` (zero writes; constant biases stay). With mean and zero ablation the empty
            circuit, run in the same call, is the baseline of ``faithfulness``.
        metrics, answer, wrong, answer_pos, attention_mask: as in :func:`jaxpatch.activation_patch`
            (mean ablation needs equal-length prompts: no attention_mask).
        labels: a name per circuit (default ``c0, c1, ...``).
        chunk_size: circuits per vectorised chunk (default: by memory).
        mesh: ``None`` (default, one device), ``"auto"`` (every local device) or a 1-D
            ``jax.sharding.Mesh`` with axis ``"sweep"``: circuits are split over its devices.

    Returns:
        a :class:`CircuitResult`; ``faithfulness()`` per circuit.

    Raises:
        InputError: a mask of the wrong shape or dtype, a circuit with an entry or an edge that is
            not an edge of the graph, an unknown node name (closest suggested).
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    if circuits is None:
        raise InputError("Give circuits= (a [U, V] boolean mask over EdgeGraph edges, a stack, or lists of edges).")
    cfg = model.config
    graph = graph_of(cfg)
    masks = check_circuits(graph, circuits)
    C = masks.shape[0]
    if labels is None:
        labels = [f"c{i}" for i in range(C)]
    elif len(labels) != C:
        raise InputError(f"labels has {len(labels)} entries for {C} circuits.")
    names, clean, corrupt, ctx = _engine.setup(model, clean_tokens, corrupt_tokens, metrics, answer, wrong, answer_pos,
                                               attention_mask, need_corrupt=ablation == "resample")
    if ablation == "mean" and attention_mask is not None:
        raise InputError("ablation='mean' averages each position over prompts, which padding misaligns; use equal-length "
                         "prompts (no attention_mask).")
    B, T = clean.shape
    t0 = time.perf_counter()
    other = ablated_outputs(model, ablation, clean, corrupt, reference_tokens, ctx.get("attention_mask"))
    ws = ~masks & graph.valid[None]
    if ablation != "resample":  # the empty circuit is the baseline: run it with the others
        ws = np.concatenate([ws, graph.valid[None]], axis=0)
    chunk = _engine.default_chunk(cfg, B, T, ws.shape[0], chunk_size)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mesh = _engine.resolve_mesh(mesh, model.params)
    args = _engine.global_inputs(mesh, "inputs (model weights, prompts, circuits, metric or options)",
                                 (model.params, clean, jnp.asarray(ws), other, ctx), (names, chunk))
    out = _engine.host(_engine.masked_sweep(cfg, args[0], names, *args[1:], chunk=chunk, mesh=mesh))
    sweep_s = time.perf_counter() - t0
    _engine.check_finite("Circuit evaluation", out, list(labels) + ["empty circuit"])
    ref = corrupt if corrupt is not None else clean
    m_clean, m_corrupt, floor = _engine.baselines(model, names, clean, ref, ctx)
    if ablation != "resample":
        m_ablated, out = out[-1], out[:-1]
    else:
        m_ablated = m_corrupt
    info = {"setup_s": setup_s, "sweep_s": sweep_s, "chunk_size": chunk, "gap_floor": floor}
    return CircuitResult(tuple(_metrics.name_of(m) for m in names), out, m_clean, m_ablated,
                         masks.sum(axis=(1, 2)), int(graph.valid.sum()), ablation, list(labels), info)
