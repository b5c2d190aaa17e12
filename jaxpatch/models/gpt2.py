"""GPT-2 random initialisation (the original draw, so seeds keep their weights); the forward pass
is the family-agnostic one in :mod:`.transformer`.

Parameters are a plain dict pytree. Per-layer weights live under ``"blocks"`` stacked on a leading
layer axis ``L`` (TransformerLens layouts otherwise)::

    W_E [V, D]   W_pos [n_ctx, D]   ln_f_w, ln_f_b [D]   W_U [D, V]   b_U [V]
    blocks: ln1_w, ln1_b [L, D]; W_Q, W_K, W_V [L, N, D, H]; b_Q, b_K, b_V [L, N, H];
            W_O [L, N, H, D]; b_O [L, D]; ln2_w, ln2_b [L, D];
            W_in [L, D, F]; b_in [L, F]; W_out [L, F, D]; b_out [L, D]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from .transformer import _draw

Params = dict[str, Any]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, init_range: float = 0.02) -> Params:
    """Random GPT-2 parameters (normal(0, init_range) weights, unit LN weights, small random biases).

    Biases and LN parameters are random too (not zeros/ones) so parity tests exercise them.
    """
    c = config
    L, N, D, H, F, V = c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab
    keys = iter(jax.random.split(key, 32))

    def normal(shape, std=init_range):
        return (std * _draw(next(keys), shape)).astype(dtype)

    def near_one(shape):
        return (1.0 + 0.1 * _draw(next(keys), shape)).astype(dtype)

    return {
        "W_E": normal((V, D)),
        "W_pos": normal((c.n_ctx, D)),
        "blocks": {
            "ln1_w": near_one((L, D)),
            "ln1_b": normal((L, D)),
            "W_Q": normal((L, N, D, H)),
            "b_Q": normal((L, N, H)),
            "W_K": normal((L, N, D, H)),
            "b_K": normal((L, N, H)),
            "W_V": normal((L, N, D, H)),
            "b_V": normal((L, N, H)),
            "W_O": normal((L, N, H, D)),
            "b_O": normal((L, D)),
            "ln2_w": near_one((L, D)),
            "ln2_b": normal((L, D)),
            "W_in": normal((L, D, F)),
            "b_in": normal((L, F)),
            "W_out": normal((L, F, D)),
            "b_out": normal((L, D)),
        },
        "ln_f_w": near_one((D,)),
        "ln_f_b": normal((D,)),
        "W_U": normal((D, V)),
        "b_U": jnp.zeros((V,), dtype),
    }


# The forward pass is family-agnostic: see transformer.py. These names remain for code written
# against the GPT-2 module.
from .transformer import forward as forward  # noqa: E402,F401
from .transformer import logits_at as logits_at  # noqa: E402,F401
