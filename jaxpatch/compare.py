"""Exact patching vs its gradient approximations, as a built-in feature.

* :func:`compare` runs approximations (AtP, AtP+QK, AtP*) and the exact sweep on the same spec and
  reports Pearson and Spearman correlation, top-k recall, sign agreement, and the cost of each
  (wall time and forward-pass equivalents, measured against a warm forward pass of the model on
  the same batch).
* :func:`verify_top_k` ranks with an approximation and patches its top k exactly in one call.
* :func:`false_negative_bound` is AtP*'s subsampling diagnostic: patch random subsets of the
  components the approximation ranks low, jointly and exactly, to bound how large a missed
  component's effect could be.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from ._errors import InputError
from .attribution import attribution_patch
from .patching import activation_patch
from .results import PatchResult


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    ranks = np.empty(len(x), np.float64)
    n = len(x)
    boundaries = np.flatnonzero(np.diff(sx) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [n]])
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1..end
    return ranks


def pearson(a, b) -> float:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    return pearson(_ranks(np.asarray(a, float).ravel()), _ranks(np.asarray(b, float).ravel()))


def top_k_recall(exact, estimate, k: int) -> float:
    """Of the k components with the largest |exact| effect, the fraction in the estimate's top k
    by |estimate|."""
    e, s = np.abs(np.ravel(exact)), np.abs(np.ravel(estimate))
    k = min(k, e.size)
    return len(set(np.argsort(-e)[:k]) & set(np.argsort(-s)[:k])) / k


def effects(result: PatchResult, metric: str | None = None) -> np.ndarray:
    """Change of the metric (mean over prompts) caused by each patch, relative to the run."""
    return result.effects(metric)


@dataclasses.dataclass
class Comparison:
    """Agreement and cost of each approximation against the exact sweep."""

    exact: PatchResult
    estimates: dict[str, PatchResult]
    table: list[dict]
    forward_s: float

    def __str__(self) -> str:
        cols = ["method", "pearson", "spearman", f"top{self.table[0]['k']}_recall", "sign_agreement", "wall_s", "forward_equiv"]
        lines = [" | ".join(cols)]
        for row in self.table:
            lines.append(" | ".join(
                f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols))
        return "\n".join(lines)


def _forward_time(model, tokens, repeats=5) -> float:
    model(tokens).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(model(tokens))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def compare(
    model,
    clean_tokens,
    corrupt_tokens,
    *,
    site: str = "z",
    by: Sequence[str] | None = None,
    methods: Sequence[str] = ("atp", "atp*"),
    direction: str = "denoise",
    metric: str = "logit_diff",
    answer=None,
    wrong=None,
    answer_pos=-1,
    k: int = 10,
    warm: bool = True,
) -> Comparison:
    """Run each approximation and the exact sweep on the same spec and compare them.

    With ``warm=True`` each method runs once untimed first, so times exclude compilation. For
    ``atp*`` (unsigned magnitudes) correlations and recall use ``|exact|``; its sign agreement is
    not defined (reported as NaN).
    """
    kw = dict(direction=direction, answer=answer, wrong=wrong, answer_pos=answer_pos)
    fwd = _forward_time(model, np.asarray(clean_tokens))

    def timed(fn):
        if warm:
            fn()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    exact, exact_s = timed(lambda: activation_patch(model, clean_tokens, corrupt_tokens, site=site, by=by, metrics=(metric,), **kw))
    e = effects(exact)
    rows = [{"method": "exact", "k": k, "pearson": 1.0, "spearman": 1.0, f"top{k}_recall": 1.0, "sign_agreement": 1.0,
             "wall_s": exact_s, "forward_equiv": exact_s / fwd}]
    estimates = {}
    for method in methods:
        est, s = timed(lambda: attribution_patch(model, clean_tokens, corrupt_tokens, site=site, by=by, method=method,
                                                 metric=metric, **kw))
        estimates[method] = est
        a = effects(est)
        unsigned = method == "atp*"
        ref = np.abs(e) if unsigned else e
        rows.append({"method": method, "k": k, "pearson": pearson(ref, a), "spearman": spearman(ref, a),
                     f"top{k}_recall": top_k_recall(e, a, k),
                     "sign_agreement": float("nan") if unsigned else float(np.mean(np.sign(a) == np.sign(e))),
                     "wall_s": s, "forward_equiv": s / fwd})
    return Comparison(exact, estimates, rows, fwd)


def _rows_of(result: PatchResult, flat_idx) -> list[dict]:
    names = {"neuron": "neuron", "dest_pos": "dest_pos", "src_pos": "src_pos"}
    out = []
    for f in flat_idx:
        ix = np.unravel_index(int(f), result.shape)
        out.append({names.get(a, a): int(i) for a, i in zip(result.axes, ix)})
    return out


def verify_top_k(model, clean_tokens, corrupt_tokens, *, site="z", by=None, k=10, method="atp*", direction="denoise",
                 metric="logit_diff", answer=None, wrong=None, answer_pos=-1):
    """Rank components with ``method`` and patch the top k exactly, in one vectorised call.

    Returns a list of dicts: component indices and labels, the estimate, and the exact effect.
    """
    kw = dict(direction=direction, answer=answer, wrong=wrong, answer_pos=answer_pos)
    est = attribution_patch(model, clean_tokens, corrupt_tokens, site=site, by=by, method=method, metric=metric, **kw)
    a = effects(est)
    top = np.argsort(-np.abs(a).ravel())[: min(k, a.size)]
    rows = _rows_of(est, top)
    exact = activation_patch(model, clean_tokens, corrupt_tokens, site=site, patches=rows, metrics=(metric,), **kw)
    ex = effects(exact)
    out = []
    for r, f, x in zip(rows, top, ex):
        label = {ax: est.labels[ax][r[ax]] for ax in est.axes if ax in est.labels}
        out.append({**r, "label": label, "estimate": float(a.ravel()[f]), "exact": float(x)})
    return out


@dataclasses.dataclass
class FalseNegativeBound:
    """Result of :func:`false_negative_bound`.

    Attributes:
        bound: the largest |joint effect| over the sampled subsets: under the no-cancellation
            assumption (a subset's effect is at least as large as any member's), no component
            outside the verified set that appeared in a subset has a larger effect.
        coverage: fraction of unverified components that appeared in at least one subset.
        subset_effects: exact effect of each subset.
        n_unverified: components the approximation ranked below the top k.
    """

    bound: float
    coverage: float
    subset_effects: np.ndarray
    n_unverified: int


def false_negative_bound(model, clean_tokens, corrupt_tokens, *, site="z", by=None, k=10, method="atp*", n_subsets=32,
                         subset_size=None, seed=0, direction="denoise", metric="logit_diff", answer=None, wrong=None,
                         answer_pos=-1) -> FalseNegativeBound:
    """AtP*'s subsampling diagnostic: patch random subsets of the components ranked below the top
    k (jointly, exactly, in one vectorised call) and report the largest subset effect as a bound
    on any missed component's effect, with the fraction of components the subsets covered."""
    if n_subsets < 1:
        raise InputError("n_subsets must be >= 1.")
    kw = dict(direction=direction, answer=answer, wrong=wrong, answer_pos=answer_pos)
    est = attribution_patch(model, clean_tokens, corrupt_tokens, site=site, by=by, method=method, metric=metric, **kw)
    a = np.abs(effects(est)).ravel()
    rest = np.argsort(-a)[min(k, a.size):]
    if rest.size == 0:
        return FalseNegativeBound(0.0, 1.0, np.zeros(0), 0)
    size = subset_size or max(1, int(np.ceil(np.sqrt(rest.size))))
    size = min(size, rest.size)
    rng = np.random.default_rng(seed)
    subsets = [rng.choice(rest, size=size, replace=False) for _ in range(n_subsets)]
    patches = [_rows_of(est, s) for s in subsets]
    exact = activation_patch(model, clean_tokens, corrupt_tokens, site=site, patches=patches, metrics=(metric,), **kw)
    eff = effects(exact)
    covered = len(set(np.concatenate(subsets).tolist())) / rest.size
    return FalseNegativeBound(float(np.abs(eff).max()), covered, eff, int(rest.size))
