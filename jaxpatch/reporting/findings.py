"""Typed findings and the detectors that produce them from patching results.

A :class:`Finding` is one statement the report makes, as data: what kind of observation it is,
which components it is about, which metrics it was read from, the numbers behind it, the message in
the terms of Heimersheim & Nanda (2024), "How to use and interpret activation patching", and what
to try next. Every detector here is a pure function of :class:`~jaxpatch.PatchResult` s (and, for
head roles, attention patterns): the same results give the same findings, in the same order.

Conventions used by every detector:

* an *effect* is the normalised effect of :meth:`PatchResult.normalized` (1 = the whole
  clean-corrupt gap restored when denoising, destroyed when noising), on the report's primary
  metric unless said otherwise;
* a component is *important* in a direction when ``|effect| >= threshold`` and *unimportant* when
  ``|effect| < threshold / 2`` (the band between is left unclassified rather than guessed);
* numbers are rounded to 4 significant digits and never NaN, so findings compare equal across reruns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from .._errors import JaxpatchError
from ..results import PatchResult

#: Every kind of finding, in the order the report presents them.
KINDS = (
    "circuit",              # a known circuit motif found (previous-token -> induction)
    "head_role",            # what a top head attends to (previous-token, induction, duplicate-token)
    "localised",            # where the coarse maps show effects
    "saturated_metric",     # a metric flat at the clean or corrupt baseline
    "discrete_metric",      # a discrete metric (accuracy, rank) hiding partial effects
    "metric_disagreement",  # metrics disagreeing in sign or ranking
    "small_gap",            # a clean-corrupt gap too small (or too noisy) to normalise by
    "necessary_and_sufficient",
    "sufficient_not_necessary",  # denoising only: possible OR / backup
    "necessary_not_sufficient",  # noising only: possible AND
    "negative_component",
    "overshoot",
    "few_prompts",          # an effect carried by a few prompts
    "attribution_agreement",
    "attribution_misranked",
    "skipped",              # a planned step left out (budget)
)

DISCRETE_METRICS = ("accuracy", "rank")


def _r(x: float) -> float:
    """Round to 4 significant digits (stable numbers for findings)."""
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.4g}")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One statement of the report, as data.

    Attributes:
        kind: one of :data:`KINDS`.
        section: the report section it belongs to (``"coarse"``, ``"zoom"``, ``"metrics"``,
            ``"directions"``, ``"signs"``, ``"spread"``, ``"attribution"``, ``"circuit"``,
            ``"plan"``).
        components: the components it is about, e.g. ``("L0H0", "L1H1")`` or
            ``("resid_pre L1 @10:hill",)``.
        metrics: the metrics it was read from.
        numbers: ``(name, value)`` pairs behind the statement (see :attr:`values`).
        message: what was found, in the paper's terms.
        next_step: what to try next.
        severity: ``"note"`` (a result) or ``"caution"`` (a pitfall: read other results with it in mind).
    """

    kind: str
    section: str
    components: tuple[str, ...]
    metrics: tuple[str, ...]
    numbers: tuple[tuple[str, float], ...]
    message: str
    next_step: str
    severity: str = "note"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"internal: unknown finding kind {self.kind!r}; valid: {KINDS}")

    @property
    def values(self) -> dict[str, float]:
        """The numbers as a dict."""
        return dict(self.numbers)

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists for tuples, numbers as a dict)."""
        return {"kind": self.kind, "section": self.section, "components": list(self.components),
                "metrics": list(self.metrics), "numbers": dict(self.numbers), "message": self.message,
                "next_step": self.next_step, "severity": self.severity}


def _nums(**kw) -> tuple[tuple[str, float], ...]:
    """Rounded ``(name, value)`` pairs; undefined (NaN) values are left out, so that findings
    compare equal (NaN != NaN)."""
    return tuple((k, _r(v)) for k, v in kw.items() if not math.isnan(float(v)))


# ------------------------------------------------------------------------------------ helpers
def normalized_or_none(result: PatchResult, metric: str) -> np.ndarray | None:
    """The normalised effects, or ``None`` when the gap is too small to normalise by."""
    try:
        return np.asarray(result.normalized(metric), np.float64)
    except JaxpatchError:
        return None


def per_prompt_normalized(result: PatchResult, metric: str) -> np.ndarray:
    """Per-prompt normalised effects ``[*grid, batch]``: each prompt's change divided by the mean
    gap, signed as :meth:`PatchResult.normalized` (their mean over prompts is the normalised effect)."""
    i = result._m(metric)
    v = np.asarray(result.per_prompt[..., i, :], np.float64)
    c, k = np.asarray(result.clean[i], np.float64), np.asarray(result.corrupt[i], np.float64)
    gap = float(c.mean() - k.mean())
    return (v - k) / gap if result.direction == "denoise" else (c - v) / gap


def _what(direction: str) -> str:
    return "restores" if direction == "denoise" else "destroys"


def _fmt_list(names: Sequence[str], vals: Sequence[float]) -> str:
    return ", ".join(f"{n} ({v:+.2f})" for n, v in zip(names, vals))


# --------------------------------------------------------------------------------- detectors
def localised(result: PatchResult, names: list[str], metric: str, threshold: float, section: str, what: str,
              k: int = 3) -> list[Finding]:
    """Where a sweep shows effects: its top components with ``|effect| >= threshold``."""
    v = normalized_or_none(result, metric)
    if v is None:
        return []
    flat = v.reshape(-1)
    order = [int(i) for i in np.argsort(-np.abs(flat), kind="stable") if abs(flat[i]) >= threshold][:k]
    if not order:
        return [Finding("localised", section, (), (metric,), _nums(max_abs_effect=float(np.max(np.abs(flat)))),
                        f"{what} ({result.direction}): no component reaches {threshold:.2f} of the {metric} gap "
                        f"(largest {float(np.max(np.abs(flat))):.2f}). The effect is spread over many components or "
                        "carried by several redundant ones.",
                        "Patch groups of components jointly (e.g. whole layers) or look at the other direction.")]
    comps = tuple(names[i] for i in order)
    return [Finding("localised", section, comps, (metric,), tuple((n, _r(flat[i])) for n, i in zip(comps, order)),
                    f"{what} ({result.direction}): the effect is localised in {_fmt_list(comps, [flat[i] for i in order])} "
                    f"(normalised {metric}: 1 = the whole clean-corrupt gap {'restored' if result.direction == 'denoise' else 'destroyed'}).",
                    "Zoom in on these components at a finer granularity (heads, positions, q/k/v, neurons).")]


def gap_findings(result: PatchResult, metrics: Sequence[str]) -> list[Finding]:
    """Metrics whose clean-corrupt gap is too small to normalise by (rounding noise) or is not
    distinguishable from the prompts' spread (|mean gap| < 2 standard errors of per-prompt gaps)."""
    out = []
    floor = float(result.info.get("gap_floor", 0.0))
    for m in metrics:
        i = result._m(m)
        c, k = np.asarray(result.clean[i], np.float64), np.asarray(result.corrupt[i], np.float64)
        gap = float(c.mean() - k.mean())
        if normalized_or_none(result, m) is None:
            out.append(Finding("small_gap", "metrics", (), (m,), _nums(clean=c.mean(), corrupt=k.mean(), gap=gap, floor=floor),
                               f"{m}: the clean ({c.mean():.4g}) and corrupt ({k.mean():.4g}) baselines are equal up to "
                               "rounding, so normalised effects of this metric are undefined and are not shown.",
                               f"Read {m} as raw changes only, or choose corrupted prompts that move it.", "caution"))
            continue
        d = c - k
        if d.size >= 2:
            sem = float(d.std(ddof=1) / np.sqrt(d.size))
            if abs(gap) < 2 * sem:
                out.append(Finding("small_gap", "metrics", (), (m,), _nums(gap=gap, standard_error=sem),
                                   f"{m}: the mean clean-corrupt gap ({gap:.3g}) is within two standard errors "
                                   f"({2 * sem:.3g}) of zero across prompts: dividing by it turns prompt noise into "
                                   "large normalised effects.",
                                   "Use more prompts or a corruption that changes the answer consistently; read this "
                                   "metric's normalised effects with care.", "caution"))
    return out


