"""Hugging Face GPT-2 (``GPT2LMHeadModel``) checkpoints <-> jaxpatch params (pure NumPy).

HF GPT-2 stores ``Conv1D`` weights as ``[in, out]`` and fuses q/k/v into ``c_attn``; this module
splits and reshapes them into per-head TransformerLens layouts and stacks layers.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._errors import CheckpointError, UnsupportedArchitectureError
from ..config import ModelConfig, canonical_act_fn
from .hf_common import check_names, drop_tied_head

MODEL_TYPES = ("gpt2",)
ARCHITECTURE = "GPT2LMHeadModel"

# Non-persistent buffers that older GPT-2 checkpoints contain; they carry no weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_LAYER_TENSORS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a GPT-2 ``config.json`` dict (architecture already checked)."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UnsupportedArchitectureError(f"GPT-2 config option {flag}=True is not supported.")
    if hf.get("scale_attn_weights", True) is False:
        raise UnsupportedArchitectureError("GPT-2 config option scale_attn_weights=False is not supported.")
    try:
        d_model, n_heads = int(hf["n_embd"]), int(hf["n_head"])
        return ModelConfig(
            n_layers=int(hf["n_layer"]),
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_model // n_heads,
            d_mlp=int(hf.get("n_inner") or 4 * d_model),
            d_vocab=int(hf["vocab_size"]),
            n_ctx=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            act_fn=canonical_act_fn(hf.get("activation_function", "gelu_new")),
            eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            # GPT-2 has no unembedding bias; its unembedding is the embedding unless untied.
            unembed_bias=False,
            tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the GPT-2 field {e.args[0]!r}.") from None


def config_to_hf(config: ModelConfig, params: Mapping[str, Any] | None = None) -> dict:
    """The ``config.json`` dict of an HF ``GPT2LMHeadModel`` with this config (tied embeddings
    when the params hold no ``W_U``; without params, as ``config.tied_embeddings`` says)."""
    tied = config.tied_embeddings if params is None else "W_U" not in params
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": config.n_layers,
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_inner": config.d_mlp,
        "vocab_size": config.d_vocab,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "activation_function": config.act_fn,
        "layer_norm_epsilon": config.eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": tied,
        "scale_attn_weights": True,
    }


def expected_tensor_names(config: ModelConfig, tied: bool) -> list[str]:
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    for i in range(config.n_layers):
        names += [f"transformer.h.{i}.{t}" for t in _LAYER_TENSORS]
    if not tied:
        names.append("lm_head.weight")
    return names


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept both ``transformer.h.0...`` (GPT2LMHeadModel) and bare ``h.0...`` (GPT2Model) keys."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if not (k.startswith("transformer.") or k.startswith("lm_head.")):
            k = "transformer." + k
        out[k] = v
    return out


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype) -> dict:
    """Convert HF GPT-2 tensors (NumPy, float32 or wider) to a jaxpatch params pytree of ``dtype``.

    A tied checkpoint (``config.tied_embeddings``, from ``tie_word_embeddings``: GPT-2's default)
    loads tied: no ``W_U``, the unembedding is ``W_E``'s transpose (as in ``transformers``: one
    array, one gradient). A tied checkpoint that still stores ``lm_head`` must store the embedding
    there.

    Raises:
        CheckpointError: naming any missing or unexpected tensors, a tensor of the wrong shape, or a
            tied checkpoint whose stored ``lm_head`` differs from the embedding.
    """
    t = _normalise_names(tensors)
    tied = config.tied_embeddings
    if tied:
        t = drop_tied_head(t, "lm_head.weight", "transformer.wte.weight", "GPT-2")
    check_names(set(t), expected_tensor_names(config, tied), "GPT-2")

    c = config
    L, N, D, H, F, V = c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab

    def get(name, shape):
        a = np.asarray(t[name])
        if a.shape != tuple(shape):
            raise CheckpointError(f"Tensor {name!r} has shape {a.shape}; config.json implies {tuple(shape)}.")
        return a

    def layers(fn):
        return np.stack([fn(i) for i in range(L)])

    def h(i, name, shape):
        return get(f"transformer.h.{i}.{name}", shape)

    def qkv_w(i, which):  # c_attn.weight [D, 3D] -> [N, D, H]
        w = h(i, "attn.c_attn.weight", (D, 3 * D))[:, which * D : (which + 1) * D]
        return w.reshape(D, N, H).transpose(1, 0, 2)

    def qkv_b(i, which):
        return h(i, "attn.c_attn.bias", (3 * D,))[which * D : (which + 1) * D].reshape(N, H)

    W_E = get("transformer.wte.weight", (V, D))
    params = {
        "W_E": W_E,
        "W_pos": get("transformer.wpe.weight", (c.n_ctx, D)),
        "blocks": {
            "ln1_w": layers(lambda i: h(i, "ln_1.weight", (D,))),
            "ln1_b": layers(lambda i: h(i, "ln_1.bias", (D,))),
            "W_Q": layers(lambda i: qkv_w(i, 0)),
            "b_Q": layers(lambda i: qkv_b(i, 0)),
            "W_K": layers(lambda i: qkv_w(i, 1)),
            "b_K": layers(lambda i: qkv_b(i, 1)),
            "W_V": layers(lambda i: qkv_w(i, 2)),
            "b_V": layers(lambda i: qkv_b(i, 2)),
            "W_O": layers(lambda i: h(i, "attn.c_proj.weight", (D, D)).reshape(N, H, D)),
            "b_O": layers(lambda i: h(i, "attn.c_proj.bias", (D,))),
            "ln2_w": layers(lambda i: h(i, "ln_2.weight", (D,))),
            "ln2_b": layers(lambda i: h(i, "ln_2.bias", (D,))),
            "W_in": layers(lambda i: h(i, "mlp.c_fc.weight", (D, F))),
            "b_in": layers(lambda i: h(i, "mlp.c_fc.bias", (F,))),
            "W_out": layers(lambda i: h(i, "mlp.c_proj.weight", (F, D))),
            "b_out": layers(lambda i: h(i, "mlp.c_proj.bias", (D,))),
        },
        "ln_f_w": get("transformer.ln_f.weight", (D,)),
        "ln_f_b": get("transformer.ln_f.bias", (D,)),
    }
    if not tied:
        params["W_U"] = np.ascontiguousarray(get("lm_head.weight", (V, D)).T)
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64 if dtype == jnp.float64 else np.float32), dtype=dtype), params)


def params_to_hf(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf` (``lm_head`` stored only when the params hold ``W_U``);
    float32 NumPy arrays."""
    c = config
    N, D, H = c.n_heads, c.d_model, c.d_head
    p = {k: v for k, v in params.items() if k != "blocks"}
    b = params["blocks"]

    def f32(a):
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32))

    if "b_U" in params and np.any(np.asarray(params["b_U"], np.float32) != 0):
        raise CheckpointError("GPT-2 checkpoints have no unembedding bias; b_U must be zero to save.")
    out = {
        "transformer.wte.weight": f32(p["W_E"]),
        "transformer.wpe.weight": f32(p["W_pos"]),
        "transformer.ln_f.weight": f32(p["ln_f_w"]),
        "transformer.ln_f.bias": f32(p["ln_f_b"]),
    }
    if "W_U" in p:
        out["lm_head.weight"] = f32(np.asarray(p["W_U"]).T)
    for i in range(c.n_layers):
        pre = f"transformer.h.{i}."
        qkv_w = [np.asarray(b[w][i]).transpose(1, 0, 2).reshape(D, D) for w in ("W_Q", "W_K", "W_V")]
        qkv_b = [np.asarray(b[w][i]).reshape(D) for w in ("b_Q", "b_K", "b_V")]
        out.update(
            {
                pre + "ln_1.weight": f32(b["ln1_w"][i]),
                pre + "ln_1.bias": f32(b["ln1_b"][i]),
                pre + "attn.c_attn.weight": f32(np.concatenate(qkv_w, axis=1)),
                pre + "attn.c_attn.bias": f32(np.concatenate(qkv_b)),
                pre + "attn.c_proj.weight": f32(np.asarray(b["W_O"][i]).reshape(N * H, D)),
                pre + "attn.c_proj.bias": f32(b["b_O"][i]),
                pre + "ln_2.weight": f32(b["ln2_w"][i]),
                pre + "ln_2.bias": f32(b["ln2_b"][i]),
                pre + "mlp.c_fc.weight": f32(b["W_in"][i]),
                pre + "mlp.c_fc.bias": f32(b["b_in"][i]),
                pre + "mlp.c_proj.weight": f32(b["W_out"][i]),
                pre + "mlp.c_proj.bias": f32(b["b_out"][i]),
            }
        )
    return out
