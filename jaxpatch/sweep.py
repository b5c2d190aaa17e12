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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from . import metrics as _metrics
from ._errors import InputError
from .config import ModelConfig
from .interventions import NONE, Edit, Interventions
from .models import gpt2
from .sites import SITES

#: Grid-axis names a user may sweep over, and the site axis each indexes.
GRID_AXES = {"layer": "layer", "pos": "pos", "head": "head", "neuron": "d_mlp", "dest_pos": "q_pos", "src_pos": "k_pos"}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Which patches to run: ``P`` rows of indices into one per-layer site.

    Attributes:
        site: canonical per-layer site name (e.g. ``"blocks.attn.hook_z"``).
        index: site-axis name (``"layer"``, ``"pos"``, ``"head"``, ``"q_pos"``, ``"k_pos"``,
            ``"d_mlp"``) -> int array ``[P]``, or ``[P, K]`` to patch K components jointly.
            Axes of the site not indexed are patched whole (e.g. a head over all positions).
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
    sizes = {"layer": config.n_layers, "pos": n_pos, "q_pos": n_pos, "k_pos": n_pos, "head": config.n_heads, "d_mlp": config.d_mlp}
    axes = tuple(axes)
    for a in axes:
        if a not in GRID_AXES:
            raise InputError(f"Unknown sweep axis {a!r}; valid: {list(GRID_AXES)}.")
        if GRID_AXES[a] != "layer" and GRID_AXES[a] not in site_obj.axes:
            raise InputError(f"Site {site!r} has axes {site_obj.axes}; cannot sweep over {a!r}.")
    if "layer" not in axes:
        raise InputError(f"A sweep always includes 'layer'; got axes {axes}.")
    shape = tuple(sizes[GRID_AXES[a]] for a in axes)
    mesh = np.meshgrid(*[np.arange(n, dtype=np.int32) for n in shape], indexing="ij")
    index = {GRID_AXES[a]: m.reshape(-1) for a, m in zip(axes, mesh)}
    return Sweep(site, index, axes, shape)


def from_rows(config: ModelConfig, site: str, rows, n_pos: int) -> Sweep:
    """A sweep from explicit rows: a list of dicts (one component each) or of lists of dicts
    (components patched jointly), e.g. ``[{"layer": 3, "head": 1}, [{"layer": 4, "head": 0},
    {"layer": 5, "head": 2}]]``; every row must have the same number of components."""
    rows = [r if isinstance(r, (list, tuple)) else [r] for r in rows]
    if not rows:
        raise InputError("A sweep needs at least one patch.")
    k = len(rows[0])
    if any(len(r) != k for r in rows):
        raise InputError("Every joint patch in one sweep must have the same number of components.")
    keys = set(rows[0][0])
    index = {}
    for key in keys:
        if key not in GRID_AXES:
            raise InputError(f"Unknown index {key!r}; valid: {list(GRID_AXES)}.")
    for key in keys:
        try:
            index[GRID_AXES[key]] = np.array([[c[key] for c in r] for r in rows], dtype=np.int32)
        except KeyError as e:
            raise InputError(f"Every component must give the same indices; one lacks {e.args[0]!r}.") from None
    if "layer" not in index:
        raise InputError("Every component must give its 'layer'.")
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
    sizes = {"layer": config.n_layers, "pos": n_pos, "q_pos": n_pos, "k_pos": n_pos, "head": config.n_heads, "d_mlp": config.d_mlp, "d_head": config.d_head, "d_model": config.d_model}
    for axis, idx in sweep.index.items():
        if axis != "layer" and axis not in site.axes:
            raise InputError(f"Site {sweep.site!r} has axes {site.axes}; cannot index {axis!r}.")
        idx = np.asarray(idx)
        bad = idx[(idx < 0) | (idx >= sizes[axis])]
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
    n_patches: int


def _pos_key(sweep: Sweep) -> np.ndarray:
    for axis in ("pos", "q_pos"):
        if axis in sweep.index:
            idx = np.asarray(sweep.index[axis])
            return idx.min(axis=1) if idx.ndim == 2 else idx
    return np.zeros(sweep.size, np.int32)


