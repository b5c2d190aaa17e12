"""Hugging Face GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) checkpoints <-> jaxpatch params (pure NumPy).

As ``transformers`` 5.24 implements it: LayerNorm, plain GELU MLP with biases, q/k/v fused in
``attention.query_key_value`` laid out per head (output row ``n * 3H + j * H + h`` is head ``n``'s
q/k/v (``j`` = 0/1/2) dim ``h``), rotary on the first ``int(head_dim * rotary_pct)`` dims of each
head, optional parallel residual (``use_parallel_residual``: attention and MLP both read the
block's input), ``attention_bias`` on qkv and the output projection, untied ``embed_out``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._errors import UnsupportedArchitectureError
from ..config import ModelConfig
from . import hf_common as hc
from . import hf_llama

MODEL_TYPES = ("gpt_neox",)
ARCHITECTURE = "GPTNeoXForCausalLM"
FAMILY = "GPT-NeoX"

#: transformers 5.24's ``GPTNeoXConfig`` defaults of the fields read here.
DEFAULTS = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                intermediate_size=24576, hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5,
                tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True)

# Non-persistent buffers older checkpoints contain (causal mask, rotary table); they carry no weights.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
LAYER_PREFIX = "gpt_neox.layers."


def config_from_hf(hf: Mapping[str, Any], model_type: str = "gpt_neox") -> ModelConfig:
    hf = hc.with_defaults(hf, DEFAULTS)
    hc.reject_moe(hf, FAMILY)
    n_heads = int(hc.required(hf, "num_attention_heads", FAMILY))
    d_model = int(hc.required(hf, "hidden_size", FAMILY))
    d_head = d_model // n_heads
    max_pos = int(hc.required(hf, "max_position_embeddings", FAMILY))
    # GPTNeoXConfig.convert_rope_params_to_dict: rope_parameters (or legacy rope_scaling) first, then
    # rotary_emb_base / rotary_pct, then the defaults 10000 / 0.25.
    rp, local, nested = hc.rope_dicts(hf)
    if nested:
        raise UnsupportedArchitectureError(f"{FAMILY} config: per-layer-type rope_parameters are not supported.")
    theta = rp.get("rope_theta") or hf.get("rotary_emb_base") or 10000.0
    pct = rp.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rotary_dim = int(d_head * float(pct))
    if rotary_dim < 2 or rotary_dim % 2:
        raise UnsupportedArchitectureError(
            f"{FAMILY} config: rotary_pct={pct!r} gives {rotary_dim} rotary dims of head_dim {d_head}; jaxpatch "
            "needs an even number >= 2.")
    _, scaling = hc.rope_settings(rp, FAMILY, max_pos)
    bias = bool(hf.get("attention_bias"))
    return hf_llama.make_config(
        FAMILY, n_layers=int(hc.required(hf, "num_hidden_layers", FAMILY)), d_model=d_model, n_heads=n_heads,
        d_head=d_head, d_mlp=int(hc.required(hf, "intermediate_size", FAMILY)),
        d_vocab=int(hc.required(hf, "vocab_size", FAMILY)), n_ctx=hc.n_ctx_from_hf(max_pos, scaling),
        act_fn=hc.act_fn(hf.get("hidden_act"), FAMILY, "hidden_act"), eps=float(hf["layer_norm_eps"]),
        architecture="gpt_neox", positional="rotary", rotary_dim=rotary_dim, rope_base=float(theta),
        rope_scaling=scaling, norm="layernorm", parallel_attn_mlp=bool(hf.get("use_parallel_residual")),
        qkv_bias=bias, o_bias=bias, mlp_bias=True, unembed_bias=False,
        tied_embeddings=bool(hf.get("tie_word_embeddings")),
    )


def _rotary_pct(c: ModelConfig) -> float:
    """A ``rotary_pct`` for which transformers' ``int(head_dim * pct)`` gives ``rotary_dim``."""
    pct = c.rotary_dim / c.d_head
    while int(c.d_head * pct) < c.rotary_dim:
        pct = float(np.nextafter(pct, 2.0))
    return pct


