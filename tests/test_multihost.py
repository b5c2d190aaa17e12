"""Multi-host sweeps (jaxpatch/multihost.py): 2 local processes x 2 CPU devices each, joined by
``jax.distributed.initialize`` (gloo collectives), run the same ``activation_patch`` sharded over
all 4 devices; every process gets the whole result, bitwise equal to one process on one device.
The progress bar is drawn by process 0 only; a checkpoint is written by process 0 and resumed by
both; processes given different prompts are refused; attribution (its prompts split over the
processes) gives every process the single-process numbers to float rounding.

That 2-process run is ``test_two_processes_equal_one_process_bitwise`` in
tests/test_multihost_gather.py: the same two processes run its checks and that module's, so they
start, join and compile the shared sweep once. Here: the single-process parts."""

from __future__ import annotations

import jax
import numpy as np


def test_replicate_on_a_one_d_mesh():
    """Inputs other than the weights are replicated over the sweep's mesh (the weights go through
    ``place_params``: tests/test_multihost_2d.py)."""
    from jax.sharding import Mesh

    from jaxpatch import multihost

    one_d = Mesh(np.array(jax.devices()[:2]), ("sweep",))
    out = multihost.replicate({"w": np.arange(3, dtype=np.float32), "k": 3}, one_d)
    assert out["k"] == 3 and out["w"].sharding.is_fully_replicated and len(out["w"].sharding.device_set) == 2
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(3, dtype=np.float32))
    assert not multihost.spans_processes(one_d) and not multihost.spans_processes(None)
