"""The model package: the one forward pass (:mod:`.transformer`) and each family's checkpoint
format. Code outside this package uses only the names below, never a family.

* ``forward(config, params, tokens, interventions, capture, attention_mask)`` -> logits, captures
* ``run_context`` / ``run_blocks_from`` / ``logits_at`` / ``logits_columns`` / ``logits_elements`` /
  ``kv_sites``: the pieces a sweep uses to rerun a suffix of layers and positions from a cached run
  and read its logits (all of them, given tokens' columns, or single logits); ``packed_layout`` / ``run_blocks_packed``:
  several such suffix runs packed into one row axis; ``matmul_major_blocks`` / ``layer_split`` /
  ``per_layer_blocks`` / ``is_per_layer``: the block weights laid out once for those runs (transposed, split per layer)
* ``attention_logits`` / ``layer_windows`` / ``head_rms``: the attention's masked scores from the
  queries and keys it reads, each layer's sliding window, and the q/k norm (AtP*'s QK fix)
* ``head_write_sites`` / ``head_writes``: each attention head's exactly additive write to the
  residual stream (the edge methods' upstream nodes), whatever the family's norms
* ``init_params(config, key, dtype)``: random parameters of any family
* ``embed_stream`` / ``block_at`` / ``head_writes_at``: the forward pass one block at a time
  (:mod:`.stepwise`; circuit evaluation carries its own state between layers)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .transformer import (  # noqa: F401
    attention_logits as attention_logits,
    default_positions as default_positions,
    forward as forward,
    head_write_sites as head_write_sites,
    head_writes as head_writes,
    kv_sites as kv_sites,
    logits_at as logits_at,
    logits_columns as logits_columns,
    logits_elements as logits_elements,
    matmul_major_blocks as matmul_major_blocks,
    packed_layout as packed_layout,
    run_blocks_packed as run_blocks_packed,
    run_blocks_from as run_blocks_from,
    run_context as run_context,
    tile_rows as tile_rows,
)
from .layer_weights import is_per_layer as is_per_layer, layer_split as layer_split, per_layer_blocks as per_layer_blocks  # noqa: F401
from .stepwise import block_at as block_at, embed_stream as embed_stream, head_writes_at as head_writes_at  # noqa: F401


def layer_windows(config):
    """Each layer's sliding window as data ``[n_layers]`` (a huge number where there is none)."""
    from .transformer import _windows

    return _windows(config)


def head_rms(x, w, eps):
    """The per-head RMS norm of q/k norm models (Qwen3, Gemma 3)."""
    from .transformer import _head_rms

    return _head_rms(x, w, eps)


def init_params(config, key, dtype=jnp.float32):
    """Random parameters for ``config`` (GPT-2 keeps its original draw, so seeds reproduce).

    One compiled program per (config, dtype): drawn eagerly, every weight shape compiled its own
    sampler (a third of a second each, before any patching ran). Within the program every weight's
    ``jax.random.normal`` draw is made by one batched sampler (:mod:`.init_draw`: the same numbers
    bit for bit; one sampler per weight compiled 4-6x longer, ~5 s of a 2-core machine per config).
    The weight matrices are the eager draws bit for bit; norm weights (``1 + 0.1 · normal``) may
    differ in the last bit (the compiled program fuses the multiply-add). The training scripts draw
    eagerly (``gpt2.init_params``), so shipped models retrain bitwise."""
    return _init_jit(config, key, jnp.dtype(dtype))


@partial(jax.jit, static_argnums=(0, 2))
def _init_jit(config, key, dtype):
    from .init_draw import init_batched

    return init_batched(_family_init(config), config, key, dtype)


def _family_init(config):
    """The family's ``init_params``: GPT-2 keeps its own draw order (``gpt2.init_params``) where
    it makes every parameter the config reads (not with q/k norms or post-norms, which it lacks:
    those GPT-2-shaped configs get the general draw instead of a KeyError mid-forward)."""
    from . import gpt2, transformer

    if config.architecture == "gpt2" and config.positional == "learned" and config.norm == "layernorm" \
            and not config.gated_mlp and config.n_kv_heads == config.n_heads and not config.qk_norm \
            and not config.post_norms:
        return gpt2.init_params
    return transformer.init_params
