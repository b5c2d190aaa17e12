"""Resumable sweeps (jaxpatch/resume.py): a sweep killed with SIGKILL and rerun computes only its
missing chunk groups and returns a result bitwise identical to an uninterrupted run; a checkpoint
of any other sweep (model, prompts, spec, metrics, chunking) is refused, never mixed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import resume, sweep
from tests.helpers import CHILD_SWEEP_SETUP

ROOT = Path(__file__).resolve().parent.parent

# The sweep both the killed child and this process run (same weights, prompts and arguments).
SETUP = CHILD_SWEEP_SETUP + "KW['progress'] = False\n"

# Dies by SIGKILL right after its first group file is on disk (the other groups are in flight).
CHILD = SETUP + """
import os, signal, sys
from jaxpatch import resume
_save = resume.Checkpoint.save
def save_then_die(self, *a, **k):
    _save(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
resume.Checkpoint.save = save_then_die
jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=sys.argv[1], mesh=eval(sys.argv[2]), **KW)
print("NOT KILLED")
"""

ns: dict = {}
exec(SETUP, ns)
model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]


def write_weights(m, path) -> str:
    """``m``'s weights as an npz of ``outer/leaf`` keys (read back by SETUP's ``load_model``)."""
    flat = jax.tree_util.tree_flatten_with_path(m.params)[0]
    np.savez(path, **{"/".join(k.key for k in kp): np.asarray(v) for kp, v in flat})
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(model, tmp_path_factory.mktemp("weights") / "w.npz")


@pytest.fixture(scope="module")
def uninterrupted():
    return jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **KW)


def _groups(d: Path) -> list[str]:
    return sorted(f.name for f in d.iterdir() if f.name.startswith("chunks_"))


# child mesh -> (chunks the child saved before dying, groups the rerun on one device loads)
@pytest.mark.parametrize("child_mesh, saved, loaded", [("None", ["chunks_000000_000002.npz"], 1),
                                                        ("'auto'", ["chunks_000000_000008.npz"], 4)])
def test_sigkill_then_rerun_is_bitwise_identical_and_computes_only_missing_groups(tmp_path, monkeypatch, uninterrupted,
                                                                                  weights, child_mesh, saved, loaded):
    env = {**os.environ, "JAXPATCH_TEST_WEIGHTS": weights}
    env.pop("PYTEST_CURRENT_TEST", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), child_mesh], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert _groups(tmp_path) == saved  # killed mid-sweep: one group on disk, no partial files under final names
    assert (tmp_path / "manifest.json").is_file()

    # Rerun with the same arguments (here on one device; the child ran on 1 or 8 devices), counting
    # the chunks the compiled sweep program really runs.
    ran = []

    def counting_core(*a, **k):
        if not isinstance(a[7], jax.core.Tracer):  # a dispatch (not the shape-only trace)
            ran.append(len(a[7]))  # chunks in this dispatch
        return core(*a, **k)

    core = sweep._core
    monkeypatch.setattr(sweep, "_core", counting_core)
    res = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=tmp_path, mesh=None, **KW)
    n_groups = 8  # 16 patches in chunks of 1 on one device: 8 groups of 2 chunks
    assert ran == [2] * (n_groups - loaded)  # only the missing groups ran
    assert resume.last_run == {"groups": n_groups, "loaded": loaded, "computed": n_groups - loaded,
                               "chunks_computed": 16 - 2 * loaded}
    np.testing.assert_array_equal(res.per_prompt, uninterrupted.per_prompt)
    assert res.per_prompt.tobytes() == uninterrupted.per_prompt.tobytes()  # bitwise, signs of zeros included
    assert len(_groups(tmp_path)) == 1 + n_groups - loaded

    # A third run computes nothing and still gives the same bits.
    again = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=tmp_path, mesh=None, **KW)
    assert resume.last_run["computed"] == 0 and resume.last_run["loaded"] == n_groups
    assert ran == [2] * (n_groups - loaded)  # nothing ran
    assert again.per_prompt.tobytes() == uninterrupted.per_prompt.tobytes()


def test_checkpointed_run_equals_plain_run_on_several_devices(tmp_path, uninterrupted):
    res = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=tmp_path, mesh="auto", **KW)
    assert resume.last_run["computed"] == resume.last_run["groups"] > 1
    assert res.per_prompt.tobytes() == uninterrupted.per_prompt.tobytes()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=d, mesh=None, **KW)
    return d


def _refused(d, match, m=model, c=clean, k=corrupt, **changes):
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    with pytest.raises(resume.SweepCheckpointError, match=match) as e:
        jaxpatch.activation_patch(m, c, k, checkpoint_dir=d, mesh=None, **{**KW, **changes})
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == before  # nothing written or mixed
    assert "never mixed" in str(e.value)
    return str(e.value)


def test_changed_model_is_refused(written):
    other = jaxpatch.HookedModel.from_config(model.config, seed=1)
    msg = _refused(written, "the model", m=other)
    assert "the prompts (" not in msg and "the sweep spec" not in msg


def test_one_changed_weight_bit_is_refused(written):
    import jax

    params = jax.tree.map(lambda x: x, model.params)
    w = np.array(params["W_U"])
    w.view(np.uint32)[0, 0] ^= 1  # flip the lowest mantissa bit of one weight
    params["W_U"] = jax.numpy.asarray(w)
    _refused(written, "the model", m=jaxpatch.HookedModel(model.config, params))


def test_changed_prompts_are_refused(written):
    k = corrupt.copy()
    k[0, 0] = (k[0, 0] + 1) % 50
    msg = _refused(written, "the prompts", k=k)
    assert "the model" not in msg


def test_changed_spec_is_refused(written):
    _refused(written, "the sweep spec", site="attn_out")
    _refused(written, "the sweep spec", by=("layer",))


def test_changed_metrics_and_options_are_refused(written):
    _refused(written, "the metrics", metrics=("logit_diff",))
    _refused(written, "the metrics", answer=(clean[:, -1] + 1) % 50)
    _refused(written, "the options", direction="noise")
    msg = _refused(written, "the options", baseline="noise", noise_positions=[1, 2])
    assert "the prompts (" not in msg


def test_changed_chunking_is_refused_with_the_values_to_pass(written):
    msg = _refused(written, "the chunking", chunk_size=2)
    assert "chunk_size=1" in msg


def test_user_metric_constants_are_part_of_the_fingerprint(tmp_path):
    target = np.zeros(50, np.float32)

    def score(logits):
        import jax.numpy as jnp

        return logits @ jnp.asarray(target)

    kw = {**KW, "metrics": (score,)}
    jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=tmp_path, mesh=None, **kw)
    target[3] = 1.0  # same code, a different closed-over array
    with pytest.raises(resume.SweepCheckpointError, match="the metrics"):
        jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=tmp_path, mesh=None, **kw)


def test_foreign_group_file_is_refused(written, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(written, d)
    first = sorted(d.glob("chunks_*.npz"))[0]
    with np.load(first) as z:
        arrays = dict(z)
    arrays["digest"] = np.asarray("0" * 40)
    np.savez(first, **arrays)
    with pytest.raises(resume.SweepCheckpointError, match="belongs to another sweep"):
        jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=d, mesh=None, **KW)


def test_cli_resume(tmp_path, capsys):
    from jaxpatch.cli import main

    out = str(tmp_path / "res")
    argv = ["sweep", "default", "--clean", "<bos> cat dog sun red cat dog sun", "--corrupt",
            "<bos> pen box hot red cat dog sun", "--answer", "red", "--wrong", "pen", "--out", out]
    assert main(argv + ["--resume"]) == 0
    first = capsys.readouterr().out
    assert "0 of" in first and Path(out + ".checkpoint", "manifest.json").is_file()
    assert main(argv + ["--resume"]) == 0
    second = capsys.readouterr().out
    groups = resume.last_run["groups"]
    assert f"{groups} of {groups} chunk groups loaded, 0 computed" in second
    # without --resume an existing checkpoint is not silently reused
    assert main(argv + ["--checkpoint-dir", out + ".checkpoint"]) == 2
    assert "--resume" in capsys.readouterr().err
    # a different sweep into the same checkpoint is refused
    assert main(argv + ["--resume", "--site", "attn_out"]) == 2
    assert "different sweep" in capsys.readouterr().err
