"""The memory planner: a sweep's chunk size from the compiled program's own memory analysis.

A sweep's peak memory is set by its chunk size (patches vectorised together): chunks run one
after another under ``lax.map``, so the working set is one chunk's activations plus the program's
arguments (weights, the cached run, the source activations). Given a budget, :func:`choose_chunk`
lowers and compiles the sweep program at a few candidate chunk sizes and reads
``compiled.memory_analysis()`` (XLA's buffer assignment: argument, output, temporary and aliased
bytes per device), instead of guessing from shapes:

* the candidates are the speed-preferred chunk (:func:`jaxpatch.sweep.default_chunk_size`) and
  the powers of two below it; the preferred one is tried first (one compile when it fits), then
  chunk 1 (if even that does not fit, nothing will: a clear error says what to change), then a
  bisection between them: about ``2 + log2(preferred)`` compiles in all;
* each candidate is compiled with one chunk per device; a sweep of many chunks uses the same
  temporaries (the ``lax.map`` body) and an output that grows by the per-chunk output for every
  further chunk, which the estimate adds.

The budget is, per device, ``memory_budget=`` (bytes, or a string such as ``"2GiB"``, ``"512MB"``)
where given, else what the device reports (``device.memory_stats()``: ``bytes_limit -
bytes_in_use``, times :data:`DEVICE_HEADROOM`; arguments already resident on the device are not
counted twice). CPUs report nothing: there the planner runs only with ``memory_budget=``, and
without one the speed heuristic alone sets the chunk. ``chunk_size=`` always overrides.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ._errors import InputError

#: Fraction of a device's free memory the planner lets a sweep use (allocator fragmentation,
#: buffers outside the program).
DEVICE_HEADROOM = 0.9

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: ``{"budget", "chunk", "source", "measured": {chunk: bytes}, "compiles", "compile_s"}`` of the
#: last planned sweep.
last_plan: dict[str, Any] = {}


class MemoryPlanError(InputError):
    """No chunk size fits the memory budget."""


def parse_bytes(value) -> int:
    """``2**30``, ``"2GiB"``, ``"1.5 GB"``, ``"512MiB"`` -> bytes (an int > 0)."""
    if isinstance(value, bool):
        raise InputError(f"memory_budget must be bytes (an int) or a size such as '2GiB' or '512MB'; got {value!r}.")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"memory_budget {value!r} is not a size: give bytes (an int) or a number with a unit "
                             f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GiB'.")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise InputError(f"memory_budget must be bytes (an int) or a size such as '2GiB'; got {type(value).__name__}.")
    if n <= 0:
        raise InputError(f"memory_budget must be positive; got {value!r}.")
    return n


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes of a sweep program at one chunk size (from ``memory_analysis()``)."""

    chunk: int
    argument: int
    output: int
    temp: int
    alias: int
    resident: int = 0  # argument bytes already on the device (not counted against a device budget)

    @property
    def total(self) -> int:
        """Bytes the program needs on a device: arguments + outputs + temporaries - aliased."""
        return self.argument + self.output + self.temp - self.alias

    def need(self) -> int:
        """Bytes beyond what is already resident on the device."""
        return self.total - self.resident


def estimate(compiled, chunk: int, n_chunks_per_device: int = 1, resident: int = 0) -> Estimate:
    """An :class:`Estimate` from a program compiled with one chunk per device, scaled to
    ``n_chunks_per_device`` chunks (the output grows per chunk; the ``lax.map`` body's temporaries
    do not)."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise InputError("This backend's compiled programs report no memory analysis; pass chunk_size= instead.")
    return Estimate(chunk, int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes) * max(1, n_chunks_per_device),
                    int(ma.temp_size_in_bytes), int(ma.alias_size_in_bytes), resident)


def device_budget(devices: Sequence) -> int | None:
    """The smallest free memory (``bytes_limit - bytes_in_use``) over ``devices`` times
    :data:`DEVICE_HEADROOM`, or ``None`` when a device does not report its memory (CPUs)."""
    free = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (backends without the API)
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return int(min(free) * DEVICE_HEADROOM) if free else None


def resident_bytes(tree, device) -> int:
    """Bytes of ``tree``'s jax arrays that already hold a shard on ``device``."""
    n = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            n += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return n


def candidates(preferred: int) -> list[int]:
    """Powers of two below ``preferred``, then ``preferred``: ``[1, 2, 4, ..., preferred]``."""
    out = [1 << i for i in range(max(0, int(preferred).bit_length())) if (1 << i) < preferred]
    return out + [int(preferred)]


def choose_chunk(measure: Callable[[int], Estimate], preferred: int, budget: int, *, source: str,
                 what: str = "this sweep") -> int:
    """The largest candidate chunk size (:func:`candidates` of ``preferred``) whose program needs
    at most ``budget`` bytes per device, by bisection (memory grows with the chunk).

    Raises:
        MemoryPlanError: when even chunk size 1 does not fit (the message gives the breakdown
            and what to change).
    """
    cands = candidates(preferred)
    measured: dict[int, Estimate] = {}
    t0 = time.perf_counter()

    def fits(i: int) -> bool:
        c = cands[i]
        if c not in measured:
            measured[c] = measure(c)
        return measured[c].need() <= budget

    def record(chunk):
        last_plan.clear()
        last_plan.update(budget=budget, chunk=chunk, source=source, measured={c: e.need() for c, e in sorted(measured.items())},
                         estimates=dict(sorted(measured.items())), compiles=len(measured),
                         compile_s=time.perf_counter() - t0)

    if fits(len(cands) - 1):
        record(cands[-1])
        return cands[-1]
    if not fits(0):
        record(None)
        e = measured[1]
        raise MemoryPlanError(
            f"{what} does not fit the memory budget even one patch at a time: chunk_size=1 needs {fmt_bytes(e.need())} per "
            f"device (arguments {fmt_bytes(e.argument - e.resident)}{' beyond those already on the device' if e.resident else ''}"
            f": model weights, the cached run and source activations; temporaries {fmt_bytes(e.temp)}; outputs "
            f"{fmt_bytes(e.output)}), "
            f"and the budget ({source}) is {fmt_bytes(budget)}. To fit: patch fewer prompts per call (a smaller batch), "
            f"shorter prompts, position_buckets=1 (fewer compiled branches), a smaller dtype (dtype='bfloat16' when "
            f"loading), or a larger memory_budget= if the device really has more free memory.")
    lo, hi = 0, len(cands) - 1  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    record(cands[lo])
    return cands[lo]