def _slopes(result: PatchResult, metric: str, where: str) -> float | None:
    """Local slope of a bounded metric w.r.t. the answer's logit at a baseline (mean over prompts):
    ``p(1-p)`` for prob, ``1-p`` for logprob, from the per-prompt probability of the answer."""
    if metric not in ("prob", "logprob"):
        return None
    src = result.clean if where == "clean" else result.corrupt
    if "prob" in result.metrics:
        p = np.asarray(src[result._m("prob")], np.float64)
    elif "logprob" in result.metrics:
        p = np.exp(np.asarray(src[result._m("logprob")], np.float64))
    else:
        return None
    return float(np.mean(p * (1 - p))) if metric == "prob" else float(np.mean(1 - p))


def saturation_findings(result: PatchResult, names: list[str], primary: str, ratio: float = 0.25) -> list[Finding]:
    """A metric is *saturated* at a baseline when it barely responds to the logits there: its local
    slope with respect to the answer's logit is below ``ratio`` x its average slope across the gap
    (the metric's gap divided by the primary metric's gap, a logit difference). A patch that moves
    the logits near that baseline then hardly moves the metric, so partial effects are squashed
    (probability near 0 or 1; logprob near 0). ``logit_diff`` is linear in the logits and
    unbounded: it cannot saturate. Evidence: the component whose normalised effect differs most
    between the metric and the primary metric."""
    if primary != "logit_diff":
        return []
    out = []
    p = result._m(primary)
    lgap = float(np.mean(result.clean[p]) - np.mean(result.corrupt[p]))
    v_primary = normalized_or_none(result, primary)
    for m in ("prob", "logprob"):
        if m not in result.metrics:
            continue
        i = result._m(m)
        mgap = float(np.mean(result.clean[i]) - np.mean(result.corrupt[i]))
        if lgap == 0 or mgap == 0:
            continue
        avg = mgap / lgap
        v_m = normalized_or_none(result, m)
        for where in ("clean", "corrupt"):
            local = _slopes(result, m, where)
            if local is None or avg <= 0 or local >= ratio * avg:
                continue
            comps, extra = (), {}
            if v_m is not None and v_primary is not None:
                diff = np.abs(v_m - v_primary).reshape(-1)
                j = int(np.argmax(diff))
                comps = (names[j],)
                extra = {f"{primary}_effect": float(v_primary.reshape(-1)[j]), f"{m}_effect": float(v_m.reshape(-1)[j])}
            evidence = (f" For example {comps[0]} {_what(result.direction)} {extra[f'{primary}_effect']:.2f} of the {primary} "
                        f"gap but {extra[f'{m}_effect']:.2f} of the {m} gap." if comps else "")
            base = float(np.mean(result.clean[i] if where == "clean" else result.corrupt[i]))
            shape = ("near 1 (the answer already dominates)" if where == "clean" else "near 0") if m == "prob" else "near 0 (probability near 1)"
            out.append(Finding(
                "saturated_metric", "metrics", comps, (m, primary),
                _nums(**{f"{where}_baseline": base, "local_slope": local, "average_slope": avg,
                         "slope_ratio": local / avg}, **extra),
                f"{m} is saturated at the {where} baseline ({m} {base:.3g}, {shape}): there it responds to the logits "
                f"{local / avg:.2g}x as much as on average across the gap, so patches that move the logits part of the way "
                f"barely move it and partial effects look like none (or all-or-nothing).{evidence} {primary} is linear in "
                "the logits and does not saturate.",
                f"Rank components by {primary}; read {m} as a check of whether the behaviour is fully restored, not of how "
                "much each component contributes.", "caution"))
    return out


