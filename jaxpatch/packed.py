"""Packed sweeps: the patches of a chunk share one row axis, each recomputing only its own suffix.

A vectorised chunk (:mod:`jaxpatch.sweep`) runs every patch over the positions from the chunk's
position bucket on: a patch at position 13 in a chunk whose bucket starts at 4 recomputes nine
rows it cannot change. A *packed* chunk instead lays its patches' suffixes end to end on one row
axis (:func:`jaxpatch.models.transformer.packed_layout`): the patch at layer ``l``, position
``p`` contributes the rows of positions ``p..T-1`` only, and each row attends to the run's cached
keys/values before its own patch's first position and to its own patch's rows
(:func:`jaxpatch.models.transformer.run_blocks_packed`). The matmuls see ``rows`` token rows per
prompt however the positions vary, and the executed work approaches the live minimum.

The layout is data (each slot's first position rides along with the patch indices), so one
compiled program serves every sweep of the same site, batch, length, packed chunk size and number
of chunks (the chunk size is a multiple of the length, chosen per sweep by :func:`choose`).

Eligible sweeps (:func:`eligible`): one component per patch, indexed by position (and optionally
head or neuron), replacing activations whose second axis is the position, with a stacked or scalar
source, no interventions of the run itself inside the blocks, and no 2-D mesh; built-in and custom metrics alike.
Everything else runs vectorised, as before; ``pack=False`` in :func:`jaxpatch.sweep.run` is the
slow twin the tests compare against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import models
from .interventions import ALL, NONE
from .models._layers import SiteHandler
from .sites import LOCAL_SITES, SITES

#: Token rows (prompts x packed rows) per packed chunk: the rows each matmul sees.
PACK_ROWS = 1024
#: Index axes a packed patch may use besides ``layer`` and ``pos``.
_EXTRA_AXES = ("head", "d_mlp")


def max_rows(batch: int, n_pos: int) -> int:
    """Most packed rows per prompt in a chunk: about :data:`PACK_ROWS` token rows, and at least
    one whole sequence (the longest suffix a patch can need)."""
    return max(n_pos, -(-PACK_ROWS // max(1, batch)))


def slots_per_chunk(rows: int, n_pos: int) -> int:
    """The fewest patches a packed chunk holds (each slot's read rows run the last layer and the
    metric, used or not): room for suffixes of a third of the sequence on average, at least 8.
    :func:`choose` also tries 2x and 4x as many (sweeps of many short suffixes)."""
    return int(min(rows, max(8, -(-3 * rows // n_pos))))


#: Rows per matmul at which a chunk's matmuls run at half their large-matrix rate, for
#: :func:`choose`'s cost (a rough CPU figure; it only breaks near-ties toward larger chunks).
HALF_RATE_ROWS = 64


def main_start(chunk_start: np.ndarray, n_layers: int, side: bool) -> np.ndarray:
    """The first layer a packed chunk runs for all its rows: with side rows (:func:`side_rows`)
    the layer after its first one, unless that is the last layer."""
    s = np.asarray(chunk_start)
    return np.where(s < n_layers - 1, s + 1, s) if side else s


def side_chunks(chunk_start: np.ndarray, n_layers: int, side: bool) -> int:
    """Chunks that run their first layer for one row per slot (:func:`side_rows`)."""
    return int(np.sum(np.asarray(chunk_start) < n_layers - 1)) if side else 0


class Choice(NamedTuple):
    """A packed plan's shape (:func:`choose`): ``rows`` per chunk, ``slots`` (patches) per chunk,
    ``bins`` (patch ids per chunk), ``lead`` (0, or the rows that run a chunk's first layer where
    ``lead_ok`` ``[chunks]`` holds: see :func:`lead_fits`)."""

    rows: int
    slots: int
    bins: list
    lead: int = 0
    lead_ok: np.ndarray | None = None


def choose(layer: np.ndarray, first: np.ndarray, n_pos: int, batch: int, side: bool = False,
           lead: bool = False) -> Choice:
    """The packed chunk size, patches per chunk and bins with the least estimated time, among
    multiples of ``n_pos`` up to :func:`max_rows` rows (one chunk per layer of a small sweep
    wastes nothing; a large sweep fills large chunks) and 1, 2 or 4 times
    :func:`slots_per_chunk` slots (many short suffixes fill rows only with many slots). The
    estimate is executed block rows plus one row per slot (its read rows in the last layer; with
    ``side``, also its edited row in the chunk's first layer), each chunk's at a rate falling off
    below :data:`HALF_RATE_ROWS` token rows per matmul. Bins from :func:`pack` or
    :func:`pack_fill`, whichever costs less. With ``lead`` (and not ``side``) each candidate is
    also costed with each of :func:`lead_candidates` lead rows (see :func:`lead_fits`)."""
    cap = max_rows(batch, n_pos)
    total = int(np.sum(n_pos - first))
    cands = sorted({min(cap, n_pos * k) for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if n_pos * k < 2 * total} | {cap})
    widths = (1, 2, 4)
    if len(first) > 20000:  # host time: pack() is a Python loop
        cands, widths = [cap], (1,)
    best, L = None, int(layer.max()) + 1
    rate = lambda r: 1 + HALF_RATE_ROWS / (r * batch)  # noqa: E731  time per row, relative
    for rows in cands:
        for slots in sorted({min(rows, slots_per_chunk(rows, n_pos) * w) for w in widths}):
            for packer in (pack, pack_fill):
                bins = packer(layer, first, n_pos, rows, slots)
                starts = np.asarray([layer[b].min() for b in bins])
                work = executed_rows(starts, rows, L, side, slots) + len(bins) * slots
                options = [(work * rate(rows), Choice(rows, slots, bins))]
                need = lead_needs(layer, first, n_pos, bins, L) if lead and not side else None
                for k in lead_candidates(rows, n_pos) if need is not None else ():
                    ok = need <= k
                    n = int(ok.sum())
                    if n:  # the lead rows run at a small matmul's rate
                        led = executed_rows(starts, rows, L, side, slots, k, ok) + len(bins) * slots
                        options.append(((led - n * k) * rate(rows) + n * k * rate(k), Choice(rows, slots, bins, k, ok)))
                for cost, choice in options:
                    if best is None or cost < best[0]:
                        best = (cost, choice)
    return best[1]


#: Packed chunks of sites outside :data:`jaxpatch.sites.LOCAL_SITES` (``resid_pre``, keys,
#: values...) may run their first layer for their first rows alone (:func:`lead_fits`; ``lead`` of
#: :func:`jaxpatch.models.transformer.run_blocks_packed`): a chunk that starts with a layer's last
#: few patches and fills up with the next layer's then runs the first layer only for the few.
#: ``False`` is the slow twin (every chunk runs its first layer whole).
LEAD_ROWS = True


def lead_candidates(rows: int, n_pos: int) -> tuple[int, ...]:
    """Lead sizes :func:`choose` tries for chunks of ``rows`` rows: one sequence to four
    sequences, at most half the chunk."""
    return tuple(k for k in sorted({n_pos, 3 * n_pos // 2, 2 * n_pos, 3 * n_pos, 4 * n_pos})
                 if k <= rows // 2)


def lead_needs(layer: np.ndarray, first: np.ndarray, n_pos: int, bins, n_layers: int) -> np.ndarray:
    """``[len(bins)]``: the fewest leading packed rows of each chunk that hold every patch editing
    its first layer (segments laid out in bin order, :func:`jaxpatch.models.transformer.packed_layout`);
    a huge number where that layer is the last one (it runs whole). See :func:`lead_fits`."""
    need = np.full(len(bins), np.iinfo(np.int64).max, np.int64)
    for c, b in enumerate(bins):
        lay = np.asarray(layer)[b]
        s = lay.min()
        if s < n_layers - 1:
            need[c] = np.cumsum(np.maximum(n_pos - np.asarray(first)[b], 0))[lay == s].max()
    return need


def lead_fits(layer: np.ndarray, first: np.ndarray, n_pos: int, bins, lead: int, n_layers: int) -> np.ndarray:
    """``[len(bins)]`` bool: whether each chunk may run its first layer for its first ``lead``
    packed rows alone. It may when that layer is not the last one and every patch editing it lies
    within those rows (:func:`lead_needs`): the other rows belong to patches of later layers,
    unchanged in the first one, and enter the next layer from the cached residual. ``layer``: the
    layers the plan packs by (an unread patch, planned as a last-layer one by
    :func:`jaxpatch.sweep.plan_packed`, may lie after the lead whatever layer it edits: its edit
    changes nothing the metric reads)."""
    return lead_needs(layer, first, n_pos, bins, n_layers) <= lead


def bucket_code(full_last: bool, lead_ok: bool) -> int:
    """A packed chunk's ``chunk_bucket``: bit 0, an edit applies in the last layer (it runs whole);
    bit 1, the chunk's first layer runs for its lead rows alone (:func:`lead_fits`)."""
    return int(full_last) + 2 * int(lead_ok)


def runs_last_whole(bucket):
    """Bit 0 of :func:`bucket_code` (numpy or traced)."""
    return bucket % 2 == 1


def runs_lead(bucket):
    """Bit 1 of :func:`bucket_code` (numpy or traced)."""
    return bucket // 2 % 2 == 1


def eligible(sweep, source, source_stacked: bool, run_edits_layers: bool, two_d_mesh: bool) -> bool:
    """Whether ``sweep`` can run packed (see the module docstring); static, from shapes and
    options only. ``run_edits_layers``: the run's own interventions edit a per-layer site (its
    edits before the first block, such as the noise baseline's, are in the cached run already)."""
    site = SITES.get(sweep.site)
    if site is None or sweep.joint or two_d_mesh or run_edits_layers:
        return False
    if site.axes[:2] != ("batch", "pos") or "pos" not in sweep.index:
        return False
    if any(a not in ("layer", "pos") + _EXTRA_AXES or (a != "layer" and a not in site.axes) for a in sweep.index):
        return False
    if any(np.any(np.asarray(v) == ALL) for a, v in sweep.index.items() if a != "layer"):
        return False
    return bool(source_stacked) or np.ndim(source) == 0


def first_positions(pos_first: np.ndarray, max_offset: int) -> np.ndarray:
    """Each patch's segment start: its first position that can change (see
    :func:`jaxpatch.sweep._first_pos`), never past the earliest position the metric reads (so
    every prompt's answer row lies in the segment; recomputing more is always exact)."""
    return np.minimum(pos_first, max_offset).astype(np.int32)


def pack(layer: np.ndarray, first: np.ndarray, n_pos: int, rows: int, slots: int) -> list[np.ndarray]:
    """Patches (ids) per packed chunk: sorted by layer then position, filled greedily up to
    ``rows`` rows and ``slots`` patches. A chunk spanning two layers starts at the lower one (its
    later patches recompute a layer that cannot change: exact, some waste)."""
    order = np.lexsort((first, layer))
    bins, cur, used = [], [], 0
    for i in order:
        n = n_pos - int(first[i])
        if cur and (used + n > rows or len(cur) >= slots):
            bins.append(np.asarray(cur, np.int64))
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        bins.append(np.asarray(cur, np.int64))
    return bins


def pack_fill(layer: np.ndarray, first: np.ndarray, n_pos: int, rows: int, slots: int) -> list[np.ndarray]:
    """Like :func:`pack`, but a chunk's rows left empty by the next patch in order are filled with
    the longest later patches that fit, nearest layer first (looking ahead ``4 x slots``
    patches): such a patch runs from the chunk's first layer (one or a few layers it cannot
    change), where empty rows would run every layer for nothing. A layer of suffixes ``13, 12,
    ..., 1`` rows long then fills chunks without gaps."""
    order = np.lexsort((first, layer))
    lens = (n_pos - np.asarray(first, np.int64))[order]
    lay = np.asarray(layer)[order]
    taken = np.zeros(order.size, bool)
    window = 4 * slots
    bins, i = [], 0
    while True:
        while i < order.size and taken[i]:
            i += 1
        if i >= order.size:
            break
        cur, used, j = [], 0, i
        while j < order.size and len(cur) < slots:  # in order while they fit
            if not taken[j]:
                if used + lens[j] > rows:
                    break
                taken[j] = True
                cur.append(j)
                used += lens[j]
            j += 1
        while len(cur) < slots and used < rows:  # fill the gap from the patches after
            ahead = np.arange(j, min(order.size, j + window))
            ok = ahead[~taken[ahead] & (lens[ahead] <= rows - used)]
            if ok.size == 0:
                break
            near = ok[lay[ok] == lay[ok].min()]
            k = near[np.argmax(lens[near])]
            taken[k] = True
            cur.append(int(k))
            used += lens[k]
        bins.append(order[np.asarray(cur, np.int64)])
    return bins


class PackedEdits(SiteHandler):
    """Applies each packed patch's replacement at its own rows of ``site`` in ``layer``: row ``r``
    of slot ``s`` is replaced where ``layer == layer[s]``, its position is ``pos[s]``, and (when
    indexed) its head/neuron is ``head[s]``/``d_mlp[s]``, by the source activation at that layer
    and position."""

    def __init__(self, site: str, idx, layout, source, stacked: bool, layer, n_pos: int):
        super().__init__(NONE, frozenset(), layer)
        self.site, self.idx, self.layout, self.source, self.stacked, self.n_pos = site, idx, layout, source, stacked, n_pos

    def wants(self, *names: str) -> bool:
        return self.site in names

    def __call__(self, name: str, act):
        if name != self.site:
            return act
        idx, lay = self.idx, self.layout
        S = idx["layer"].shape[0]
        real = lay["slot"] < S
        s = jnp.minimum(lay["slot"], S - 1)
        on = real & (idx["layer"][s] == self.layer) & (lay["pos"] == idx["pos"][s] % self.n_pos)  # [rows]
        sel = jnp.reshape(on, (1, -1) + (1,) * (act.ndim - 2))
        axes = SITES[self.site].axes
        for a in _EXTRA_AXES:
            if a in idx:
                i, n = axes.index(a), act.shape[axes.index(a)]
                hit = jnp.arange(n, dtype=jnp.int32)[None, :] == (idx[a][s] % n)[:, None]  # [rows, n]
                sel = sel & jnp.reshape(hit, (1, hit.shape[0]) + tuple(n if j == i else 1 for j in range(2, act.ndim)))
        if self.stacked:
            value = jax.lax.dynamic_index_in_dim(self.source, self.layer, 0, keepdims=False)[:, lay["pos"]]
        else:
            value = jnp.asarray(self.source)
        return jnp.where(sel, value.astype(act.dtype), act)


#: Patches of :data:`jaxpatch.sites.LOCAL_SITES` in a chunk's first layer compute that layer for
#: their edited row only (``side`` of :func:`jaxpatch.models.transformer.run_blocks_packed`); the
#: chunk's segments start one layer later. ``False`` is the slow twin (every segment runs the
#: chunk's first layer whole).
SIDE_ROWS = True


def side_rows(site: str) -> bool:
    """Whether packed patches of ``site`` run their layer for the edited row alone (see
    :data:`SIDE_ROWS`)."""
    return SIDE_ROWS and site in LOCAL_SITES


def chunk_fn(config, blocks, cache, source, source_stacked: bool, ctx, site: str, n_pos: int, rows: int,
             read_from: int | None = None, lead: int = 0):
    """``(idx, start, bucket) -> [slots, B, D]``: the residual row each slot's metric reads (each
    prompt's answer position); with ``read_from`` (a custom metric reading positions
    ``read_from..n_pos-1``) ``[slots, B, n_pos - read_from, D]``. ``idx`` holds the patches'
    indices ``[slots]`` and ``"_first"`` (each slot's first position, ``n_pos`` for an empty
    slot; never past the first position read); ``bucket``: :func:`bucket_code`."""

    def fn(args):
        idx, start, bucket = args
        idx = dict(idx)
        first = idx.pop("_first")
        S = first.shape[0]
        layout = models.packed_layout(first, n_pos, rows)
        if read_from is None:
            at = jnp.asarray(ctx["answer_pos"], jnp.int32)[:, None]  # [B, 1] positions read
        else:
            at = jnp.arange(read_from, n_pos, dtype=jnp.int32)[None, :]  # [1, n_read]
        n_read = at.shape[1]
        read = layout["start"][None, :, None] + at[:, None, :] - first[None, :, None]  # [B|1, slots, n_read]
        read = jnp.clip(read, 0, rows - 1)
        B = cache["resid"].shape[1]
        read = jnp.broadcast_to(read, (B, S, n_read)).reshape(B, S * n_read)
        hs_of = lambda layer: PackedEdits(site, idx, layout, source, source_stacked, layer, n_pos)  # noqa: E731
        side = None
        if side_rows(site):
            # Slots whose edit is in the chunk's first layer and inside their segment: the packed
            # row of the edited position (others: `rows`, out of bounds, dropped).
            at = idx["pos"] % n_pos
            use = (first < n_pos) & (idx["layer"] == start) & (at >= first)
            row = jnp.where(use, layout["start"] + at - first, rows).astype(jnp.int32)
            one = {"slot": jnp.arange(S, dtype=jnp.int32), "pos": at.astype(jnp.int32)}
            side = (one["pos"], row, lambda layer: PackedEdits(site, idx, one, source, source_stacked, layer, n_pos))
        lead_args = None
        if lead and side is None:
            head = {n: layout[n][:lead] for n in ("slot", "pos")}
            lead_args = (lead, runs_lead(bucket),
                         lambda layer: PackedEdits(site, idx, head, source, source_stacked, layer, n_pos))
        out = models.run_blocks_packed(config, blocks, cache, start, cache["ctx"], layout, hs_of, read, runs_last_whole(bucket),
                                       side=side, lead=lead_args)
        out = jnp.swapaxes(out.reshape((B, S, n_read) + out.shape[2:]), 0, 1)  # [slots, B, n_read, D]
        return out[:, :, 0] if read_from is None else out

    return fn


def attention_keys(rows: int, n_pos: int) -> int:
    """Keys each packed row's query reads in a chunk of ``rows`` rows: the cached sequence and,
    attending by tiles (:func:`jaxpatch.models.transformer.tile_rows`), two tiles of packed rows,
    else every packed row."""
    t = models.tile_rows(rows, n_pos) if models.transformer.TILED_ATTENTION else 0
    return n_pos + (2 * t if t else rows)


def executed_rows(chunk_start: np.ndarray, rows: int, n_layers: int, side: bool = False, slots: int = 0,
                  lead: int = 0, lead_ok=None) -> int:
    """Block-row evaluations per prompt that packed chunks execute (with ``side``: plus one row per
    slot in each chunk's first layer, see :func:`side_rows`; chunks flagged in ``lead_ok`` run
    their first layer for ``lead`` rows, see :func:`lead_fits`)."""
    lo = main_start(chunk_start, n_layers, side)
    n = int(rows * np.sum(np.maximum(n_layers - lo, 0)) + slots * side_chunks(chunk_start, n_layers, side))
    if lead and lead_ok is not None:
        n -= int(np.sum(np.asarray(lead_ok, bool))) * (rows - lead)
    return n


def n_chunks_for(n_bins: int, unit: int, round_chunks) -> int:
    """Chunks a packed plan dispatches: its bins rounded like a vectorised plan's (sweeps of
    slightly different sizes share a program), in whole units (devices x unembedding groups)."""
    n = round_chunks(max(1, n_bins))
    return int(math.ceil(n / unit) * unit)
