"""The report's detectors on hand-made PatchResults (no model): each fires on the case it names and
stays silent on its twin, so a detector that always (or never) fires fails here."""

import numpy as np

from jaxpatch.reporting import findings as F
from jaxpatch.results import PatchResult

M = ("logit_diff", "prob", "accuracy")


def _result(direction, effects, *, per_prompt=None, clean=None, corrupt=None, B=10):
    """A (layer=1, head=len(effects)) result whose normalised logit_diff is ``effects`` (prob and
    accuracy follow the same effects unless given per prompt)."""
    eff = np.asarray(effects, np.float64)
    n = eff.size
    c = np.tile(np.asarray(clean if clean is not None else [4.0, 0.9, 1.0])[:, None], (1, B))
    k = np.tile(np.asarray(corrupt if corrupt is not None else [0.0, 0.1, 0.0])[:, None], (1, B))
    gap = c.mean(1) - k.mean(1)  # [M]
    if per_prompt is None:
        frac = np.broadcast_to(eff[:, None, None], (n, len(M), B))
    else:
        frac = np.broadcast_to(np.asarray(per_prompt, np.float64)[:, None, :], (n, len(M), B))
    vals = k[None] + frac * gap[None, :, None] if direction == "denoise" else c[None] - frac * gap[None, :, None]
    return PatchResult("blocks.attn.hook_z", direction, "resample", M, ("layer", "head"),
                       {"layer": ["L0"], "head": [f"H{i}" for i in range(n)]}, vals.reshape(1, n, len(M), B), c, k,
                       {"gap_floor": 1e-6})


NAMES = ["L0H0", "L0H1", "L0H2"]


def test_direction_findings_and_or():
    # H0: sufficient only (OR/backup); H1: necessary only (AND); H2: both
    den = _result("denoise", [0.9, 0.02, 0.8])
    noi = _result("noise", [0.05, 0.95, 0.9])
    fs = F.direction_findings(den, noi, NAMES, "logit_diff", 0.2, "head")
    kinds = {f.components[0]: f.kind for f in fs}
    assert kinds == {"L0H0": "sufficient_not_necessary", "L0H1": "necessary_not_sufficient",
                     "L0H2": "necessary_and_sufficient"}
    assert "OR" in next(f for f in fs if f.components == ("L0H0",)).message
    assert "AND" in next(f for f in fs if f.components == ("L0H1",)).message
    # an in-between component (neither clearly important nor clearly not) is left unclassified
    assert F.direction_findings(_result("denoise", [0.9]), _result("noise", [0.15]), NAMES, "logit_diff", 0.2, "head") == []


def test_negative_and_overshoot():
    fs = F.sign_findings(_result("denoise", [-0.5, 1.4, 0.5]), NAMES, "logit_diff", 0.2, "head")
    assert {f.kind: f.components for f in fs} == {"negative_component": ("L0H0",), "overshoot": ("L0H1",)}
    assert F.sign_findings(_result("denoise", [0.0, 1.05, 0.5]), NAMES, "logit_diff", 0.2, "head") == []


def test_few_prompts_carry_the_effect():
    few = np.zeros(10)
    few[:2] = 2.5  # mean 0.5, carried by 2 of 10 prompts
    even = np.full(10, 0.5)
    fs = F.spread_findings(_result("denoise", [0.0], per_prompt=[few]), ["L0H0"], "logit_diff", 0.2, "head")
    assert [f.kind for f in fs] == ["few_prompts"] and fs[0].values["share"] == 1.0
    assert F.spread_findings(_result("denoise", [0.0], per_prompt=[even]), ["L0H0"], "logit_diff", 0.2, "head") == []


def test_gap_too_small_or_too_noisy():
    tiny = _result("denoise", [0.5], clean=[4.0, 0.5, 1.0], corrupt=[0.0, 0.5, 0.0])  # prob: no gap at all
    fs = F.gap_findings(tiny, M)
    assert [f.metrics for f in fs] == [("prob",)] and "rounding" in fs[0].message
    r = _result("denoise", [0.5])
    r.corrupt[0] = np.where(np.arange(10) % 2 == 0, 10.0, -2.5)  # per-prompt gaps of both signs, mean 0.25
    r.clean[0] = np.full(10, 4.0)
    assert [f.metrics for f in F.gap_findings(r, ("logit_diff",))] == [("logit_diff",)]
    assert F.gap_findings(_result("denoise", [0.5]), M) == []


def test_discrete_metric_hides_partial_effect():
    r = _result("noise", [0.5, 0.9])
    r.per_prompt[0, 0, 2, :] = r.clean[2]  # accuracy: no change at all for the partial L0H0
    fs = F.discrete_findings(r, NAMES[:2], "logit_diff", 0.2)
    assert [(f.kind, f.components) for f in fs] == [("discrete_metric", ("L0H0",))]
    assert F.discrete_findings(_result("noise", [0.5, 0.9]), NAMES[:2], "logit_diff", 0.2) == []


def test_metric_sign_disagreement():
    r = _result("denoise", [0.6, 0.1])
    r.per_prompt[0, 0, 1, :] = r.corrupt[1] - 0.5 * 0.8  # prob says -0.5 where logit_diff says +0.6
    fs = F.disagreement_findings(r, NAMES[:2], "logit_diff", 0.2)
    assert any(f.components == ("L0H0",) and "disagree in sign" in f.message for f in fs)
    assert F.disagreement_findings(_result("denoise", [0.6, 0.1]), NAMES[:2], "logit_diff", 0.2) == []


def test_head_roles_from_patterns():
    # 1 layer, 2 heads, prompt <bos> a b c a b: head 0 previous-token, head 1 induction
    toks = np.array([[0, 1, 2, 3, 1, 2]])
    T = toks.shape[1]
    pat = np.zeros((1, 1, 2, T, T))
    pat[0, 0, 0, 0, 0] = 1.0
    for t in range(1, T):
        pat[0, 0, 0, t, t - 1] = 1.0
        pat[0, 0, 1, t, 0] = 1.0
    pat[0, 0, 1, 4, :] = 0.0
    pat[0, 0, 1, 4, 2] = 1.0  # token 1 at t=4: attend to the token after its earlier occurrence (pos 2)
    pat[0, 0, 1, 5, :] = 0.0
    pat[0, 0, 1, 5, 3] = 1.0
    roles = F.head_roles(F.head_scores(pat, toks))
    assert roles[(0, 0)][0] == "previous_token" and roles[(0, 1)][0] == "induction"
