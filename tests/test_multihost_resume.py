"""A multi-host resumable sweep killed mid-sweep (jaxpatch/resume.py + jaxpatch/multihost.py): 2 local
processes x 2 CPU devices each share one ``checkpoint_dir``; once the first group of chunks is on
disk both processes are killed with SIGKILL (the other groups in flight); a rerun of both with the
same arguments loads that group, computes only the 3 missing ones, and every process returns a
result bitwise identical to an uninterrupted single-process, single-device run."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

import jaxpatch
from tests.helpers import CHILD_PREAMBLE as PREAMBLE
from tests.helpers import CHILD_SWEEP_SETUP, child_env, run_two, start_two

SWEEP = """
KW["progress"] = False
ckpt = os.path.join(out, "ckpt")
"""

# Each process, once its first group is saved (process 0 writes the file; process 1's save writes
# nothing), leaves a marker and waits to be killed; the test kills both with SIGKILL.
KILLED = PREAMBLE + SWEEP + """
import time
from jaxpatch import resume
_save = resume.Checkpoint.save
def save_then_wait(self, *a, **k):
    path = _save(self, *a, **k)
    open(os.path.join(out, f"saved{pid}"), "w").close()
    time.sleep(600)
    return path
resume.Checkpoint.save = save_then_wait
jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, **KW)
print("NOT KILLED", flush=True)
"""

RERUN = PREAMBLE + SWEEP + """
from jaxpatch import resume
res = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, **KW)
runs = [resume.last_run[k] for k in ("groups", "loaded", "computed", "chunks_computed")]
np.savez(os.path.join(out, f"p{pid}.npz"), per_prompt=res.per_prompt, runs=np.asarray(runs))
print("CHILD DONE", flush=True)
"""

GROUPS = ["chunks_000000_000004.npz", "chunks_000004_000008.npz", "chunks_000008_000012.npz", "chunks_000012_000016.npz"]


def _groups(d) -> list[str]:
    return sorted(f.name for f in d.iterdir() if f.name.startswith("chunks_"))


@pytest.mark.slow
def test_two_processes_killed_mid_sweep_resume_bitwise(tmp_path):
    ns: dict = {}
    exec(CHILD_SWEEP_SETUP, ns)  # noqa: S102 (the sweep the children run)
    env = child_env(tmp_path, ns["model"])
    procs = start_two(KILLED, tmp_path, env=env)
    try:
        deadline = time.monotonic() + 300  # both processes past their first saved group, within 5 minutes
        while not all((tmp_path / f"saved{i}").exists() for i in range(2)):
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead, f"a child exited (rc {dead}) before its first group: {procs[0].communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no group saved within 300 s"
            time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        logs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, logs
    assert all("NOT KILLED" not in out for out, _ in logs)
    # Killed mid-sweep: the first group of 4 (16 chunks on 4 devices) on disk, nothing else under a
    # final name (temporary files may remain; they are never read).
    assert _groups(tmp_path / "ckpt") == GROUPS[:1]
    assert (tmp_path / "ckpt" / "manifest.json").is_file()

    run_two(RERUN, tmp_path, env=env)
    ref = jaxpatch.activation_patch(ns["model"], ns["clean"], ns["corrupt"], mesh=None, **ns["KW"]).per_prompt
    for i in range(2):
        z = np.load(tmp_path / f"p{i}.npz")
        assert z["per_prompt"].tobytes() == ref.tobytes(), (i, np.abs(z["per_prompt"] - ref).max())
        assert z["runs"].tolist() == [4, 1, 3, 12]  # groups, loaded, computed, chunks computed
    assert _groups(tmp_path / "ckpt") == GROUPS
