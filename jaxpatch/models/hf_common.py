"""Shared machinery of the Hugging Face converters (pure NumPy; torch is never imported).

A family describes its checkpoint as a list of :class:`Spec` rows: one Hugging Face tensor, the
shape the config implies for it, the jaxpatch parameter(s) it becomes, and the two reshapes
between them. :func:`load_specs` / :func:`save_specs` do the rest (name checks, shape checks,
layer stacking, dtypes) identically for every family.

Also here: reading the rotary settings of ``config.json`` files written by ``transformers`` 4.x
(``rope_theta``, ``rope_scaling``) and 5.x (``rope_parameters``, flat or per layer type).
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._errors import CheckpointError, JaxpatchError, UnsupportedArchitectureError
from ..config import LAYER_TYPES, ROPE_TYPES, canonical_act_fn

# ----------------------------------------------------------------------------------------------
# config.json


#: Keys that only a mixture-of-experts config sets (any truthy one is rejected).
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "n_shared_experts", "shared_expert_intermediate_size", "moe_layer_freq", "decoder_sparse_step")

#: The ``rope_scaling`` keys each supported rope type reads (others are ignored, as ``transformers`` does).
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def with_defaults(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """``config.json`` over the family's ``transformers`` defaults (a missing key means the default)."""
    return {**defaults, **hf}


def reject_moe(hf: Mapping[str, Any], family: str) -> None:
    for key in MOE_KEYS:
        if hf.get(key):
            raise UnsupportedArchitectureError(
                f"{family} config option {key}={hf[key]!r} (mixture of experts) is not supported; jaxpatch "
                "implements dense MLPs only.")


def reject_truthy(hf: Mapping[str, Any], family: str, keys: Sequence[str]) -> None:
    for key in keys:
        if hf.get(key):
            raise UnsupportedArchitectureError(f"{family} config option {key}={hf[key]!r} is not supported.")


def act_fn(name, family: str, key: str) -> str:
    try:
        return canonical_act_fn(name)
    except JaxpatchError as e:
        raise UnsupportedArchitectureError(f"{family} config option {key}={name!r}: {e}") from None


def required(hf: Mapping[str, Any], key: str, family: str):
    value = hf.get(key)
    if value is None:
        raise CheckpointError(f"config.json lacks the {family} field {key!r}.")
    return value


def rope_settings(rp: Mapping[str, Any] | None, family: str, max_pos: int, where: str = "") -> tuple[str, tuple]:
    """``(rope_type, rope_scaling pairs)`` of one rope-parameters dict (5.x ``rope_parameters`` or
    4.x ``rope_scaling``); raises for rope types the forward pass does not implement."""
    rp = dict(rp or {})
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rtype not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{family} config{where}: rope type {rtype!r} is not supported; supported rope types: {list(ROPE_TYPES)}.")
    if rtype == "default":
        return rtype, ()
    out = {"rope_type": rtype}
    if rtype in ("dynamic", "llama3"):
        # transformers: dynamic NTK always scales from max_position_embeddings; llama3 reads
        # original_max_position_embeddings, defaulting to max_position_embeddings.
        out["original_max_position_embeddings"] = int(max_pos if rtype == "dynamic"
                                                      else rp.get("original_max_position_embeddings") or max_pos)
    for key in ROPE_KEYS[rtype]:
        if key in out:
            continue
        if rp.get(key) is None:
            raise CheckpointError(f"{family} config{where}: rope type {rtype!r} needs {key!r}.")
        out[key] = float(rp[key])
    return rtype, tuple(sorted(out.items()))


def rope_dicts(hf: Mapping[str, Any]) -> tuple[dict | None, dict | None, bool]:
    """The rotary parameters of a config as ``(global, per-layer-type or None, nested)``.

    transformers 5.x writes ``rope_parameters`` (flat, or nested by layer type:
    ``{"full_attention": {...}, "sliding_attention": {...}}``); 4.x writes ``rope_theta`` and
    ``rope_scaling``. As ``transformers`` does, a legacy ``rope_scaling`` wins over ``rope_parameters``.
    """
    rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rp = dict(rp)
    nested = any(k in LAYER_TYPES for k in rp)
    if nested:
        return dict(rp.get("full_attention") or {}), rp.get("sliding_attention"), True
    return rp, None, False


def layer_types_from(hf: Mapping[str, Any], n_layers: int, family: str) -> tuple | None:
    lt = hf.get("layer_types")
    if lt is None:
        return None
    lt = tuple("full_attention" if t == "attention" else t for t in lt)  # transformers' legacy remap
    bad = sorted(set(lt) - set(LAYER_TYPES))
    if bad:
        raise UnsupportedArchitectureError(
            f"{family} config option layer_types has {bad}; supported layer types: {list(LAYER_TYPES)}.")
    if len(lt) != n_layers:
        raise CheckpointError(f"{family} config.json: layer_types has {len(lt)} entries for {n_layers} layers.")
    return lt


