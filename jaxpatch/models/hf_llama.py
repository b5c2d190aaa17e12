"""Hugging Face Llama-layout checkpoints <-> jaxpatch params: ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (pure NumPy).

They share one tensor layout (``model.layers.{i}.self_attn.q_proj`` ...); Gemma reuses it
(:mod:`.hf_gemma`) with RMSNorm weights offset by one and extra post-norms. How the families
differ, as ``transformers`` 5.24 implements them:

* Llama: ``attention_bias`` (q, k, v and o), ``mlp_bias``; rope scaling default/linear/dynamic/llama3.
* Mistral: no biases; ``sliding_window`` (when set) on every layer.
* Qwen2: q/k/v biases always, none on o; sliding window only with ``use_sliding_window``, on the
  layers ``layer_types`` marks (by default layers ``>= max_window_layers``).
* Qwen3: ``attention_bias`` (q, k, v, o), RMSNorm on each query/key head; sliding as Qwen2.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._errors import CheckpointError, JaxpatchError, UnsupportedArchitectureError
from ..config import ModelConfig
from . import hf_common as hc

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
FAMILY = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

#: transformers 5.24's config-class defaults of the fields read here (a config.json may omit them).
DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None),
}

# Non-persistent buffers some older checkpoints contain; they carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------
# config.json


def sizes(hf: Mapping[str, Any], family: str) -> dict:
    """The size fields shared by the Llama layout (after :func:`hc.with_defaults`)."""
    n_heads = int(hc.required(hf, "num_attention_heads", family))
    d_model = int(hc.required(hf, "hidden_size", family))
    return dict(
        n_layers=int(hc.required(hf, "num_hidden_layers", family)), d_model=d_model, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_head=int(hf.get("head_dim") or d_model // n_heads),
        d_mlp=int(hc.required(hf, "intermediate_size", family)), d_vocab=int(hc.required(hf, "vocab_size", family)),
    )


def flat_rope(hf: Mapping[str, Any], family: str, max_pos: int, default_theta: float = 10000.0) -> dict:
    """``rope_base`` / ``rope_scaling`` / ``n_ctx`` of a family with one rotary table."""
    rp, local, nested = hc.rope_dicts(hf)
    if nested and local is not None and dict(local) != dict(rp):
        raise UnsupportedArchitectureError(
            f"{family} config: per-layer-type rope_parameters are supported for Gemma 3 only.")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedArchitectureError(
            f"{family} config option partial_rotary_factor={partial!r} is not supported (GPT-NeoX only).")
    theta = rp.get("rope_theta") or hf.get("rope_theta") or default_theta
    _, scaling = hc.rope_settings(rp, family, max_pos)
    return dict(rope_base=float(theta), rope_scaling=scaling, n_ctx=hc.n_ctx_from_hf(max_pos, scaling))


def qwen_layer_types(hf: Mapping[str, Any], n_layers: int, family: str) -> dict:
    """Qwen2/Qwen3 sliding windows, as transformers 5.24's ``Qwen2Config.__post_init__``."""
    sw = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    lt = hc.layer_types_from(hf, n_layers, family)
    if lt is None:
        mwl = int(hf.get("max_window_layers") or 0)
        lt = tuple("sliding_attention" if sw is not None and i >= mwl else "full_attention" for i in range(n_layers))
    return hc.windows(sw, lt, family)