def discrete_findings(result: PatchResult, names: list[str], primary: str, threshold: float) -> list[Finding]:
    """A discrete metric (accuracy, rank) that shows (almost) nothing where the primary metric
    shows a partial effect: components with primary effect in ``[threshold, 1 - threshold]`` and
    ``|discrete effect| < threshold / 2``."""
    out = []
    v = normalized_or_none(result, primary)
    if v is None:
        return out
    for m in result.metrics:
        if m not in DISCRETE_METRICS and not (m.startswith("top") and m.endswith("_accuracy")):
            continue
        d = normalized_or_none(result, m)
        if d is None:
            continue
        fv, fd = v.reshape(-1), d.reshape(-1)
        hidden = [i for i in np.argsort(-np.abs(fv), kind="stable")
                  if threshold <= abs(fv[i]) <= 1 - threshold and abs(fd[i]) < threshold / 2][:4]
        if not hidden:
            continue
        comps = tuple(names[i] for i in hidden)
        out.append(Finding(
            "discrete_metric", "metrics", comps, (m, primary),
            tuple((f"{n} {primary}", _r(fv[i])) for n, i in zip(comps, hidden)) + tuple((f"{n} {m}", _r(fd[i])) for n, i in zip(comps, hidden)),
            f"{m} is discrete and hides partial effects: {_fmt_list(comps, [fv[i] for i in hidden])} "
            f"{'moves' if len(comps) == 1 else 'move'} {primary} by part of "
            f"the gap, but {m} moves by {', '.join(f'{fd[i]:+.2f}' for i in hidden)} — the answer's rank does not cross the "
            "threshold, so a real contribution reads as zero.",
            f"Use a continuous metric ({primary}, logprob) for exploration; keep {m} to check the end behaviour.", "caution"))
    return out


