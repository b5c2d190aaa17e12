"""Hugging Face Gemma checkpoints <-> jaxpatch params: ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
``Gemma3ForCausalLM`` (text only, ``model_type`` ``gemma3_text``), pure NumPy.

The Llama tensor layout (:mod:`.hf_llama`) with Gemma's differences, as ``transformers`` 5.24
implements them:

* RMSNorm applies ``1 + weight`` (in float32); jaxpatch stores the multiplier, so ``1`` is added
  on loading and subtracted on saving (every norm, q/k norms included).
* Embeddings are multiplied by ``sqrt(hidden_size)``; GeGLU MLP (``gelu_pytorch_tanh``); tied
  embeddings by default.
* Gemma 2/3: attention scale ``query_pre_attn_scalar ** -0.5``; norms after attention and MLP
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``; ``pre_feedforward_layernorm`` is
  the MLP's input norm); sliding-window layers from ``layer_types`` (Gemma 2 default: even layers;
  Gemma 3 default: every layer but each ``sliding_window_pattern``-th).
* Gemma 2: ``attn_logit_softcapping`` and ``final_logit_softcapping`` (defaults 50 and 30).
* Gemma 3: RMSNorm on query/key heads; sliding layers rotate with their own base
  (``rope_parameters["sliding_attention"]``, 4.x ``rope_local_base_freq``), full layers with
  ``rope_parameters["full_attention"]`` (4.x ``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._errors import CheckpointError, UnsupportedArchitectureError
from ..config import ModelConfig
from . import hf_common as hc
from . import hf_llama

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
FAMILY = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
NORM_OFFSET = 1.0

#: transformers 5.24's config-class defaults of the fields read here.
DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, layer_types=None, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}
GEMMA3_THETA = {"global": 1_000_000.0, "local": 10_000.0}


def _gemma3_rope(hf: Mapping[str, Any], max_pos: int) -> dict:
    """Gemma 3's two rotary tables, as ``Gemma3TextConfig.convert_rope_params_to_dict``."""
    family = FAMILY["gemma3_text"]
    rp = hf.get("rope_parameters")
    if rp is None:
        full, local = {}, {}
    else:
        if not any(k in ("full_attention", "sliding_attention") for k in rp):
            raise CheckpointError(f"{family} config.json: rope_parameters must be keyed by layer type "
                                  f"('full_attention', 'sliding_attention'); got keys {sorted(rp)}.")
        full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full_theta = full.get("rope_theta") or hf.get("rope_theta") or GEMMA3_THETA["global"]
    local_theta = local.get("rope_theta") or hf.get("rope_local_base_freq") or GEMMA3_THETA["local"]
    for name, d in (("full_attention", full), ("sliding_attention", local)):
        partial = d.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise UnsupportedArchitectureError(
                f"{family} config option partial_rotary_factor={partial!r} ({name}) is not supported.")
    ltype, _ = hc.rope_settings(local, family, max_pos, " (rope_parameters['sliding_attention'])")
    if ltype != "default":
        raise UnsupportedArchitectureError(
            f"{family} config: rope type {ltype!r} on sliding-window layers is not supported; jaxpatch scales "
            "the full-attention layers' rotary table only (supported there: default, linear, dynamic, llama3).")
    _, scaling = hc.rope_settings(full, family, max_pos, " (rope_parameters['full_attention'])")
    return dict(rope_base=float(full_theta), rope_scaling=scaling, rope_local_base=float(local_theta),
                n_ctx=hc.n_ctx_from_hf(max_pos, scaling))


