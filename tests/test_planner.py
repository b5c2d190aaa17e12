"""The memory planner (jaxpatch/planner.py): the chunk size it picks compiles within the budget
(XLA's own memory analysis of the program actually run), the next larger candidate would not,
and when nothing fits the error says so and what to change."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import planner
from jaxpatch import sweep as sw

cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16)
model = jaxpatch.HookedModel.from_config(cfg, seed=0)
rng = np.random.default_rng(0)
clean = rng.integers(0, 50, (4, 12)).astype(np.int32)
corrupt = rng.integers(0, 50, (4, 12)).astype(np.int32)
KW = dict(site="resid_pre", answer=clean[:, -1], wrong=corrupt[:, -1], position_buckets=1, progress=False)


class _Spy:
    """Stands in for sweep._core, recording the arguments of the program the sweep runs."""

    def __init__(self, core):
        self.core, self.calls = core, []

    def __call__(self, *a, **k):
        self.calls.append((a, k))
        return self.core(*a, **k)

    def lower(self, *a, **k):
        return self.core.lower(*a, **k)


def _program_bytes(args, kw, chunk: int) -> int:
    """Per-device bytes of the sweep program that runs every patch in chunks of ``chunk``
    (arguments + outputs + temporaries - aliased, from ``memory_analysis()``)."""
    sweep = sw.grid(cfg, "blocks.hook_resid_pre", ("layer", "pos"), clean.shape[1])
    n_dev = 1 if kw["mesh"] is None else kw["mesh"].size
    p = sw.plan(sweep, cfg.n_layers, clean.shape[1], int(np.min(np.asarray(args[5]["answer_pos"]))), chunk, n_dev, 1)
    n = len(p.chunk_start)
    idx = {a: jax.numpy.asarray(np.asarray(v)[p.order].reshape(n, chunk)) for a, v in sweep.index.items()}
    ma = sw._core.lower(*args[:6], idx, jax.numpy.asarray(p.chunk_start), jax.numpy.asarray(p.chunk_bucket),
                        **{**kw, "offsets": p.offsets}).compile().memory_analysis()
    return ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes


@pytest.mark.parametrize("mesh", [None, "auto"])
def test_planned_chunk_fits_the_budget_and_the_next_candidate_does_not(monkeypatch, mesh):
    # chunk 1 and the preferred chunk bracket the budget, so the planner must bisect
    with pytest.raises(planner.MemoryPlanError):
        jaxpatch.activation_patch(model, clean, corrupt, memory_budget=1, mesh=mesh, **KW)
    lo = planner.last_plan["measured"][1]
    preferred = max(planner.last_plan["measured"])
    hi = planner.last_plan["measured"][preferred]
    assert preferred >= 8 and hi > lo
    budget = (lo + 2 * hi) // 3

    spy = _Spy(sw._core)
    monkeypatch.setattr(sw, "_core", spy)
    res = jaxpatch.activation_patch(model, clean, corrupt, memory_budget=budget, mesh=mesh, **KW)
    chunk = res.info["chunk_size"]
    cands = planner.candidates(preferred)
    assert 1 < chunk < preferred and chunk in cands
    assert planner.last_plan["chunk"] == chunk and planner.last_plan["budget"] == budget
    assert planner.last_plan["compiles"] <= 2 + math.ceil(math.log2(preferred))  # bounded compile cost

    (args, kw), = spy.calls  # the one program the sweep ran
    assert _program_bytes(args, kw, chunk) <= budget  # the program run fits, by XLA's own analysis
    bigger = cands[cands.index(chunk) + 1]
    assert _program_bytes(args, kw, bigger) > budget  # and the next larger candidate would not

    # a planned run gives exactly the numbers of that chunk size given by hand
    by_hand = jaxpatch.activation_patch(model, clean, corrupt, chunk_size=chunk, mesh=mesh, **KW)
    assert res.per_prompt.tobytes() == by_hand.per_prompt.tobytes()


def test_nothing_fits_raises_what_to_change():
    with pytest.raises(planner.MemoryPlanError) as e:
        jaxpatch.activation_patch(model, clean, corrupt, memory_budget="64KiB", mesh=None, **KW)
    msg = str(e.value)
    assert "chunk_size=1 needs" in msg and "64.00 KiB" in msg and "memory_budget=" in msg
    assert "fewer prompts" in msg and "bfloat16" in msg
    assert isinstance(e.value, jaxpatch.InputError)


def test_chunk_size_overrides_the_planner():
    planner.last_plan.clear()
    res = jaxpatch.activation_patch(model, clean, corrupt, memory_budget=1, chunk_size=2, mesh=None, **KW)
    assert res.info["chunk_size"] == 2 and planner.last_plan == {}


def test_device_reported_memory_is_the_default_budget(monkeypatch):
    """On a device that reports its memory (GPU/TPU) the planner runs without memory_budget=."""
    with pytest.raises(planner.MemoryPlanError):
        jaxpatch.activation_patch(model, clean, corrupt, memory_budget=1, mesh=None, **KW)
    lo = planner.last_plan["measured"][1]
    monkeypatch.setattr(planner, "device_budget", lambda devices: lo)
    res = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **KW)
    chunk = res.info["chunk_size"]  # weights and caches already on the device do not count twice
    assert "free memory" in planner.last_plan["source"] and planner.last_plan["measured"][chunk] <= lo
    assert chunk < max(planner.last_plan["measured"])
    monkeypatch.setattr(planner, "device_budget", lambda devices: None)  # a CPU: the speed heuristic alone
    planner.last_plan.clear()
    res = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **KW)
    assert res.info["chunk_size"] > 1 and planner.last_plan == {}


def test_device_budget_reads_memory_stats():
    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    free = planner.device_budget([Dev({"bytes_limit": 1000, "bytes_in_use": 100}), Dev({"bytes_limit": 1000, "bytes_in_use": 400})])
    assert free == int(600 * planner.DEVICE_HEADROOM)
    assert planner.device_budget([Dev(None)]) is None
    assert planner.device_budget(jax.devices("cpu")[:1]) is None  # CPUs report nothing (JAX 0.10.2)
    assert planner.resident_bytes({"w": jax.numpy.zeros((10, 4), np.float32)}, jax.devices()[0]) == 160


@pytest.mark.parametrize("text, n", [(2**20, 2**20), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 2**29),
                                     ("100", 100), ("3e3 kb", 3_000_000)])
def test_parse_bytes(text, n):
    assert planner.parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["2 parsecs", "", "-1GB", 0, True, 1.5, "GiB"])
def test_parse_bytes_refuses(bad):
    with pytest.raises(jaxpatch.InputError, match="memory_budget"):
        planner.parse_bytes(bad)


def test_candidates():
    assert planner.candidates(1) == [1]
    assert planner.candidates(16) == [1, 2, 4, 8, 16]
    assert planner.candidates(12) == [1, 2, 4, 8, 12]


def test_cli_memory_budget(capsys):
    from jaxpatch.cli import main

    argv = ["sweep", "default", "--clean", "<bos> cat dog sun red cat dog sun", "--corrupt",
            "<bos> pen box hot red cat dog sun", "--answer", "red", "--wrong", "pen"]
    assert main(argv + ["--memory-budget", "4KiB"]) == 2
    err = capsys.readouterr().err
    assert "chunk_size=1 needs" in err and "4.00 KiB" in err
    assert main(argv + ["--memory-budget", "2 parsecs"]) == 2
    assert "is not a size" in capsys.readouterr().err
