"""jaxpatch.packed.choose: the packed chunk size and patches per chunk. Many short suffixes get
more slots than the base count (rows are not left empty for want of slots); long suffixes keep
the base count; every bin respects its rows and slots and every patch is packed once; a sweep
run with widened slots equals vectorised chunks and one full forward per patch."""

import numpy as np

import jaxpatch
from jaxpatch import packed
from jaxpatch import sweep as sw
from tests.test_skip import B, T, close, model  # noqa: F401  (model: a fixture; close: TOL 2e-5 relative)
from tests.test_sweep import loop_twin


def _check_bins(layer, first, n_pos, rows, slots, bins):
    ids = np.concatenate(bins)
    assert np.array_equal(np.sort(ids), np.arange(layer.size))
    for b in bins:
        assert b.size <= slots and int(np.sum(n_pos - first[b])) <= rows


def test_short_suffixes_get_more_slots():
    n_pos, batch = 16, 8
    layer = np.repeat(np.arange(4), 60)
    first = np.full(layer.size, n_pos - 1)  # one row each: 240 patches, 240 rows
    rows, slots, bins = packed.choose(layer, first, n_pos, batch)[:3]
    assert slots > packed.slots_per_chunk(rows, n_pos)
    _check_bins(layer, first, n_pos, rows, slots, bins)
    base = packed.pack(layer, first, n_pos, rows, packed.slots_per_chunk(rows, n_pos))
    assert len(bins) < len(base)


def test_long_suffixes_keep_the_base_slots():
    n_pos, batch = 16, 8
    layer = np.repeat(np.arange(6), 12)
    first = np.tile(np.arange(12) % 4, 6)  # 12 to 16 rows each
    rows, slots, bins = packed.choose(layer, first, n_pos, batch)[:3]
    assert slots == packed.slots_per_chunk(rows, n_pos)
    _check_bins(layer, first, n_pos, rows, slots, bins)


def test_widened_slots_sweep_equals_single_full_forwards(model):  # noqa: F811  (model: test_skip's fixture)
    """A sweep planned with more than the base slots (prompts differing at the last position only:
    every live head patch is one row) equals vectorised chunks and one full forward per patch."""
    rng = np.random.default_rng(7)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, T - 1] = (corrupt[:, T - 1] + 5) % 61
    ans, wrong = np.array([3, 4, 5]), np.array([6, 7, 8])
    kw = dict(site="z", by=("layer", "pos", "head"), answer=ans, wrong=wrong, mesh=None)
    wide = jaxpatch.activation_patch(model, clean, corrupt, pack=True, **kw)
    pl = sw.last_plan
    assert pl.packed > 0 and pl.chunk > packed.slots_per_chunk(pl.packed, T)
    vec = jaxpatch.activation_patch(model, clean, corrupt, pack=False, skip=False, **kw)
    assert close(wide.per_prompt, vec.per_prompt)
    spec = sw.grid(model.config, "blocks.attn.hook_z", ("layer", "pos", "head"), T)
    live = np.flatnonzero(np.asarray(spec.index["pos"]) == T - 1)
    sub = sw.Sweep(spec.site, {a: np.asarray(v)[live] for a, v in spec.index.items()}, ("patch",), (live.size,))
    ref = loop_twin(model, corrupt, clean, "blocks.attn.hook_z", sub, ans, wrong)
    assert close(wide.per_prompt[..., 0, :].reshape(-1, B)[live], ref)


def test_pack_fill_fills_gaps_from_the_next_layer():
    """The benchmark's resid_pre sweep: layer 0 holds suffixes of 13, 7 and 1 rows, layers 1..11
    suffixes of 13, 12, ..., 1 rows (91). In 96-row chunks, in-order packing closes each chunk at
    91 rows (the next suffix does not fit); pack_fill fills the 5 rows left with later patches
    that fit, so every chunk but the last is full and one chunk fewer runs."""
    T, L = 16, 12
    first = np.concatenate([[3, 9, 15], np.tile(np.arange(3, 16), L - 1)])
    layer = np.concatenate([[0, 0, 0], np.repeat(np.arange(1, L), 13)])
    greedy = packed.pack(layer, first, T, 96, 18)
    fill = packed.pack_fill(layer, first, T, 96, 18)
    for bins in (greedy, fill):
        ids = np.concatenate(bins)
        assert sorted(ids.tolist()) == list(range(layer.size))  # every patch once
        assert all(np.sum(T - first[b]) <= 96 and b.size <= 18 for b in bins)
    assert [int(np.sum(T - first[b])) for b in greedy][:4] == [91] * 4
    assert all(int(np.sum(T - first[b])) == 96 for b in fill[:-1])
    assert len(fill) == len(greedy) - 1
    starts = lambda bins: np.asarray([layer[b].min() for b in bins])  # noqa: E731
    assert packed.executed_rows(starts(fill), 96, L) < packed.executed_rows(starts(greedy), 96, L)


def test_representative_runs_only_the_read_rows(model):  # noqa: F811  (model: test_skip's fixture)
    """The skipped patches' representative (here a dead patch: last layer, position T - 2) holds
    only the rows the metric reads; every skipped patch still reports the unpatched metric: equal
    to the sweep without skips."""
    rng = np.random.default_rng(8)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, 5] = (corrupt[:, 5] + 5) % 61  # positions 0..4 are no-ops at every layer
    ans, wrong = np.array([3, 4, 5]), np.array([6, 7, 8])
    kw = dict(site="mlp_out", by=("layer", "pos"), answer=ans, wrong=wrong, mesh=None, pack=True)
    fast = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    pl = sw.last_plan
    L = model.config.n_layers
    assert pl.packed > 0 and fast.info["skipped_noop"] >= 5 * L and pl.n_patches == pl.live.size + 1
    spec = sw.grid(model.config, "blocks.hook_mlp_out", ("layer", "pos"), T)
    rep = sw._cheapest(spec, np.setdiff1d(np.arange(spec.size), pl.live), L, T, pl.same_before)
    k = int(np.searchsorted(np.sort(np.append(pl.live, rep)), rep))  # its index among the patches run
    assert pl.first[pl.slot_of[k]] == T - 1 and np.asarray(spec.index["pos"])[rep] < T - 1
    slow = jaxpatch.activation_patch(model, clean, corrupt, skip=False, **kw)
    assert close(fast.per_prompt, slow.per_prompt)
