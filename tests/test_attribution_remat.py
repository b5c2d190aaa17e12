"""Rematerialisation in attribution (``attribution_patch(remat=, memory_budget=)``): recomputing each
block in the backward pass gives the same estimates as keeping its values, and the planner picks
it from the compiled programs' own memory analysis only when the budget needs it."""

from __future__ import annotations

import numpy as np
import pytest

import jaxpatch
from jaxpatch import planner
from jaxpatch.config import ModelConfig

GPT2 = ModelConfig.gpt2(n_layers=4, d_model=64, n_heads=4, d_vocab=100, n_ctx=64)
LLAMA = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=100, n_ctx=64,
                    architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu",
                    qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)


def _prompts(T=40):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 100, (4, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 5] = (corrupt[:, 5] + 1) % 100
    return clean, corrupt, dict(answer=clean[:, -1], wrong=(clean[:, -1] + 3) % 100)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_remat_gives_the_same_estimates(cfg):
    m = jaxpatch.HookedModel.from_config(cfg, seed=0)
    clean, corrupt, kw = _prompts()
    targets = [("z", ("layer", "head", "pos")), ("resid_pre", ("layer", "pos")), ("mlp_out", ("layer",))]
    for method in ("atp", "atp*"):
        a = jaxpatch.attribution_patch(m, clean, corrupt, targets=targets, method=method, **kw)
        b = jaxpatch.attribution_patch(m, clean, corrupt, targets=targets, method=method, remat=True, **kw)
        for key in a:
            assert a[key].info["remat"] is False and b[key].info["remat"] is True
            ref = a[key].per_prompt - a[key].per_prompt.mean()  # the estimated changes, not the run's metric
            assert np.abs(ref).max() > 1e-4
            # float32: the recomputed forward is the same program, so at most rounding apart
            np.testing.assert_allclose(b[key].per_prompt, a[key].per_prompt, rtol=0, atol=1e-6 * np.abs(a[key].per_prompt).max())


def test_the_budget_decides_remat_from_the_compiled_programs():
    m = jaxpatch.HookedModel.from_config(GPT2, seed=0)
    clean, corrupt, kw = _prompts()
    kw.update(site="z", method="atp*")
    free = jaxpatch.attribution_patch(m, clean, corrupt, memory_budget="1GiB", **kw)
    assert free.info["remat"] is False and set(free.info["memory_need"]) == {False}  # fits: one compile, no remat
    keep = free.info["memory_need"][False]
    tight = jaxpatch.attribution_patch(m, clean, corrupt, memory_budget=keep - 1, **kw)
    need = tight.info["memory_need"]
    # Without remat the backward pass keeps only each block's matmul outputs (GRAD_SAVES), so remat's
    # saving is those: smaller than when every intermediate was kept, still a saving.
    assert tight.info["remat"] is True and need[False] == keep and need[True] < keep, need
    np.testing.assert_allclose(tight.per_prompt, free.per_prompt, rtol=0, atol=1e-6 * np.abs(free.per_prompt).max())
    with pytest.raises(planner.MemoryPlanError, match="fewer prompts per call") as e:
        jaxpatch.attribution_patch(m, clean, corrupt, memory_budget=need[True] - 1, **kw)
    assert "remat=False" in str(e.value) and "remat=True" in str(e.value)
    with pytest.raises(planner.MemoryPlanError):  # an explicit remat=False is held to the budget too
        jaxpatch.attribution_patch(m, clean, corrupt, memory_budget=keep - 1, remat=False, **kw)
    no_budget = jaxpatch.attribution_patch(m, clean, corrupt, **kw)  # a CPU reports no memory: no planning
    assert no_budget.info["remat"] is False and "memory_need" not in no_budget.info


@pytest.mark.parametrize("bad", ["yes", 1, None, "AUTO"])
def test_a_bad_remat_is_refused(bad):
    m = jaxpatch.HookedModel.from_config(GPT2, seed=0)
    clean, corrupt, kw = _prompts(8)
    with pytest.raises(jaxpatch.InputError, match="remat must be"):
        jaxpatch.attribution_patch(m, clean, corrupt, remat=bad, **kw)
