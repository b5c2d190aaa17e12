"""The persistent compilation cache jaxpatch enables on import (jaxpatch/compile_cache.py).

Every test runs Python in a subprocess with its own environment, so neither the test process's
JAX configuration nor the user's real ``~/.cache`` is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Variables of the test process that must not leak into the subprocesses.
_SCRUB = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAXPATCH_CACHE_DIR", "JAXPATCH_NO_COMPILE_CACHE", "XLA_FLAGS")

_REPORT = """
import json, jax, jaxpatch
from jaxpatch import compile_cache
print(json.dumps({"jax_dir": jax.config.jax_compilation_cache_dir,
                  "state_dir": None if compile_cache.state["dir"] is None else str(compile_cache.state["dir"]),
                  "reason": compile_cache.state["reason"],
                  "min_time": jax.config.jax_persistent_cache_min_compile_time_secs,
                  "min_size": jax.config.jax_persistent_cache_min_entry_size_bytes,
                  "works": float(jax.numpy.arange(4.0).sum())}))
"""


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    env.update(extra)
    return env


def _python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _report(tmp_path: Path, prelude: str = "", **env: str) -> tuple[dict, str]:
    proc = _python(prelude + _REPORT, _env(tmp_path, **env))
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_default_dir_is_set_and_thresholds_lowered(tmp_path):
    r, _ = _report(tmp_path)
    expected = Path(r["jax_dir"])
    assert expected.parent == tmp_path / "xdg" / "jaxpatch" / "xla" and expected.name.startswith("jax")
    assert r["jax_dir"] == r["state_dir"] and r["reason"] == "jaxpatch"
    assert expected.is_dir()
    assert r["min_time"] == 0.0 and r["min_size"] == -1  # JAX's defaults (1 s) would skip most programs
    assert r["works"] == 6.0


def test_home_fallback_without_xdg(tmp_path):
    env = _env(tmp_path)
    env.pop("XDG_CACHE_HOME")
    r = json.loads(_python(_REPORT, env).stdout.strip().splitlines()[-1])
    assert Path(r["jax_dir"]).parent == tmp_path / "home" / ".cache" / "jaxpatch" / "xla"


def test_jaxpatch_cache_dir_env_overrides(tmp_path):
    r, _ = _report(tmp_path, JAXPATCH_CACHE_DIR=str(tmp_path / "mine"))
    assert r["jax_dir"] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("value", ["1", "yes"])
def test_opt_out_env_var(tmp_path, value):
    r, _ = _report(tmp_path, JAXPATCH_NO_COMPILE_CACHE=value)
    assert r["jax_dir"] is None and r["state_dir"] is None and r["reason"] == "disabled"
    assert r["min_time"] == 1.0  # JAX's own default, untouched
    assert not (tmp_path / "xdg" / "jaxpatch").exists()


def test_zero_does_not_opt_out(tmp_path):
    r, _ = _report(tmp_path, JAXPATCH_NO_COMPILE_CACHE="0")
    assert r["reason"] == "jaxpatch"


def test_user_cache_dir_from_env_is_respected(tmp_path):
    user = str(tmp_path / "user_cache")
    r, _ = _report(tmp_path, JAX_COMPILATION_CACHE_DIR=user, JAXPATCH_CACHE_DIR=str(tmp_path / "not_this"))
    assert r["jax_dir"] == r["state_dir"] == user and r["reason"] == "user"
    assert r["min_time"] == 1.0 and r["min_size"] == 0  # the user's cache: JAX's thresholds untouched
    assert not (tmp_path / "not_this").exists()


def test_user_cache_dir_from_config_is_respected(tmp_path):
    user = str(tmp_path / "user_cache")
    prelude = f"import jax\njax.config.update('jax_compilation_cache_dir', {user!r})\n"
    r, _ = _report(tmp_path, prelude)
    assert r["jax_dir"] == user and r["reason"] == "user" and r["min_time"] == 1.0


def test_jax_cache_disabled_by_user_is_respected(tmp_path):
    r, _ = _report(tmp_path, JAX_ENABLE_COMPILATION_CACHE="false")
    assert r["jax_dir"] is None and r["reason"] == "disabled"


def test_cache_works_when_jax_compiled_before_jaxpatch_was_imported(tmp_path):
    # JAX decides once per process whether a cache is in use, at its first compile; jaxpatch
    # imported afterwards must still get its programs cached.
    code = """
    import jax, jax.numpy as jnp
    jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
    import jaxpatch
    jax.jit(lambda x: jnp.cos(x) + 1)(jnp.ones(3)).block_until_ready()
    """
    _python(code, _env(tmp_path, JAXPATCH_CACHE_DIR=str(tmp_path / "cache")))
    assert "jit__lambda" in [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()]


def test_unwritable_dir_warns_once_and_import_works(tmp_path):
    # A path below a regular file cannot be created, even by root (CI may run as root, which
    # ignores directory permissions).
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import jaxpatch
        from jaxpatch import compile_cache
        compile_cache.setup()  # a second attempt in the same process does not warn again
    msgs = [str(w.message) for w in caught if issubclass(w.category, compile_cache.CompileCacheWarning)]
    assert len(msgs) == 1, msgs
    print(msgs[0])
    """
    proc = _python(textwrap.dedent(code) + _REPORT, _env(tmp_path, JAXPATCH_CACHE_DIR=str(blocker / "xla")))
    lines = proc.stdout.strip().splitlines()
    assert "compilation cache" in lines[0] and "JAXPATCH_CACHE_DIR" in lines[0]
    r = json.loads(lines[-1])
    assert r["jax_dir"] is None and r["reason"] == "unwritable" and r["works"] == 6.0