def disagreement_findings(result: PatchResult, names: list[str], primary: str, threshold: float) -> list[Finding]:
    """Metrics disagreeing with the primary one: in sign on an important component, or in which
    component matters most."""
    out = []
    v = normalized_or_none(result, primary)
    if v is None:
        return out
    fv = v.reshape(-1)
    top_p = int(np.argmax(np.abs(fv)))
    for m in result.metrics:
        if m == primary:
            continue
        d = normalized_or_none(result, m)
        if d is None:
            continue
        fd = d.reshape(-1)
        flips = [i for i in np.argsort(-np.abs(fv), kind="stable")
                 if abs(fv[i]) >= threshold and abs(fd[i]) >= threshold / 2 and np.sign(fd[i]) != np.sign(fv[i])][:3]
        if flips:
            comps = tuple(names[i] for i in flips)
            out.append(Finding(
                "metric_disagreement", "metrics", comps, (m, primary),
                tuple((f"{n} {primary}", _r(fv[i])) for n, i in zip(comps, flips)) + tuple((f"{n} {m}", _r(fd[i])) for n, i in zip(comps, flips)),
                f"{m} and {primary} disagree in sign on {', '.join(comps)}: {primary} says "
                f"{', '.join(f'{fv[i]:+.2f}' for i in flips)}, {m} says {', '.join(f'{fd[i]:+.2f}' for i in flips)}. "
                + ("KL is a distance from the clean distribution: it is unsigned and counts any change, including one that "
                   "helps the answer." if m == "kl" else "The metrics measure different things (the answer alone vs the "
                   "answer against the contrast token)."),
                "Check which tokens the patch moves (look at the top logits), and prefer the metric that matches your question.",
                "caution"))
        louder = [i for i in np.argsort(-np.abs(fd), kind="stable") if abs(fd[i]) >= threshold and abs(fv[i]) < threshold
                  and i not in flips][:3]
        if louder:
            comps = tuple(names[i] for i in louder)
            out.append(Finding(
                "metric_disagreement", "metrics", comps, (m, primary),
                tuple((f"{n} {m}", _r(fd[i])) for n, i in zip(comps, louder)) + tuple((f"{n} {primary}", _r(fv[i])) for n, i in zip(comps, louder)),
                f"{m} marks {', '.join(comps)} as important ({', '.join(f'{fd[i]:+.2f}' for i in louder)} of its gap) where "
                f"{primary} gives {', '.join(f'{fv[i]:+.2f}' for i in louder)}: "
                + ("a discrete metric is sharp — a small shift of the logits that crosses the top-1 (or a rank) threshold "
                   "counts as the whole effect." if m in DISCRETE_METRICS else
                   "the metrics weigh the change differently (the answer's probability alone vs against the contrast token)."),
                f"Judge importance on {primary}; a component only {m} calls important is a small logit change near a threshold.",
                "caution"))
        top_m = int(np.argmax(np.abs(fd)))
        if top_m != top_p and abs(fv[top_p]) >= threshold and abs(fv[top_m]) < 0.5 * abs(fv[top_p]):
            out.append(Finding(
                "metric_disagreement", "metrics", (names[top_p], names[top_m]), (m, primary),
                _nums(**{f"{names[top_p]} {primary}": fv[top_p], f"{names[top_m]} {primary}": fv[top_m],
                         f"{names[top_p]} {m}": fd[top_p], f"{names[top_m]} {m}": fd[top_m]}),
                f"{m} and {primary} rank components differently: {primary} puts {names[top_p]} first ({fv[top_p]:+.2f}), "
                f"{m} puts {names[top_m]} first ({fd[top_m]:+.2f}; {primary} gives it only {fv[top_m]:+.2f}).",
                f"Do not pick components by {m} alone; confirm the ranking under {primary} and logprob.", "caution"))
    return out


