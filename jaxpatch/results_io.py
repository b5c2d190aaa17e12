"""Save and load :class:`~jaxpatch.PatchResult` s.

:func:`save_result` writes two files next to each other:

* ``<prefix>.npz`` — the complete result, and what :func:`load_result` reads back: the arrays
  ``per_prompt``, ``clean`` and ``corrupt`` (when there is a corrupted run) plus ``metadata``, a
  JSON string with ``site``, ``direction``, ``baseline``, ``metrics``, ``axes``, ``labels`` and
  ``info``. It loads with plain NumPy (``allow_pickle=False``), so it is safe to share.
* ``<prefix>.parquet`` (when pyarrow is importable, else ``<prefix>.csv``) — the tidy table of
  :meth:`PatchResult.to_dataframe`: one row per patch, for pandas, R, spreadsheets. Skipped when
  pandas is not installed.

Example::

    from jaxpatch.results_io import load_result, save_result

    res = jaxpatch.activation_patch(model, clean, corrupt, answer=a, wrong=w)
    save_result(res, "out/resid_denoise")              # out/resid_denoise.npz + .parquet
    res2 = load_result("out/resid_denoise")            # results_equal(res, res2)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InputError
from .results import PatchResult

#: Version of the ``.npz`` layout, stored in the metadata.
FORMAT_VERSION = 1
_TABLE_SUFFIXES = (".npz", ".parquet", ".csv")


def _jsonable(x: Any):
    """``json.dumps`` default: NumPy scalars and arrays, tuples, paths."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return repr(x)  # last resort: keep something readable rather than fail the save


def _prefix(path) -> Path:
    p = Path(os.fspath(path))
    if p.suffix in _TABLE_SUFFIXES:
        p = p.with_suffix("")
    return p


def save_result(result: PatchResult, path_prefix, table: bool = True) -> dict[str, Path]:
    """Write ``result`` to ``<path_prefix>.npz`` and a tidy table ``<path_prefix>.parquet``/``.csv``.

    Args:
        result: a :class:`~jaxpatch.PatchResult` (exact or attribution).
        path_prefix: file path without extension (a trailing ``.npz``, ``.parquet`` or ``.csv`` is
            dropped). Missing parent folders are created.
        table: also write the tidy table (needs pandas; parquet needs pyarrow).

    Returns:
        ``{"npz": path, "table": path}`` (``"table"`` absent when not written).
    """
    if not isinstance(result, PatchResult):
        raise InputError(f"save_result expects a PatchResult, got {type(result).__name__}.")
    prefix = _prefix(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "jaxpatch.PatchResult",
        "version": FORMAT_VERSION,
        "site": result.site,
        "direction": result.direction,
        "baseline": result.baseline,
        "metrics": list(result.metrics),
        "axes": list(result.axes),
        "labels": {k: [str(s) for s in v] for k, v in result.labels.items()},
        "info": result.info,
    }
    arrays = {
        "per_prompt": np.asarray(result.per_prompt),
        "clean": np.asarray(result.clean),
        "metadata": np.asarray(json.dumps(meta, default=_jsonable)),
    }
    if result.corrupt is not None:
        arrays["corrupt"] = np.asarray(result.corrupt)
    written = {"npz": prefix.with_name(prefix.name + ".npz")}
    np.savez_compressed(written["npz"], **arrays)
    if table:
        try:
            import pandas  # noqa: F401
        except ImportError:
            return written
        df = result.to_dataframe()
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            written["table"] = prefix.with_name(prefix.name + ".csv")
            df.to_csv(written["table"], index=False)
        else:
            written["table"] = prefix.with_name(prefix.name + ".parquet")
            df.attrs = {}  # pandas would otherwise store attrs as parquet metadata; the npz has them
            df.to_parquet(written["table"], index=False)
    return written


def load_result(path) -> PatchResult:
    """Read a result written by :func:`save_result`.

    Args:
        path: the prefix given to :func:`save_result`, or the ``.npz`` path (a ``.parquet``/``.csv``
            path is accepted too: its ``.npz`` sibling is read).

    Raises:
        InputError: no such file, or not a jaxpatch result file.
    """
    prefix = _prefix(path)
    npz = prefix.with_name(prefix.name + ".npz")
    if not npz.is_file():
        raise InputError(f"No saved result at {str(npz)!r} (save_result writes <prefix>.npz).")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["metadata"]))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{str(npz)!r} is not a jaxpatch result file: {e}") from None
    if meta.get("format") != "jaxpatch.PatchResult":
        raise InputError(f"{str(npz)!r} is not a jaxpatch result file (no jaxpatch metadata).")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{str(npz)!r} was written by a newer jaxpatch (format {meta['version']}); upgrade jaxpatch.")
    return PatchResult(
        site=meta["site"],
        direction=meta["direction"],
        baseline=meta["baseline"],
        metrics=tuple(meta["metrics"]),
        axes=tuple(meta["axes"]),
        labels={k: list(v) for k, v in meta["labels"].items()},
        per_prompt=arrays["per_prompt"],
        clean=arrays["clean"],
        corrupt=arrays.get("corrupt"),
        info=meta.get("info", {}),
    )


def results_equal(a: PatchResult, b: PatchResult) -> bool:
    """Field-by-field equality of two results (arrays compared exactly, NaNs equal)."""
    if (a.site, a.direction, a.baseline, tuple(a.metrics), tuple(a.axes)) != (
        b.site, b.direction, b.baseline, tuple(b.metrics), tuple(b.axes)
    ):
        return False
    if {k: list(v) for k, v in a.labels.items()} != {k: list(v) for k, v in b.labels.items()}:
        return False
    if (a.corrupt is None) != (b.corrupt is None):
        return False
    arrs = [(a.per_prompt, b.per_prompt), (a.clean, b.clean)]
    if a.corrupt is not None:
        arrs.append((a.corrupt, b.corrupt))
    for x, y in arrs:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
            return False
    return json.loads(json.dumps(a.info, default=_jsonable)) == json.loads(json.dumps(b.info, default=_jsonable))