def config_from_hf(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    """A :class:`ModelConfig` from a Gemma / Gemma 2 / Gemma 3 text ``config.json`` dict."""
    family = FAMILY[model_type]
    hf = hc.with_defaults(hf, DEFAULTS[model_type])
    hc.reject_moe(hf, family)
    hc.reject_truthy(hf, family, ("use_bidirectional_attention",))
    s = hf_llama.sizes(hf, family)
    L = s["n_layers"]
    max_pos = int(hc.required(hf, "max_position_embeddings", family))
    if model_type == "gemma":
        act = hf.get("hidden_act")
        act = "gelu_pytorch_tanh" if act == "gelu" else act  # as GemmaConfig: "gelu" meant the tanh GELU
        act_key = "hidden_act"
    else:
        act, act_key = hf.get("hidden_activation"), "hidden_activation"
    bias = bool(hf.get("attention_bias"))
    fields: dict[str, Any] = dict(
        s, architecture=model_type, positional="rotary", norm="rmsnorm", gated_mlp=True,
        act_fn=hc.act_fn(act, family, act_key), eps=float(hf["rms_norm_eps"]),
        tied_embeddings=bool(hf.get("tie_word_embeddings")), unembed_bias=False, mlp_bias=False,
        qkv_bias=bias, o_bias=bias, scale_embed=True,
    )
    if model_type == "gemma3_text":
        fields.update(_gemma3_rope(hf, max_pos))
    else:
        fields.update(hf_llama.flat_rope(hf, family, max_pos))
    if model_type != "gemma":
        lt = hc.layer_types_from(hf, L, family)
        if lt is None:
            pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
            lt = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L))
        qpas = hc.required(hf, "query_pre_attn_scalar", family)
        cap = hf.get("attn_logit_softcapping")
        final = hf.get("final_logit_softcapping")
        fields.update(
            post_norms=True, qk_norm=model_type == "gemma3_text", attn_scale=float(qpas) ** -0.5,
            attn_softcap=None if cap is None else float(cap), final_softcap=None if final is None else float(final),
            **hc.windows(hf.get("sliding_window"), lt, family),
        )
    return hf_llama.make_config(family, **fields)


def _query_pre_attn_scalar(c: ModelConfig):
    """``query_pre_attn_scalar`` (an int in transformers) reproducing ``attn_scale``, or None."""
    if c.attn_scale is None:
        return c.d_head
    q = round(c.attn_scale ** -2)
    return q if q > 0 and abs(float(q) ** -0.5 - c.attn_scale) <= 1e-12 * c.attn_scale else None


def config_to_hf(config: ModelConfig) -> dict:
    c, mt = config, config.architecture
    family = FAMILY[mt]
    problems = hf_llama.generic_problems(c)
    qpas = _query_pre_attn_scalar(c)
    sliding = any(c.sliding_layers)
    problems.update({
        "scale_embed is False": not c.scale_embed,
        "qkv_bias != o_bias or mlp_bias is True": c.qkv_bias != c.o_bias or c.mlp_bias,
        f"qk_norm is {c.qk_norm}": c.qk_norm != (mt == "gemma3_text"),
        f"post_norms is {c.post_norms}": c.post_norms != (mt != "gemma"),
        "rope_local_base is set": mt != "gemma3_text" and c.rope_local_base is not None,
    })
    if mt == "gemma":
        problems.update({
            "attn_scale differs from d_head ** -0.5": qpas != c.d_head,
            "attention/final soft-capping is set": c.attn_softcap is not None or c.final_softcap is not None,
            "has sliding-window layers": sliding,
        })
    else:
        problems[f"attn_scale {c.attn_scale} is not q ** -0.5 for an integer q"] = qpas is None
    hc.check_saveable(family, problems)
    out = hf_llama.common_to_hf(c, mt, ARCHITECTURES[mt])
    out["attention_bias"] = c.qkv_bias
    act = hf_llama.act_to_hf(c.act_fn, gemma=True)
    if mt == "gemma":
        out["hidden_act"] = act
        return out
    out.update(
        hidden_activation=act, query_pre_attn_scalar=qpas, attn_logit_softcapping=c.attn_softcap,
        final_logit_softcapping=c.final_softcap, sliding_window=c.sliding_window if sliding else 4096,
        layer_types=["sliding_attention" if s else "full_attention" for s in c.sliding_layers],
        use_bidirectional_attention=False,
    )
    if mt == "gemma3_text":
        local = c.rope_base if c.rope_local_base is None else c.rope_local_base
        full, legacy = hc.rope_to_hf(c)
        out.update(rope_parameters={"full_attention": full,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": float(local)}},
                   rope_local_base_freq=float(local))
    return out


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype) -> dict:
    return hf_llama.params_from_hf(config, tensors, dtype, offset=NORM_OFFSET, family=FAMILY[config.architecture])


def params_to_hf(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return hf_llama.params_to_hf(config, params, offset=NORM_OFFSET, family=FAMILY[config.architecture])
