"""The sweep engine: many patches as one compiled, vectorised, chunked, sharded program.

A :class:`Sweep` is a pytree of integer index arrays with a leading sweep axis ``P`` (one row per
patch; a second axis ``K`` patches K components jointly). :func:`run` turns each row into an
:class:`~jaxpatch.interventions.Edit` inside ``vmap``, so the index values are data: one compiled
program serves every layer/position/head, with no Python loop and no host sync per patch.

Only what the metric needs is computed:

* **Layer prefix.** Patches are sorted by layer and grouped into chunks; a chunk starts from the
  run's cached residual stream at its first layer (a traced ``fori_loop`` start), so layers below
  the patch are never recomputed.
* **Position prefix.** Under causal attention a patch at position p cannot change positions < p.
  A chunk whose patches all sit at positions >= s recomputes positions s.. only, with the earlier
  keys/values taken from the run's cache. ``s`` comes from a small static set of *position
  buckets*; a ``lax.switch`` picks the bucket per chunk at run time, so composition never
  recompiles.
* **Logits.** Only the rows the metric reads (each prompt's answer position) are unembedded.

Chunks run sequentially under ``lax.map`` (peak memory is set by the chunk size, not the sweep
size) and, with several devices, the chunk axis is split across a 1-D ``Mesh`` with ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from . import metrics as _metrics
from ._errors import InputError, JaxpatchError, NonFiniteError
from .config import ModelConfig
from .interventions import ALL, NONE, Edit, Interventions
from . import models
from . import lazy_logits as _lazy
from . import packed as _packed
from .sites import LOCAL_SITES, SITES, check_available
from .user_metric import TracedMetric

#: Grid-axis names a user may sweep over, and the site axis each indexes.
GRID_AXES = {"layer": "layer", "pos": "pos", "head": "head", "neuron": "d_mlp", "dest_pos": "q_pos", "src_pos": "k_pos"}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Which patches to run: ``P`` rows of indices into one per-layer site.

    Attributes:
        site: canonical per-layer site name (e.g. ``"blocks.attn.hook_z"``).
        index: site-axis name (``"layer"``, ``"pos"``, ``"head"``, ``"q_pos"``, ``"k_pos"``,
            ``"d_mlp"``) -> int array ``[P]``, or ``[P, K]`` to patch K components jointly.
            Axes of the site not indexed are patched whole (e.g. a head over all positions); an
            entry equal to :data:`jaxpatch.interventions.ALL` patches that axis whole for that
            component only (rows whose components give different axes).
        grid_axes: names of the result grid's axes (``("layer", "pos")``); ``P`` equals the
            product of ``grid_shape`` when the sweep is a full grid, else ``grid_axes == ("patch",)``.
        grid_shape: the result grid's shape.
    """

    site: str
    index: Mapping[str, np.ndarray]
    grid_axes: tuple[str, ...]
    grid_shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(next(iter(self.index.values())).shape[0])

    @property
    def joint(self) -> bool:
        return next(iter(self.index.values())).ndim == 2


def grid(config: ModelConfig, site: str, axes, n_pos: int) -> Sweep:
    """Every combination of the given grid axes for ``site`` (layer always included, first).

    ``axes`` are grid-axis names: ``layer``, ``pos``, ``head``, ``neuron``, ``dest_pos``,
    ``src_pos``. Example: ``grid(cfg, "blocks.attn.hook_z", ("layer", "pos", "head"), 16)``.
    """
    site_obj = SITES.get(site)
    if site_obj is None or not site_obj.per_layer:
        from .sites import _unknown

        if site in SITES:
            raise InputError(f"Sweeps patch per-layer sites; {site!r} is not one.")
        _unknown(site, config)
    check_available(site, config)
    sizes = {"layer": config.n_layers, **{a: site_obj.axis_size(config, a, 1, n_pos) for a in site_obj.axes}}
    axes = tuple(axes)
    for a in axes:
        if a not in GRID_AXES:
            raise InputError(f"Unknown sweep axis {a!r}; valid: {list(GRID_AXES)}.")
        if GRID_AXES[a] != "layer" and GRID_AXES[a] not in site_obj.axes:
            raise InputError(f"Site {site!r} has axes {site_obj.axes}; cannot sweep over {a!r}.")
    if "layer" not in axes:
        raise InputError(f"A sweep always includes 'layer'; got axes {axes}.")
    dup = sorted({a for a in axes if axes.count(a) > 1})
    if dup:
        raise InputError(f"by= names axis {dup} more than once ({axes}); give each sweep axis once.")
    shape = tuple(sizes[GRID_AXES[a]] for a in axes)
    mesh = np.meshgrid(*[np.arange(n, dtype=np.int32) for n in shape], indexing="ij")
    index = {GRID_AXES[a]: m.reshape(-1) for a, m in zip(axes, mesh)}
    return Sweep(site, index, axes, shape)


def from_rows(config: ModelConfig, site: str, rows, n_pos: int) -> Sweep:
    """A sweep from explicit rows: a list of dicts (one component each) or of lists of dicts
    (components patched jointly), e.g. ``[{"layer": 3, "head": 1}, [{"layer": 4, "head": 0},
    {"layer": 5, "pos": 2}]]``. Every row must have the same number of components.

    Each component patches exactly the indices it gives; a site axis it does not give is patched
    whole (``{"layer": 4}`` is the whole of layer 4's activation), and components may give
    different axes. Keys are grid-axis names (``layer``, ``pos``, ``head``, ``neuron``,
    ``dest_pos``, ``src_pos``); every component must give ``layer``; unknown keys and non-integer
    values are errors wherever they appear.
    """
    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)):
        raise InputError(f"patches= must be a list of rows (dicts, or lists of dicts patched jointly); got {type(rows).__name__}.")
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
    if not rows:
        raise InputError("A sweep needs at least one patch.")
    k = len(rows[0])
    if k == 0 or any(len(r) != k for r in rows):
        raise InputError(f"Every joint patch in one sweep must have the same (non-zero) number of components; "
                         f"got {sorted({len(r) for r in rows})}.")
    keys: set[str] = set()
    for i, r in enumerate(rows):
        for comp in r:
            if not isinstance(comp, Mapping):
                raise InputError(f"patches row {i}: a component must be a dict like {{'layer': 3, 'pos': 5}}; got {comp!r}.")
            unknown = [key for key in comp if key not in GRID_AXES]
            if unknown:
                raise InputError(f"patches row {i}: unknown index {unknown[0]!r} in {dict(comp)}; valid: {list(GRID_AXES)}.")
            if "layer" not in comp:
                raise InputError(f"patches row {i}: every component must give its 'layer'; got {dict(comp)}.")
            for key, val in comp.items():
                if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                    raise InputError(f"patches row {i}: {key}={val!r} must be an int (one index per component; "
                                     f"list several components to patch several indices).")
            keys |= set(comp)
    index = {GRID_AXES[key]: np.array([[c.get(key, ALL) for c in r] for r in rows], dtype=np.int32) for key in sorted(keys)}
    if k == 1:
        index = {a: v[:, 0] for a, v in index.items()}
    sweep = Sweep(site, index, ("patch",), (len(rows),))
    check(sweep, config, n_pos)
    return sweep


