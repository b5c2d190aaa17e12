"""Hugging Face checkpoints <-> ``(ModelConfig, params)`` for every family (pure NumPy; torch is
never imported).

This module dispatches on the checkpoint's architecture; each family's names and reshapes live
in its own module: :mod:`.hf_gpt2` (GPT-2), :mod:`.hf_neox` (GPT-NeoX / Pythia), :mod:`.hf_llama`
(Llama, Mistral, Qwen2, Qwen3), :mod:`.hf_gemma` (Gemma 1/2/3 text). The params follow the layout
of :mod:`jaxpatch.models.transformer`; ``ModelConfig.architecture`` is the HF ``model_type``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .._errors import UnsupportedArchitectureError
from ..config import ModelConfig
from . import hf_gemma, hf_gpt2, hf_llama, hf_neox

#: ``architectures`` entry -> ``model_type`` (``ModelConfig.architecture``).
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_MODULES = {"gpt2": hf_gpt2, "gpt_neox": hf_neox, **{m: hf_llama for m in hf_llama.MODEL_TYPES},
            **{m: hf_gemma for m in hf_gemma.MODEL_TYPES}}


def model_type_of(hf: Mapping[str, Any]) -> str:
    """The family of a ``config.json`` dict; raises for architectures jaxpatch does not implement.

    As ``AutoModelForCausalLM``, ``model_type`` picks the family; every ``architectures`` entry
    must be a supported causal LM (a multimodal ``Gemma3ForConditionalGeneration`` is not).
    """
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if unsupported:
        raise UnsupportedArchitectureError(
            f"Unsupported architecture {unsupported[0]!r} (model_type {model_type!r}); "
            f"jaxpatch supports: {list(SUPPORTED_ARCHITECTURES)}."
        )
    if model_type is None and archs:
        model_type = ARCHITECTURES[archs[0]]
    if model_type not in _MODULES:
        how = f"architectures {archs}" if archs else "no 'architectures' in config.json"
        raise UnsupportedArchitectureError(
            f"Unsupported model_type {model_type!r} ({how}); jaxpatch supports: {list(SUPPORTED_ARCHITECTURES)} "
            f"(model types {sorted(_MODULES)})."
        )
    return model_type


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a ``config.json`` dict (``transformers`` 4.x or 5.x).

    Raises:
        UnsupportedArchitectureError: an architecture, rope type or option jaxpatch does not implement.
        CheckpointError: a config.json that describes no valid model.
    """
    mt = model_type_of(hf)
    if mt == "gpt2":
        return hf_gpt2.config_from_hf(hf)
    return _MODULES[mt].config_from_hf(hf, mt)


def config_to_hf(config: ModelConfig, params: Mapping[str, Any] | None = None) -> dict:
    """The ``config.json`` dict of the ``transformers`` model with this config (and ``params``,
    where the family reads tying from them).

    Raises:
        CheckpointError: the config sets an option its family's checkpoint cannot express.
    """
    if config.architecture == "gpt2":
        return hf_gpt2.config_to_hf(config, params)
    return _MODULES[config.architecture].config_to_hf(config)


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype) -> dict:
    """Convert HF tensors (NumPy, any float dtype) to a jaxpatch params pytree of ``dtype``
    (tied or not as ``config.tied_embeddings`` says, read from config.json).

    Raises:
        CheckpointError: naming any missing or unexpected tensors, or a tensor of the wrong shape
            (with the shape config.json implies and the shape found).
    """
    return _MODULES[config.architecture].params_from_hf(config, tensors, dtype)


def params_to_hf(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf`: HF tensors (float32, or the params' bfloat16/float16)."""
    return _MODULES[config.architecture].params_to_hf(config, params)