def make_config(family: str, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except JaxpatchError as e:
        raise CheckpointError(f"{family} config.json describes no valid model: {e}") from None


def config_from_hf(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    """A :class:`ModelConfig` from a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dict."""
    family = FAMILY[model_type]
    hf = hc.with_defaults(hf, DEFAULTS[model_type])
    hc.reject_moe(hf, family)
    s = sizes(hf, family)
    max_pos = int(hc.required(hf, "max_position_embeddings", family))
    fields: dict[str, Any] = dict(
        s, architecture=model_type, positional="rotary", norm="rmsnorm", gated_mlp=True,
        act_fn=hc.act_fn(hf.get("hidden_act"), family, "hidden_act"), eps=float(hf["rms_norm_eps"]),
        tied_embeddings=bool(hf.get("tie_word_embeddings")), unembed_bias=False, mlp_bias=False,
        **flat_rope(hf, family, max_pos),
    )
    if model_type == "llama":
        bias = bool(hf.get("attention_bias"))
        fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias")))
    elif model_type == "mistral":
        sw = hf.get("sliding_window")
        fields.update(qkv_bias=False, o_bias=False,
                      **hc.windows(sw, ("sliding_attention",) * s["n_layers"] if sw else None, family))
    elif model_type == "qwen2":
        fields.update(qkv_bias=True, o_bias=False, **qwen_layer_types(hf, s["n_layers"], family))
    else:  # qwen3
        bias = bool(hf.get("attention_bias"))
        fields.update(qkv_bias=bias, o_bias=bias, qk_norm=True, **qwen_layer_types(hf, s["n_layers"], family))
    return make_config(family, **fields)


def act_to_hf(act: str, gemma: bool = False) -> str:
    return {"gelu_new": "gelu_pytorch_tanh" if gemma else "gelu_new"}.get(act, act)


def common_to_hf(config: ModelConfig, model_type: str, architecture: str) -> dict:
    """The config.json fields every Llama-layout family shares (both transformers 4.x and 5.x keys)."""
    c = config
    params, legacy = hc.rope_to_hf(c)
    return {
        "architectures": [architecture], "model_type": model_type, "vocab_size": c.d_vocab, "hidden_size": c.d_model,
        "intermediate_size": c.d_mlp, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.d_head, "max_position_embeddings": hc.max_positions_to_hf(c),
        "rms_norm_eps": c.eps, "tie_word_embeddings": c.tied_embeddings, "attention_dropout": 0.0,
        "rope_parameters": params, "rope_theta": params["rope_theta"], "rope_scaling": legacy,
    }


def generic_problems(c: ModelConfig) -> dict:
    """What no Llama-layout checkpoint can express."""
    return {
        "positional is not 'rotary'": c.positional != "rotary",
        f"rotary_dim {c.rotary_dim} != d_head {c.d_head}": c.rotary_dim != c.d_head,
        "norm is not 'rmsnorm'": c.norm != "rmsnorm",
        "gated_mlp is False": not c.gated_mlp,
        "parallel_attn_mlp is True": c.parallel_attn_mlp,
        "unembed_bias is True": c.unembed_bias,
    }


def _scale_is_default(c: ModelConfig) -> bool:
    return c.attn_scale is None or abs(c.attn_scale - c.d_head ** -0.5) <= 1e-12 * c.d_head ** -0.5


def config_to_hf(config: ModelConfig) -> dict:
    c, mt = config, config.architecture
    family = FAMILY[mt]
    problems = generic_problems(c)
    problems.update({
        "post_norms is True": c.post_norms, "scale_embed is True": c.scale_embed,
        "attn_scale differs from d_head ** -0.5": not _scale_is_default(c),
        "attention/final soft-capping is set": c.attn_softcap is not None or c.final_softcap is not None,
        "rope_local_base is set": c.rope_local_base is not None,
        f"qk_norm is {c.qk_norm}": c.qk_norm != (mt == "qwen3"),
    })
    sliding = any(c.sliding_layers)
    if mt == "llama":
        problems["qkv_bias != o_bias"] = c.qkv_bias != c.o_bias
        problems["has sliding-window layers"] = sliding
    elif mt == "mistral":
        problems["has biases"] = c.qkv_bias or c.o_bias or c.mlp_bias
        problems["mixes sliding-window and full layers"] = sliding and not all(c.sliding_layers)
    elif mt == "qwen2":
        problems["qkv_bias is False or o_bias/mlp_bias is True"] = not c.qkv_bias or c.o_bias or c.mlp_bias
    else:
        problems["qkv_bias != o_bias or mlp_bias is True"] = c.qkv_bias != c.o_bias or c.mlp_bias
    hc.check_saveable(family, problems)
    out = common_to_hf(c, mt, ARCHITECTURES[mt])
    out["hidden_act"] = act_to_hf(c.act_fn)
    if mt == "llama":
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif mt == "mistral":
        out["sliding_window"] = c.sliding_window if sliding else None
    else:
        first = next((i for i, s in enumerate(c.sliding_layers) if s), c.n_layers)
        out.update(use_sliding_window=sliding, sliding_window=c.sliding_window if sliding else None,
                   max_window_layers=first, layer_types=["sliding_attention" if s else "full_attention"
                                                         for s in c.sliding_layers])
        if mt == "qwen3":
            out["attention_bias"] = c.qkv_bias
    return out


# ----------------------------------------------------------------------------------------------
# Tensors


def layer_specs(c: ModelConfig, offset: float = 0.0) -> list:
    """Per-layer tensors of the Llama layout (``offset``: Gemma stores RMSNorm weights minus one;
    with ``post_norms`` the Gemma 2/3 names of the four norms)."""
    N, K, D, H, F = c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_mlp
    s = [hc.same("input_layernorm.weight", (D,), "ln1_w", offset),
         hc.linear_in("self_attn.q_proj.weight", N, D, H, "W_Q"),
         hc.linear_in("self_attn.k_proj.weight", K, D, H, "W_K"),
         hc.linear_in("self_attn.v_proj.weight", K, D, H, "W_V"),
         hc.linear_out("self_attn.o_proj.weight", N, H, D, "W_O")]
    if c.qkv_bias:
        s += [hc.head_bias("self_attn.q_proj.bias", N, H, "b_Q"), hc.head_bias("self_attn.k_proj.bias", K, H, "b_K"),
              hc.head_bias("self_attn.v_proj.bias", K, H, "b_V")]
    if c.o_bias:
        s.append(hc.same("self_attn.o_proj.bias", (D,), "b_O"))
    if c.qk_norm:
        s += [hc.same("self_attn.q_norm.weight", (H,), "q_norm_w", offset),
              hc.same("self_attn.k_norm.weight", (H,), "k_norm_w", offset)]
    if c.post_norms:
        s += [hc.same("post_attention_layernorm.weight", (D,), "ln1_post_w", offset),
              hc.same("pre_feedforward_layernorm.weight", (D,), "ln2_w", offset),
              hc.same("post_feedforward_layernorm.weight", (D,), "ln2_post_w", offset)]
    else:
        s.append(hc.same("post_attention_layernorm.weight", (D,), "ln2_w", offset))
    s += [hc.transposed("mlp.up_proj.weight", F, D, "W_in"), hc.transposed("mlp.gate_proj.weight", F, D, "W_gate"),
          hc.transposed("mlp.down_proj.weight", D, F, "W_out")]
    if c.mlp_bias:
        s += [hc.same("mlp.up_proj.bias", (F,), "b_in"), hc.same("mlp.gate_proj.bias", (F,), "b_gate"),
              hc.same("mlp.down_proj.bias", (D,), "b_out")]
    return s


def top_specs(c: ModelConfig, offset: float = 0.0) -> list:
    s = [hc.same("model.embed_tokens.weight", (c.d_vocab, c.d_model), "W_E"),
         hc.same("model.norm.weight", (c.d_model,), "ln_f_w", offset)]
    if not c.tied_embeddings:
        s.append(hc.transposed("lm_head.weight", c.d_vocab, c.d_model, "W_U"))
    return s


LAYER_PREFIX = "model.layers."


def normalise(config: ModelConfig, tensors: Mapping[str, np.ndarray], family: str) -> dict:
    """Drop weightless buffers, accept bare base-model names (``layers.0...`` from ``LlamaModel``),
    and drop a tied checkpoint's stored ``lm_head`` when it equals the embedding."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        if not (k.startswith("model.") or k.startswith("lm_head.")):
            k = "model." + k
        out[k] = v
    if config.tied_embeddings:
        out = hc.drop_tied_head(out, "lm_head.weight", "model.embed_tokens.weight", family)
    return out


def check_params_tying(config: ModelConfig, params: Mapping[str, Any], family: str) -> None:
    if config.tied_embeddings == ("W_U" in params):
        raise CheckpointError(
            f"Cannot save this {family} model: config.tied_embeddings={config.tied_embeddings} but the params "
            f"{'have' if 'W_U' in params else 'lack'} W_U.")


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype, offset: float = 0.0,
                   family: str | None = None) -> dict:
    family = family or FAMILY[config.architecture]
    t = normalise(config, tensors, family)
    return hc.load_specs(t, top_specs(config, offset), layer_specs(config, offset), config.n_layers, LAYER_PREFIX,
                         family, dtype)


def params_to_hf(config: ModelConfig, params: Mapping[str, Any], offset: float = 0.0,
                 family: str | None = None) -> dict[str, np.ndarray]:
    check_params_tying(config, params, family or FAMILY[config.architecture])
    return hc.save_specs(params, top_specs(config, offset), layer_specs(config, offset), config.n_layers, LAYER_PREFIX)
