"""Logical axis names of every parameter: what each dimension of a weight means, independent of
any device mesh. :mod:`jaxpatch.partitioning` maps these names to mesh axes; nothing else in
jaxpatch names a mesh axis.

Names: ``layers`` (the stacked block axis), ``vocab``, ``embed`` (d_model), ``heads`` (query
heads), ``kv_heads`` (key/value heads), ``head_dim``, ``mlp`` (d_mlp), ``ctx`` (learned
positions).
"""

from __future__ import annotations

from typing import Any

from .._errors import JaxpatchError

#: Top-level parameters.
TOP = {
    "W_E": ("vocab", "embed"),
    "W_pos": ("ctx", "embed"),
    "W_U": ("embed", "vocab"),
    "b_U": ("vocab",),
    "ln_f_w": ("embed",),
    "ln_f_b": ("embed",),
}

#: Per-layer parameters (under ``"blocks"``; the leading ``layers`` axis is added).
BLOCK = {
    "ln1_w": ("embed",), "ln1_b": ("embed",), "ln2_w": ("embed",), "ln2_b": ("embed",),
    "ln1_post_w": ("embed",), "ln1_post_b": ("embed",), "ln2_post_w": ("embed",), "ln2_post_b": ("embed",),
    "W_Q": ("heads", "embed", "head_dim"), "b_Q": ("heads", "head_dim"),
    "W_K": ("kv_heads", "embed", "head_dim"), "b_K": ("kv_heads", "head_dim"),
    "W_V": ("kv_heads", "embed", "head_dim"), "b_V": ("kv_heads", "head_dim"),
    "q_norm_w": ("head_dim",), "k_norm_w": ("head_dim",),
    "W_O": ("heads", "head_dim", "embed"), "b_O": ("embed",),
    "W_in": ("embed", "mlp"), "W_gate": ("embed", "mlp"), "b_in": ("mlp",), "b_gate": ("mlp",),
    "W_out": ("mlp", "embed"), "b_out": ("embed",),
}


def param_axes(params: dict[str, Any]) -> dict[str, Any]:
    """The logical axis names of each parameter, as a pytree of tuples shaped like ``params``
    (which may be arrays or ``jax.ShapeDtypeStruct``; only the keys and ranks are read).

    GPT-2's checkpoints store q/k/v per query head, so a GPT-2 ``W_K`` has ``n_heads`` heads; the
    name ``kv_heads`` still applies (key/value heads equal query heads there).
    """
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k == "blocks":
            out[k] = {}
            for bk, bv in v.items():
                if bk not in BLOCK:
                    raise JaxpatchError(f"No logical axes for block parameter {bk!r}; known: {sorted(BLOCK)}.")
                out[k][bk] = ("layers",) + BLOCK[bk]
                _check_rank(f"blocks.{bk}", bv, out[k][bk])
        else:
            if k not in TOP:
                raise JaxpatchError(f"No logical axes for parameter {k!r}; known: {sorted(TOP)}.")
            out[k] = TOP[k]
            _check_rank(k, v, out[k])
    return out


def _check_rank(name, value, axes) -> None:
    if len(value.shape) != len(axes):
        raise JaxpatchError(f"Parameter {name} has shape {tuple(value.shape)} but its logical axes are {axes}.")
