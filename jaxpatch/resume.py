"""Resumable sweeps: each completed group of chunks on disk, a manifest that refuses any other sweep.

``activation_patch(..., checkpoint_dir=DIR)`` runs the sweep's chunks as a few equal dispatch
groups (as the progress bar does, :func:`jaxpatch.sweep._run_with_bar`) and writes each finished
group to ``DIR/chunks_<first>_<end>.npz`` (metric values and finiteness flags of chunks
``first..end-1``, in the plan's execution order). Run again with the same arguments, after a crash
or a ``kill -9``, it loads the groups on disk and computes only the missing ones; since each chunk
is computed by the same compiled program from the same data, the result is bitwise identical to an
uninterrupted run.

``DIR/manifest.json`` holds fingerprints (BLAKE2b hashes) of everything the numbers depend on:

* ``model``: the config, dtype and every weight (bytes, shapes, dtypes, tree paths);
* ``prompts``: clean and corrupted tokens, the attention mask, the mean baseline's reference tokens;
* ``spec``: the site and every patch's indices (grid axes and shape);
* ``metrics``: metric names, user metrics' traced programs and constants, answer/wrong tokens and
  answer positions;
* ``options``: direction, baseline and the noise baseline's settings;
* ``plan``: the chunking (chunk size, execution order, position buckets);
* ``inputs``: the exact arrays the compiled sweep reads (the patched run's cache, the source
  activations, the metric context), so two runs whose activations differ in one bit never mix;
* ``software``: jaxpatch, jax and jaxlib versions and the device platform/kind.

A directory whose manifest differs is refused with a :class:`SweepCheckpointError` naming what
changed; results are never mixed. Every file is written to a temporary name and renamed, so a kill
at any moment leaves only whole files. The device count may change between runs (a chunk's values
do not depend on which device ran it; see ``tests/test_resume.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ._errors import JaxpatchError

FORMAT = "jaxpatch-sweep-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_GROUP_RE = re.compile(r"^chunks_(\d+)_(\d+)\.npz$")

#: What each fingerprint covers, for error messages.
WHAT = {
    "model": "the model (config, dtype or weights)",
    "prompts": "the prompts (clean/corrupted tokens, attention mask or reference tokens)",
    "spec": "the sweep spec (site, by= axes or patches=)",
    "metrics": "the metrics (names, user metric code or constants, answer/wrong tokens or answer positions)",
    "options": "the options (direction, baseline or noise settings)",
    "plan": "the chunking (chunk_size or position_buckets)",
    "software": "the software or device (jaxpatch/jax/jaxlib version, device platform or kind)",
    "inputs": "the activations the sweep patches (bitwise)",
}

#: ``{"groups": dispatch groups in the plan, "loaded": groups read from disk, "computed": groups
#: computed, "chunks_computed": chunks those groups ran}`` of the last sweep run by
#: :func:`run_groups` (checkpointed, or spanning several processes).
last_run: dict[str, int] = {}


class SweepCheckpointError(JaxpatchError):
    """A ``checkpoint_dir`` that belongs to another sweep, or whose files cannot be read."""


# ---------------------------------------------------------------------------------- hashing
def _host(x) -> np.ndarray:
    """A jax or numpy array as numpy; a global array spread over processes via its local copy
    (every input the engine fingerprints is replicated)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise SweepCheckpointError("cannot fingerprint an array sharded across processes; only replicated inputs are supported")
        x = x.addressable_data(0)
    return np.asarray(x)


