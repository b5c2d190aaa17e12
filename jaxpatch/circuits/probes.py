"""AND/OR probes and backup behaviour (Heimersheim & Nanda 2024, on interpreting patching).

Noising (clean run, a component's corrupted output patched in) asks whether the component is
*necessary*; denoising (corrupted run, its clean output patched in) whether it is *sufficient*.
Probing components one at a time and jointly separates two kinds of circuit:

* **AND**: each component is necessary (noising any one destroys the behaviour) and none is
  sufficient alone (denoising one restores little); denoising all of them jointly restores it.
* **OR**: each component is sufficient (denoising any one restores the behaviour) and none is
  necessary alone (noising one destroys little); noising all of them jointly destroys it.

**Backup**: ablating component A alone hurts less than A's own direct contribution, because
another component B compensates (IOI's backup name movers). :func:`backup_probe` measures the
effect of ablating A, B and both, and each one's *direct* effect (only its edge into the logits
ablated, everything else recomputed): ``self_repair = direct - total`` is the part of a
component's direct effect the rest of the model restores, and ``interaction = both - A - B``
is positive when each compensates for the other.

All runs of a probe are one vectorised call of the edge-masked forward
(:mod:`jaxpatch.circuits._engine`): patching a node's output = every edge leaving it carries the
other run's value, exactly activation patching of that output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .. import metrics as _metrics
from .._errors import InputError
from ..model import HookedModel
from . import _engine
from ._graph import as_group, graph_of, group_label, node_mask


@dataclasses.dataclass
class ProbeResult:
    """AND/OR probe of component groups. Effects are fractions of the clean-corrupted gap:
    noising 1 = behaviour destroyed, denoising 1 = behaviour restored.

    Attributes:
        groups: a label per group (``"L0H0"``, ``"L0H1+MLP0"``).
        noise_single, denoise_single: ``[G]`` each group patched alone.
        noise_joint, denoise_joint: all groups patched together.
        verdict: ``"AND"``, ``"OR"`` or ``"neither"`` (with thresholds ``high``/``low``).
    """

    groups: list[str]
    metric: str
    noise_single: np.ndarray
    noise_joint: float
    denoise_single: np.ndarray
    denoise_joint: float
    high: float
    low: float
    verdict: str

    def summary(self) -> str:
        lines = [f"{self.verdict}: {' , '.join(self.groups)} ({self.metric}; fractions of the clean-corrupted gap)"]
        for g, n, d in zip(self.groups, self.noise_single, self.denoise_single):
            lines.append(f"  {g:>16s}  noising alone destroys {n:+.2f}, denoising alone restores {d:+.2f}")
        lines.append(f"  {'jointly':>16s}  noising destroys {self.noise_joint:+.2f}, denoising restores {self.denoise_joint:+.2f}")
        return "\n".join(lines)


@dataclasses.dataclass
class BackupResult:
    """Backup probe of two components A and B (noising effects, fractions of the gap; 1 = the
    behaviour destroyed).

    Attributes:
        total_a, total_b, total_both: ablating A, B, both (everything else recomputed).
        direct_a, direct_b: ablating only A's (B's) edge into the logits.
        self_repair_a, self_repair_b: ``direct - total``: how much of the component's direct effect
            the rest of the model restores when it is ablated.
        interaction: ``total_both - total_a - total_b`` (> 0: each compensates for the other).
    """

    a: str
    b: str
    metric: str
    ablation: str
    total_a: float
    total_b: float
    total_both: float
    direct_a: float
    direct_b: float

    @property
    def self_repair_a(self) -> float:
        return self.direct_a - self.total_a

    @property
    def self_repair_b(self) -> float:
        return self.direct_b - self.total_b

    @property
    def interaction(self) -> float:
        return self.total_both - self.total_a - self.total_b

    def summary(self) -> str:
        return (f"ablating {self.a}: {self.total_a:+.2f} (direct {self.direct_a:+.2f}, self-repair {self.self_repair_a:+.2f}); "
                f"{self.b}: {self.total_b:+.2f} (direct {self.direct_b:+.2f}, self-repair {self.self_repair_b:+.2f}); "
                f"both: {self.total_both:+.2f} (interaction {self.interaction:+.2f})")


def _groups(graph, groups, minimum: int):
    gs = [as_group(g, "component") for g in groups]
    if len(gs) < minimum:
        raise InputError(f"Give at least {minimum} components or component sets to probe; got {len(gs)}.")
    nm = node_mask(graph, gs)
    if (nm.sum(0) > 1).any():
        twice = [graph.up[i] for i in np.flatnonzero(nm.sum(0) > 1)]
        raise InputError(f"Component sets overlap ({twice} in more than one); probe disjoint sets.")
    return gs, nm


def _run(model, names, run, other, ws, ctx):
    cfg = model.config
    chunk = _engine.default_chunk(cfg, run.shape[0], run.shape[1], ws.shape[0], None)
    out = _engine.masked_sweep(cfg, model.params, names, run, jnp.asarray(ws), other, ctx, chunk=chunk)
    return _engine.host(out)[:, 0]  # [C, B]


def and_or_probe(model: HookedModel, clean_tokens, corrupt_tokens, groups: Sequence, *, metric="logit_diff",
                 answer=None, wrong=None, answer_pos=-1, attention_mask=None, high: float = 0.75,
                 low: float = 0.25) -> ProbeResult:
    """Noise and denoise each group alone and all jointly; classify the groups as AND or OR.

    Args:
        groups: at least two components (``"L0H1"``, ``"MLP0"``, ``"embed"``) or disjoint sets.
        metric: one metric (name or callable); answer, wrong, answer_pos, attention_mask as in
            :func:`jaxpatch.activation_patch`.
        high, low: an effect of at least ``high`` counts as destroying/restoring the behaviour,
            at most ``low`` as not.

    Returns:
        a :class:`ProbeResult` (``verdict`` is ``"AND"``, ``"OR"`` or ``"neither"``).
    """
    if not (0 <= low < high):
        raise InputError(f"Need 0 <= low < high; got low={low}, high={high}.")
    graph = graph_of(model.config)
    gs, nm = _groups(graph, groups, 2)
    names, clean, corrupt, ctx = _engine.setup(model, clean_tokens, corrupt_tokens, (metric,), answer, wrong,
                                               answer_pos, attention_mask)
    sel = np.concatenate([nm, nm.any(0, keepdims=True)])  # each group, then all jointly: [G + 1, U]
    ws = sel[:, :, None] & graph.valid[None]  # every edge leaving a selected node
    am = ctx.get("attention_mask")
    up_clean = _engine.up_outputs(model.config, model.params, clean, am)
    up_corrupt = _engine.up_outputs(model.config, model.params, corrupt, am)
    noised = _run(model, names, clean, up_corrupt, ws, ctx)
    denoised = _run(model, names, corrupt, up_clean, ws, ctx)
    m_clean, m_corrupt, floor = _engine.baselines(model, names, clean, corrupt, ctx)
    name = _metrics.name_of(names[0])
    _engine.check_finite("AND/OR probe", np.concatenate([noised, denoised]))
    n = _metrics.normalise(noised.mean(-1), m_clean[0], m_corrupt[0], "noise", name, floor)
    d = _metrics.normalise(denoised.mean(-1), m_clean[0], m_corrupt[0], "denoise", name, floor)
    ns, nj, ds, dj = n[:-1], float(n[-1]), d[:-1], float(d[-1])
    if np.all(ns >= high) and np.all(ds <= low) and dj >= high:
        verdict = "AND"
    elif np.all(ds >= high) and np.all(ns <= low) and nj >= high:
        verdict = "OR"
    else:
        verdict = "neither"
    return ProbeResult([group_label(g) for g in gs], name, ns, nj, ds, dj, high, low, verdict)


def backup_probe(model: HookedModel, clean_tokens, corrupt_tokens, a, b, *, ablation: str = "resample",
                 reference_tokens=None, metric="logit_diff", answer=None, wrong=None, answer_pos=-1,
                 attention_mask=None) -> BackupResult:
    """Effects of ablating A, B and both, and of ablating only each one's edge into the logits.

    Args:
        a, b: components (or disjoint sets): ``"L2H1"``, ``"MLP0"``, ``["L1H0", "L1H2"]``.
        ablation: ``"resample"`` (the corrupted run's outputs), ``"mean"`` (means over
            ``reference_tokens``, default the clean prompts) or ``"zero"``. Effects are fractions
            of the clean-corrupted gap whatever the ablation.

    Returns:
        a :class:`BackupResult` (noising effects as fractions of the clean-corrupted gap).
    """
    if ablation not in ("resample", "mean", "zero"):
        raise InputError(f"ablation must be 'resample', 'mean' or 'zero', got {ablation!r}.")
    graph = graph_of(model.config)
    gs, nm = _groups(graph, [a, b], 2)
    names, clean, corrupt, ctx = _engine.setup(model, clean_tokens, corrupt_tokens, (metric,), answer, wrong,
                                               answer_pos, attention_mask)
    from .evaluate import ablated_outputs

    other = ablated_outputs(model, ablation, clean, corrupt, reference_tokens, ctx.get("attention_mask"))
    logits = np.zeros(graph.valid.shape, bool)
    logits[:, -1] = True
    sel = np.stack([nm[0], nm[1], nm[0] | nm[1]])
    ws = np.concatenate([sel[:, :, None] & graph.valid[None], nm[:, :, None] & logits[None]])  # [5, U, V]
    out = _run(model, names, clean, other, ws, ctx)
    m_clean, m_corrupt, floor = _engine.baselines(model, names, clean, corrupt, ctx)
    name = _metrics.name_of(names[0])
    _engine.check_finite("Backup probe", out)
    e = _metrics.normalise(out.mean(-1), m_clean[0], m_corrupt[0], "noise", name, floor)
    return BackupResult(group_label(gs[0]), group_label(gs[1]), name, ablation, *(float(x) for x in e))