def windows(sliding_window, layer_types: tuple | None, family: str) -> dict:
    """ModelConfig ``sliding_window`` / ``layer_types`` from per-layer types (``None``: all full;
    every layer sliding gives ``layer_types=None``, as a config that only sets ``sliding_window``)."""
    if layer_types is None or "sliding_attention" not in layer_types:
        return {"sliding_window": None, "layer_types": None}
    if not sliding_window:
        raise CheckpointError(f"{family} config.json has sliding_attention layers but no sliding_window.")
    if all(t == "sliding_attention" for t in layer_types):  # ModelConfig's canonical "every layer"
        return {"sliding_window": int(sliding_window), "layer_types": None}
    return {"sliding_window": int(sliding_window), "layer_types": tuple(layer_types)}


def rope_to_hf(config, theta: float | None = None, rope_scaling: tuple | None = None) -> tuple[dict, dict | None]:
    """``(rope_parameters, legacy rope_scaling or None)`` for ``config.json``; dynamic scaling's
    ``original_max_position_embeddings`` is ``max_position_embeddings`` (dropped here)."""
    scaling = dict(config.rope_scaling if rope_scaling is None else rope_scaling)
    theta = config.rope_base if theta is None else theta
    rtype = scaling.pop("rope_type", "default")
    if rtype == "dynamic":
        scaling.pop("original_max_position_embeddings", None)
    params = {"rope_type": rtype, "rope_theta": float(theta), **scaling}
    legacy = {"rope_type": rtype, **scaling} if rtype != "default" else None
    return params, legacy


def max_positions_to_hf(config) -> int:
    """``max_position_embeddings`` of a config (dynamic NTK scales from it; :func:`n_ctx_from_hf`)."""
    scaling = dict(config.rope_scaling)
    if scaling.get("rope_type") == "dynamic":
        return int(scaling["original_max_position_embeddings"])
    return config.n_ctx


def n_ctx_from_hf(max_pos: int, rope_scaling: tuple) -> int:
    """The longest sequence: ``max_position_embeddings``, times ``factor`` for dynamic NTK scaling
    (which exists to run past the trained length)."""
    scaling = dict(rope_scaling)
    if scaling.get("rope_type") == "dynamic":
        return int(max_pos * scaling["factor"])
    return int(max_pos)


# ----------------------------------------------------------------------------------------------
# Tensors


