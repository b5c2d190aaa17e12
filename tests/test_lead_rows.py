"""Lead rows (``jaxpatch.packed.LEAD_ROWS``): a packed chunk of a site outside
``jaxpatch.sites.LOCAL_SITES`` (``resid_pre``, keys, values, the first norm) whose first-layer
patches all lie in its first ``lead`` rows runs that layer for those rows alone; its other rows
(patches of later layers) enter the next layer from the cached residual. Exact: equal to the same
packed plan without lead rows (the slow twin) and to one full forward per patch, with a later
patch's segment straddling the lead boundary, chunks whose first-layer patches do not fit (which
run whole), last-layer chunks, every family's attention and per-prompt answer positions; a NaN
stays in its patch; fewer rows run. Also: the skipped patches' representative is planned as a
last-layer patch (it never makes a chunk start early)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import packed as pk
from jaxpatch import sweep as sw
from tests.test_skip import B, L, T, _families, close, model  # noqa: F401  (model: a fixture; close: TOL 2e-5 relative)
from tests.test_side_rows import flagged_run, sweep_inputs
from tests.test_sweep import loop_twin

SITES = {
    "blocks.hook_resid_pre": {},
    "blocks.attn.hook_k": {"head": 1},
    "blocks.attn.hook_v": {"head": 2},
    "blocks.ln1.hook_normalized": {},
}
# (layer, pos) with T = 10. In chunks of 20 rows and 5 slots, packed in order: chunk 0 holds layer
# 0's segments (3 + 2 rows, within a 8-row lead) and layer 1's 9-row segment (rows 5..13: it
# straddles the lead boundary); chunk 1 holds layer 1's other segments (8 + 5 + 2 rows: they do not
# fit the lead, it runs whole); chunk 2 is the last layer's.
PATCHES = [(0, 7), (0, 8), (1, 1), (1, 2), (1, 5), (1, 8), (2, 3), (2, 6), (2, 9)]
ROWS, SLOTS, LEAD = 20, 5, 8


def _forced(monkeypatch, rows=ROWS, slots=SLOTS, lead=LEAD):
    def choose(layer, first, n_pos, batch, side=False, lead_on=False, **kw):
        bins = pk.pack(layer, first, n_pos, rows, slots)
        if not kw.get("lead", lead_on) or side:
            return pk.Choice(rows, slots, bins)
        return pk.Choice(rows, slots, bins, lead, pk.lead_fits(layer, first, n_pos, bins, lead, int(layer.max()) + 1))

    monkeypatch.setattr(pk, "choose", choose)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    clean = rng.integers(0, 61, (B, T))
    corrupt = (clean + rng.integers(1, 61, (B, T))) % 61  # different at every position: no patch is a no-op
    ans, wrong = rng.integers(0, 61, B), rng.integers(0, 61, B)
    return clean, corrupt, ans, wrong


@pytest.mark.parametrize("site", list(SITES))
def test_lead_rows_equal_whole_first_layer_and_single_forwards(model, prompts, site, monkeypatch):
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _forced(monkeypatch)
    run_cache, source, ctx = sweep_inputs(model, clean, corrupt, site, ans, wrong)
    spec = sw.from_rows(cfg, site, [{"layer": la, "pos": p, **SITES[site]} for la, p in PATCHES], T)
    fast, pl = flagged_run(model, spec, run_cache, source, ctx, "LEAD_ROWS", True, monkeypatch)
    slow, pl0 = flagged_run(model, spec, run_cache, source, ctx, "LEAD_ROWS", False, monkeypatch)
    assert pl.lead == LEAD and pl0.lead == 0 and not pl.side
    n = int(np.sum(pl.chunk_start < L))
    assert (pl.chunk_bucket[:n] // 2 % 2 == 1).tolist() == [True, False, False]  # a lead, a whole layer, the last layer
    assert sw.executed_rows(pl, L, T) == sw.executed_rows(pl0, L, T) - (ROWS - LEAD)
    ref = loop_twin(model, corrupt, clean, site, spec, ans, wrong, source=source)
    assert close(fast, slow), site
    assert close(fast, ref), site


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_lead_rows_every_family(name, monkeypatch):
    """Rotary tables, grouped-query heads, sliding windows and soft-caps in the lead rows' layer;
    per-prompt answer positions (the segments are cut at the earliest one read); noising."""
    cfg = _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=2)
    rng = np.random.default_rng(7)
    clean = rng.integers(0, cfg.d_vocab, (2, T))
    corrupt = (clean + rng.integers(1, cfg.d_vocab, (2, T))) % cfg.d_vocab
    ans, wrong = rng.integers(0, cfg.d_vocab, 2), rng.integers(0, cfg.d_vocab, 2)
    _forced(monkeypatch, rows=16, slots=4, lead=9)  # layers of 6 + 3 rows: chunks straddle, most leads fit
    kw = dict(site="resid_pre", answer=ans, wrong=wrong, answer_pos=[T - 1, 7], mesh=None, pack=True, skip=False,
              patches=[{"layer": la, "pos": p} for la in range(cfg.n_layers) for p in (4, 7)])
    out = {}
    for lead in (True, False):
        monkeypatch.setattr(pk, "LEAD_ROWS", lead)
        jax.clear_caches()
        out[lead] = jaxpatch.activation_patch(m, corrupt, clean, direction="noise", **kw)
        pl = sw.last_plan
        assert out[lead].info["packed_rows"] > 0 and (pl.lead > 0) == lead
        if lead:
            assert (pl.chunk_bucket // 2 % 2 == 1).any()
    assert close(out[True].per_prompt, out[False].per_prompt), name
    assert out[True].info["executed_rows"] < out[False].info["executed_rows"]
    cfg_ref = dict(kw)
    cfg_ref["pack"] = False
    ref = jaxpatch.activation_patch(m, corrupt, clean, direction="noise", **cfg_ref)
    assert close(out[True].per_prompt, ref.per_prompt), name


def test_lead_row_nan_stays_in_its_patch(model, prompts, monkeypatch):
    """A NaN in the source of a patch run in the lead rows is reported for that patch only (the
    9-row segment of the next layer, in the same rows of the same layer, stays finite)."""
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _forced(monkeypatch)
    site = "blocks.hook_resid_pre"
    _, caps = model.run(corrupt, capture=sw.run_sites(cfg))
    _, src = model.run(clean, capture={site})
    source = src[site].at[0, :, 7].set(jnp.nan)  # layer 0, position 7: chunk 0's lead rows
    ctx = {"answer_pos": jnp.full((B,), T - 1), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    spec = sw.from_rows(cfg, site, [{"layer": la, "pos": p} for la, p in PATCHES], T)
    monkeypatch.setattr(pk, "LEAD_ROWS", True)
    jax.clear_caches()
    with pytest.raises(jaxpatch.NonFiniteError, match=rf"^1 of {len(PATCHES)} patches.*layer=0, pos=7"):
        sw.run(cfg, model.params, spec, sw.run_cache(cfg, caps, corrupt), source, True, ("logit_diff",), ctx, T,
               mesh=None, pack=True, skip=False)
    assert sw.last_plan.lead == LEAD


def test_lead_fits():
    layer = np.array([l for l, _ in PATCHES])
    first = np.array([p for _, p in PATCHES])
    bins = pk.pack(layer, first, T, ROWS, SLOTS)
    assert [b.tolist() for b in bins] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pk.lead_fits(layer, first, T, bins, LEAD, L).tolist() == [True, False, False]
    assert pk.lead_fits(layer, first, T, bins, 4, L).tolist() == [False, False, False]  # layer 0 needs 5 rows
    assert pk.lead_fits(layer, first, T, bins, 5, L).tolist() == [True, False, False]
    assert pk.lead_fits(layer, first, T, bins, 15, L).tolist() == [True, True, False]  # the last layer never
    starts = np.array([0, 1, 2])
    whole = pk.executed_rows(starts, ROWS, L)
    assert pk.executed_rows(starts, ROWS, L, lead=LEAD, lead_ok=[True, False, False]) == whole - (ROWS - LEAD)


def test_choose_takes_a_lead_for_the_benchmark_layout():
    """The benchmark's resid_pre sweep (layer 0: 13 + 7 rows, layers 1..11: 91 rows each): chunks
    straddle layers, and a lead makes the chunks that start with a few rows of a layer run that layer
    for a few rows only."""
    n_pos, L12 = 16, 12
    first = np.concatenate([[3, 9], np.tile(np.arange(3, 16), L12 - 1)])
    layer = np.concatenate([[0, 0], np.repeat(np.arange(1, L12), 13)])
    plain = pk.choose(layer, first, n_pos, 8)
    led = pk.choose(layer, first, n_pos, 8, lead=True)
    assert plain.lead == 0 and led.lead > 0 and led.lead_ok.sum() >= 3  # the chunks layer 0 shifts (20, 15, 10, 5 rows)
    for ch in (plain, led):
        ids = np.concatenate(ch.bins)
        assert sorted(ids.tolist()) == list(range(layer.size))
    rows = lambda ch: pk.executed_rows(np.asarray([layer[b].min() for b in ch.bins]), ch.rows, L12,  # noqa: E731
                                       lead=ch.lead, lead_ok=ch.lead_ok)
    assert rows(led) < rows(plain)
    assert pk.choose(layer, first, n_pos, 8, side=True, lead=True).lead == 0  # side rows take the first layer already


def test_representative_is_planned_as_a_last_layer_patch():
    """An unread patch (the skipped patches' representative) at layer 0 does not make its chunk
    start at layer 0: it runs with the last layer's patches."""
    spec = sw.from_rows(jaxpatch.ModelConfig.gpt2(n_layers=L, d_model=32, n_heads=4, d_vocab=61, n_ctx=16),
                        "blocks.hook_resid_pre", [{"layer": 0, "pos": 9}, {"layer": 2, "pos": 5}, {"layer": 2, "pos": 7}], T)
    pl = sw.plan_packed(spec, L, T, T - 1, B, unread=np.array([True, False, False]))
    assert pl.chunk_start[pl.chunk_start < L].tolist() == [2]