def direction_findings(den: PatchResult, noi: PatchResult, names: list[str], metric: str, threshold: float,
                       what: str, k: int = 3) -> list[Finding]:
    """Denoising (sufficiency) against noising (necessity), per component."""
    d, n = normalized_or_none(den, metric), normalized_or_none(noi, metric)
    if d is None or n is None:
        return []
    fd, fn = d.reshape(-1), n.reshape(-1)
    out = []
    order = np.argsort(-np.maximum(np.abs(fd), np.abs(fn)), kind="stable")
    important_d = [names[i] for i in order if fd[i] >= threshold]
    counts: dict[str, int] = {}
    for i in order:
        c, a, b = names[i], float(fd[i]), float(fn[i])
        nums = _nums(denoise=a, noise=b)
        if a >= threshold and b >= threshold:
            out.append(Finding("necessary_and_sufficient", "directions", (c,), (metric,), nums,
                               f"{what} {c} is both sufficient (restoring it alone restores {a:.2f} of the gap) and necessary "
                               f"(corrupting it alone destroys {b:.2f}): on this distribution it carries the behaviour.",
                               "Zoom in: which positions and which of its inputs (q/k/v) carry the effect?"))
        elif a >= threshold and abs(b) < threshold / 2:
            others = [x for x in important_d if x != c][:3]
            out.append(Finding("sufficient_not_necessary", "directions", (c,), (metric,), nums,
                               f"{what} {c} is sufficient but not necessary: restoring it alone restores {a:.2f} of the gap, "
                               f"but corrupting it in the clean run destroys only {b:+.2f}. Something else does its job when it "
                               "is corrupted: a possible OR gate (redundant paths) or backup behaviour.",
                               "Noise it jointly with the other components that restore the behaviour"
                               + (f" ({', '.join(others)})" if others else "")
                               + ": a joint effect much larger than each alone confirms an OR/backup; path patching "
                                 "shows which component compensates."))
        elif b >= threshold and a < threshold / 2:
            out.append(Finding("necessary_not_sufficient", "directions", (c,), (metric,), nums,
                               f"{what} {c} is necessary but not sufficient: corrupting it in the clean run destroys {b:.2f} of "
                               f"the gap, but restoring it alone in the corrupted run "
                               + (f"restores only {a:+.2f}" if a > -threshold else f"makes things worse ({a:+.2f})")
                               + ". It matters only "
                               "together with other clean components: a possible AND gate (e.g. its output is read by a "
                               "later component that also needs other clean inputs).",
                               "Denoise it jointly with the other components that are necessary under noising: if only the "
                               "joint patch restores the behaviour, they form an AND."))
    kept = []
    for f in out:  # at most k of each kind per sweep, strongest first
        counts[f.kind] = counts.get(f.kind, 0) + 1
        if counts[f.kind] <= k:
            kept.append(f)
    return kept


def sign_findings(result: PatchResult, names: list[str], metric: str, threshold: float, what: str,
                  overshoot_tol: float = 0.1, k: int = 3) -> list[Finding]:
    """Negative components (effect <= -threshold) and overshoot (effect > 1 + overshoot_tol)."""
    v = normalized_or_none(result, metric)
    if v is None:
        return []
    f = v.reshape(-1)
    out = []
    neg = [int(i) for i in np.argsort(f, kind="stable") if f[i] <= -threshold][:k]
    if neg:
        comps = tuple(names[i] for i in neg)
        if result.direction == "denoise":
            meaning = ("restoring its clean value alone moves the model further from the clean answer: in the corrupted "
                       "context it pushes the wrong way (e.g. it carries information that a later component reads "
                       "against mismatched inputs, or it is a negative/copy-suppression component).")
        else:
            meaning = ("corrupting it makes the model *more* confident in the clean answer: in the clean run it works "
                       "against the answer (a negative component, e.g. a head that suppresses the answer).")
        out.append(Finding("negative_component", "signs", comps, (metric,), tuple((n, _r(f[i])) for n, i in zip(comps, neg)),
                           f"{what} ({result.direction}): negative effects {_fmt_list(comps, [f[i] for i in neg])}: {meaning}",
                           "Keep negative components in the circuit: summing absolute effects or dropping them makes the "
                           "circuit look cleaner than it is. Check the direct logit attribution of each."))
    over = [int(i) for i in np.argsort(-f, kind="stable") if f[i] > 1 + overshoot_tol][:k]
    if over:
        comps = tuple(names[i] for i in over)
        if result.direction == "denoise":
            meaning = "restores more than the whole gap: its clean value, without the rest of the clean run, overshoots"
        else:
            meaning = "destroys more than the whole gap: corrupting it alone does worse than the corrupted prompt itself"
        out.append(Finding("overshoot", "signs", comps, (metric,), tuple((n, _r(f[i])) for n, i in zip(comps, over)),
                           f"{what} ({result.direction}): {_fmt_list(comps, [f[i] for i in over])} {meaning} — a sign that "
                           "other components counteract it in the reference run (negative or backup components).",
                           "Look for components with the opposite sign in the same sweep and patch them jointly with this one."))
    return out


