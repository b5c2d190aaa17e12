"""Residual-stream patches that write the run's own values are no-ops (``sweep.unchanged``): e.g.
``resid_pre`` of layer 0 at a position whose token the clean and corrupted prompts share, after
the first position where they differ. They are found by comparing the cached streams bit for bit
and skipped; the sweep equals ``skip=False`` and one full forward per patch.

Tolerance: 2e-5 relative to max(1, |value|), as in tests/test_skip.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw

TOL = 2e-5
L, T = 3, 8
DIFF = (2, 5)  # positions where the corrupted prompts differ


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) <= TOL * max(1.0, float(np.max(np.abs(b))))


@pytest.fixture(scope="module")
def setup():
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=L, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)
    m = jaxpatch.HookedModel.from_config(cfg, seed=1)
    m.params = jax.tree_util.tree_map(lambda a: a * 5.0 if a.ndim >= 2 else a, m.params)
    rng = np.random.default_rng(2)
    clean = rng.integers(0, 61, (3, T)).astype(np.int32)
    corrupt = clean.copy()
    for p in DIFF:
        corrupt[:, p] = (corrupt[:, p] + 7) % 61
    return m, clean, corrupt, np.array([1, 2, 3]), np.array([4, 5, 6])


def _patch(m, clean, corrupt, ans, wrong, **kw):
    return jaxpatch.activation_patch(m, clean, corrupt, by=("layer", "pos"), answer=ans, wrong=wrong, mesh=None, **kw)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_layer0_resid_pre_at_shared_tokens_is_skipped_and_exact(setup, direction):
    m, clean, corrupt, ans, wrong = setup
    res = _patch(m, clean, corrupt, ans, wrong, site="resid_pre", direction=direction)
    ref = _patch(m, clean, corrupt, ans, wrong, site="resid_pre", direction=direction, skip=False)
    # before the first difference: every layer; after it: layer 0 at the shared tokens
    shared_after = [p for p in range(DIFF[0] + 1, T) if p not in DIFF]
    assert res.info["skipped_noop"] == L * DIFF[0] + len(shared_after)
    assert close(res.values(), ref.values())
    # against one full forward per patch (the run's own value written back: the unpatched metric)
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    site = "blocks.hook_resid_pre"
    _, caps = m.run(src, capture={site})
    b = np.arange(3)
    for p in shared_after:
        lg = np.asarray(m(run, m.edit(site, value=caps[site], stacked=True, layer=0, pos=p)))
        assert close(res.values()[0, p], np.mean(lg[b, -1, ans] - lg[b, -1, wrong]))


def test_resid_post_and_other_sites_claim_only_what_is_identical(setup):
    """``resid_post`` of layer 0 mixes earlier positions (attention): only the positions before the
    first difference are no-ops; ``mlp_out`` is not compared at all."""
    m, clean, corrupt, ans, wrong = setup
    for site in ("resid_post", "mlp_out"):
        res = _patch(m, clean, corrupt, ans, wrong, site=site)
        ref = _patch(m, clean, corrupt, ans, wrong, site=site, skip=False)
        assert res.info["skipped_noop"] == L * DIFF[0], site
        assert close(res.values(), ref.values())


def test_unchanged_compares_bit_for_bit_and_shifts_resid_post():
    spec_pre = sw.grid(jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=8, n_heads=2, d_vocab=11, n_ctx=8),
                       "blocks.hook_resid_pre", ("layer", "pos"), 3)
    resid = np.zeros((2, 2, 3, 4), np.float32)
    src = resid.copy()
    src[0, 1, 1, 2] = 1e-30  # one prompt, one position, one dimension, smaller than any tolerance
    src[1, :, 2] = 5.0
    got = sw.unchanged(spec_pre, {"resid": resid}, src, True, 2, 3, jaxpatch.Interventions())
    layer, pos = np.asarray(spec_pre.index["layer"]), np.asarray(spec_pre.index["pos"])
    want = ~(((layer == 0) & (pos == 1)) | ((layer == 1) & (pos == 2)))
    assert (got == want).all()
    post = sw.Sweep("blocks.hook_resid_post", spec_pre.index, spec_pre.grid_axes, spec_pre.grid_shape)
    got = sw.unchanged(post, {"resid": resid}, src, True, 2, 3, jaxpatch.Interventions())
    assert (got == ((layer == 0) & (pos != 2))).all()  # resid_post[0] = resid_pre[1]; the last layer: never
    assert not sw.unchanged(spec_pre, {"resid": resid}, 0.0, False, 2, 3, jaxpatch.Interventions()).any()