def config_to_hf(config: ModelConfig) -> dict:
    c = config
    hc.check_saveable(FAMILY, {
        "positional is not 'rotary'": c.positional != "rotary",
        "norm is not 'layernorm'": c.norm != "layernorm",
        "gated_mlp is True": c.gated_mlp,
        f"d_head {c.d_head} != d_model // n_heads": c.d_head * c.n_heads != c.d_model,
        "n_kv_heads != n_heads": c.n_kv_heads != c.n_heads,
        "qkv_bias != o_bias, or mlp_bias is False": c.qkv_bias != c.o_bias or not c.mlp_bias,
        "unembed_bias is True": c.unembed_bias,
        "qk_norm, post_norms or scale_embed is set": c.qk_norm or c.post_norms or c.scale_embed,
        "attn_scale differs from d_head ** -0.5": not hf_llama._scale_is_default(c),
        "soft-capping is set": c.attn_softcap is not None or c.final_softcap is not None,
        "has sliding-window layers": any(c.sliding_layers),
        "rope_local_base is set": c.rope_local_base is not None,
    })
    pct = _rotary_pct(c)
    params, legacy = hc.rope_to_hf(c)
    params["partial_rotary_factor"] = pct
    return {
        "architectures": [ARCHITECTURE], "model_type": "gpt_neox", "vocab_size": c.d_vocab, "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "intermediate_size": c.d_mlp,
        "hidden_act": c.act_fn, "max_position_embeddings": hc.max_positions_to_hf(c), "layer_norm_eps": c.eps,
        "tie_word_embeddings": c.tied_embeddings, "use_parallel_residual": c.parallel_attn_mlp,
        "attention_bias": c.qkv_bias, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "rope_parameters": params, "rotary_pct": pct, "rotary_emb_base": params["rope_theta"], "rope_scaling": legacy,
    }


def _qkv_weight(N, D, H) -> hc.Spec:
    def load(a):
        a = a.reshape(N, 3, H, D)
        return tuple(a[:, j].transpose(0, 2, 1) for j in range(3))

    def save(wq, wk, wv):
        return np.stack([w.transpose(0, 2, 1) for w in (wq, wk, wv)], axis=1).reshape(3 * N * H, D)

    return hc.Spec("attention.query_key_value.weight", (3 * N * H, D), ("W_Q", "W_K", "W_V"), load, save)


def _qkv_bias(N, H) -> hc.Spec:
    def load(a):
        a = a.reshape(N, 3, H)
        return tuple(a[:, j] for j in range(3))

    def save(bq, bk, bv):
        return np.stack([bq, bk, bv], axis=1).reshape(3 * N * H)

    return hc.Spec("attention.query_key_value.bias", (3 * N * H,), ("b_Q", "b_K", "b_V"), load, save)


def layer_specs(c: ModelConfig) -> list:
    N, D, H, F = c.n_heads, c.d_model, c.d_head, c.d_mlp
    s = [hc.same("input_layernorm.weight", (D,), "ln1_w"), hc.same("input_layernorm.bias", (D,), "ln1_b"),
         _qkv_weight(N, D, H), hc.linear_out("attention.dense.weight", N, H, D, "W_O")]
    if c.qkv_bias:
        s.append(_qkv_bias(N, H))
    if c.o_bias:
        s.append(hc.same("attention.dense.bias", (D,), "b_O"))
    s += [hc.same("post_attention_layernorm.weight", (D,), "ln2_w"),
          hc.same("post_attention_layernorm.bias", (D,), "ln2_b"),
          hc.transposed("mlp.dense_h_to_4h.weight", F, D, "W_in"), hc.same("mlp.dense_h_to_4h.bias", (F,), "b_in"),
          hc.transposed("mlp.dense_4h_to_h.weight", D, F, "W_out"), hc.same("mlp.dense_4h_to_h.bias", (D,), "b_out")]
    return s


def top_specs(c: ModelConfig) -> list:
    s = [hc.same("gpt_neox.embed_in.weight", (c.d_vocab, c.d_model), "W_E"),
         hc.same("gpt_neox.final_layer_norm.weight", (c.d_model,), "ln_f_w"),
         hc.same("gpt_neox.final_layer_norm.bias", (c.d_model,), "ln_f_b")]
    if not c.tied_embeddings:
        s.append(hc.transposed("embed_out.weight", c.d_vocab, c.d_model, "W_U"))
    return s


def _normalise(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Drop weightless buffers; ``lm_head.weight`` (transformers 5's in-memory name) is
    ``embed_out.weight``; bare ``GPTNeoXModel`` names get the ``gpt_neox.`` prefix."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        if k == "lm_head.weight":
            k = "embed_out.weight"
        elif not (k.startswith("gpt_neox.") or k.startswith("embed_out.")):
            k = "gpt_neox." + k
        out[k] = v
    if config.tied_embeddings:
        out = hc.drop_tied_head(out, "embed_out.weight", "gpt_neox.embed_in.weight", FAMILY)
    return out


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype) -> dict:
    t = _normalise(config, tensors)
    return hc.load_specs(t, top_specs(config), layer_specs(config), config.n_layers, LAYER_PREFIX, FAMILY, dtype)


def params_to_hf(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    hf_llama.check_params_tying(config, params, FAMILY)
    return hc.save_specs(params, top_specs(config), layer_specs(config), config.n_layers, LAYER_PREFIX)
