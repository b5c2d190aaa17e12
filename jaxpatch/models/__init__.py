"""The model package: the one forward pass (:mod:`.transformer`) and each family's checkpoint
format. Code outside this package uses only the names below, never a family.

* ``forward(config, params, tokens, interventions, capture, attention_mask)`` -> logits, captures
* ``run_context`` / ``run_blocks_from`` / ``logits_at`` / ``kv_sites``: the pieces a sweep uses to
  rerun a suffix of layers and positions from a cached run
* ``init_params(config, key, dtype)``: random parameters of any family
"""

from __future__ import annotations

import jax.numpy as jnp

from .transformer import (  # noqa: F401
    default_positions as default_positions,
    forward as forward,
    kv_sites as kv_sites,
    logits_at as logits_at,
    run_blocks_from as run_blocks_from,
    run_context as run_context,
)


def init_params(config, key, dtype=jnp.float32):
    """Random parameters for ``config`` (GPT-2 keeps its original draw, so seeds reproduce)."""
    from . import gpt2, transformer

    if config.architecture == "gpt2" and config.positional == "learned" and config.norm == "layernorm" \
            and not config.gated_mlp and config.n_kv_heads == config.n_heads:
        return gpt2.init_params(config, key, dtype)
    return transformer.init_params(config, key, dtype)