def _feed(h, obj) -> None:
    from .user_metric import TracedMetric

    if obj is None or isinstance(obj, (bool, int, float, str, np.integer, np.floating)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, TracedMetric):
        _feed(h, ("TracedMetric", obj.name, repr(obj.key)))
    elif isinstance(obj, jax.Array) and not obj.is_fully_addressable and not obj.is_fully_replicated:
        from .multihost import global_digest  # weights sharded across processes: no process holds them whole

        h.update(b"global:" + global_digest(obj))
    elif isinstance(obj, (np.ndarray, jax.Array, np.generic)):
        arr = _host(obj)
        h.update(f"array:{arr.dtype.str}:{arr.shape};".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[".encode())
        for x in obj:
            _feed(h, x)
        h.update(b"]")
    else:  # a registered pytree (Interventions, Edit...): its structure and leaves; else a dataclass
        leaves, treedef = jax.tree_util.tree_flatten(obj)
        if len(leaves) == 1 and leaves[0] is obj:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                _feed(h, (type(obj).__name__, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}))
                return
            raise TypeError(f"jaxpatch.resume cannot fingerprint a {type(obj).__name__}")
        _feed(h, str(treedef))
        _feed(h, leaves)


def fingerprint(*parts) -> str:
    """A BLAKE2b hex digest of nested tuples/dicts of arrays, numbers, strings and pytrees: equal
    exactly when every array is bitwise equal (same dtype and shape) and everything else equal."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def software() -> str:
    import jaxlib

    from . import __version__

    dev = jax.devices()[0]
    return f"jaxpatch {__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, {dev.platform} {dev.device_kind}"


# ---------------------------------------------------------------------------------- the dir
class Checkpoint:
    """One sweep's checkpoint directory.

    Args:
        directory: where the manifest and group files live (created if missing).
        fingerprints: what the caller knows about the sweep (``model``, ``prompts``, ``spec``,
            ``metrics``, ``options``; see the module docstring), name -> digest.
        describe: human-readable facts stored in the manifest (site, grid, metrics...).
    """

    def __init__(self, directory, fingerprints: Mapping[str, str], describe: Mapping[str, Any] | None = None):
        self.dir = Path(directory)
        self.fingerprints = dict(fingerprints)
        self.describe = dict(describe or {})
        self.writer = True  # False on processes other than 0 of a multi-process run
        self.digest: str | None = None

    def open(self, extra: Mapping[str, str]) -> None:
        """Add the engine's fingerprints (``plan``, ``inputs``, ``software``) and check them
        against the manifest on disk, or write one. Raises :class:`SweepCheckpointError` when
        the directory belongs to another sweep."""
        fps = {**self.fingerprints, **extra}
        self.digest = fingerprint(fps)
        path = self.dir / MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
                assert old.get("format") == FORMAT
            except (ValueError, AssertionError, OSError) as e:
                raise SweepCheckpointError(f"checkpoint_dir {str(self.dir)!r} has a {MANIFEST} that is not a jaxpatch sweep "
                                           f"checkpoint ({type(e).__name__}); use another checkpoint_dir.") from None
            if old.get("format_version") != FORMAT_VERSION:
                raise SweepCheckpointError(f"checkpoint_dir {str(self.dir)!r} was written in checkpoint format "
                                           f"{old.get('format_version')}; this jaxpatch reads format {FORMAT_VERSION}. "
                                           "Use a new checkpoint_dir (or delete this one to start over).")
            theirs = old.get("fingerprints", {})
            changed = [k for k in WHAT if theirs.get(k) != fps.get(k)]
            if len(changed) > 1 and "inputs" in changed:  # a consequence of what else changed
                changed.remove("inputs")
            if changed:
                said = old.get("describe", {})
                hint = ""
                if changed == ["plan"] and "chunk_size" in said:
                    hint = (f" It was chunked with chunk_size={said['chunk_size']} and position_buckets="
                            f"{said.get('position_buckets')}; pass those to resume it.")
                elif changed == ["inputs"]:
                    hint = (" Model, prompts, spec and options are the same, so the activations were computed "
                            "differently (another device type, XLA build or flags); resume where it was started.")
                raise SweepCheckpointError(
                    f"checkpoint_dir {str(self.dir)!r} holds a different sweep: "
                    + "; ".join(WHAT[k] for k in changed) + " changed since it was written"
                    + f" (it was: {_brief(said)}).{hint} Results of different sweeps are never mixed: use a new "
                    "checkpoint_dir, or delete this one to start over.")
            return
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "software": software(),
                        "fingerprints": fps, "digest": self.digest, "describe": self.describe}
            _atomic_write(path, json.dumps(manifest, indent=1, default=str).encode())

    def load(self, n_real: int, chunk: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Chunk id -> ``(values [chunk, ...], finite [chunk])`` for every chunk on disk."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if not self.dir.is_dir():
            return out
        for f in sorted(self.dir.iterdir()):
            m = _GROUP_RE.match(f.name)
            if not m:
                continue
            a, b = int(m.group(1)), int(m.group(2))
            try:
                with np.load(f, allow_pickle=False) as z:
                    digest, vals, finite = str(z["digest"]), z["values"], z["finite"]
            except (OSError, ValueError, KeyError) as e:
                raise SweepCheckpointError(f"checkpoint file {str(f)!r} cannot be read ({e}); delete it to recompute "
                                           "its chunks.") from None
            if digest != self.digest:
                raise SweepCheckpointError(f"checkpoint file {str(f)!r} belongs to another sweep than {MANIFEST} "
                                           "describes; delete the directory to start over.")
            if not (0 <= a < b <= n_real) or vals.shape[:2] != (b - a, chunk) or finite.shape != (b - a, chunk):
                raise SweepCheckpointError(f"checkpoint file {str(f)!r} holds arrays of shape {vals.shape} for chunks "
                                           f"{a}..{b - 1}, which this sweep's plan ({n_real} chunks of {chunk}) does not "
                                           "have; delete the directory to start over.")
            for c in range(a, b):
                out.setdefault(c, (vals[c - a], finite[c - a]))
        return out

    def save(self, first: int, vals: np.ndarray, finite: np.ndarray) -> Path:
        """Write chunks ``first .. first + len(vals) - 1`` (atomically)."""
        path = self.dir / f"chunks_{first:06d}_{first + len(vals):06d}.npz"
        if self.writer:
            tmp = self.dir / f".tmp-{os.getpid()}-{path.name}"
            with open(tmp, "wb") as fh:
                np.savez(fh, digest=np.asarray(self.digest), values=vals, finite=finite)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return path


def _brief(d: Mapping[str, Any]) -> str:
    keys = ("site", "grid_axes", "grid_shape", "n_patches", "metrics", "direction", "baseline", "prompts")
    return ", ".join(f"{k}={d[k]}" for k in keys if k in d) or "no description"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- the runner
def run_groups(core: Callable, idx: Mapping[str, np.ndarray], chunk_start: np.ndarray, chunk_bucket: np.ndarray, *,
               n_real: int, n_layers: int, n_dev: int, checkpoint: Checkpoint | None = None,
               put: Callable | None = None, fetch: Callable | None = None, show_bar: bool = False, desc: str = "sweep"):
    """Run ``core(idx, chunk_start, chunk_bucket)`` over a plan's chunks as a few equal dispatch
    groups (:func:`jaxpatch.sweep._progress_groups`), skipping groups whose chunks a checkpoint
    already holds and saving each computed group; returns numpy ``(values [n_chunks, chunk, ...],
    finite [n_chunks, chunk])``, equal to one ``core`` call on every chunk.

    ``put(array, sharded: bool)`` places a group's inputs (sharded along chunks or replicated),
    ``fetch(out)`` brings a group's outputs to this host as numpy (in a multi-process run: from
    every process, to every process or to process 0 only as :func:`jaxpatch.multihost.gather_mode`
    says; see :mod:`jaxpatch.multihost`). Under ``gather="process0"`` the other processes hold
    zeros for the values and, as ``finite``, whether each patch's logits and values were finite.
    Only chunks ``< n_real`` are real; later ones pad the chunk count to a multiple of the device
    count and run no layer. The bar (counted in
    chunks) is drawn where ``show_bar``; every process runs the same dispatches.
    """
    from . import sweep as _sweep

    put = put or (lambda a, sharded: jax.numpy.asarray(a))
    fetch = fetch or (lambda o: jax.tree.map(np.asarray, o))
    n_chunks = len(chunk_start)
    groups, per, pad, idx, chunk_start, chunk_bucket = _sweep.pad_groups(idx, chunk_start, chunk_bucket, n_layers, n_dev)

    def args(g):
        sl = slice(g * per, (g + 1) * per)
        return ({k: put(v[sl], True) for k, v in idx.items()}, put(chunk_start[sl], True), put(chunk_bucket[sl], True))

    shapes = jax.eval_shape(core, *jax.tree.map(lambda a: jax.ShapeDtypeStruct(a[:per].shape, a.dtype),
                                                (idx, chunk_start, chunk_bucket)))
    vals = np.zeros((groups * per,) + shapes[0].shape[1:], shapes[0].dtype)
    finite = np.zeros((groups * per,) + shapes[1].shape[1:], shapes[1].dtype)
    have = checkpoint.load(n_real, vals.shape[1]) if checkpoint is not None else {}
    done = np.zeros(groups * per, bool)
    for c, (v, f) in have.items():
        vals[c], finite[c], done[c] = v, f, True
    done[n_real:] = True
    if checkpoint is not None and jax.process_count() > 1:  # every process runs the groups process 0 lacks
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    todo = [g for g in range(groups) if not done[g * per:(g + 1) * per].all()]

    from tqdm import tqdm

    bar = tqdm(total=n_real, initial=int(done[:n_real].sum()), desc=desc, unit="chunk", leave=False,
               dynamic_ncols=True, disable=not show_bar)
    try:
        outs = [(g, core(*args(g))) for g in todo]  # every group dispatched before the first is waited on
        for g, o in outs:  # one host sync per group, in order
            v, f = fetch(o)
            sl = slice(g * per, (g + 1) * per)
            vals[sl], finite[sl] = v, f
            hi = min((g + 1) * per, n_real)
            if checkpoint is not None:
                checkpoint.save(g * per, v[: hi - g * per], f[: hi - g * per])
            bar.update(max(0, hi - g * per) - int(done[g * per:hi].sum()))
    finally:
        bar.close()
    if checkpoint is not None and jax.process_count() > 1:  # chunks loaded on process 0 reach every process
        from jax.experimental import multihost_utils

        from . import multihost as _multihost

        if _multihost.gather_mode() == "process0":  # the values stay on process 0; the others get the NaN flags
            ok = finite & np.all(np.isfinite(vals), axis=tuple(range(finite.ndim, vals.ndim)))
            ok = np.asarray(multihost_utils.broadcast_one_to_all(ok))
            if jax.process_index() != 0:
                vals, finite = np.zeros_like(vals), ok
        else:
            vals, finite = (np.asarray(x) for x in multihost_utils.broadcast_one_to_all((vals, finite)))
    last_run.clear()
    last_run.update(groups=groups, loaded=groups - len(todo), computed=len(todo),
                    chunks_computed=sum(min(per, max(0, n_real - g * per)) for g in todo))
    return vals[:n_chunks], finite[:n_chunks]


def for_activation_patch(directory, model, spec, *, names, static_names, metric_consts, prompts, answers, options) -> Checkpoint:
    """The :class:`Checkpoint` of one :func:`jaxpatch.activation_patch` call: fingerprints of its
    model, prompts, spec, metrics and options (see the module docstring)."""
    from . import metrics as _metrics

    def arr(x):
        return None if x is None else np.asarray(x)

    clean, corrupt, mask, reference = prompts
    fps = {
        "model": fingerprint(model.config, str(np.dtype(model.dtype)), model.params),
        "prompts": fingerprint(arr(clean), arr(corrupt), arr(mask), arr(reference)),
        "spec": fingerprint(spec.site, dict(spec.index), spec.grid_axes, spec.grid_shape),
        "metrics": fingerprint(tuple(static_names), metric_consts, *answers),
        "options": fingerprint(options[0], options[1], arr(options[2]), options[3], options[4], options[5]),
    }
    describe = {"site": spec.site, "grid_axes": list(spec.grid_axes), "grid_shape": list(spec.grid_shape),
                "n_patches": spec.size, "metrics": [_metrics.name_of(n) for n in names], "direction": options[0],
                "baseline": options[1], "prompts": list(np.shape(clean))}
    return Checkpoint(directory, fps, describe)
