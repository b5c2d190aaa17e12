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

The result equals a single-process run bitwise (``tests/test_multihost.py``: 2 processes x 2
CPU devices against one device).
"""

from __future__ import annotations

import jax
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


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` as a global array replicated over ``mesh`` (built from this
    process's copy, which every process must hold identically: see :func:`check_same`).

    Raises:
        InputError: for a mesh other than 1-D ``("sweep",)``: weights sharded over a ``"model"``
            axis would be gathered whole onto every device (multi-process 2-D meshes are not
            supported yet).
    """
    if tuple(mesh.axis_names) != ("sweep",):
        raise InputError(f"A sweep across processes runs on a 1-D mesh with axis 'sweep' (every device holds the whole "
                         f"model); got a mesh with axes {tuple(mesh.axis_names)}. Sharded parameters across processes are "
                         f"not supported yet: use mesh='auto' (every device of every process) or a 1-D 'sweep' mesh.")
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _global(x, rep) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def putter(mesh: Mesh):
    """``put(array, sharded)``: a host array as a global array, split along its first axis over
    ``"sweep"`` (``sharded``) or replicated."""
    shd, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    return lambda a, sharded: _global(a, shd if sharded else rep)


def fetch(tree):
    """Global arrays gathered whole to this process as numpy (a collective: every process calls)."""
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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
