"""Every example runs top to bottom (they are documentation; they must not rot)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["quickstart.py", "induction_circuit.py", "causal_tracing.py", "transformer_lens_migration.py"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={"JAXPATCH_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