def check(sweep: Sweep, config: ModelConfig, n_pos: int) -> None:
    """Range-check every index (clear errors naming the axis and the valid range)."""
    site = SITES.get(sweep.site)
    if site is None or not site.per_layer:
        raise InputError(f"Sweeps patch per-layer sites; got {sweep.site!r}.")
    check_available(sweep.site, config)
    sizes = {"layer": config.n_layers, **{a: site.axis_size(config, a, 1, n_pos) for a in site.axes}}
    for axis, idx in sweep.index.items():
        if axis != "layer" and axis not in site.axes:
            raise InputError(f"Site {sweep.site!r} has axes {site.axes}; cannot index {axis!r}.")
        idx = np.asarray(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise InputError(f"{axis} indices must be integers; got dtype {idx.dtype}.")
        if axis == "layer" and np.any(idx == ALL):
            raise InputError("Every patch must give its layer.")
        bad = idx[((idx < 0) | (idx >= sizes[axis])) & (idx != ALL)]
        if bad.size:
            name = {"d_mlp": "neuron", "q_pos": "dest_pos", "k_pos": "src_pos"}.get(axis, axis)
            raise InputError(f"{name} index {sorted(set(bad.tolist()))[:10]} out of range: valid 0..{sizes[axis] - 1}.")


# ----------------------------------------------------------------------------------------------
# Planning (host side, once per sweep): sort by layer/position, chunk, pick position buckets.


@dataclasses.dataclass(frozen=True)
class Plan:
    order: np.ndarray  # [n_chunks * chunk] patch ids in execution order (padded with repeats)
    chunk_start: np.ndarray  # [n_chunks] first layer each chunk runs
    chunk_bucket: np.ndarray  # [n_chunks] index into offsets
    offsets: tuple[int, ...]  # static position offsets of the buckets
    chunk: int
    n_patches: int  # patches the plan runs (the live ones: see :func:`skippable`)
    n_noop: int = 0  # patches skipped as no-ops (see :func:`skippable`)
    n_dead: int = 0  # patches skipped as dead
    same_before: int = 0  # positions < this are identical in the run and the source
    live: np.ndarray | None = None  # the patches run (ids into the whole sweep); None: all of them
    unit: int = 1  # chunks come in multiples of this (devices x unembedding group)
    packed: int = 0  # packed rows per prompt per chunk (see jaxpatch.packed); 0: vectorised chunks
    slot_of: np.ndarray | None = None  # packed: each patch's slot (index into order); None: slot i runs order[i]
    first: np.ndarray | None = None  # packed: each slot's first position (n_pos: an empty slot)
    side: bool = False  # packed: the chunks' first layer runs for each slot's edited row only (packed.side_rows)
    lead: int = 0  # packed: chunks whose chunk_bucket has bit 1 run their first layer for this many rows (packed.lead_fits)
    from_z: bool = False  # vectorised: the chunks' first layer starts at the cached z (enters_at_z)


def _pos_key(sweep: Sweep) -> np.ndarray:
    """First position each patch can change (0 where a component covers every position)."""
    for axis in ("pos", "q_pos"):
        if axis in sweep.index:
            idx = np.asarray(sweep.index[axis])
            idx = np.where(idx == ALL, 0, idx)
            return idx.min(axis=1) if idx.ndim == 2 else idx
    return np.zeros(sweep.size, np.int32)


def _first_pos(sweep: Sweep, same_before: int = 0) -> np.ndarray:
    """First position each patch can change: its own first position, and never before
    ``same_before`` (positions where the run and the source are identical: patching them is a
    no-op, see :func:`skippable`)."""
    return np.maximum(_pos_key(sweep), same_before)


def _round_chunks(n: int) -> int:
    """``n`` rounded up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1.5x): sweeps whose skipped
    patches leave slightly different numbers live share one compiled program; the padding
    chunks run no layer and no unembedding."""
    k = 1
    while k < n:
        if k * 3 // 2 >= n and k >= 2:
            return k * 3 // 2
        k *= 2
    return k


def plan(sweep: Sweep, n_layers: int, n_pos: int, max_offset: int, chunk: int, n_dev: int = 1, n_buckets: int = 4,
         same_before: int = 0, full_last: bool = False) -> Plan:
    """Order and chunk the patches (see module docstring). ``max_offset``: the earliest position
    the metric reads (no bucket may skip it); ``same_before``: see :func:`skippable`.

    ``chunk_bucket`` also says whether a chunk runs its last layer whole: ``+ len(offsets)`` when
    one of its patches edits the last layer (or ``full_last``: the run's own interventions do);
    otherwise the last layer computes only what the metric reads (every row's keys and values,
    the read rows' queries, attention and MLP)."""
    n = sweep.size
    layer = np.asarray(sweep.index["layer"])
    top = layer.max(axis=1) if layer.ndim == 2 else layer
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    pos = _first_pos(sweep, same_before)
    order = np.lexsort((pos, layer)).astype(np.int32)
    chunk = max(1, min(chunk, n))
    n_chunks = _round_chunks(math.ceil(n / chunk))
    n_chunks = math.ceil(n_chunks / n_dev) * n_dev
    padded = np.concatenate([order, np.full(n_chunks * chunk - n, order[-1], np.int32)])
    real = np.arange(n_chunks * chunk) < n
    # Bucket offsets: a fixed lattice (which patches a sweep holds never changes the compiled
    # program), plus the first position where the run and the source differ (the prompts'
    # property: no patch starts before it); never past the earliest position the metric reads.
    lattice = {(n_pos * j) // n_buckets for j in range(n_buckets)} if n_buckets > 1 else {0}
    lo = min(same_before, max_offset)
    offsets = tuple(sorted({lo} | {o for o in lattice if lo <= o <= max_offset}))
    chunk_start = np.empty(n_chunks, np.int32)
    chunk_bucket = np.zeros(n_chunks, np.int32)
    for c in range(n_chunks):
        ids = padded[c * chunk : (c + 1) * chunk][real[c * chunk : (c + 1) * chunk]]
        if ids.size == 0:  # padding chunk: runs no layers
            chunk_start[c] = n_layers
            continue
        chunk_start[c] = layer[ids].min()
        lo = pos[ids].min()
        chunk_bucket[c] = max(i for i, o in enumerate(offsets) if o <= lo)
        if full_last or top[ids].max() == n_layers - 1:
            chunk_bucket[c] += len(offsets)
    return Plan(padded, chunk_start, chunk_bucket, offsets, chunk, n, same_before=same_before)


def plan_packed(sweep: Sweep, n_layers: int, n_pos: int, max_offset: int, batch: int, n_dev: int = 1,
                same_before: int = 0, full_last: bool = False, unread=None) -> Plan:
    """A packed plan (see :mod:`jaxpatch.packed`): chunks of at most ``slots`` patches whose
    suffixes fill at most ``rows`` rows (both chosen by :func:`jaxpatch.packed.choose`);
    ``chunk_bucket``: :func:`jaxpatch.packed.bucket_code` (whether a chunk edits the last layer, or
    ``full_last``; whether it runs a lead).
    ``unread`` ``[P]``: patches that cannot change what the metric reads (a skipped patches'
    representative, see :func:`run`): their segments hold only the positions read (from
    ``max_offset``), whatever they edit, and their edits in the last layer need not run."""
    n = sweep.size
    layer = np.asarray(sweep.index["layer"])
    first = _packed.first_positions(_first_pos(sweep, same_before), max_offset)
    quiet = np.zeros(n, bool) if unread is None else np.asarray(unread, bool)
    first = np.where(quiet, max_offset, first).astype(np.int32)
    side = _packed.side_rows(sweep.site)
    # An unread patch changes nothing the metric reads, so it may run in any chunk (from any
    # layer: its edit, applied or not, is a no-op there): plan it as a last-layer patch.
    layer = np.where(quiet, n_layers - 1, layer)
    ch = _packed.choose(layer, first, n_pos, batch, side, lead=_packed.LEAD_ROWS)
    rows, slots, bins = ch.rows, ch.slots, ch.bins
    n_chunks = _packed.n_chunks_for(len(bins), n_dev, _round_chunks)
    order = np.zeros(n_chunks * slots, np.int32)
    slot_first = np.full(n_chunks * slots, n_pos, np.int32)
    slot_of = np.empty(n, np.int64)
    chunk_start = np.full(n_chunks, n_layers, np.int32)  # chunks past the bins: padding, run no layer
    chunk_bucket = np.zeros(n_chunks, np.int32)
    for c, ids in enumerate(bins):
        at = c * slots + np.arange(ids.size)
        order[at], slot_first[at], slot_of[ids] = ids, first[ids], at
        order[c * slots + ids.size : (c + 1) * slots] = ids[-1]  # empty slots: no rows, no edit
        chunk_start[c] = layer[ids].min()
        edits_last = full_last or (layer[ids][~quiet[ids]] == n_layers - 1).any()
        chunk_bucket[c] = _packed.bucket_code(edits_last, ch.lead and ch.lead_ok[c])
    return Plan(order, chunk_start, chunk_bucket, (0,), slots, n, same_before=same_before, packed=rows,
                slot_of=slot_of, first=slot_first, side=side, lead=ch.lead)


#: Rough costs used by :func:`auto_buckets`: seconds to compile one more bucket branch, and a
#: conservative sustained FLOP rate. Only the ratio matters; measured on a 2-core CPU.
BUCKET_COMPILE_S = 0.6
ASSUMED_FLOPS = 1.5e11


def auto_buckets(config: ModelConfig, sweep: Sweep, batch: int, n_pos: int, max_offset: int, same_before: int = 0) -> int:
    """Pick 1, 2 or 4 position buckets: minimise (compile time of the branches + estimated run
    time). Sweeps without a position index always get 1."""
    if max_offset == 0 or len(np.unique(np.minimum(_first_pos(sweep, same_before), max_offset))) <= 1:
        return 1
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    nh = config.n_heads * config.d_head
    row = 8 * config.d_model * nh + 4 * config.d_model * config.d_mlp + 4 * nh * n_pos
    run_1 = float(np.sum(config.n_layers - layer)) * n_pos * batch * row / ASSUMED_FLOPS
    cost = {nb: nb * BUCKET_COMPILE_S + run_1 * (nb + 1) / (2 * nb) for nb in (1, 2, 4)}
    return min(cost, key=cost.get)


def default_chunk_size(sweep: Sweep, batch: int, n_pos: int, position_buckets: int, target_rows: int = 2048,
                       same_before: int = 0) -> int:
    """Patches per chunk: about ``target_rows`` token rows per matmul (where this CPU's matmuls are
    most efficient), never mixing layers when a layer has enough patches, and small enough that
    position buckets can skip prefixes when the sweep indexes positions."""
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    per_layer = int(np.bincount(layer).max())
    c = min(max(1, target_rows // max(1, batch * n_pos)), per_layer)
    if position_buckets > 1 and len(np.unique(_first_pos(sweep, same_before))) > 1:
        c = min(c, max(1, math.ceil(per_layer / position_buckets)))
    return c


def executed_rows(p: Plan, n_layers: int, n_pos: int) -> int:
    """Block-row evaluations the plan executes: patches x layers run x positions recomputed (packed:
    rows per chunk x layers run)."""
    if p.packed:
        return _packed.executed_rows(p.chunk_start, p.packed, n_layers, p.side, p.chunk, p.lead, _packed.runs_lead(p.chunk_bucket))
    offs = np.asarray(p.offsets)[p.chunk_bucket % len(p.offsets)]
    return int(np.sum(p.chunk * np.maximum(n_layers - p.chunk_start, 0) * (n_pos - offs)))


def minimal_rows(sweep: Sweep, n_layers: int, n_pos: int, same_before: int = 0, live=None) -> int:
    """Block-row evaluations strictly needed: each patch recomputes layers >= its layer at
    positions >= its first position (and >= ``same_before``); a patch of one position of a
    :data:`LOCAL_SITES` site, in its own layer only its edited row. With ``live`` (ids of the
    patches that can change the answer, :attr:`Plan.live`; see :func:`skippable`) only those
    count: the *live minimum*."""
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    after = n_pos - _first_pos(sweep, same_before)
    rows = (n_layers - layer) * after
    if sweep.site in LOCAL_SITES and not sweep.joint and "pos" in sweep.index:
        one = np.asarray(sweep.index["pos"]) != ALL
        rows = np.where(one, (n_layers - layer - 1) * after + 1, rows)
    return int(np.sum(rows if live is None else rows[np.asarray(live, np.int64)]))


# ----------------------------------------------------------------------------------------------
# Skipping patches that cannot change the answer (host side, exact).

#: Per-layer sites whose edit at position p changes only position p of the layer's output (see
#: :data:`jaxpatch.sites.LOCAL_SITES`).
_LOCAL_SITES = LOCAL_SITES


def first_difference(a, b) -> int:
    """First position (axis 1) at which ``a`` and ``b`` (``[B, T, ...]``) differ in any prompt,
    bit for bit; ``T`` if they are identical. One host transfer per sweep, never per patch."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return 0
    diff = np.any((a != b).reshape(a.shape[0], a.shape[1], -1), axis=(0, 2))
    return int(np.argmax(diff)) if diff.any() else int(a.shape[1])


def _component_positions(sweep: Sweep, n_pos: int):
    """``(first, last)`` ``[P, K]``: the first and last position (query position for attention
    patterns) each component of each patch writes; a whole axis covers ``0..n_pos-1``."""
    K = 1 if not sweep.joint else int(np.asarray(sweep.index["layer"]).shape[1])
    P = sweep.size
    for axis in ("pos", "q_pos"):
        if axis in sweep.index:
            idx = np.asarray(sweep.index[axis]).reshape(P, K)
            whole = idx == ALL
            return np.where(whole, 0, idx), np.where(whole, n_pos - 1, idx)
    return np.zeros((P, K), np.int64), np.full((P, K), n_pos - 1, np.int64)


def skippable(sweep: Sweep, n_layers: int, n_pos: int, read_positions, same_before: int = 0):
    """Which patches cannot change what the metric reads: ``(noop, dead)``, ``[P]`` bool each.

    Exact under causal attention, for patches that *replace* activations:

    * **no-op**: every component writes only positions ``< same_before``, where the caller
      guarantees the run and the source are identical at every layer (their inputs agree there:
      resample and noise baselines; never mean/zero). The patched value equals the run's own.
    * **dead**: every component either writes only positions after the last position the metric
      reads, or sits in the last layer at a site after its key/value read (:data:`_LOCAL_SITES`)
      and writes no position the metric reads.

    A skipped patch's result is the unpatched run's metric. ``read_positions``: the positions the
    metric reads (any prompt).
    """
    read = np.zeros(n_pos, bool)
    read[np.asarray(read_positions, np.int64)] = True
    last_read = int(np.flatnonzero(read).max())
    first, last = _component_positions(sweep, n_pos)
    layer = np.asarray(sweep.index["layer"]).reshape(first.shape)
    noop_c = last < same_before
    dead_c = first > last_read
    if sweep.site in _LOCAL_SITES:
        single = first == last  # a component at one position (a whole axis reads every position)
        dead_c |= (layer == n_layers - 1) & single & ~read[np.clip(first, 0, n_pos - 1)]
    skip = np.all(noop_c | dead_c, axis=1)
    noop = skip & np.all(noop_c, axis=1)
    return noop, skip & ~noop


def unchanged(sweep: Sweep, run_cache, source, source_stacked: bool, n_layers: int, n_pos: int, run_ivs) -> np.ndarray:
    """Patches of the residual stream that write, at every component, exactly the value the run
    already holds there (bit for bit, in every prompt): ``[P]`` bool. Such a patch is a no-op
    whatever its source (e.g. ``resid_pre`` of layer 0 at a position whose token the clean and
    corrupted prompts share, after the first position where they differ). Compared on the cached
    residual streams (``blocks.hook_resid_pre``; ``hook_resid_post`` of layer ``l`` is
    ``resid_pre`` of ``l + 1``): one device comparison and one ``[L, T]`` host transfer per
    sweep. Nothing is claimed (all ``False``) for other sites, unstacked sources, or runs with
    interventions of their own (they could act on the patched value)."""
    P = sweep.size
    shift = {"blocks.hook_resid_pre": 0, "blocks.hook_resid_post": 1}.get(sweep.site)
    if shift is None or not source_stacked or run_ivs.sites() or set(sweep.index) - {"layer", "pos"}:
        return np.zeros(P, bool)
    resid = run_cache["resid"]
    src = jnp.asarray(source)
    if src.ndim != resid.ndim or src.shape[0] != resid.shape[0] or src.shape[2:] != resid.shape[2:] \
            or src.shape[1] not in (1, resid.shape[1]):
        return np.zeros(P, bool)
    same = np.asarray(jnp.all(resid == src, axis=(1, 3)))  # [L, T]: identical in every prompt
    same = np.concatenate([same[shift:], np.zeros((shift, n_pos), bool)])  # the site's layer l
    first, last = _component_positions(sweep, n_pos)
    layer = np.asarray(sweep.index["layer"]).reshape(first.shape)
    # a component covers positions first..last of its layer: all of them unchanged
    runs = np.cumsum(~same, axis=1)  # changed positions up to and including each one
    changed = runs[layer, last] - np.where(first > 0, runs[layer, np.maximum(first - 1, 0)], 0)
    return np.all(changed == 0, axis=1)


# ----------------------------------------------------------------------------------------------
# The compiled core.


def _cheapest(sweep: Sweep, ids, n_layers: int, n_pos: int, same_before: int = 0) -> int:
    """The patch among ``ids`` whose run recomputes the fewest block rows (latest layer, then
    latest first position)."""
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    rows = (n_layers - layer[ids]) * (n_pos - np.minimum(_first_pos(sweep, same_before)[ids], n_pos - 1))
    return int(ids[np.argmin(rows)])


@dataclasses.dataclass(frozen=True)
class CustomMetric:
    """A user metric of full logits ``[B, T, V] -> scalar`` (TransformerLens style), traced so that
    compiled programs key on its structure and take its constants as data (``ctx["metric_consts"]``;
    see :mod:`jaxpatch.user_metric`). ``first_pos``: the first position the metric can read,
    proved from its traced program (:func:`jaxpatch.user_metric.first_position_read`); logits of
    earlier positions are not computed (the metric provably ignores them)."""

    fn: TracedMetric
    first_pos: int


def _metric_of(config, params, x, s: int, metric, ctx, n_pos: int, lazy: bool = False):
    """The metric of a run's final residual stream ``x`` ``[B, T - s, D]`` (positions ``s..``):
    ``(values [M, B] (or [1, 1] for a custom metric), all logits finite)``."""
    if isinstance(metric, CustomMetric):
        if lazy:  # only the logits the metric reads (jaxpatch.lazy_logits)
            out = _lazy_metric(config, params, x[:, metric.first_pos - s:], metric, ctx, n_pos)
            if out is not None:
                return out
        read = models.logits_at(config, params, x[:, metric.first_pos - s:])  # positions first_pos..
        full = read
        if metric.first_pos:  # earlier positions provably unread: zeros, never computed
            full = jnp.zeros(read.shape[:1] + (n_pos,) + read.shape[2:], read.dtype)
            full = jax.lax.dynamic_update_slice_in_dim(full, read, metric.first_pos, axis=1)
        val = jnp.asarray(metric.fn(ctx["metric_consts"], full))
        val = jnp.reshape(val, (1, 1)).astype(jnp.promote_types(val.dtype, jnp.float32))
        return val, jnp.all(jnp.isfinite(read))
    rows = jnp.take_along_axis(x, (ctx["answer_pos"] - s)[:, None, None], axis=1)  # [B, 1, D]
    logits = models.logits_at(config, params, rows)[:, 0]
    return _metrics.compute_ctx(metric, logits, ctx), jnp.all(jnp.isfinite(logits))


#: Custom metrics compute only the logits they read (:mod:`jaxpatch.lazy_logits`); ``False`` hands
#: them the full logits of their read rows (the slow twin the tests compare against).
LAZY_LOGITS = True


def _lazy_for(metric) -> bool:
    """Whether a sweep program evaluates ``metric`` with :mod:`jaxpatch.lazy_logits` (a static
    argument of the program, so toggling :data:`LAZY_LOGITS` compiles anew)."""
    return LAZY_LOGITS and isinstance(metric, CustomMetric)


def _lazy_metric(config, params, x, metric: CustomMetric, ctx, n_pos: int):
    """A custom metric of final residual rows ``x`` ``[B, R, D]`` (positions ``n_pos - R..``),
    computing only the logits it reads: ``(value [1, 1], finite)``, or ``None`` (the caller
    computes every logit) where the int32 index proxy cannot address the logits or ``x`` is not
    one batch of the traced size."""
    if x.shape[0] != metric.fn.in_aval.shape[0]:
        return None
    lg = _lazy.Logits(x, n_pos, metric.fn.in_aval.shape[-1], metric.fn.in_aval.dtype,
                      partial(models.logits_at, config, params), partial(models.logits_elements, config, params))
    if not lg.fits():
        return None
    val = jnp.asarray(_lazy.evaluate(metric.fn.jaxpr, ctx["metric_consts"], lg)[0])
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))] + lg.finite))
    return jnp.reshape(val, (1, 1)).astype(jnp.promote_types(val.dtype, jnp.float32)), finite


#: Residual rows unembedded per batched matmul: chunks are grouped until their read rows reach
#: about this many (one unembedding per group instead of one per chunk; see :func:`_core`).
UNEMBED_ROWS = 1024


def _columns_only(metric) -> bool:
    """Metrics that read only the answer and wrong tokens' logits (no softmax over the vocabulary):
    unembed those two columns instead of the whole vocabulary."""
    return not isinstance(metric, CustomMetric) and tuple(metric) == ("logit_diff",)


def _finish(config, params, rows, metric, ctx, n_pos: int, lazy: bool = False):
    """Metric values of many patched runs at once from their read rows ``[G, B, ...]`` (see
    :func:`_read_rows`): ``(values [G, M, B] (custom: [G, 1, 1]), all logits finite [G])``, with
    one unembedding matmul for all ``G x B`` rows."""
    if _columns_only(metric):
        cols = jnp.stack([ctx["answer"], ctx["wrong"]], axis=-1)  # [B, 2]
        lg = models.logits_columns(config, params, rows, cols)  # [G, B, 2]
        lg = lg.astype(jnp.promote_types(lg.dtype, jnp.float32))
        return (lg[..., 0] - lg[..., 1])[:, None], jnp.all(jnp.isfinite(lg), axis=(1, 2))
    if isinstance(metric, CustomMetric):
        return jax.vmap(lambda x: _metric_of(config, params, x, metric.first_pos, metric, ctx, n_pos, lazy))(rows)
    logits = models.logits_at(config, params, rows)  # [G, B, V]: the rows as a [G, B] grid of positions
    vals = jax.vmap(lambda lg: _metrics.compute_ctx(metric, lg, ctx))(logits)
    return vals, jnp.all(jnp.isfinite(logits), axis=(1, 2))


#: Suffix runs read the attention weights stored matmul-major (``models.matmul_major_blocks``:
#: transposed once per program, so no layer's matmul copies its weight slice); ``False`` is the
#: slow twin the tests compare against.
MATMUL_MAJOR = True
#: Suffix runs read each layer's matmul weights as separate arrays (``models.per_layer_blocks``,
#: laid out once per :func:`run` by :func:`suffix_blocks`): a layer's matmul then reads its weight
#: in place instead of a per-layer, per-chunk copy of a dynamic slice. ``False`` is the slow twin.
PER_LAYER_WEIGHTS = True


@partial(jax.jit, static_argnames="major")
def _layer_layout(blocks, layer, major: bool):
    return models.layer_split(blocks, layer, models.matmul_major_blocks if major else None)


def suffix_blocks(config: ModelConfig, params, mesh=None):
    """``params`` with the block weights laid out for the suffix runs of a sweep, once per sweep
    (:data:`MATMUL_MAJOR`, :data:`PER_LAYER_WEIGHTS`): one more copy of the block weights lives
    while the sweep runs (the memory planner sees it: it is in use and resident). Not on a 2-D
    mesh (its weights are sharded over ``"model"``: each program slices its own shards), nor where
    a device that reports its memory has less than twice that copy free (the program then slices
    each layer's weights itself, as before)."""
    if not PER_LAYER_WEIGHTS or (mesh is not None and "model" in mesh.axis_names):
        return params
    from . import planner as _planner

    leaves = [a for a in jax.tree.leaves(params["blocks"]) if isinstance(a, jax.Array)]
    devices = sorted({d for a in leaves for d in a.devices()}, key=lambda d: d.id)
    free = _planner.device_budget(devices) if devices else None
    if free is not None and 2 * max(_planner.resident_bytes(params["blocks"], d) for d in devices) > free:
        return params
    blocks = params["blocks"]
    # One program for every layer (the layer is data): compiling one that writes all L layers'
    # arrays took 0.8 s for GPT-2 small, this one a fraction of it.
    layers = [_layer_layout(blocks, np.int32(i), MATMUL_MAJOR) for i in range(config.n_layers)]
    return {**params, "blocks": models.per_layer_blocks(blocks, layers)}


def _chunk_fn(config, params, run_ivs, cache, source, ctx, site, paired, source_stacked, offsets, metric, n_pos, packed=0,
              lead=0):
    blocks = params["blocks"]
    if MATMUL_MAJOR and not models.is_per_layer(blocks):  # laid out already by suffix_blocks
        blocks = models.matmul_major_blocks(blocks)
    if packed:
        return _packed.chunk_fn(config, blocks, cache, source, source_stacked, ctx, site, n_pos, packed,
                                metric.first_pos if isinstance(metric, CustomMetric) else None, lead)
    at_z = enters_at_z(site, cache, run_ivs)

    def make_branch(s):
        def one(ix, start, full):
            layers = ix["layer"]
            edit = Edit(layers=layers, index={a: v for a, v in ix.items() if a != "layer"},
                        value=source, stacked=source_stacked, paired=paired)
            ivs = run_ivs + Interventions({site: (edit,)})
            x0 = jax.lax.dynamic_index_in_dim(cache["resid"], jnp.minimum(start, config.n_layers - 1), 0, keepdims=False)
            x0 = x0[:, s:]
            B = x0.shape[0]
            if isinstance(metric, CustomMetric):
                read = jnp.broadcast_to(jnp.arange(metric.first_pos - s, n_pos - s, dtype=jnp.int32), (B, n_pos - metric.first_pos))
            else:
                read = (ctx["answer_pos"] - s)[:, None].astype(jnp.int32)
            z0 = None
            if at_z:
                z0 = jax.lax.dynamic_index_in_dim(cache["z"], jnp.minimum(start, config.n_layers - 1), 0, keepdims=False)[:, s:]
            rows = models.run_blocks_from(config, blocks, x0, start, cache["ctx"], ivs, pos_offset=s,
                                          prefix_kv=(cache["k"], cache["v"]) if s else None, read=read, full_last=full,
                                          first_z=z0)
            return rows if isinstance(metric, CustomMetric) else rows[:, 0]

        return lambda idx, start, full: jax.vmap(one, in_axes=(0, None, None))(idx, start, full)

    branches = [make_branch(s) for s in offsets]

    def chunk_fn(args):
        # bucket = position bucket + len(offsets) x (an edit applies in the last layer: run it whole)
        idx, start, bucket = args
        full = bucket >= len(branches)
        if len(branches) == 1:
            return branches[0](idx, start, full)
        return jax.lax.switch(bucket % len(branches), branches, idx, start, full)

    return chunk_fn


#: Most dispatches a sweep with a progress bar is split into (see :func:`_run_with_bar`).
MAX_PROGRESS_GROUPS = 8
#: ``{"total": chunks, "done": chunks finished, "updates": times the bar moved}`` of the last
#: sweep that showed a bar.
last_progress: dict[str, int] = {}
#: The :class:`Plan` of the last sweep :func:`run` ran (benchmarks count its FLOPs from it).
last_plan: Plan | None = None


def _progress_groups(n_chunks: int, n_dev: int, max_groups: int = MAX_PROGRESS_GROUPS) -> tuple[int, int]:
    """``(groups, chunks per group)``: at most ``max_groups`` equal groups, each a multiple of
    ``n_dev`` chunks (``n_chunks`` is one already, see :func:`plan`); the last may need padding."""
    units = max(1, n_chunks // n_dev)
    per = math.ceil(units / min(max_groups, units))
    return math.ceil(units / per), per * n_dev


def pad_groups(idx, chunk_start, chunk_bucket, n_layers: int, n_dev: int):
    """Chunks padded to equal dispatch groups (see :func:`_progress_groups`): returns ``(groups,
    per, pad, idx, chunk_start, chunk_bucket)`` as numpy; padding chunks repeat the last chunk's
    indices and start at ``n_layers``, so they run no layer."""
    n_chunks = len(chunk_start)
    groups, per = _progress_groups(n_chunks, n_dev)
    pad = groups * per - n_chunks

    def padded(a, fill=None):
        a = np.asarray(a)
        extra = np.repeat(a[-1:], pad, axis=0) if fill is None else np.full((pad,) + a.shape[1:], fill, a.dtype)
        return np.concatenate([a, extra]) if pad else a

    return (groups, per, pad, {k: padded(v) for k, v in idx.items()}, padded(chunk_start, n_layers),
            padded(chunk_bucket, 0))


def _run_with_bar(core, idx, chunk_start, chunk_bucket, n_layers: int, n_dev: int, desc: str):
    """``core(idx, chunk_start, chunk_bucket)`` run as a few equal dispatches, advancing a tqdm
    bar (in chunks) as each finishes; returns what one ``core`` call on all chunks returns.

    Why not a host callback inside the program: JAX never writes executables that contain host
    callbacks to its persistent compilation cache (``_cache_write`` in ``jax/_src/compiler.py``),
    so every process would recompile a sweep that draws a bar that way. Here the program is the
    plain one, cacheable, and the host loops over at most :data:`MAX_PROGRESS_GROUPS` dispatch
    groups, never over patches: every group is dispatched before the first is waited on
    (asynchronous dispatch keeps the device busy), then the host waits for them in order, one
    sync per group. All groups have the same shape (one compile); the last is padded with
    chunks that run no layer (``chunk_start = n_layers``), whose outputs are dropped.
    """
    from tqdm import tqdm

    n_chunks = len(chunk_start)
    groups, per, pad, idx, chunk_start, chunk_bucket = pad_groups(idx, chunk_start, chunk_bucket, n_layers, n_dev)
    bar = tqdm(total=n_chunks, desc=desc, unit="chunk", leave=False, dynamic_ncols=True)
    updates = 0
    try:
        outs = []
        for g in range(groups):  # dispatch every group (asynchronous): at most MAX_PROGRESS_GROUPS
            sl = slice(g * per, (g + 1) * per)
            outs.append(core({k: jnp.asarray(v[sl]) for k, v in idx.items()}, jnp.asarray(chunk_start[sl]),
                             jnp.asarray(chunk_bucket[sl])))
        for g, o in enumerate(outs):  # one host sync per group, in order
            jax.block_until_ready(o)
            bar.update(min(per, n_chunks - g * per))
            updates += 1
    finally:
        last_progress.clear()
        last_progress.update(total=n_chunks, done=int(bar.n), updates=updates)
        bar.close()
    if groups == 1 and not pad:
        return outs[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n_chunks], *outs)


@partial(jax.jit, static_argnames=("config", "site", "paired", "source_stacked", "offsets", "metric", "n_pos", "mesh",
                                   "group", "packed", "lead", "lazy"))
def _core(config, params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket, *, site, paired,
          source_stacked, offsets, metric, n_pos, mesh, group=1, packed=0, lead=0, lazy=False):
    """``idx``: site-axis -> ``[n_chunks, chunk(, K)]`` (packed: plus ``"_first"``, see
    :mod:`jaxpatch.packed`). Returns the metric values ``[n_chunks, chunk, M, B]`` and whether
    each patched run's logits were all finite ``[n_chunks, chunk]``."""

    def run_chunks(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket):
        # Groups of g chunks: each chunk's patched runs yield the residual rows the metric reads;
        # a group's rows are unembedded together (one large matmul, not g small ones).
        fn = _chunk_fn(config, params, run_ivs, cache, source, ctx, site, paired, source_stacked, offsets, metric, n_pos,
                       packed, lead)
        n_chunks, chunk = chunk_start.shape[0], jax.tree.leaves(idx)[0].shape[1]
        g = group  # the plan makes every dispatch (and every device's share) whole groups of g chunks
        if n_chunks % g:
            raise JaxpatchError(f"internal: {n_chunks} chunks are not whole unembedding groups of {g}.")
        grouped = lambda a: a.reshape((-1, g) + a.shape[1:])  # noqa: E731
        args = (jax.tree.map(grouped, idx), grouped(chunk_start), grouped(chunk_bucket))

        def one_group(args):
            shapes = []  # compute's output shapes, recorded when lax.cond traces it

            def compute(args):
                rows = jax.lax.map(fn, args)  # [g, chunk, B, ...]
                vals, finite = _finish(config, params, rows.reshape((g * chunk,) + rows.shape[2:]), metric, ctx, n_pos, lazy)
                out = vals.reshape((g, chunk) + vals.shape[1:]), finite.reshape(g, chunk)
                shapes.append(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out))
                return out

            def padding(args):
                # lax.cond traces compute first, so its shapes are known without tracing the model
                # a second time (jax.eval_shape did: a second full trace on every first call)
                spec = shapes[0] if shapes else jax.eval_shape(compute, args)
                return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), spec)

            # a group whose chunks all start past the last layer (padding) is not run
            return jax.lax.cond(jnp.any(args[1] < config.n_layers), compute, padding, args)

        vals, finite = jax.lax.map(one_group, args)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
        return flat(vals), flat(finite)

    if mesh is None:
        return run_chunks(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket)
    rep, shd = P(), P("sweep")
    if "model" in mesh.axis_names:
        # A 2-D mesh: parameters sharded over "model" (and "sweep", FSDP-style) by
        # jaxpatch.partitioning. One program for all devices (GSPMD): every chunk spans the whole
        # "sweep" axis, so every device runs the same start layer and position bucket and the
        # collectives the sharded weights need line up. (A shard_map over "sweep" would let
        # shards run different layer loops around those collectives: a deadlock.)
        fn = _chunk_fn(config, params, run_ivs, cache, source, ctx, site, paired, source_stacked, offsets, metric, n_pos)
        along = jax.sharding.NamedSharding(mesh, shd)

        def body(args):
            ix, start, bucket = args
            ix = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, along), ix)
            vals, finite = _finish(config, params, fn((ix, start, bucket)), metric, ctx, n_pos, lazy)
            return jax.lax.with_sharding_constraint(vals, along), finite

        return jax.lax.map(body, (idx, chunk_start, chunk_bucket))
    f = jax.shard_map(run_chunks, mesh=mesh, in_specs=(rep, rep, rep, rep, rep, shd, shd, shd), out_specs=shd, check_vma=False)
    return f(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket)