#: While set (by ``jaxpatch.load_pretrained(..., mesh=)``), :func:`load_specs` streams each tensor
#: to its shards instead of stacking the model in host memory. An object with ``check(name,
#: array)``, ``put(path, array)``, ``zeros(path, shape, dtype)`` and ``set_layer(path, stacked, i,
#: array)``; ``path`` is the parameter's key path (``("W_E",)``, ``("blocks", "W_Q")``).
PLACEMENT: contextvars.ContextVar = contextvars.ContextVar("jaxpatch_placement", default=None)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: ``name`` (per layer: the part after ``{layers}.{i}.``), its ``shape``,
    the jaxpatch parameter(s) ``keys`` it becomes (a fused q/k/v tensor becomes three), ``load``
    (HF array -> tuple of jaxpatch arrays) and ``save`` (jaxpatch arrays -> HF array)."""

    name: str
    shape: tuple
    keys: tuple
    load: Callable[[np.ndarray], tuple]
    save: Callable[..., np.ndarray]


def same(name, shape, key, offset: float = 0.0) -> Spec:
    """A tensor stored as is (``offset``: Gemma's RMSNorm stores ``weight`` and applies ``1 + weight``)."""
    if offset:
        return Spec(name, tuple(shape), (key,), lambda a: (a + offset,), lambda a: a - offset)
    return Spec(name, tuple(shape), (key,), lambda a: (a,), lambda a: a)


def linear_in(name, n, d, h, key) -> Spec:
    """``nn.Linear`` reading the residual into heads: ``[n*h, d]`` <-> ``[n, d, h]``."""
    return Spec(name, (n * h, d), (key,), lambda a: (a.reshape(n, h, d).transpose(0, 2, 1),),
                lambda w: w.transpose(0, 2, 1).reshape(n * h, d))


def head_bias(name, n, h, key) -> Spec:
    return Spec(name, (n * h,), (key,), lambda a: (a.reshape(n, h),), lambda b: b.reshape(n * h))


def linear_out(name, n, h, d, key) -> Spec:
    """``nn.Linear`` writing heads to the residual: ``[d, n*h]`` <-> ``[n, h, d]``."""
    return Spec(name, (d, n * h), (key,), lambda a: (a.T.reshape(n, h, d),), lambda w: w.reshape(n * h, d).T)


def transposed(name, rows, cols, key) -> Spec:
    """``nn.Linear`` weight ``[out, in]`` <-> jaxpatch ``[in, out]``."""
    return Spec(name, (rows, cols), (key,), lambda a: (a.T,), lambda w: w.T)


def drop_tied_head(tensors: dict, head: str, embed: str, family: str) -> dict:
    """``tensors`` of a tied checkpoint (config.json: ``tie_word_embeddings=true``) without its
    unembedding ``head``, which some checkpoints store anyway: dropped when it equals the embedding
    ``embed``, else refused (two different matrices where the config says one)."""
    if head not in tensors:
        return tensors
    lm, emb = tensors[head], tensors.get(embed)
    if emb is None or lm.shape != emb.shape or not np.array_equal(np.asarray(lm), np.asarray(emb)):
        raise CheckpointError(
            f"{family} config.json says tie_word_embeddings=true but the checkpoint's {head} differs from {embed}; "
            f"set tie_word_embeddings to false in config.json to use {head}.")
    return {k: v for k, v in tensors.items() if k != head}


def check_names(present: set, expected: list, family: str) -> None:
    missing = [n for n in expected if n not in present]
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointError(f"Checkpoint does not match its {family} config.json: " + "; ".join(parts) + ".")


def work_dtype(dtype):
    """NumPy dtype conversions run in: float64 for a float64 model, else float32 (bfloat16/float16
    weights are widened exactly, and any arithmetic such as Gemma's ``1 + w`` runs in float32)."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def load_specs(tensors: Mapping[str, np.ndarray], top: list[Spec], layer: list[Spec], n_layers: int,
               layer_prefix: str, family: str, dtype) -> dict:
    """Check names and shapes, convert, stack per-layer tensors on a leading axis, cast to ``dtype``.

    Args:
        tensors: checkpoint tensors (names already normalised by the family).
        top: specs of whole-model tensors (full names).
        layer: specs of per-layer tensors (names relative to ``{layer_prefix}{i}.``).
        dtype: the params' dtype (a NumPy/JAX dtype).
    """
    import jax.numpy as jnp

    expected = [s.name for s in top] + [f"{layer_prefix}{i}.{s.name}" for i in range(n_layers) for s in layer]
    check_names(set(tensors), expected, family)
    work, target = work_dtype(dtype), np.dtype(dtype)
    place = PLACEMENT.get()

    def get(name, shape):
        a = tensors[name]
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"Tensor {name!r} has shape {tuple(a.shape)}; config.json implies {tuple(shape)}.")
        if place is not None:
            place.check(name, a := np.asarray(a))
        return np.asarray(a, dtype=work)

    if place is not None:  # streamed: one tensor in host memory at a time, straight to its shards
        out: dict[str, Any] = {}
        for s in top:
            for k, v in zip(s.keys, s.load(get(s.name, s.shape))):
                out[k] = place.put((k,), np.ascontiguousarray(v).astype(target))
        blocks: dict[str, Any] = {}
        for i in range(n_layers):
            for s in layer:
                for k, v in zip(s.keys, s.load(get(f"{layer_prefix}{i}.{s.name}", s.shape))):
                    v = np.ascontiguousarray(v).astype(target)
                    if k not in blocks:
                        blocks[k] = place.zeros(("blocks", k), (n_layers,) + v.shape, target)
                    blocks[k] = place.set_layer(("blocks", k), blocks[k], i, v)
        out["blocks"] = blocks
        return out

    out: dict[str, Any] = {}
    for s in top:
        for k, v in zip(s.keys, s.load(get(s.name, s.shape))):
            out[k] = jnp.asarray(np.ascontiguousarray(v).astype(target))
    blocks: dict[str, list] = {}
    for i in range(n_layers):
        for s in layer:
            for k, v in zip(s.keys, s.load(get(f"{layer_prefix}{i}.{s.name}", s.shape))):
                blocks.setdefault(k, []).append(np.asarray(v).astype(target))
    out["blocks"] = {k: jnp.asarray(np.stack(v)) for k, v in blocks.items()}
    return out


def save_dtype(params) -> np.dtype:
    """Checkpoint dtype for saving: bfloat16/float16 params keep their dtype, others are float32."""
    dt = np.dtype(params["W_E"].dtype)
    return dt if dt.itemsize == 2 else np.dtype(np.float32)


def save_specs(params: Mapping[str, Any], top: list[Spec], layer: list[Spec], n_layers: int,
               layer_prefix: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_specs`: HF tensors (contiguous NumPy, :func:`save_dtype`)."""
    out_dt = save_dtype(params)
    work = np.float64 if np.dtype(params["W_E"].dtype) == np.float64 else np.float32

    def np_(a):
        return np.asarray(a).astype(work)

    def fin(a):
        return np.ascontiguousarray(np.asarray(a).astype(out_dt))

    out = {}
    for s in top:
        out[s.name] = fin(s.save(*[np_(params[k]) for k in s.keys]))
    blocks = {k: np.asarray(v) for k, v in params["blocks"].items()}
    for i in range(n_layers):
        for s in layer:
            out[f"{layer_prefix}{i}.{s.name}"] = fin(s.save(*[blocks[k][i].astype(work) for k in s.keys]))
    return out


def check_saveable(family: str, problems: Mapping[str, bool]) -> None:
    """Raise if the config sets an option the family's checkpoint format cannot express
    (``problems``: description -> whether it applies)."""
    bad = [what for what, applies in problems.items() if applies]
    if bad:
        raise CheckpointError(f"Cannot save this model as a {family} checkpoint: {'; '.join(bad)}.")
