"""jaxpatch.packed.choose: the packed chunk size and patches per chunk. Many short suffixes get
more slots than the base count (rows are not left empty for want of slots); long suffixes keep
the base count; every bin respects its rows and slots and every patch is packed once."""

import numpy as np

from jaxpatch import packed


def _check_bins(layer, first, n_pos, rows, slots, bins):
    ids = np.concatenate(bins)
    assert np.array_equal(np.sort(ids), np.arange(layer.size))
    for b in bins:
        assert b.size <= slots and int(np.sum(n_pos - first[b])) <= rows


def test_short_suffixes_get_more_slots():
    n_pos, batch = 16, 8
    layer = np.repeat(np.arange(4), 60)
    first = np.full(layer.size, n_pos - 1)  # one row each: 240 patches, 240 rows
    rows, slots, bins = packed.choose(layer, first, n_pos, batch)
    assert slots > packed.slots_per_chunk(rows, n_pos)
    _check_bins(layer, first, n_pos, rows, slots, bins)
    base = packed.pack(layer, first, n_pos, rows, packed.slots_per_chunk(rows, n_pos))
    assert len(bins) < len(base)


def test_long_suffixes_keep_the_base_slots():
    n_pos, batch = 16, 8
    layer = np.repeat(np.arange(6), 12)
    first = np.tile(np.arange(12) % 4, 6)  # 12 to 16 rows each
    rows, slots, bins = packed.choose(layer, first, n_pos, batch)
    assert slots == packed.slots_per_chunk(rows, n_pos)
    _check_bins(layer, first, n_pos, rows, slots, bins)
