"""Side rows (``jaxpatch.packed.SIDE_ROWS``): a packed patch of a site whose edit changes only its
own row in its layer (``jaxpatch.sites.LOCAL_SITES``: the heads' outputs, ``mlp_out``,
``resid_post``, queries, neurons, ...) runs that layer for its edited row alone, and its segment
starts from the cached residual entering the next layer. Exact: equal to the same packed plan
without side rows (the slow twin) and to one full forward per patch, for chunks that straddle
layers, chunks in the last layer (which run whole), per-prompt answer positions (segments starting
before the edited position) and every family's attention; a NaN stays in its patch; and fewer rows
run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import packed as pk
from jaxpatch import sweep as sw
from tests.test_skip import B, L, T, _families, close, model  # noqa: F401  (model: a fixture; close: TOL 2e-5 relative)
from tests.test_sweep import loop_twin

# canonical site, the index axes of its rows (besides layer and pos)
SITES = {
    "blocks.hook_mlp_out": {},
    "blocks.attn.hook_z": {"head": 2},
    "blocks.hook_resid_post": {},
    "blocks.attn.hook_q": {"head": 1},
    "blocks.hook_resid_mid": {},
    "blocks.mlp.hook_post": {"neuron": 5},
}
# (layer, pos): layers 0..L-1 mixed, the last layer at read positions (others there are dead)
PATCHES = [(0, 3), (0, 7), (0, 9), (1, 2), (1, 6), (1, 8), (2, 9), (2, 5), (0, 5), (1, 9)]


def _rows(extra):
    return [{"layer": la, "pos": p, **extra} for la, p in PATCHES]


@pytest.fixture(scope="module")
def setup(model):
    rng = np.random.default_rng(5)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % 61
    ans, wrong = rng.integers(0, 61, B), rng.integers(0, 61, B)
    return clean, corrupt, ans, wrong


def _forced_bins(monkeypatch, rows=16, slots=3):
    """Plan every packed sweep in chunks of ``rows`` rows and ``slots`` slots (straddling layers)."""
    monkeypatch.setattr(pk, "choose", lambda layer, first, n_pos, batch, side=False, lead=False:
                        pk.Choice(rows, slots, pk.pack(layer, first, n_pos, rows, slots)))


def flagged_run(m, spec, run_cache, source, ctx, flag: str, value: bool, monkeypatch):
    """A packed sweep (logit difference, no skips) with ``jaxpatch.packed.<flag>`` set to ``value``:
    ``(values [P, B], plan)``."""
    monkeypatch.setattr(pk, flag, value)
    jax.clear_caches()  # the flag is read when the program is traced
    vals, pl = sw.run(m.config, m.params, spec, run_cache, source, True, ("logit_diff",), ctx, T, mesh=None, pack=True,
                      skip=False)
    return np.asarray(vals)[:, 0], pl  # [P, B]


def sweep_inputs(m, clean, corrupt, site, ans, wrong):
    """``(run_cache, source, ctx)`` for patching ``site`` of the corrupted run with the clean one's
    activations, reading the last position."""
    cfg = m.config
    _, caps = m.run(corrupt, capture=sw.run_sites(cfg))
    _, src = m.run(clean, capture={site})
    ctx = {"answer_pos": jnp.full((B,), T - 1), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    return sw.run_cache(cfg, caps, corrupt), src[site], ctx


@pytest.mark.parametrize("site", list(SITES))
def test_side_rows_equal_whole_layer_and_single_forwards(model, setup, site, monkeypatch):
    clean, corrupt, ans, wrong = setup
    cfg = model.config
    _forced_bins(monkeypatch)
    run_cache, source, ctx = sweep_inputs(model, clean, corrupt, site, ans, wrong)
    spec = sw.from_rows(cfg, site, _rows(SITES[site]), T)
    fast, pl = flagged_run(model, spec, run_cache, source, ctx, "SIDE_ROWS", True, monkeypatch)
    slow, pl0 = flagged_run(model, spec, run_cache, source, ctx, "SIDE_ROWS", False, monkeypatch)
    assert pl.side and not pl0.side and pl.packed > 0
    starts = pl.chunk_start[pl.chunk_start < L]
    layer = np.asarray(spec.index["layer"])
    bins = [pl.order[c * pl.chunk: (c + 1) * pl.chunk] for c in range(len(starts))]
    assert any(np.unique(layer[b]).size > 1 for b in bins)  # a chunk straddles layers
    assert (starts == L - 1).any() and (starts < L - 1).any()  # last-layer chunks run whole
    assert sw.executed_rows(pl, L, T) < sw.executed_rows(pl0, L, T)
    ref = loop_twin(model, corrupt, clean, site, spec, ans, wrong, source=source)
    assert close(fast, slow), site
    assert close(fast, ref), site


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_side_rows_every_family(name, monkeypatch):
    """Rotary tables, grouped-query heads, sliding windows and soft-caps of the one-row layer;
    per-prompt answer positions, so segments start before their edited position."""
    cfg = _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=2)
    rng = np.random.default_rng(7)
    clean = rng.integers(0, cfg.d_vocab, (2, T))
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 3) % cfg.d_vocab
    ans, wrong = rng.integers(0, cfg.d_vocab, 2), rng.integers(0, cfg.d_vocab, 2)
    kw = dict(site="z", answer=ans, wrong=wrong, answer_pos=[T - 1, 6], mesh=None, pack=True,
              patches=[{"layer": la, "pos": p, "head": h} for la in range(cfg.n_layers) for p in (2, 5, 7, 9) for h in (0, 3)])
    out = {}
    for side in (True, False):
        monkeypatch.setattr(pk, "SIDE_ROWS", side)
        jax.clear_caches()
        out[side] = jaxpatch.activation_patch(m, corrupt, clean, direction="noise", **kw)
        assert out[side].info["packed_rows"] > 0 and sw.last_plan.side == side
    assert close(out[True].per_prompt, out[False].per_prompt), name
    assert out[True].info["executed_rows"] < out[False].info["executed_rows"]


def test_side_row_nan_stays_in_its_patch(model, setup, monkeypatch):
    """A NaN in the source of a patch computed as a side row is reported for that patch only."""
    clean, corrupt, ans, wrong = setup
    cfg = model.config
    _forced_bins(monkeypatch)
    site = "blocks.hook_mlp_out"
    _, caps = model.run(corrupt, capture=sw.run_sites(cfg))
    _, src = model.run(clean, capture={site})
    source = src[site].at[0, :, 7].set(jnp.nan)  # layer 0, position 7: a chunk's first layer
    ctx = {"answer_pos": jnp.full((B,), T - 1), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    spec = sw.from_rows(cfg, site, _rows({}), T)
    monkeypatch.setattr(pk, "SIDE_ROWS", True)
    jax.clear_caches()
    with pytest.raises(jaxpatch.NonFiniteError, match=rf"^1 of {len(PATCHES)} patches.*layer=0, pos=7"):
        sw.run(cfg, model.params, spec, sw.run_cache(cfg, caps, corrupt), source, True, ("logit_diff",), ctx, T,
               mesh=None, pack=True, skip=False)
    assert sw.last_plan.side


def test_minimal_rows_counts_one_row_in_the_edited_layer(model):
    cfg = model.config
    for site, rows in (("blocks.hook_mlp_out", (L - 1) * (T - 4) + 1), ("blocks.hook_resid_pre", L * (T - 4))):
        spec = sw.from_rows(cfg, site, [{"layer": 0, "pos": 4}], T)
        assert sw.minimal_rows(spec, L, T) == rows, site
    last = sw.from_rows(cfg, "blocks.attn.hook_z", [{"layer": L - 1, "pos": 4, "head": 0}], T)
    assert sw.minimal_rows(last, L, T) == 1