def run_sites(config: ModelConfig, site: str | None = None) -> frozenset:
    """Sites a run must capture to be patched by a sweep: its residual stream entering each layer
    and the keys/values a suffix rerun reads for the positions it keeps (see :func:`run_cache`);
    for a sweep of ``site`` in :data:`FROM_Z_SITES`, also the heads' outputs (see
    :data:`ENTER_AT_Z`)."""
    extra = {"blocks.attn.hook_z"} if ENTER_AT_Z and site in FROM_Z_SITES else set()
    return frozenset({"blocks.hook_resid_pre", *models.kv_sites(config), *extra})


def run_cache(config: ModelConfig, caps: Mapping[str, Any], tokens, attention_mask=None) -> dict:
    """The cache :func:`run` patches: from a run's :func:`run_sites` captures, with the run's
    positions, key mask and rotary tables (``ctx``); ``z`` where the heads' outputs were captured."""
    k, v = models.kv_sites(config)
    cache = {"resid": caps["blocks.hook_resid_pre"], "k": caps[k], "v": caps[v],
             "ctx": models.run_context(config, jnp.asarray(tokens), attention_mask)}
    if "blocks.attn.hook_z" in caps:
        cache["z"] = caps["blocks.attn.hook_z"]
    return cache


#: Sites after the heads' outputs ``z`` in a block (and ``z`` itself), whose edits leave ``z`` of
#: their layer unchanged for every position.
FROM_Z_SITES = LOCAL_SITES - models.transformer.BEFORE_Z

