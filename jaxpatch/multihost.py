"""Sweeps across processes and hosts: JAX's multi-controller runtime, one program on every device.

Launch the same script as N processes, each calling ``jax.distributed.initialize(...)`` first
(on CPUs, collectives go through gloo, JAX 0.10.2's default). Then ``activation_patch(...)`` with
the default ``mesh="auto"`` shards the sweep's chunks over **every device of every process**
(:func:`jaxpatch.sweep.default_mesh`), and every process returns the whole result:

* every process runs the reference runs (clean, corrupted) itself, on its own first device, from
  the same model and prompts; :func:`check_same` compares a fingerprint of the sweep's inputs
  across processes and raises if any process was given something else (different weights,
  prompts, arguments: a silent mix of two sweeps is impossible);
* the inputs become global arrays (:func:`replicate`: weights, the cached run and source
  activations replicated on every device; each dispatch group's patch indices sharded along
  ``"sweep"``, :func:`put`), built from each process's own copy, never sent between hosts;
* the chunks run as a few equal dispatch groups (:func:`jaxpatch.resume.run_groups`), each
  group's metric values gathered to every process (:func:`fetch`: ``[chunks, chunk, M, B]``,
  small); the progress bar is drawn by process 0 only;
* with ``checkpoint_dir=``, process 0 writes the checkpoint (give every process the same path;
  the others never write) and broadcasts which groups are done and the values it loaded.

Where the results go is the caller's choice (``gather=`` of :func:`jaxpatch.activation_patch`,
:func:`jaxpatch.attribution_patch` and the edge calls; :data:`GATHER_MODES`):

* ``gather="all"`` (default): every process returns the whole result (an all-gather per group);
* ``gather="process0"``: only process 0 returns it; every other process returns ``None``. Each
  group's metric values travel only to process 0's devices (point-to-point ``ppermute`` sends,
  :func:`fetch_to_process0`), never to the other processes, and with a checkpoint the values
  process 0 loaded stay there. Every process still receives one finiteness flag per patch (a bool),
  so a NaN/inf raises the same :class:`jaxpatch.NonFiniteError` on every process.

The mode is read from a context variable (:func:`gathering`) that the entry points set around the
sweep, so the sweep engine passes no extra argument.

Attribution (:func:`jaxpatch.attribution_patch`) and edge estimates
(:func:`jaxpatch.edges.edge_attribution_patch`) are one forward and backward pass, not a sweep:
with ``mesh="auto"`` they split the *prompts* over the processes (:func:`prompt_share`; built-in
metrics, each prompt's value its own), each process running its share on its first device, and
gather the per-prompt estimates as ``gather=`` says (:func:`gather_prompts`).

The result equals a single-process run bitwise (``tests/test_multihost_gather.py``,
``test_two_processes_equal_one_process_bitwise``: 2 processes x 2 CPU devices against one device).

**Weights sharded across processes.** A ``("sweep", "model")`` mesh may span processes: the
weights are global arrays sharded by :mod:`jaxpatch.partitioning` (loaded that way by
``load_pretrained(path, mesh=)``, each process reading only its shards, or placed by the sweep from
each process's host copy: :func:`place_params`). Every call on such weights (:func:`spread`) is one
program over all processes: the reference runs' outputs are made whole on every process
(:func:`replicated`), the gradient and circuit calls do not split prompts, their results are
collected as ``gather=`` says (:func:`collect`), and fingerprints of the weights are computed over
the processes (:func:`global_digest`). ``tests/test_multihost_2d.py``: 2 processes x 2 devices.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._errors import InputError


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` has devices of more than one process."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def _global(x, sharding: NamedSharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def spans(x) -> bool:
    """Whether ``x`` is a global array with devices in other processes (no process holds it whole)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` as a global array replicated over ``mesh`` (built from this
    process's copy, which every process must hold identically: see :func:`check_same`)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _global(x, rep) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def place_params(params, mesh: Mesh):
    """The weights as global arrays on ``mesh``: replicated on a 1-D ``("sweep",)`` mesh; on a
    ``("sweep", "model")`` mesh sharded by :func:`jaxpatch.partitioning.param_shardings` (each
    process builds only its own shards from its host copy). Weights already spread over this
    mesh's processes (``load_pretrained(..., mesh=)``, ``partitioning.shard_params``) stay where
    they are.

    Raises:
        InputError: weights spread over processes on devices other than the mesh's.
    """
    if tuple(mesh.axis_names) == ("sweep",):
        return replicate(params, mesh)
    from .partitioning import param_shardings

    devices = set(mesh.devices.flat)

    def put(x, sharding):
        if spans(x):
            if set(x.sharding.device_set) != devices:
                raise InputError("The model's weights are sharded over other devices than the sweep's mesh: place them on "
                                 "the same mesh (jaxpatch.partitioning.shard_params(params, mesh) or "
                                 "load_pretrained(path, mesh=mesh)) or pass that mesh as mesh=.")
            return x
        return _global(x, sharding)

    return jax.tree.map(put, params, param_shardings(params, mesh))


def replicated(tree):
    """``tree`` with every leaf spread over processes (:func:`spans`) made fully replicated on its
    own mesh, so that every process holds it whole (a collective: every process calls). Used for
    the reference runs of a model whose weights are sharded across processes: their logits and
    activations are small next to the weights."""
    return jax.tree.map(lambda x: _replicator(x.sharding.mesh)(x) if spans(x) else x, tree)


@cache
def _replicator(mesh: Mesh):
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))


def global_digest(x: jax.Array) -> bytes:
    """Bytes that identify the contents of ``x`` (a global array spread over processes) and are
    the same on every process: two 32-bit position-weighted sums of its bytes computed by one
    program over every device (integer sums wrap exactly, so no reduction order changes them;
    a collective: every process calls). What :func:`jaxpatch.resume.fingerprint` uses for weights
    no process holds whole."""
    sums = _checksum(x)
    return f"{x.dtype.str}:{x.shape};".encode() + np.asarray(sums.addressable_data(0)).tobytes()


@jax.jit
def _checksum(x):
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    b = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)  # [..., itemsize] for wider types
    index = jnp.zeros(b.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(b.ndim)):  # each byte's flat position, without reshaping the sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, b.shape, d) * jnp.uint32(stride % 2**32)
        stride *= b.shape[d]
    one = jnp.sum(b * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
    two = jnp.sum((b + jnp.uint32(1)) * (index * jnp.uint32(40503) + jnp.uint32(2246822519)), dtype=jnp.uint32)
    return jnp.stack([one, two])


def putter(mesh: Mesh):
    """``put(array, sharded)``: a host array as a global array, split along its first axis over
    ``"sweep"`` (``sharded``) or replicated. On a ``("sweep", "model")`` mesh everything is
    replicated (small: patch indices; the program splits each chunk over ``"sweep"`` itself)."""
    shd, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    two_d = "model" in mesh.axis_names
    return lambda a, sharded: _global(a, shd if sharded and not two_d else rep)


#: Valid ``gather=`` values: every process returns the result, or process 0 only.
GATHER_MODES = ("all", "process0")

_GATHER: contextvars.ContextVar[str] = contextvars.ContextVar("jaxpatch_gather", default="all")


def check_gather(gather) -> str:
    """``gather`` if it is one of :data:`GATHER_MODES`, else an :class:`InputError`."""
    if not isinstance(gather, str) or gather not in GATHER_MODES:
        raise InputError(f"gather must be 'all' (every process returns the whole result) or 'process0' (only process 0 "
                         f"does; the others return None and never receive the values); got {gather!r}.")
    return gather


@contextlib.contextmanager
def gathering(gather: str):
    """Within the block, multi-process sweeps gather their results as ``gather`` says
    (:data:`GATHER_MODES`; validated)."""
    token = _GATHER.set(check_gather(gather))
    try:
        yield
    finally:
        _GATHER.reset(token)


def gather_mode() -> str:
    """The current ``gather`` mode (``"all"`` outside :func:`gathering`)."""
    return _GATHER.get()


def keeps_result(gather: str | None = None) -> bool:
    """Whether this process returns the result under ``gather`` (default: the current mode)."""
    return (gather or gather_mode()) == "all" or jax.process_index() == 0


def fetch(tree):
    """A dispatch group's outputs ``(values [n, chunk, ...], finite [n, chunk])`` (global arrays
    split along ``"sweep"``) as numpy on this process (a collective: every process calls).

    ``gather="all"``: gathered whole to every process. ``gather="process0"``: see
    :func:`fetch_to_process0`.
    """
    if gather_mode() == "process0":
        vals, finite = tree
        return fetch_to_process0(vals, finite)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


@jax.jit
def _rows_finite(vals, finite):
    return finite & jnp.all(jnp.isfinite(vals), axis=tuple(range(finite.ndim, vals.ndim)))


def fetch_to_process0(vals: jax.Array, finite: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``values`` brought to process 0 only (a collective: every process calls).

    Process 0 gets ``(values, finite)`` as numpy. Every other process gets a placeholder: zeros for
    the values and, for ``finite``, whether each patched run's logits *and* metric values were
    finite (the flags, one bool per patch, are all-gathered: small), so that the engine's NaN check
    raises alike on every process. The values move as :func:`to_process0` says: only process 0
    receives them.
    """
    from jax.experimental import multihost_utils

    finite, ok = (np.asarray(x) for x in multihost_utils.process_allgather((finite, _rows_finite(vals, finite)), tiled=True))
    out = to_process0(vals)
    if out is None:
        return np.zeros(vals.shape, vals.dtype), ok
    return out, finite


def to_process0(x: jax.Array) -> np.ndarray | None:
    """A global array split along the ``"sweep"`` axis of its mesh, whole as numpy on process 0
    (``None`` on the others; a collective: every process calls). It moves by ``ppermute`` rounds,
    each sending up to one shard per device of process 0 from the devices of the other processes,
    so no other process receives anything. On a ``("sweep", "model")`` mesh the array is first
    spread evenly over every device (flattened, padded), then moved the same way."""
    mesh = x.sharding.mesh
    spec = tuple(x.sharding.spec)
    if tuple(mesh.axis_names) != ("sweep",) or not spec or spec[0] != "sweep" or any(a is not None for a in spec[1:]):
        return _flat_to_process0(x)
    devs = list(mesh.devices.flat)
    first = tuple(i for i, d in enumerate(devs) if d.process_index == 0)
    rest = [i for i, d in enumerate(devs) if d.process_index != 0]
    perms = tuple(tuple((src, first[t]) for t, src in enumerate(rest[j:j + len(first)]))
                  for j in range(0, len(rest), len(first)))
    moved = _to_process0(mesh, perms)(x)
    if jax.process_index() != 0:
        jax.block_until_ready(moved)  # this process's sends are done before it moves on
        return None
    rows = x.shape[0] // len(devs)  # rows per device (the "sweep" split)
    where = {d: i for i, d in enumerate(devs)}
    out = np.empty(x.shape, x.dtype)
    for sh in x.addressable_shards:
        out[sh.index] = np.asarray(sh.data)
    for perm, arr in zip(perms, moved):
        src_of = {dst: src for src, dst in perm}
        for sh in arr.addressable_shards:
            src = src_of.get(where[sh.device])
            if src is not None:
                out[src * rows:(src + 1) * rows] = np.asarray(sh.data)
    return out


def _flat_to_process0(x: jax.Array) -> np.ndarray | None:
    mesh = x.sharding.mesh
    spread = _spreader(mesh)(x)  # [devices, per]: row i on device mesh.devices.flat[i]
    flat = NamedSharding(Mesh(mesh.devices.reshape(-1), ("sweep",)), P("sweep"))
    rows = jax.make_array_from_single_device_arrays(spread.shape, flat, [s.data for s in spread.addressable_shards])
    out = to_process0(rows)
    return None if out is None else out.reshape(-1)[: x.size].reshape(x.shape)


@cache
def _spreader(mesh: Mesh):
    n = mesh.size

    def spread(x):
        flat = x.reshape(-1)
        per = -(-flat.size // n)
        return jnp.pad(flat, (0, n * per - flat.size)).reshape(n, per)

    return jax.jit(spread, out_shardings=NamedSharding(mesh, P(tuple(mesh.axis_names))))


# ------------------------------------------------------------------ prompts split over processes
def check_prompt_mesh(mesh) -> None:
    """``mesh=`` of the attribution and edge-estimate calls: ``"auto"`` or ``None``."""
    if not (mesh is None or (isinstance(mesh, str) and mesh == "auto")):
        raise InputError(f"mesh must be 'auto' (in a multi-process run, split the prompts over the processes) or None "
                         f"(run the whole call on this process's first device); got {mesh!r}.")


def spread(params) -> bool:
    """Whether the model's weights are global arrays over several processes (a sharded model, or
    weights placed on a mesh spanning processes): every call on them is one program that every
    process runs together."""
    leaves = jax.tree_util.tree_leaves(params)
    return bool(leaves) and spans(leaves[0])


def collect(tree, gather: str):
    """The outputs of one program over every process (weights :func:`spread`) as numpy: on every
    process (``gather="all"``) or on process 0 only (``"process0"``: :func:`to_process0` for
    arrays split over devices; ``None`` on the other processes). A collective: every process calls."""
    if gather == "all":
        return jax.tree.map(np.asarray, replicated(tree))
    leaves, treedef = jax.tree.flatten(tree)
    out = [to_process0(x) if spans(x) and not x.is_fully_replicated else np.asarray(x) for x in leaves]
    return jax.tree.unflatten(treedef, out) if jax.process_index() == 0 else None


def prompt_share(mesh, batch: int, names, params=None) -> np.ndarray | None:
    """The prompts this process computes when a call splits its prompts over processes: under
    ``mesh="auto"`` in a multi-process run with built-in metrics only (each prompt's value depends
    on that prompt alone; a user metric may mix prompts, so it runs whole on every process),
    ``ceil(batch / processes)`` indices, process ``i`` taking the ``i``-th block (the last blocks
    padded by repeating prompt ``batch - 1``, so every process compiles the same shapes). Else
    ``None``: the whole call runs on each process, or, with weights spread over the processes
    (:func:`spread`), once over all of them."""
    check_prompt_mesh(mesh)
    if spread(params) or mesh is None or jax.process_count() == 1 or not all(isinstance(n, str) for n in names):
        return None
    n, i = jax.process_count(), jax.process_index()
    per = -(-batch // n)
    return np.minimum(np.arange(i * per, (i + 1) * per), batch - 1)


def gather_prompts(tree, batch: int, gather: str):
    """Each process's share (:func:`prompt_share`) of per-prompt results, leaves ``[..., share]``
    (prompt axis last), as the whole ``[..., batch]``: on every process (``gather="all"``, an
    all-gather) or on process 0 only (``"process0"``, :func:`to_process0`; ``None`` elsewhere).
    A collective: every process calls."""
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    front = [np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 0)) for x in leaves]  # [share, ...]
    n = jax.process_count()
    if gather == "all":
        every = [np.asarray(e) for e in multihost_utils.process_allgather(front, tiled=True)]  # [n * share, ...]
    else:
        devs = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
        sharding = NamedSharding(Mesh(np.array(devs), ("sweep",)), P("sweep"))
        mine = devs[jax.process_index()]
        every = [to_process0(jax.make_array_from_single_device_arrays((n * x.shape[0],) + x.shape[1:], sharding,
                                                                      [jax.device_put(x, mine)])) for x in front]
        if jax.process_index() != 0:
            return None
    return jax.tree.unflatten(treedef, [np.moveaxis(e[:batch], 0, -1) for e in every])


@cache
def _to_process0(mesh: Mesh, perms: tuple):
    """A program moving, in round ``r``, the ``"sweep"`` shard of each device ``src`` of
    ``perms[r]`` to its process-0 device ``dst`` (devices receiving nothing get zeros)."""

    def body(x):
        return tuple(jax.lax.ppermute(x, "sweep", list(p)) for p in perms)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("sweep"), out_specs=P("sweep"), check_vma=False))


def check_same(what: str, digest: str) -> None:
    """Raise unless every process computed the same ``digest`` (a collective)."""
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, bytes]
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise InputError(
            f"The processes of this multi-process sweep were given different {what}: process(es) {differ} differ from "
            f"process 0. Every process must call the sweep with the same model, prompts and arguments (and the same "
            f"jaxpatch/jax versions); each runs the reference runs itself and patches are split among them.")
