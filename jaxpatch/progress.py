"""Optional progress bars.

A sweep with a bar runs its chunks as a few equal dispatches of one compiled program and advances
the bar (counted in chunks) as each dispatch finishes (:func:`jaxpatch.sweep.run`, ``progress=``);
there is no host callback inside the program, which would keep it out of JAX's persistent
compilation cache (:mod:`jaxpatch.compile_cache`). This module decides when bars are shown, and
:func:`progress` wraps loops over several sweeps (the CLI's ``demo``) in ``tqdm``, only when that
helps a person watching a terminal:

* tqdm is importable (a dependency of jaxpatch; a broken install just loses the bars),
* the bar is not disabled: neither ``progress=False`` nor the environment variable
  ``JAXPATCH_NO_PROGRESS`` set to anything but ``""``/``"0"``,
* and standard error is a terminal (``progress=True`` skips this check, e.g. in a notebook).

Otherwise the iterable is returned unchanged, so logs and CI output stay clean.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

ENV_DISABLE = "JAXPATCH_NO_PROGRESS"


def enabled(progress: bool | None = None) -> bool:
    """Whether :func:`progress` would draw a bar (see the module docstring for the rules)."""
    if progress is False or os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    if progress is True:
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[T], *, desc: str | None = None, total: int | None = None,
             progress: bool | None = None, **tqdm_kwargs) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when :func:`enabled`, else ``iterable`` itself.

    Args:
        iterable: what to iterate over.
        desc: the bar's label.
        total: number of items, when ``len(iterable)`` is not available.
        progress: ``None`` (auto: a bar only on a terminal), ``True`` (force, if tqdm is installed)
            or ``False`` (never). ``JAXPATCH_NO_PROGRESS=1`` disables bars in every case.
        tqdm_kwargs: passed on to ``tqdm`` (e.g. ``unit="sweep"``).
    """
    if not enabled(progress):
        return iterable
    from tqdm import tqdm

    tqdm_kwargs.setdefault("leave", False)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, **tqdm_kwargs)


def describe(bar, text: str) -> None:
    """Set a bar's label (no-op when ``bar`` is a plain iterable because bars are off)."""
    if hasattr(bar, "set_description_str"):
        bar.set_description_str(text)
