"""Multi-host sweeps (jaxpatch/multihost.py): 2 local processes x 2 CPU devices each, joined by
``jax.distributed.initialize`` (gloo collectives), run the same ``activation_patch`` sharded over
all 4 devices; every process gets the whole result, bitwise equal to one process on one device.
The progress bar is drawn by process 0 only; a checkpoint is written by process 0 and resumed by
both; processes given different prompts are refused; attribution (its prompts split over the
processes) gives every process the single-process numbers to float rounding (more in
tests/test_multihost_gather.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxpatch
from tests.helpers import CHILD_PREAMBLE, CHILD_SWEEP_SETUP, child_env, rel_err, run_two

SETUP = CHILD_SWEEP_SETUP

CHILD = CHILD_PREAMBLE + """
from jaxpatch import resume, sweep
assert sweep.default_mesh().size == 4
plain = jaxpatch.activation_patch(model, clean, corrupt, progress=False, **KW)
ckpt = os.path.join(out, "ckpt")
first = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, progress=True, **KW)  # bar: process 0
runs = [resume.last_run["computed"], resume.last_run["groups"]]
again = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, progress=False, **KW)
runs += [resume.last_run["computed"], resume.last_run["loaded"]]
atp = jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp", answer=KW["answer"], wrong=KW["wrong"])
other = corrupt.copy()
other[0, 0] = (other[0, 0] + pid) % 50  # process 1 is given different prompts
try:
    jaxpatch.activation_patch(model, clean, other, progress=False, **KW)
    refused = ""
except jaxpatch.InputError as e:
    refused = str(e)
np.savez(os.path.join(out, f"p{pid}.npz"), atp=atp.per_prompt, plain=plain.per_prompt, first=first.per_prompt,
         again=again.per_prompt, runs=np.asarray(runs), refused=np.asarray(refused))
print("CHILD DONE", flush=True)
"""


@pytest.mark.slow
def test_two_processes_equal_one_process_bitwise(tmp_path):
    ns: dict = {}
    exec(SETUP, ns)
    logs = run_two(CHILD, tmp_path, env=child_env(tmp_path, ns["model"]), timeout=240)

    ref = jaxpatch.activation_patch(ns["model"], ns["clean"], ns["corrupt"], mesh=None, **ns["KW"]).per_prompt
    atp = jaxpatch.attribution_patch(ns["model"], ns["clean"], ns["corrupt"], site="z", method="atp",
                                     answer=ns["KW"]["answer"], wrong=ns["KW"]["wrong"])
    for i in range(2):
        z = np.load(tmp_path / f"p{i}.npz")
        for key in ("plain", "first", "again"):  # every process holds the whole result, bitwise
            assert z[key].tobytes() == ref.tobytes(), (i, key, np.abs(z[key] - ref).max())
        # attribution splits the prompts over the processes: the single-process numbers to rounding
        assert z["atp"].shape == atp.per_prompt.shape and rel_err(z["atp"], atp.per_prompt) <= 1e-5
        # 16 chunks on 4 devices: 4 groups computed, then all 4 loaded from process 0's checkpoint
        assert z["runs"].tolist() == [4, 4, 0, 4]
        assert "different inputs" in str(z["refused"]) and "process(es) [1]" in str(z["refused"])
    bar = "sweep blocks.hook_resid_pre"
    assert bar in logs[0][2] and "/16 " in logs[0][2]  # one bar (16 chunks), on process 0
    assert bar not in logs[1][2]
    assert sorted(f.name for f in (tmp_path / "ckpt").iterdir()) == [
        "chunks_000000_000004.npz", "chunks_000004_000008.npz", "chunks_000008_000012.npz", "chunks_000012_000016.npz",
        "manifest.json"]


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