#: A vectorised chunk patching a :data:`FROM_Z_SITES` site enters its first layer at ``z`` taken
#: from the run's cache (``run_cache(...)["z"]``): no queries, keys, values or attention there
#: (``first_z`` of :func:`jaxpatch.models.transformer.run_blocks_from`). Every patch of the chunk
#: edits that layer at ``z`` or later, or a later layer, so ``z`` there is the run's own. ``False``
#: is the slow twin.
ENTER_AT_Z = True


def enters_at_z(site: str, run_cache, run_ivs) -> bool:
    """Whether a vectorised sweep of ``site`` enters its chunks' first layer at the cached ``z``
    (:data:`ENTER_AT_Z`): the cache holds ``z`` and the run's own interventions edit no layer."""
    return ENTER_AT_Z and site in FROM_Z_SITES and "z" in run_cache and not _edits_layers(run_ivs)


def default_mesh() -> Mesh | None:
    """A 1-D mesh over all local devices (``None`` with one device); in a multi-process run
    (after ``jax.distributed.initialize``), over every device of every process (see
    :mod:`jaxpatch.multihost`)."""
    devs = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    return Mesh(np.array(devs), ("sweep",)) if len(devs) > 1 else None


def run(
    config: ModelConfig,
    params,
    sweep: Sweep,
    run_cache: Mapping[str, Any],
    source,
    source_stacked: bool,
    metric,
    ctx: Mapping[str, Any],
    n_pos: int,
    *,
    run_ivs: Interventions = NONE,
    chunk_size: int | None = None,
    mesh: Mesh | None | str = "auto",
    position_buckets: int | str = "auto",
    progress: bool | None = None,
    checkpoint=None,
    memory_budget: int | str | None = None,
    same_before: int = 0,
    skip: bool = True,
    pack: bool | str = "auto",
) -> tuple[np.ndarray, Plan]:
    """Run every patch of ``sweep``: ``(metric values [P, M, B] in the sweep's order (numpy, on
    the host), Plan)``.

    Args:
        run_cache: the run being patched: ``resid`` (``blocks.hook_resid_pre``), ``k``, ``v``
            stacked ``[L, B, T, ...]``.
        source: the replacement activations (stacked ``[L, B|1, T, ...]`` if ``source_stacked``,
            else broadcastable to one layer's activation, e.g. a scalar 0 for zero-ablation).
        metric: a tuple of metric names (see :mod:`jaxpatch.metrics`) or a :class:`CustomMetric`.
        ctx: ``answer_pos``/``answer``/``wrong``/``clean_logprobs`` arrays for the metrics.
        chunk_size: patches per vmapped chunk (default: ~2048 token rows per matmul).
        mesh: ``"auto"`` (all local devices), ``None`` (one device), a 1-D ``Mesh`` with axis
            ``"sweep"``, or a 2-D ``("sweep", "model")`` mesh whose ``"model"`` axis holds
            parameters sharded by :mod:`jaxpatch.partitioning` (patches split over ``"sweep"``).
        position_buckets: how many static position offsets a chunk may start from (1 disables
            position-prefix reuse; each bucket is one more compiled branch). ``"auto"`` weighs the
            extra compile time against the FLOPs saved (see :func:`auto_buckets`).
        progress: a tqdm bar counting chunks: ``None`` shows it on a terminal only, ``True``
            forces it, ``False`` never (see :mod:`jaxpatch.progress`). With a bar the chunks
            run as a few equal dispatches (at most :data:`MAX_PROGRESS_GROUPS`, never one per
            patch; see :func:`_run_with_bar`), so toggling it compiles a second program; both
            are cacheable.
        checkpoint: a :class:`jaxpatch.resume.Checkpoint`: completed dispatch groups are written
            to its directory and groups already there are loaded, not recomputed (bitwise equal).
        memory_budget: bytes per device (or ``"2GiB"``) the sweep program may use; with it, or
            on a device that reports its memory, an automatic chunk size is the largest that the
            compiled program's memory analysis fits (see :mod:`jaxpatch.planner`).
        same_before: the caller's guarantee that at every position before it the run and the
            source activations are identical at every layer (their inputs agree there, e.g. the
            first position where clean and corrupted prompts differ; :func:`first_difference`).
            0 (the default) claims nothing; never give more for mean or zero sources.
        skip: run only the patches that can change what the metric reads (see
            :func:`skippable`); the others get the unpatched run's metric, exactly. ``False``
            runs every patch (the slow twin the skips are tested against).
        pack: lay each chunk's patches end to end on one row axis, each recomputing only its own
            positions (see :mod:`jaxpatch.packed`). ``"auto"`` packs an eligible sweep when no
            ``chunk_size`` is given, packing executes fewer block FLOPs than vectorised chunks
            (counting the longer attention of packed rows) and, where a memory budget applies,
            its program fits; ``True`` requires it (an error says why a sweep cannot be packed);
            ``False`` never packs (the slow twin).
    """
    global last_plan
    check(sweep, config, n_pos)
    if isinstance(same_before, bool) or not isinstance(same_before, (int, np.integer)) or not 0 <= same_before <= n_pos:
        raise InputError(f"same_before must be an int in 0..{n_pos}; got {same_before!r}.")
    if isinstance(metric, CustomMetric):
        read_positions = np.arange(metric.first_pos, n_pos)
    else:
        read_positions = np.unique(np.asarray(ctx["answer_pos"]))
    noop, dead = skippable(sweep, config.n_layers, n_pos, read_positions, same_before) if skip else (
        np.zeros(sweep.size, bool), np.zeros(sweep.size, bool))
    if skip:  # patches that write the run's own values (e.g. layer 0 at a shared token)
        noop = noop | (unchanged(sweep, run_cache, source, source_stacked, config.n_layers, n_pos, run_ivs) & ~dead)
    if not skip:
        same_before = 0
    full_sweep, live = sweep, np.flatnonzero(~(noop | dead))
    ran, rep = live, None
    if live.size < sweep.size:
        # Run the live patches, plus one skipped patch (the cheapest): every skipped patch returns
        # its value, the unpatched run's metric, computed by the same program as every patched run.
        rep = _cheapest(sweep, np.flatnonzero(noop | dead), config.n_layers, n_pos, same_before)
        ran = np.sort(np.append(live, rep))
        sweep = Sweep(sweep.site, {a: np.asarray(v)[ran] for a, v in sweep.index.items()}, ("patch",), (int(ran.size),))
    if mesh == "auto":
        mesh = default_mesh()
    if mesh is not None:
        from .partitioning import check_mesh

        check_mesh(mesh)
    n_dev = 1 if mesh is None else mesh.size
    n_split = 1  # 2-D mesh: each chunk is split over "sweep" (see _core), so chunks are multiples of it
    if mesh is not None and "model" in mesh.axis_names:
        n_dev, n_split = 1, int(dict(mesh.shape)["sweep"])
    B = int(run_cache["resid"].shape[1])  # prompts per patched run (sizes the chunks)
    if "ctx" not in run_cache:  # unpadded prompts: default positions
        run_cache = {**run_cache, "ctx": models.run_context(config, jnp.zeros((B, n_pos), jnp.int32))}
    if isinstance(metric, CustomMetric):
        max_offset = metric.first_pos
    else:
        max_offset = int(np.min(np.asarray(ctx["answer_pos"])))
    if position_buckets == "auto":
        position_buckets = auto_buckets(config, sweep, B, n_pos, max_offset, same_before)
    if not isinstance(position_buckets, int) or position_buckets < 1:
        raise InputError(f"position_buckets must be 'auto' or an int >= 1, got {position_buckets!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise InputError(f"chunk_size must be None (automatic) or an int >= 1 (patches per vectorised chunk); got {chunk_size!r}.")
    from . import multihost as _multihost

    multi = _multihost.spans_processes(mesh)
    if multi:  # every process holds the same inputs (checked): global arrays over every device
        from .resume import fingerprint

        _multihost.check_same("inputs (model weights, prompts, sweep, metrics or options)", fingerprint(
            params, dict(run_cache), source, source_stacked, dict(ctx), run_ivs, metric, sweep.site, dict(sweep.index),
            n_pos, chunk_size, position_buckets))
        params = _multihost.place_params(params, mesh)
        run_ivs, run_cache, source, ctx = _multihost.replicate((run_ivs, dict(run_cache), source, dict(ctx)), mesh)
    unread = None if rep is None else ran == rep  # the skipped patches' representative: its rows change nothing
    params = suffix_blocks(config, params, mesh)
    pl = _packed_plan(config, params, sweep, run_cache, source, source_stacked, metric, ctx, n_pos, run_ivs, mesh, n_dev,
                      max_offset, position_buckets, chunk_size, memory_budget, same_before, pack, B, unread)
    if pl is None:  # vectorised chunks
        if chunk_size is None:
            chunk_size = default_chunk_size(sweep, B, n_pos, position_buckets, same_before=same_before)
            chunk_size = _planned_chunk(config, params, sweep, run_cache, source, source_stacked, metric, ctx, n_pos, run_ivs,
                                        mesh, n_dev, max_offset, position_buckets, chunk_size, memory_budget, same_before)
        chunk_size = -(-chunk_size // n_split) * n_split
        group = _unembed_group(metric, B, n_pos, chunk_size, mesh, sweep.size)
        # Chunks come in multiples of n_dev x group: every device's share, and every dispatch group
        # of the progress bar or a checkpoint, holds whole unembedding groups (bitwise the same grouping).
        unit = n_dev * group
        pl = plan(sweep, config.n_layers, n_pos, max_offset, chunk_size, unit, position_buckets, same_before,
                  _edits_layers(run_ivs))
        pl = dataclasses.replace(pl, from_z=enters_at_z(sweep.site, run_cache, run_ivs))
    else:
        unit = pl.unit
        group = unit // n_dev
    pl = dataclasses.replace(pl, n_noop=int(noop.sum()), n_dead=int(dead.sum()), live=live, unit=unit)
    last_plan = pl
    n_chunks = len(pl.chunk_start)
    idx = {a: jnp.asarray(np.asarray(v)[pl.order].reshape((n_chunks, pl.chunk) + np.shape(v)[1:])) for a, v in sweep.index.items()}
    if pl.packed:
        idx["_first"] = jnp.asarray(pl.first.reshape(n_chunks, pl.chunk))
    from . import progress as _progress

    core = partial(_core, config, params, run_ivs, dict(run_cache), source, dict(ctx), site=sweep.site, paired=sweep.joint,
                   source_stacked=source_stacked, offsets=pl.offsets, metric=metric, n_pos=n_pos, mesh=mesh, group=group,
                   packed=pl.packed, lead=pl.lead, lazy=_lazy_for(metric))
    if checkpoint is not None or multi:  # dispatch groups: saved/loaded (resume.py), gathered (multihost.py)
        from . import resume as _resume

        n_real = int(np.sum(pl.chunk_start < config.n_layers)) if pl.packed else math.ceil(sweep.size / pl.chunk)
        if checkpoint is not None:
            checkpoint.writer = jax.process_index() == 0
            checkpoint.describe.update(chunk_size=pl.chunk, position_buckets=position_buckets)
            checkpoint.open({"plan": _resume.fingerprint(ran, pl.order[: sweep.size], pl.chunk, pl.chunk_start[:n_real],
                                                         pl.chunk_bucket[:n_real], pl.offsets,
                                                         *((pl.packed, pl.first, pl.lead) if pl.packed else ())),
                             "inputs": _resume.fingerprint(dict(run_cache), source, source_stacked, dict(ctx), run_ivs, metric, n_pos),
                             "software": _resume.software()})
        out = _resume.run_groups(core, idx, pl.chunk_start, pl.chunk_bucket, n_real=n_real, n_layers=config.n_layers,
                                 n_dev=unit, checkpoint=checkpoint, put=_multihost.putter(mesh) if multi else None,
                                 fetch=_multihost.fetch if multi else None,
                                 show_bar=_progress.enabled(progress) and jax.process_index() == 0, desc=f"sweep {sweep.site}")
        out = tuple(jnp.asarray(o) for o in out)
    elif _progress.enabled(progress):  # a bar: a few equal dispatches, no host callback (see _run_with_bar)
        out = _run_with_bar(core, idx, pl.chunk_start, pl.chunk_bucket, config.n_layers, unit, f"sweep {sweep.site}")
    else:
        out = core(idx, jnp.asarray(pl.chunk_start), jnp.asarray(pl.chunk_bucket))
    # One host transfer after the whole sweep (never per patch); what follows is numpy, so it
    # compiles nothing (each eager jax op on a new shape would compile a small program).
    vals, finite = np.asarray(out[0]), np.asarray(out[1])
    vals = vals.reshape((n_chunks * pl.chunk,) + vals.shape[2:])
    # Undo the execution order: position i ran patch order[i] (packed: patch j ran in slot slot_of[j]).
    if pl.slot_of is not None:
        inv = pl.slot_of
    else:
        inv = np.empty(sweep.size, np.int64)
        inv[pl.order[: sweep.size]] = np.arange(sweep.size)
    vals = vals[inv]
    # A NaN/inf in a patched run is reported with the patch that produced it instead of flowing
    # into tables and plots.
    ok = finite.reshape(-1)[inv] & np.all(np.isfinite(vals), axis=tuple(range(1, vals.ndim)))
    at = None if rep is None else int(np.searchsorted(ran, rep))
    bad = np.flatnonzero(~ok)
    if (bad != at).any():
        raise_nonfinite(full_sweep, ran[bad[bad != at]])
    if rep is None:
        return vals, pl
    if not ok[at]:
        raise_nonfinite(full_sweep, np.flatnonzero(noop | dead), unpatched=True)
    out = np.array(np.broadcast_to(vals[at], (full_sweep.size,) + vals.shape[1:]))
    out[ran] = vals
    return out, pl


def _unembed_group(metric, batch: int, n_pos: int, chunk: int, mesh, n_patches: int) -> int:
    """Chunks whose read rows are unembedded in one matmul (about :data:`UNEMBED_ROWS` rows), but
    few enough that the sweep keeps :data:`MAX_PROGRESS_GROUPS` dispatch groups (a bar that moves,
    checkpoints that save progress); 1 on a 2-D mesh (each chunk is split over the
    sweep axis there)."""
    if mesh is not None and "model" in mesh.axis_names:
        return 1
    read = batch * (n_pos - metric.first_pos if isinstance(metric, CustomMetric) else 1)
    # A function of the devices this process sees, never of the mesh a sweep uses: one device and
    # all of them group the same chunks (bitwise the same values).
    spread = MAX_PROGRESS_GROUPS * len(jax.devices())
    return max(1, min(UNEMBED_ROWS // max(1, chunk * read), math.ceil(n_patches / chunk) // spread))


def _edits_layers(ivs: Interventions) -> bool:
    """Whether interventions edit any per-layer site (then every chunk runs its last layer whole)."""
    return any(SITES[site].per_layer if site in SITES else True for site in ivs.sites())


def _budget(params, run_ivs, run_cache, source, ctx, mesh, memory_budget):
    """``(budget bytes per device, where it comes from, bytes already resident)``, or ``None``
    where no budget applies (no ``memory_budget`` and a device that reports no memory: CPUs)."""
    from . import multihost as _multihost
    from . import planner as _planner

    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()] if mesh is not None else [jax.devices()[0]]
    if memory_budget is not None:
        return _planner.parse_bytes(memory_budget), "memory_budget=", 0
    budget = _planner.device_budget(devices)
    if _multihost.spans_processes(mesh):  # every process must choose the same: the smallest budget of all
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(np.asarray(-1 if budget is None else budget, np.int64)))
        budget = None if (every < 0).any() else int(every.min())
    if budget is None:
        return None
    said = f"{_planner.DEVICE_HEADROOM:.0%} of the free memory {devices[0].device_kind} reports"
    resident = min(_planner.resident_bytes((params, run_ivs, run_cache, source, ctx), d) for d in devices)
    return budget, said, resident


def _packed_plan(config, params, sweep, run_cache, source, source_stacked, metric, ctx, n_pos, run_ivs, mesh, n_dev,
                 max_offset, position_buckets, chunk_size, memory_budget, same_before, pack, batch, unread=None) -> Plan | None:
    """The packed plan of ``sweep`` (see :mod:`jaxpatch.packed`), or ``None`` to run vectorised
    chunks (``pack`` and :func:`run`'s docstring say when)."""
    if pack not in (True, False, "auto") or not isinstance(pack, (bool, str)):
        raise InputError(f"pack must be 'auto', True or False; got {pack!r}.")
    two_d = mesh is not None and "model" in mesh.axis_names
    ok = pack is not False and _packed.eligible(sweep, source, source_stacked, _edits_layers(run_ivs), two_d)
    if pack is True and not ok:
        raise InputError(
            f"pack=True: this sweep of {sweep.site!r} cannot run packed. Packing needs one component per patch indexed "
            f"by position (optionally head or neuron, never a whole axis), a site whose activation is [batch, pos, ...], "
            f"a stacked source or a scalar one, no interventions on the run itself inside the blocks and no 2-D mesh. "
            f"Use pack='auto' or pack=False.")
    if not ok or (pack == "auto" and chunk_size is not None):
        return None
    full_last = _edits_layers(run_ivs)
    pl = plan_packed(sweep, config.n_layers, n_pos, max_offset, batch, n_dev, same_before, full_last, unread)
    rows, slots = pl.packed, pl.chunk
    group = _unembed_group(metric, batch, n_pos, slots, mesh, sweep.size)
    if group > 1:  # whole unembedding groups per device
        pl = plan_packed(sweep, config.n_layers, n_pos, max_offset, batch, n_dev * group, same_before, full_last, unread)
    pl = dataclasses.replace(pl, unit=n_dev * group)
    if pack == "auto":
        chunk = default_chunk_size(sweep, batch, n_pos, position_buckets, same_before=same_before)
        vec = plan(sweep, config.n_layers, n_pos, max_offset, chunk, n_dev, position_buckets, same_before, full_last)
        # Block FLOPs per token row (matmuls, and the attention over its keys: a packed row's
        # keys are the cached sequence and two tiles of the chunk's rows, or all of them).
        nh = config.n_heads * config.d_head
        row = 8 * config.d_model * nh + (6 if config.gated_mlp else 4) * config.d_model * config.d_mlp
        packed_cost = executed_rows(pl, config.n_layers, n_pos) * (row + 4 * nh * _packed.attention_keys(pl.packed, n_pos))
        if packed_cost >= executed_rows(vec, config.n_layers, n_pos) * (row + 4 * nh * n_pos):
            return None
    budget = _budget(params, run_ivs, run_cache, source, ctx, mesh, memory_budget)
    if budget is not None:  # the packed program must fit, else vectorised chunks (planned to fit)
        from . import multihost as _multihost
        from . import planner as _planner

        budget, said, resident = budget
        k = pl.unit
        put = _multihost.putter(mesh) if _multihost.spans_processes(mesh) else (lambda a, sharded: jnp.asarray(a))
        ix = {a: put(np.asarray(v)[pl.order[: k * slots]].reshape((k, slots) + np.shape(v)[1:]), True)
              for a, v in sweep.index.items()}
        ix["_first"] = put(pl.first[: k * slots].reshape(k, slots), True)
        compiled = _core.lower(config, params, run_ivs, dict(run_cache), source, dict(ctx), ix, put(pl.chunk_start[:k], True),
                               put(pl.chunk_bucket[:k], True), site=sweep.site, paired=False, source_stacked=source_stacked,
                               offsets=pl.offsets, metric=metric, n_pos=n_pos, mesh=mesh, group=group, packed=rows, lead=pl.lead,
                               lazy=_lazy_for(metric)).compile()
        if _planner.estimate(compiled, slots, len(pl.chunk_start) // k, resident).need() > budget:
            if pack is True:
                raise _planner.MemoryPlanError(
                    f"pack=True: the packed program of this sweep of {sweep.site!r} does not fit the memory budget "
                    f"({said}, {_planner.fmt_bytes(budget)}); use pack='auto' (vectorised chunks planned to fit).")
            return None
    return pl


def _planned_chunk(config, params, sweep, run_cache, source, source_stacked, metric, ctx, n_pos, run_ivs, mesh, n_dev,
                   max_offset, position_buckets, preferred, memory_budget, same_before=0) -> int:
    """``preferred`` (the speed heuristic's chunk), or the largest candidate at most it whose
    compiled program fits the memory budget (``memory_budget``, else the devices' reported free
    memory; without either: ``preferred``). See :mod:`jaxpatch.planner`."""
    from . import planner as _planner

    from . import multihost as _multihost

    multi = _multihost.spans_processes(mesh)
    b = _budget(params, run_ivs, run_cache, source, ctx, mesh, memory_budget)
    if b is None:  # the device reports no memory (CPU): the speed heuristic alone
        return preferred
    budget, said, resident = b

    def measure(c: int):  # one unembedding group of chunks per device, as run() dispatches them
        g = _unembed_group(metric, int(run_cache["resid"].shape[1]), n_pos, c, mesh, sweep.size)
        k = n_dev * g
        p = plan(sweep, config.n_layers, n_pos, max_offset, c, k, position_buckets, same_before, _edits_layers(run_ivs))
        put = _multihost.putter(mesh) if multi else (lambda a, sharded: jnp.asarray(a))
        ix = {a: put(np.asarray(v)[p.order[: k * c]].reshape((k, c) + np.shape(v)[1:]), True) for a, v in sweep.index.items()}
        compiled = _core.lower(config, params, run_ivs, dict(run_cache), source, dict(ctx), ix,
                               put(p.chunk_start[:k], True), put(p.chunk_bucket[:k], True), site=sweep.site,
                               paired=sweep.joint, source_stacked=source_stacked, offsets=p.offsets, metric=metric,
                               n_pos=n_pos, mesh=mesh, group=g, lazy=_lazy_for(metric)).compile()
        return _planner.estimate(compiled, c, len(p.chunk_start) // k, resident)

    return _planner.choose_chunk(measure, preferred, budget, source=said, what=f"This sweep of {sweep.site!r}")


def describe_patch(sweep: Sweep, i: int) -> str:
    """A patch's indices in the user's terms, e.g. ``layer=2, pos=5`` (joint: ``[...] + [...]``)."""
    names = {"d_mlp": "neuron", "q_pos": "dest_pos", "k_pos": "src_pos"}

    def comp(k=None):
        parts = []
        for a, v in sweep.index.items():
            x = int(np.asarray(v)[i] if k is None else np.asarray(v)[i, k])
            parts.append(f"{names.get(a, a)}={'all' if x == ALL else x}")
        return ", ".join(parts)

    if not sweep.joint:
        return comp()
    return " + ".join(f"[{comp(k)}]" for k in range(np.asarray(sweep.index["layer"]).shape[1]))


def raise_nonfinite(sweep: Sweep, bad: np.ndarray, unpatched: bool = False):
    shown = "; ".join(f"#{int(i)} ({describe_patch(sweep, int(i))})" for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    why = (" (these patches cannot change the metric, so they report the unpatched run's metric, which is "
           "NaN or inf)") if unpatched else ""
    raise NonFiniteError(
        f"{len(bad)} of {sweep.size} patches of {sweep.site!r} produced NaN or inf logits or metric values{why}: "
        f"{shown}{more}. Check the source activations and the metric (a log of zero, a division by zero), "
        f"and the model's weights and dtype (float16 overflows)."
    )
