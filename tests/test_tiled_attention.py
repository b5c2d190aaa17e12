"""Packed rows attend by tiles (``models.transformer._tiled_attention``): each tile's queries read
the cached keys and two tiles of packed keys instead of every packed row. The tiled suffix run
equals the dense one (``TILED_ATTENTION = False``, the slow twin) for every family's attention
(rotary, grouped-query, sliding windows, soft-caps, q/k norms), left padding, segments that
straddle tile boundaries, and non-finite values (a patch's own NaN makes its rows NaN; other
patches' NaNs never reach it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import models
from jaxpatch import sweep as sw
from jaxpatch.interventions import NONE
from jaxpatch.models import transformer as tr
from jaxpatch.models._layers import SiteHandler
from tests.test_skip import _families

TOL = 2e-5  # float32, relative to max(1, |value|): the same sums over the same keys, in another order
T = 8


def test_tile_rows():
    assert tr.tile_rows(128, 16) == 16
    assert tr.tile_rows(30, 10) == 10
    assert tr.tile_rows(342, 10) == 18  # the smallest divisor >= n_pos
    assert tr.tile_rows(20, 10) == 10
    assert tr.tile_rows(10, 10) == 0  # one tile: dense
    assert tr.tile_rows(19, 10) == 0  # no divisor in 10..9
    assert tr.tile_rows(35, 10) == 0  # no divisor in 10..17


def _suffix_rows(cfg, params, cache, run_ctx, first, rows, tiled, monkeypatch):
    """Every packed row after all blocks (``[B, rows, D]``), from layer 0, no edits."""
    monkeypatch.setattr(tr, "TILED_ATTENTION", tiled)
    layout = models.packed_layout(jnp.asarray(first, jnp.int32), T, rows)
    B = cache["resid"].shape[1]
    read = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (B, rows))
    hs_of = lambda layer: SiteHandler(NONE, frozenset(), layer)  # noqa: E731
    fn = jax.jit(lambda cache, run_ctx: models.run_blocks_packed(cfg, params["blocks"], cache, jnp.int32(0), run_ctx,
                                                                 layout, hs_of, read, True))
    return np.asarray(fn(cache, run_ctx)), np.asarray(layout["slot"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "qwen3-qknorm"])
def test_tiled_equals_dense_every_family(name, monkeypatch):
    cfg = _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=4)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, m.params)
    tokens = np.random.default_rng(1).integers(0, cfg.d_vocab, (2, T))
    mask = np.ones((2, T), np.int32)
    mask[1, :2] = 0  # left padding
    _, caps = m.run(tokens, capture=sw.run_sites(cfg), attention_mask=mask)
    cache = sw.run_cache(cfg, caps, tokens, mask)
    run_ctx = cache.pop("ctx")
    # Segments of 5, 8, 3, 1, 6 and 8 rows in 4 tiles of 8: four of them straddle a tile boundary;
    # the last tile ends in padding rows.
    first = np.array([3, 0, 5, 7, 2, 0])
    rows = 32
    assert tr.tile_rows(rows, T) == 8
    dense, slot = _suffix_rows(cfg, m.params, cache, run_ctx, first, rows, False, monkeypatch)
    tiled, _ = _suffix_rows(cfg, m.params, cache, run_ctx, first, rows, True, monkeypatch)
    real = slot < first.size
    assert np.all(np.isfinite(dense[:, real]))
    scale = max(1.0, float(np.max(np.abs(dense[:, real]))))
    assert np.max(np.abs(tiled[:, real] - dense[:, real])) <= TOL * scale, name


def test_tiled_nonfinite_stays_in_its_patch(monkeypatch):
    """A NaN value in the cache at position 4 reaches the segments that read it from the cache
    (first position > 4) and no other; a NaN in the rows a segment recomputes stays in the
    segments that hold it (the segment from position 7, packed among them, stays finite)."""
    cfg = _families()["llama"]
    m = jaxpatch.HookedModel.from_config(cfg, seed=4)
    tokens = np.random.default_rng(2).integers(0, cfg.d_vocab, (2, T))
    _, caps = m.run(tokens, capture=sw.run_sites(cfg))
    cache = sw.run_cache(cfg, caps, tokens)
    run_ctx = cache.pop("ctx")
    first = np.array([3, 7, 0, 5, 2])  # segments of 5, 1, 8, 3, 6 rows
    rows = 32
    for where in ("cache", "rows"):
        c = dict(cache)
        if where == "cache":
            c["v"] = c["v"].at[1, 0, 4].set(jnp.nan)  # layer 1, prompt 0, position 4
        else:  # the residual entering layer 0 at position 6: the segments recomputing it read it
            c["resid"] = c["resid"].at[0, 0, 6].set(jnp.nan)
        dense, slot = _suffix_rows(cfg, m.params, c, run_ctx, first, rows, False, monkeypatch)
        tiled, _ = _suffix_rows(cfg, m.params, c, run_ctx, first, rows, True, monkeypatch)
        real = slot < first.size
        nan_d = np.isnan(dense[:, real]).any(-1)
        nan_t = np.isnan(tiled[:, real]).any(-1)
        np.testing.assert_array_equal(nan_t, nan_d)
        seg_nan = {int(s): bool(nan_d[0, slot[real] == s].any()) for s in range(first.size)}
        if where == "cache":
            assert seg_nan == {0: False, 1: True, 2: False, 3: True, 4: False}
        else:  # every segment but the one from position 7 recomputes position 6
            assert seg_nan == {0: True, 1: False, 2: True, 3: True, 4: True}
        assert not np.isnan(dense[1, real]).any() and not np.isnan(tiled[1, real]).any()  # prompt 1 untouched
        ok = ~nan_d
        assert np.max(np.abs(tiled[:, real][ok] - dense[:, real][ok])) <= TOL * max(1.0, float(np.max(np.abs(dense[:, real][ok]))))
