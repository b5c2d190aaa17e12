"""Progress bars of sweeps: driven by a few equal dispatches of the plain compiled program (no
host callback inside it, which would keep it out of JAX's persistent compilation cache)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw

from .helpers import random_tokens


@pytest.mark.parametrize("n_dev", [1, 2, 8])
@pytest.mark.parametrize("n_units", [1, 2, 7, 8, 9, 13, 64, 1000])
def test_progress_groups_are_few_equal_and_device_aligned(n_units, n_dev):
    n_chunks = n_units * n_dev  # plan() makes the chunk count a multiple of the device count
    groups, per = sw._progress_groups(n_chunks, n_dev)
    assert 1 <= groups <= sw.MAX_PROGRESS_GROUPS and groups <= n_units
    assert per % n_dev == 0
    assert groups * per >= n_chunks > (groups - 1) * per  # no group is only padding
    assert groups == min(sw.MAX_PROGRESS_GROUPS, n_units) or groups * per - n_chunks < per


def _rows(n, n_layers=3, n_pos=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"layer": int(rng.integers(n_layers)), "pos": int(rng.integers(n_pos))} for _ in range(n)]


@pytest.mark.parametrize("n_patches, mesh", [(24, None), (13, None), (72, "auto")])
def test_bar_moves_per_group_and_results_are_unchanged(tiny_model, n_patches, mesh):
    pytest.importorskip("tqdm")
    cfg = tiny_model.config
    clean, corrupt = random_tokens(cfg, batch=3, seed=1), random_tokens(cfg, batch=3, seed=2)
    ans, wrong = clean[:, -1] % cfg.d_vocab, (clean[:, -1] + 1) % cfg.d_vocab
    kw = dict(site="resid_pre", patches=_rows(n_patches), answer=ans, wrong=wrong, chunk_size=1, mesh=mesh,
              metrics=("logit_diff", "kl"))
    quiet = jaxpatch.activation_patch(tiny_model, clean, corrupt, progress=False, **kw)
    sw.last_progress.clear()
    shown = jaxpatch.activation_patch(tiny_model, clean, corrupt, progress=True, **kw)
    n_dev = 1 if mesh is None else len(jax.local_devices())
    n_chunks = len(sw.last_plan.chunk_start)  # whole multiples of devices x unembedding groups
    unit = sw.last_plan.unit
    assert n_chunks >= math.ceil(n_patches / n_dev) * n_dev and unit % n_dev == 0 and n_chunks % unit == 0
    groups, _ = sw._progress_groups(n_chunks, unit)
    assert sw.last_progress == {"total": n_chunks, "done": n_chunks, "updates": groups}
    assert groups > 1  # the bar really moves during the sweep
    np.testing.assert_array_equal(shown.per_prompt, quiet.per_prompt)


def test_no_host_callback_in_the_sweep_program(tiny_model):
    """The compiled sweep has no host callback: one would make JAX skip writing it to the
    persistent compilation cache (see test_compile_cache for the cross-process check)."""
    cfg = tiny_model.config
    clean, corrupt = random_tokens(cfg, seed=3), random_tokens(cfg, seed=4)
    seen = []
    orig = jax.debug.callback

    def spy(*a, **k):  # pragma: no cover  (fails the test if reached)
        seen.append(a)
        return orig(*a, **k)

    jax.debug.callback = spy
    try:
        jaxpatch.activation_patch(tiny_model, clean, corrupt, site="resid_pre", answer=clean[:, -1],
                                  wrong=corrupt[:, -1], chunk_size=2, mesh=None, progress=True)
    finally:
        jax.debug.callback = orig
    assert seen == []
