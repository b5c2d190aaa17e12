"""A budgeted ``attribution_patch`` (``memory_budget=``) compiles its candidate programs itself to
read their memory analysis; a second call with the same shapes and options reuses them instead of
compiling again, and any change the program depends on (shapes, targets, method) compiles anew."""

from __future__ import annotations

import numpy as np

import jaxpatch
from jaxpatch import attribution as at
from jaxpatch.config import ModelConfig

CFG = ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16)


def test_a_budgeted_call_compiles_once(monkeypatch):
    m = jaxpatch.HookedModel.from_config(CFG, seed=0)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 50, (3, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % 50
    kw = dict(answer=clean[:, -1], wrong=(clean[:, -1] + 3) % 50, memory_budget="1GiB", mesh=None)
    builds = []
    real = at._atp_core.lower
    monkeypatch.setattr(at, "_PLANNED", {})
    monkeypatch.setattr(at._atp_core, "lower", lambda *a, **k: builds.append(k["method"]) or real(*a, **k), raising=False)
    first = jaxpatch.attribution_patch(m, clean, corrupt, site="z", **kw)
    again = jaxpatch.attribution_patch(m, clean, corrupt, site="z", **kw)
    assert builds == ["atp"]  # fits without remat: one candidate compiled, then reused
    np.testing.assert_array_equal(again.per_prompt, first.per_prompt)
    other = corrupt.copy()
    other[:, 4] = (other[:, 4] + 7) % 50  # new values, same shapes: the same program
    changed = jaxpatch.attribution_patch(m, clean, other, site="z", **kw)
    assert builds == ["atp"] and not np.allclose(changed.per_prompt, first.per_prompt)
    jaxpatch.attribution_patch(m, clean[:2], corrupt[:2], site="z", **{**kw, "answer": kw["answer"][:2],
                                                                        "wrong": kw["wrong"][:2]})  # another batch size
    jaxpatch.attribution_patch(m, clean, corrupt, site="z", method="atp*", **kw)  # another method
    jaxpatch.attribution_patch(m, clean, corrupt, site="resid_pre", **kw)  # another target
    assert builds == ["atp", "atp", "atp*", "atp"]