def plan(sweep: Sweep, n_layers: int, n_pos: int, max_offset: int, chunk: int, n_dev: int = 1, n_buckets: int = 4) -> Plan:
    """Order and chunk the patches (see module docstring). ``max_offset``: the earliest position
    the metric reads (no bucket may skip it)."""
    n = sweep.size
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    pos = _pos_key(sweep)
    order = np.lexsort((pos, layer)).astype(np.int32)
    chunk = max(1, min(chunk, n))
    n_chunks = math.ceil(n / chunk)
    n_chunks = math.ceil(n_chunks / n_dev) * n_dev
    padded = np.concatenate([order, np.full(n_chunks * chunk - n, order[-1], np.int32)])
    real = np.arange(n_chunks * chunk) < n
    offsets = sorted({0} | {(n_pos * j) // n_buckets for j in range(1, n_buckets)} if n_buckets > 1 else {0})
    offsets = tuple(o for o in offsets if o <= max_offset)
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
    return Plan(padded, chunk_start, chunk_bucket, offsets, chunk, n)


#: Rough costs used by :func:`auto_buckets`: seconds to compile one more bucket branch, and a
#: conservative sustained FLOP rate. Only the ratio matters; measured on a 2-core CPU.
BUCKET_COMPILE_S = 0.6
ASSUMED_FLOPS = 1.5e11


def auto_buckets(config: ModelConfig, sweep: Sweep, batch: int, n_pos: int, max_offset: int) -> int:
    """Pick 1, 2 or 4 position buckets: minimise (compile time of the branches + estimated run
    time). Sweeps without a position index always get 1."""
    if max_offset == 0 or len(np.unique(_pos_key(sweep))) <= 1:
        return 1
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    nh = config.n_heads * config.d_head
    row = 8 * config.d_model * nh + 4 * config.d_model * config.d_mlp + 4 * nh * n_pos
    run_1 = float(np.sum(config.n_layers - layer)) * n_pos * batch * row / ASSUMED_FLOPS
    cost = {nb: nb * BUCKET_COMPILE_S + run_1 * (nb + 1) / (2 * nb) for nb in (1, 2, 4)}
    return min(cost, key=cost.get)


def default_chunk_size(sweep: Sweep, batch: int, n_pos: int, position_buckets: int, target_rows: int = 2048) -> int:
    """Patches per chunk: about ``target_rows`` token rows per matmul (where this CPU's matmuls are
    most efficient), never mixing layers when a layer has enough patches, and small enough that
    position buckets can skip prefixes when the sweep indexes positions."""
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    per_layer = int(np.bincount(layer).max())
    c = min(max(1, target_rows // max(1, batch * n_pos)), per_layer)
    if position_buckets > 1 and len(np.unique(_pos_key(sweep))) > 1:
        c = min(c, max(1, math.ceil(per_layer / position_buckets)))
    return c


def executed_rows(p: Plan, n_layers: int, n_pos: int) -> int:
    """Block-row evaluations the plan executes: patches x layers run x positions recomputed."""
    offs = np.asarray(p.offsets)[p.chunk_bucket]
    return int(np.sum(p.chunk * np.maximum(n_layers - p.chunk_start, 0) * (n_pos - offs)))


def minimal_rows(sweep: Sweep, n_layers: int, n_pos: int) -> int:
    """Block-row evaluations strictly needed: each patch recomputes layers >= its layer at
    positions >= its position."""
    layer = np.asarray(sweep.index["layer"])
    layer = layer.min(axis=1) if layer.ndim == 2 else layer
    return int(np.sum((n_layers - layer) * (n_pos - _pos_key(sweep))))


# ----------------------------------------------------------------------------------------------
# The compiled core.


@dataclasses.dataclass(frozen=True)
class CustomMetric:
    """A user metric of full logits ``[B, T, V] -> scalar`` (TransformerLens style). Hashable by
    identity of ``fn``. ``last_only``: the metric reads only the last position's logits."""

    fn: Callable
    last_only: bool


def _chunk_fn(config, params, run_ivs, cache, source, ctx, site, paired, source_stacked, offsets, metric, n_pos):
    blocks = params["blocks"]

    def make_branch(s):
        def one(ix, start):
            layers = ix["layer"]
            edit = Edit(layers=layers, index={a: v for a, v in ix.items() if a != "layer"},
                        value=source, stacked=source_stacked, paired=paired)
            ivs = run_ivs + Interventions({site: (edit,)})
            x0 = jax.lax.dynamic_index_in_dim(cache["resid"], jnp.minimum(start, config.n_layers - 1), 0, keepdims=False)
            x0 = x0[:, s:]
            x = gpt2.run_blocks_from(config, blocks, x0, start, ivs, pos_offset=s, prefix_kv=(cache["k"], cache["v"]) if s else None)
            if isinstance(metric, CustomMetric):
                if metric.last_only:
                    last = gpt2.logits_at(config, params, x[:, -1:])
                    full = jnp.zeros(last.shape[:1] + (n_pos,) + last.shape[2:], last.dtype)
                    full = jax.lax.dynamic_update_slice_in_dim(full, last, n_pos - 1, axis=1)
                else:
                    full = gpt2.logits_at(config, params, x)
                val = jnp.asarray(metric.fn(full))
                return jnp.reshape(val, (1, 1)).astype(jnp.float32)
            rows = jnp.take_along_axis(x, (ctx["answer_pos"] - s)[:, None, None], axis=1)  # [B, 1, D]
            logits = gpt2.logits_at(config, params, rows)[:, 0]
            return _metrics.compute(metric, logits, ctx["answer"], ctx.get("wrong"), ctx.get("clean_logprobs"))

        return lambda idx, start: jax.vmap(one, in_axes=(0, None))(idx, start)

    branches = [make_branch(s) for s in offsets]

    def chunk_fn(args):
        idx, start, bucket = args
        if len(branches) == 1:
            return branches[0](idx, start)
        return jax.lax.switch(bucket, branches, idx, start)

    return chunk_fn


#: Most dispatches a sweep with a progress bar is split into (see :func:`_run_with_bar`).
MAX_PROGRESS_GROUPS = 8
#: ``{"total": chunks, "done": chunks finished, "updates": times the bar moved}`` of the last
#: sweep that showed a bar.
last_progress: dict[str, int] = {}


def _progress_groups(n_chunks: int, n_dev: int, max_groups: int = MAX_PROGRESS_GROUPS) -> tuple[int, int]:
    """``(groups, chunks per group)``: at most ``max_groups`` equal groups, each a multiple of
    ``n_dev`` chunks (``n_chunks`` is one already, see :func:`plan`); the last may need padding."""
    units = max(1, n_chunks // n_dev)
    per = math.ceil(units / min(max_groups, units))
    return math.ceil(units / per), per * n_dev


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
    groups, per = _progress_groups(n_chunks, n_dev)
    pad = groups * per - n_chunks

    def padded(a, fill=None):
        a = np.asarray(a)
        extra = np.repeat(a[-1:], pad, axis=0) if fill is None else np.full((pad,) + a.shape[1:], fill, a.dtype)
        return np.concatenate([a, extra]) if pad else a

    idx = {k: padded(v) for k, v in idx.items()}
    chunk_start, chunk_bucket = padded(chunk_start, n_layers), padded(chunk_bucket, 0)
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


@partial(jax.jit, static_argnames=("config", "site", "paired", "source_stacked", "offsets", "metric", "n_pos", "mesh"))
def _core(config, params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket, *, site, paired,
          source_stacked, offsets, metric, n_pos, mesh):
    """``idx``: site-axis -> ``[n_chunks, chunk(, K)]``. Returns ``[n_chunks, chunk, M, B]``."""

    def run_chunks(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket):
        fn = _chunk_fn(config, params, run_ivs, cache, source, ctx, site, paired, source_stacked, offsets, metric, n_pos)
        return jax.lax.map(fn, (idx, chunk_start, chunk_bucket))

    if mesh is None:
        return run_chunks(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket)
    rep, shd = P(), P("sweep")
    f = jax.shard_map(run_chunks, mesh=mesh, in_specs=(rep, rep, rep, rep, rep, shd, shd, shd), out_specs=shd, check_vma=False)
    return f(params, run_ivs, cache, source, ctx, idx, chunk_start, chunk_bucket)


def default_mesh() -> Mesh | None:
    """A 1-D mesh over all local devices (``None`` with one device)."""
    devs = jax.local_devices()
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
) -> jax.Array:
    """Run every patch of ``sweep``: ``(metric values [P, M, B] in the sweep's order, Plan)``.

    Args:
        run_cache: the run being patched: ``resid`` (``blocks.hook_resid_pre``), ``k``, ``v``
            stacked ``[L, B, T, ...]``.
        source: the replacement activations (stacked ``[L, B|1, T, ...]`` if ``source_stacked``,
            else broadcastable to one layer's activation, e.g. a scalar 0 for zero-ablation).
        metric: a tuple of metric names (see :mod:`jaxpatch.metrics`) or a :class:`CustomMetric`.
        ctx: ``answer_pos``/``answer``/``wrong``/``clean_logprobs`` arrays for the metrics.
        chunk_size: patches per vmapped chunk (default: ~2048 token rows per matmul).
        mesh: ``"auto"`` (all local devices), ``None`` (one device) or a 1-D ``Mesh`` with axis
            ``"sweep"``.
        position_buckets: how many static position offsets a chunk may start from (1 disables
            position-prefix reuse; each bucket is one more compiled branch). ``"auto"`` weighs the
            extra compile time against the FLOPs saved (see :func:`auto_buckets`).
        progress: a tqdm bar counting chunks: ``None`` shows it on a terminal only, ``True``
            forces it, ``False`` never (see :mod:`jaxpatch.progress`). With a bar the chunks
            run as a few equal dispatches (at most :data:`MAX_PROGRESS_GROUPS`, never one per
            patch; see :func:`_run_with_bar`), so toggling it compiles a second program; both
            are cacheable.
    """
    check(sweep, config, n_pos)
    if mesh == "auto":
        mesh = default_mesh()
    n_dev = 1 if mesh is None else mesh.size
    B = int(run_cache["resid"].shape[1])  # prompts per patched run (sizes the chunks)
    if isinstance(metric, CustomMetric):
        max_offset = n_pos - 1 if metric.last_only else 0
    else:
        max_offset = int(np.min(np.asarray(ctx["answer_pos"])))
    if position_buckets == "auto":
        position_buckets = auto_buckets(config, sweep, B, n_pos, max_offset)
    if not isinstance(position_buckets, int) or position_buckets < 1:
        raise InputError(f"position_buckets must be 'auto' or an int >= 1, got {position_buckets!r}.")
    if chunk_size is None:
        chunk_size = default_chunk_size(sweep, B, n_pos, position_buckets)
    pl = plan(sweep, config.n_layers, n_pos, max_offset, chunk_size, n_dev, position_buckets)
    n_chunks = len(pl.chunk_start)
    idx = {a: jnp.asarray(np.asarray(v)[pl.order].reshape((n_chunks, pl.chunk) + np.shape(v)[1:])) for a, v in sweep.index.items()}
    from . import progress as _progress

    core = partial(_core, config, params, run_ivs, dict(run_cache), source, dict(ctx), site=sweep.site, paired=sweep.joint,
                   source_stacked=source_stacked, offsets=pl.offsets, metric=metric, n_pos=n_pos, mesh=mesh)
    if _progress.enabled(progress):  # a bar: a few equal dispatches, no host callback (see _run_with_bar)
        out = _run_with_bar(core, idx, pl.chunk_start, pl.chunk_bucket, config.n_layers, n_dev, f"sweep {sweep.site}")
    else:
        out = core(idx, jnp.asarray(pl.chunk_start), jnp.asarray(pl.chunk_bucket))
    out = out.reshape((n_chunks * pl.chunk,) + out.shape[2:])
    # Undo the execution order on device (no host round trip): position i ran patch order[i].
    inv = np.empty(sweep.size, np.int64)
    inv[pl.order[: sweep.size]] = np.arange(sweep.size)
    return out[jnp.asarray(inv)], pl