_SWEEP = """
import json, logging, sys, time
hits, misses = [], []

class Log(logging.Handler):
    def emit(self, rec):
        msg = rec.getMessage()
        if msg.startswith("Persistent compilation cache hit for '"):
            hits.append(msg.split("'")[1])
        elif msg.startswith("PERSISTENT COMPILATION CACHE MISS for '"):
            misses.append(msg.split("'")[1])

log = logging.getLogger("jax._src.compiler")
log.setLevel(logging.DEBUG)
log.addHandler(Log())
import numpy as np
import jaxpatch

cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8)
model = jaxpatch.HookedModel.from_config(cfg, seed=0)
rng = np.random.default_rng(0)
clean, corrupt = rng.integers(1, 20, (2, 3, 6)).astype(np.int32)
t0 = time.perf_counter()
for progress in (False, True):  # the progress-bar program must be cacheable too
    jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", answer=np.array([1, 2, 3]),
                              wrong=np.array([4, 5, 6]), chunk_size=2, mesh=None, progress=progress)
print(json.dumps({"hits": hits, "misses": misses, "seconds": time.perf_counter() - t0}))
"""


@pytest.mark.slow
def test_second_process_loads_every_program_from_the_cache(tmp_path):
    env = _env(tmp_path, JAXPATCH_CACHE_DIR=str(tmp_path / "cache"))
    first = json.loads(_python(_SWEEP, env).stdout.strip().splitlines()[-1])
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # A hit in the first process is a program compiled earlier in the same process.
    assert set(first["hits"]) <= set(first["misses"]) and "jit__core" in first["misses"], first
    assert any(f.startswith("jit__core-") for f in files), files
    # Both _core programs (without and with a progress bar) were written: no host callback in either.
    assert len([f for f in files if f.startswith("jit__core-")]) == 2, files
    second = json.loads(_python(_SWEEP, env).stdout.strip().splitlines()[-1])
    assert second["misses"] == [], second  # nothing compiled again
    assert sorted(second["hits"]) == sorted(first["hits"] + first["misses"]), (first, second)
    assert second["hits"].count("jit__core") == 2