def spread_findings(result: PatchResult, names: list[str], metric: str, threshold: float, what: str,
                    top_share: float = 0.2, carried: float = 0.8) -> list[Finding]:
    """Effects carried by a few prompts: among important components, those whose top ``top_share``
    of prompts account for at least ``carried`` of the summed per-prompt effect."""
    v = normalized_or_none(result, metric)
    if v is None:
        return []
    per = per_prompt_normalized(result, metric)
    B = per.shape[-1]
    if B < 5:
        return []
    flat, per = v.reshape(-1), per.reshape(-1, B)
    n_top = max(1, int(np.ceil(top_share * B)))
    out = []
    for i in np.argsort(-np.abs(flat), kind="stable"):
        if abs(flat[i]) < threshold:
            break
        s = per[i] * np.sign(flat[i])
        total = float(s.sum())
        if total <= 0:
            continue
        share = float(np.sort(s)[::-1][:n_top].sum() / total)
        if share >= carried:
            out.append(Finding(
                "few_prompts", "spread", (names[i],), (metric,),
                _nums(effect=flat[i], top_prompts=n_top, share=share, median=float(np.median(per[i]))),
                f"{what} {names[i]} ({result.direction}, {flat[i]:+.2f} on average) is carried by a few prompts: "
                f"{n_top} of {B} prompts account for {share:.0%} of it (median per-prompt effect {np.median(per[i]):+.2f}). "
                "The average describes no typical prompt.",
                "Look at the prompts that carry it: they may use a different mechanism (split the dataset by template, "
                "position or token).", "caution"))
    return out


def attribution_findings(exact: PatchResult, estimate: PatchResult, names: list[str], metric: str, threshold: float,
                         what: str, max_listed: int = 8) -> tuple[list[Finding], list[int]]:
    """Compare an attribution estimate with exact patching of the same sweep. Returns the
    agreement finding and the flat indices of components ranked wrongly (to verify exactly):

    * *missed*: exact ``|effect| >= threshold`` but outside attribution's top k (k = the number of
      components exact patching finds important);
    * *over-ranked*: in attribution's top k but exact ``|effect| < threshold / 2``;
    * *sign flips* (signed methods): important components whose estimate has the other sign.
    """
    from ..compare import pearson, spearman

    ex = exact.effects(metric).reshape(-1)
    est = estimate.effects(metric).reshape(-1)
    vn = normalized_or_none(exact, metric)
    if vn is None:
        return [], []
    nv = vn.reshape(-1)
    signed = estimate.info.get("signed", True) is not False
    method = {"atp": "AtP", "atp*": "AtP*", "atp+qk": "AtP+QK"}.get(str(estimate.info.get("method")), "attribution")
    important = [int(i) for i in np.argsort(-np.abs(nv), kind="stable") if abs(nv[i]) >= threshold]
    k = max(1, len(important))
    est_top = [int(i) for i in np.argsort(-np.abs(est), kind="stable")[:k]]
    missed = [i for i in important if i not in est_top]
    # over-ranked: in attribution's top k, unimportant exactly, while an important component is left out
    over = [i for i in est_top if abs(nv[i]) < threshold / 2 and i not in important] if important else []
    flips = [i for i in important if signed and np.sign(est[i]) != np.sign(ex[i]) and est[i] != 0]
    ref = ex if signed else np.abs(ex)
    r, rho = pearson(ref, est), spearman(ref, est)
    recall = len(set(important) & set(est_top)) / len(important) if important else float("nan")
    findings = [Finding(
        "attribution_agreement", "attribution", (), (metric,),
        _nums(pearson=r, spearman=rho, top_k=k, recall=recall),
        f"{method} vs exact denoising of {what}: Pearson {r:.2f}, Spearman {rho:.2f}"
        + ("" if signed else " (against |exact|: AtP*'s GradDrop estimate is a magnitude)")
        + (f"; it finds {recall:.0%} of the {len(important)} components exact patching finds important in its top {k}."
           if important else "; exact patching finds no important component here."),
        "Use attribution to rank many components cheaply, then verify its top candidates exactly (as done below).")]
    wrong = []
    for i in missed + over + flips:
        if i not in wrong:
            wrong.append(i)
    wrong = wrong[:max_listed]
    return findings, wrong


