"""examples/circuits_induction.py runs top to bottom and finds the previous-token -> induction-key
path (examples are documentation; they must not rot)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_circuits_example_runs(tmp_path):
    env = {**os.environ, "JAXPATCH_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "circuits_induction.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strongest path: L0H0 -> L1H1.k" in proc.stdout and "AUC" not in proc.stderr
    assert (tmp_path / "pareto.png").is_file()
