"""Load and save Hugging Face checkpoint directories (``config.json`` + safetensors), offline only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ._errors import CheckpointError, InputError, NonFiniteError
from .models import convert

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _tensor_entries(path: Path):
    """``(data offset, [(name, dtype, shape, start, end)])`` from a ``.safetensors`` header
    (offsets relative to the data section)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read safetensors file {str(path)!r}: {e}") from None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"Tensor {name!r} in {str(path)!r} has unsupported dtype {info['dtype']}.")
        entries.append((name, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), *info["data_offsets"]))
    return 8 + n, entries


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file as NumPy (memory-mapped; bfloat16 included)."""
    offset, entries = _tensor_entries(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if os.path.getsize(path) > offset else np.zeros(0, np.uint8)
    return {name: np.frombuffer(data[start:end], dtype=dt).reshape(shape) for name, dt, shape, start, end in entries}


class LazyTensor:
    """One safetensors tensor, read from disk (a fresh buffer, not a memory map) only when
    converted with ``np.asarray``; ``shape``, ``dtype`` and ``size`` need no read."""

    __slots__ = ("path", "name", "dtype", "shape", "start", "end")

    def __init__(self, path: Path, name: str, dtype, shape, start: int, end: int):
        self.path, self.name, self.dtype, self.shape, self.start, self.end = path, name, np.dtype(dtype), tuple(shape), start, end

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        buf = np.empty(self.end - self.start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start)
            if f.readinto(memoryview(buf)) != buf.size:
                raise CheckpointError(f"Tensor {self.name!r} is truncated in {str(self.path)!r}.")
        a = buf.view(self.dtype).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)


def index_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a ``.safetensors`` file as a :class:`LazyTensor` (nothing read yet)."""
    offset, entries = _tensor_entries(path)
    return {name: LazyTensor(path, name, dt, shape, offset + start, offset + end) for name, dt, shape, start, end in entries}


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A checkpoint directory from a path, or a hub name found in the local Hugging Face cache.

    Never downloads. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``.
    """
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_name)
    if p.exists():
        raise CheckpointError(f"{name!r} is a file; pass the checkpoint directory that holds config.json.")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or os.path.join(os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    )
    repo_dir = hub / ("models--" + name.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not looks_like_path and snapshots.is_dir():
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snap = snapshots / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = sorted((s for s in snapshots.iterdir() if s.is_dir()), key=lambda s: s.stat().st_mtime)
        if snaps:
            return snaps[-1]
    raise CheckpointError(
        f"No checkpoint directory {name!r}, and no hub model {name!r} in the local Hugging Face cache "
        f"({str(hub)!r}). jaxpatch never downloads: pass a directory with config.json and "
        f"model.safetensors, or fetch the model into the cache on a machine with network access "
        f"(e.g. `huggingface-cli download {name}`)."
    )


def read_checkpoint(directory: Path, lazy: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json dict, tensors)`` of a checkpoint directory (single or sharded safetensors);
    ``lazy``: :class:`LazyTensor` values, read one at a time when converted."""
    read = index_safetensors if lazy else read_safetensors
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"Checkpoint directory {str(directory)!r} has no config.json.")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return hf_config, read(single)
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"Shard {shard!r} listed in {index.name} is missing from {str(directory)!r}.")
            tensors.update(read(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"Tensors listed in {index.name} but absent from the shards: {missing[:20]}.")
        return hf_config, tensors
    present = sorted(f.name for f in directory.iterdir())
    raise CheckpointError(
        f"Checkpoint directory {str(directory)!r} has no model.safetensors or model.safetensors.index.json "
        f"(found: {present}). Only safetensors checkpoints are supported."
    )


_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"Unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
        dtype = _DTYPES[dtype]
    dt = jnp.dtype(dtype)
    if dt not in [jnp.dtype(d) for d in _DTYPES.values()]:
        raise CheckpointError(f"Unsupported dtype {dt}; choose one of {sorted(_DTYPES)}.")
    if dt == jnp.float64:
        import jax

        if not jax.config.jax_enable_x64:
            raise CheckpointError(
                "dtype float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first."
            )
    return dt


def checkpoint_dtype(tensors: dict[str, np.ndarray]):
    """The dtype a checkpoint loads as by default: bfloat16 or float16 when that is the dtype of
    most of its floating-point weights (by element count, so a small float32 buffer such as an old
    checkpoint's ``rotary_emb.inv_freq`` does not count), else float32."""
    counts: dict = {}
    for t in tensors.values():
        if np.issubdtype(t.dtype, np.floating) or t.dtype == ml_dtypes.bfloat16:
            counts[np.dtype(t.dtype)] = counts.get(np.dtype(t.dtype), 0) + t.size
    if not counts:
        return jnp.dtype(jnp.float32)
    dominant = max(counts, key=counts.get)
    if dominant == np.dtype(ml_dtypes.bfloat16):
        return jnp.dtype(jnp.bfloat16)
    if dominant == np.dtype(np.float16):
        return jnp.dtype(jnp.float16)
    return jnp.dtype(jnp.float32)


def load_pretrained(path_or_name, dtype=None, mesh=None):
    """Load a Hugging Face checkpoint as a :class:`jaxpatch.HookedModel`.

    Supported architectures: ``GPT2LMHeadModel``, ``GPTNeoXForCausalLM`` (Pythia),
    ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
    ``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` (text); ``config.json`` as
    written by ``transformers`` 4.x or 5.x.

    Args:
        path_or_name: a directory with ``config.json`` and ``model.safetensors`` (or sharded
            safetensors with ``model.safetensors.index.json``), or a hub name such as ``"gpt2"``
            resolved from the local Hugging Face cache only (never downloaded).
        dtype: ``None`` (default: the checkpoint's dtype if it is bfloat16 or float16, else
            float32; see :func:`checkpoint_dtype`), ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float64"`` (needs
            ``jax_enable_x64``), or the corresponding JAX dtype.
        mesh: a ``("sweep", "model")`` :class:`jax.sharding.Mesh` (or ``("sweep",)``): the
            parameters are sharded on it by :mod:`jaxpatch.partitioning`, streamed one tensor at a
            time from disk to their shards, so the host never holds the whole model (GPT-2
            checkpoints are converted whole, then sharded).

    Raises:
        CheckpointError: missing directory/files/tensors, unexpected tensors, shape mismatches.
        UnsupportedArchitectureError: the config names an architecture, rope type or option
            jaxpatch does not implement.
    """
    from .model import HookedModel

    dt = None if dtype is None else canonical_dtype(dtype)
    directory = resolve_checkpoint(path_or_name)
    hf_config, tensors = read_checkpoint(directory, lazy=mesh is not None)
    config = convert.config_from_hf(hf_config)
    if dt is None:
        dt = checkpoint_dtype(tensors)
    where = f"checkpoint {str(directory)!r}"
    if mesh is None:
        check_finite_tensors(tensors, where)
        params = convert.params_from_hf(config, tensors, dtype=dt)
    else:
        params = _load_sharded(config, tensors, dt, mesh, where)
    check_finite_params(params, dt)
    from .tokenizer import load_tokenizer

    tok_path = directory / "tokenizer.json"
    try:
        tokenizer = load_tokenizer(directory)
    except InputError:  # tokenizer.json without the tokenizers package: token ids still work
        tokenizer = None
    return HookedModel(config, params, name=str(path_or_name), tokenizer_path=tok_path if tok_path.is_file() else None,
                       tokenizer=tokenizer)


def _load_sharded(config, tensors, dtype, mesh, where):
    """Params on ``mesh``, streamed tensor by tensor where the family's converter allows."""
    from . import partitioning
    from .models import hf_common

    placer = partitioning.StreamPlacer(mesh, lambda name, a: check_finite_tensors({name: a}, where))
    if config.architecture == "gpt2":  # GPT-2's converter is not spec-based: convert whole, then shard
        loaded = {k: np.asarray(v) for k, v in tensors.items()}
        check_finite_tensors(loaded, where)
        return partitioning.shard_params(convert.params_from_hf(config, loaded, dtype=dtype), mesh)
    token = hf_common.PLACEMENT.set(placer)
    try:
        return convert.params_from_hf(config, tensors, dtype=dtype)
    finally:
        hf_common.PLACEMENT.reset(token)


def check_finite_tensors(tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise :class:`NonFiniteError` naming every tensor that holds a NaN or inf (a model with one
    would return wrong numbers for every patch, silently)."""
    bad = []
    for name, t in tensors.items():
        if np.issubdtype(t.dtype, np.floating) or t.dtype == ml_dtypes.bfloat16:
            a = np.asarray(t, np.float32) if t.dtype == ml_dtypes.bfloat16 else t
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            if n_nan or n_inf:
                bad.append(f"{name} ({n_nan} NaN, {n_inf} inf of {a.size})")
    if bad:
        raise NonFiniteError(f"The {where} has non-finite weights: {'; '.join(bad[:10])}"
                             f"{f' and {len(bad) - 10} more tensors' if len(bad) > 10 else ''}.")


def check_finite_params(params, dtype) -> None:
    """Weights that were finite can overflow when cast down (float16 tops out at 65504)."""
    bad = [jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_leaves_with_path(params)
           if not bool(jnp.all(jnp.isfinite(a)))]
    if bad:
        raise NonFiniteError(f"Converting the weights to {jnp.dtype(dtype)} made them non-finite (overflow) in "
                             f"{bad[:10]}; load in float32 or bfloat16 instead.")


def save_pretrained(model, directory) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)
    that ``transformers`` loads (``AutoModelForCausalLM.from_pretrained``) as the same model: a
    ``GPT2LMHeadModel``, ``LlamaForCausalLM`` ... as ``model.config.architecture`` says.

    Weights are float32 on disk, except that bfloat16/float16 models keep their dtype (GPT-2: float32).

    Raises:
        CheckpointError: the config sets an option its family's checkpoint format cannot express.
    """
    from safetensors.numpy import save_file

    hf_config = convert.config_to_hf(model.config, model.params)
    tensors = convert.params_to_hf(model.config, model.params)
    first = next(iter(tensors.values()))
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(first.dtype, str(first.dtype))
    hf_config = {**hf_config, "dtype": name, "torch_dtype": name}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