def misranked_finding(exact: PatchResult, estimate: PatchResult, names: list[str], metric: str, threshold: float,
                      what: str, wrong: list[int], verified: np.ndarray) -> Finding:
    """The components attribution ranks wrongly, with their exact effects verified by a second,
    independent exact patch of each (``verified``: normalised effects, same order as ``wrong``)."""
    vn = normalized_or_none(exact, metric).reshape(-1)
    est = estimate.effects(metric).reshape(-1)
    gap = float(np.mean(exact.clean[exact._m(metric)]) - np.mean(exact.corrupt[exact._m(metric)]))
    est_n = est / gap
    signed = estimate.info.get("signed", True) is not False
    method = {"atp": "AtP", "atp*": "AtP*", "atp+qk": "AtP+QK"}.get(str(estimate.info.get("method")), "attribution")
    comps = tuple(names[i] for i in wrong)
    rank = np.empty(est.size, int)
    rank[np.argsort(-np.abs(est), kind="stable")] = np.arange(1, est.size + 1)
    erank = np.empty(est.size, int)
    erank[np.argsort(-np.abs(vn), kind="stable")] = np.arange(1, est.size + 1)
    parts = [f"{names[i]}: {method} {est_n[i]:+.3g} (rank {rank[i]}), exact {verified[j]:+.3g} (rank {erank[i]})"
             for j, i in enumerate(wrong)]
    nums = []
    for j, i in enumerate(wrong):
        nums += [(f"{names[i]} estimate", _r(est_n[i])), (f"{names[i]} exact", _r(verified[j]))]
    return Finding(
        "attribution_misranked", "attribution", comps, (metric,), tuple(nums),
        f"{method} ranks {len(wrong)} component(s) of {what} wrongly (normalised {metric}, estimates "
        + ("signed" if signed else "as magnitudes") + "; exact values verified by patching each again): "
        + "; ".join(parts) + ". First-order attribution misses effects that act through a saturated softmax or a "
        "nonlinearity, and over-ranks components whose direct and indirect effects cancel.",
        "Trust the exact values; for sites with many components, verify attribution's top candidates and a random sample "
        "of the rest exactly (jaxpatch.compare.verify_top_k, false_negative_bound).", "caution")


