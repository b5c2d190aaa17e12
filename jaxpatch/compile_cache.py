"""JAX's persistent compilation cache, on by default for jaxpatch.

Compiling dominates small runs: ``jaxpatch demo`` spends most of its time in XLA, compiling the
same programs every time it starts. :func:`setup`, called when ``jaxpatch`` is imported, points
JAX's persistent compilation cache at a jaxpatch directory so a second process loads the compiled
programs from disk instead:

* the directory is ``$JAXPATCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/jaxpatch/xla/<env>``,
  else ``~/.cache/jaxpatch/xla/<env>``, where ``<env>`` separates jax versions and ``XLA_FLAGS``
  settings (see :func:`environment_tag`);
* ``JAXPATCH_NO_COMPILE_CACHE=1`` (anything but ``""``/``"0"``) turns it off;
* a cache the user configured for JAX (``JAX_COMPILATION_CACHE_DIR``,
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before ``import jaxpatch``, or
  ``JAX_ENABLE_COMPILATION_CACHE=false``) is left exactly as it is, thresholds included;
* otherwise JAX's thresholds are lowered so that jaxpatch's programs, most of which compile in
  well under JAX's default 1 s minimum, are written too (unless set through their ``JAX_*``
  environment variables);
* a directory that cannot be created or written is reported by one warning, and jaxpatch runs
  on without the cache.

:data:`state` says what happened (``state["dir"]`` is the directory in use, or ``None``).

The cache is trusted code: like any JAX compilation cache it must not be writable by others.
Delete the directory to clear it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

ENV_DIR = "JAXPATCH_CACHE_DIR"
ENV_DISABLE = "JAXPATCH_NO_COMPILE_CACHE"

#: Thresholds set when jaxpatch owns the cache: write every program, whatever its compile time or
#: size (entries are small: tens to hundreds of kB each).
MIN_COMPILE_TIME_SECS = 0.0
MIN_ENTRY_SIZE_BYTES = -1  # -1: no size restriction

#: What :func:`setup` did: ``dir`` (the cache directory in use, ``None`` if none) and ``reason``:
#: ``"jaxpatch"`` (jaxpatch's directory), ``"user"`` (a cache the user configured for JAX),
#: ``"disabled"`` (``JAXPATCH_NO_COMPILE_CACHE`` or ``JAX_ENABLE_COMPILATION_CACHE=false``),
#: ``"unwritable"`` (the directory could not be used; see the warning) or ``"not set up"``.
state: dict = {"dir": None, "reason": "not set up"}
_warned = False


class CompileCacheWarning(UserWarning):
    """The persistent compilation cache could not be enabled."""


def environment_tag() -> str:
    """A subdirectory name for the programs of one environment: the jax/jaxlib versions, the
    machine, and ``XLA_FLAGS``. JAX leaves some flags out of its cache keys (the simulated CPU
    device count among them), and an executable loaded into a process set up differently from
    the one that compiled it can crash that process (seen: a segmentation fault while
    deserialising), so processes set up differently never share entries."""
    import hashlib
    import platform

    import jax
    import jaxlib

    raw = "|".join([jax.__version__, jaxlib.__version__, platform.machine(), os.environ.get("XLA_FLAGS", "")])
    return f"jax{jax.__version__}-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"


def default_dir() -> Path:
    """``$JAXPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxpatch/xla/<env>``, else
    ``~/.cache/jaxpatch/xla/<env>`` (``<env>``: :func:`environment_tag`)."""
    explicit = os.environ.get(ENV_DIR, "")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxpatch" / "xla" / environment_tag()


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip() not in ("", "0")


def _writable(path: Path) -> None:
    """Create ``path`` and prove a file can be written there (raises ``OSError`` otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".jaxpatch-probe-", dir=path)
    os.close(fd)
    os.unlink(probe)


def setup() -> Path | None:
    """Enable JAX's persistent compilation cache in jaxpatch's directory (see the module
    docstring). Returns the directory in use (the user's own, if they configured one), or
    ``None``. Never raises: a failure is one :class:`CompileCacheWarning`."""
    try:
        return _setup()
    except Exception as e:  # noqa: BLE001  (the cache is an optimisation: never break the import)
        state.update(dir=None, reason="unwritable")
        _warn(f"jaxpatch: compilation cache disabled ({type(e).__name__}: {e}); running without it.")
        return None


def _warn(message: str) -> None:
    global _warned
    if not _warned:  # once per process
        _warned = True
        warnings.warn(message, CompileCacheWarning, stacklevel=4)


def _setup() -> Path | None:
    import jax

    user_dir = jax.config.jax_compilation_cache_dir
    if user_dir:  # the user's own cache: touch nothing
        state.update(dir=Path(user_dir), reason="user")
        return state["dir"]
    if _disabled() or not jax.config.jax_enable_compilation_cache:
        state.update(dir=None, reason="disabled")
        return None
    path = default_dir()
    try:
        _writable(path)
    except OSError as e:
        state.update(dir=None, reason="unwritable")
        _warn(f"jaxpatch: cannot use {str(path)!r} for the compilation cache ({e.strerror or e}); running without "
              f"it. Set {ENV_DIR} to a writable directory, or {ENV_DISABLE}=1 to silence this.")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    _forget_earlier_check()
    state.update(dir=path, reason="jaxpatch")
    return path


def _forget_earlier_check() -> None:
    """If JAX already compiled something in this process before jaxpatch was imported, it has
    decided (once per process) that no cache is in use; make it look again."""
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover  (private module moved)
        return
    if getattr(cc, "_cache_checked", False) and not getattr(cc, "_cache_used", True):
        cc.reset_cache()
