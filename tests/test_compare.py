"""Exact-vs-approximate comparison, verify-top-k and the false-negative diagnostic."""

import numpy as np
import pytest

import jaxpatch
from jaxpatch import compare as cmp
from tests.test_attribution import prompts, scaled_model


def test_rank_statistics():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert cmp.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert cmp.spearman(a, a**3) == pytest.approx(1.0)
    assert cmp.spearman(a, -a) == pytest.approx(-1.0)
    assert cmp.top_k_recall([5, -4, 0.1, 0.2], [1, 2, 3, 0], 2) == 0.5


def test_compare_reports_every_method():
    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    c = cmp.compare(m, clean, corrupt, site="z", methods=("atp", "atp+qk", "atp*"), answer=ans, wrong=wrong, k=3)
    assert [r["method"] for r in c.table] == ["exact", "atp", "atp+qk", "atp*"]
    for r in c.table[1:]:
        assert -1 <= r["pearson"] <= 1 and 0 <= r["top3_recall"] <= 1 and r["wall_s"] > 0 and r["forward_equiv"] > 0
    # On this smooth model plain AtP tracks exact head patching closely.
    assert c.table[1]["pearson"] > 0.5
    assert "pearson" in str(c)


def test_verify_top_k_patches_exactly():
    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    rows = cmp.verify_top_k(m, clean, corrupt, site="z", by=("layer", "pos", "head"), k=4, answer=ans, wrong=wrong)
    assert len(rows) == 4
    exact = jaxpatch.activation_patch(m, clean, corrupt, site="z", by=("layer", "pos", "head"), answer=ans, wrong=wrong, mesh=None)
    e = cmp.effects(exact)
    for r in rows:
        assert r["exact"] == pytest.approx(e[r["layer"], r["pos"], r["head"]], abs=2e-5)
    est = np.abs([r["estimate"] for r in rows])
    assert np.all(np.diff(est) <= 1e-12)  # ranked by |estimate|


def test_false_negative_bound_covers_and_bounds():
    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    fn = cmp.false_negative_bound(m, clean, corrupt, site="z", by=("layer", "pos", "head"), k=5, n_subsets=16,
                                  answer=ans, wrong=wrong)
    assert fn.n_unverified == 3 * 8 * 4 - 5
    assert 0 < fn.coverage <= 1 and fn.subset_effects.shape == (16,)
    assert fn.bound == pytest.approx(np.abs(fn.subset_effects).max())