# ------------------------------------------------------------------------------ head roles
def head_scores(pattern: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Attention-pattern scores per head ``[n_layers, n_heads]`` on the clean prompts:

    * ``previous_token``: mean attention from position t to t - 1 (t >= 1);
    * ``induction``: mean attention from t to the positions right after earlier occurrences of
      token[t] (over queries that have one);
    * ``duplicate_token``: mean attention from t to earlier occurrences of token[t].

    ``pattern``: ``[L, B, N, T, T]``; ``tokens``: ``[B, T]``.
    """
    L, B, N, T, _ = pattern.shape
    tok = np.asarray(tokens)
    t_idx = np.arange(T)
    prev = pattern[..., t_idx[1:], t_idx[1:] - 1].mean(axis=(1, 3))
    same = tok[:, :, None] == tok[:, None, :]                                 # [B, t, s]: token[t] == token[s]
    earlier = t_idx[None, :] < t_idx[:, None]                                  # s < t
    dup_mask = same & earlier[None]
    # induction target s: token[s - 1] == token[t], s - 1 < t - 1 (s <= t - 1)
    ind_mask = np.zeros_like(dup_mask)
    ind_mask[:, :, 1:] = same[:, :, :-1] & (t_idx[None, 1:] <= t_idx[:, None] - 1)[None]
    out = {"previous_token": prev}
    for name, mask in (("induction", ind_mask), ("duplicate_token", dup_mask)):
        has = mask.any(axis=-1)                                                # [B, t]
        if not has.any():
            out[name] = np.zeros((L, N))
            continue
        att = (pattern * mask[None, :, None]).sum(axis=-1)                     # [L, B, N, t]
        out[name] = (att * has[None, :, None]).sum(axis=(1, 3)) / has.sum()
    return out


ROLE_TEXT = {
    "previous_token": "a previous-token head (attends from each token to the one before it)",
    "induction": "an induction head (attends to the token right after an earlier occurrence of the current token)",
    "duplicate_token": "a duplicate-token head (attends to earlier occurrences of the current token)",
}


def head_roles(scores: dict[str, np.ndarray], min_score: float = 0.3) -> dict[tuple[int, int], tuple[str, float]]:
    """``(layer, head) -> (role, score)`` for heads whose best score is at least ``min_score``."""
    names = list(scores)
    stack = np.stack([scores[n] for n in names])                               # [R, L, N]
    out = {}
    L, N = stack.shape[1:]
    for layer in range(L):
        for h in range(N):
            r = int(np.argmax(stack[:, layer, h]))
            if stack[r, layer, h] >= min_score:
                out[(layer, h)] = (names[r], float(stack[r, layer, h]))
    return out


def role_findings(roles, importance: dict[tuple[int, int], float], threshold: float) -> list[Finding]:
    out = []
    for (layer, h), (role, score) in sorted(roles.items()):
        imp = importance.get((layer, h), 0.0)
        if imp < threshold:
            continue
        out.append(Finding("head_role", "zoom", (f"L{layer}H{h}",), (),
                           _nums(**{f"{role}_score": score, "importance": imp}),
                           f"L{layer}H{h} is {ROLE_TEXT[role]}: score {score:.2f} on the clean prompts; its largest patching "
                           f"effect is {imp:.2f} of the gap.",
                           "Attention patterns suggest a role; patching its q/k/v and its output by position tests it."))
    return out


def circuit_findings(roles, effects: dict[tuple[int, int], tuple[float, float]], qkv: dict, metric: str,
                     threshold: float) -> list[Finding]:
    """The previous-token -> induction-head motif: an important induction head with important
    previous-token heads in earlier layers. ``effects``: ``(layer, head) -> (denoise, noise)``
    normalised; ``qkv``: ``(layer, head, "q"|"k"|"v") -> (denoise, noise)`` where zoomed."""
    imp = {lh: max(abs(d), abs(n)) for lh, (d, n) in effects.items()}
    inds = sorted([lh for lh, (r, _) in roles.items() if r == "induction" and imp.get(lh, 0) >= threshold],
                  key=lambda lh: (-imp[lh], lh))
    out = []
    for li, hi in inds:
        prevs = sorted([lh for lh, (r, _) in roles.items() if r == "previous_token" and lh[0] < li
                        and imp.get(lh, 0) >= threshold], key=lambda lh: (-imp[lh], lh))
        if not prevs:
            continue
        ind = f"L{li}H{hi}"
        pnames = [f"L{a}H{b}" for a, b in prevs]
        nums = {f"{ind} induction_score": roles[(li, hi)][1]}
        for (a, b), nm in zip(prevs, pnames):
            nums[f"{nm} previous_token_score"] = roles[(a, b)][1]
            nums[f"{nm} noise"] = effects[(a, b)][1]
        nums[f"{ind} denoise"], nums[f"{ind} noise"] = effects[(li, hi)]
        text = (f"Previous-token → induction circuit: {', '.join(pnames)} "
                f"{'is a previous-token head' if len(prevs) == 1 else 'are previous-token heads'} "
                f"(score {', '.join(f'{roles[p][1]:.2f}' for p in prevs)}) and {ind} an induction head "
                f"(score {roles[(li, hi)][1]:.2f}) in a later layer. Corrupting {pnames[0]} destroys "
                f"{effects[prevs[0]][1]:.2f} of the {metric} gap; restoring {ind} alone restores {effects[(li, hi)][0]:.2f} "
                f"and corrupting it destroys {effects[(li, hi)][1]:.2f}.")
        k_eff = qkv.get((li, hi, "k"))
        if k_eff is not None:
            nums[f"{ind}.k noise"] = k_eff[1]
            text += (f" Corrupting only {ind}'s keys destroys {k_eff[1]:.2f}: the induction head finds its target through "
                     "keys written by the previous-token head (K-composition).")
        out.append(Finding("circuit", "circuit", tuple(pnames) + (ind,), (metric,), _nums(**nums), text,
                           f"Confirm the edge with path patching from {pnames[0]} to {ind}'s keys (jaxpatch.edges), and "
                           "check the copying with the induction head's OV circuit."))
    return out
