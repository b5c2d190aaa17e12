"""GPT-2 family: parameters, random init, and the forward pass as one ``lax.scan`` over layers.

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
from ..interventions import NONE, Interventions
from ._layers import SiteHandler, activation, layer_norm, lift

Params = dict[str, Any]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, init_range: float = 0.02) -> Params:
    """Random GPT-2 parameters (normal(0, init_range) weights, unit LN weights, small random biases).

    Biases and LN parameters are random too (not zeros/ones) so parity tests exercise them.
    """
    c = config
    L, N, D, H, F, V = c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab
    keys = iter(jax.random.split(key, 32))

    def normal(shape, std=init_range):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def near_one(shape):
        return (1.0 + 0.1 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

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


def embed(config: ModelConfig, params: Params, tokens, hs: SiteHandler):
    """Token + position embedding -> the residual stream entering block 0. ``[B, T, D]``."""
    T = tokens.shape[-1]
    e = hs("hook_embed", params["W_E"][tokens])
    p = hs("hook_pos_embed", jnp.broadcast_to(params["W_pos"][:T], e.shape))
    return e + p


def block(config: ModelConfig, p: Params, x, hs: SiteHandler, prefix_kv=None):
    """One transformer block on residual stream ``x`` ``[B, T, D]``; ``p`` is that layer's params.

    ``prefix_kv``: optional ``(k, v)`` ``[B, s, N, H]`` of positions ``0..s-1`` from a cached run;
    ``x`` then holds positions ``s..`` only (``hs.pos_offset == s``). Used by sweeps: a patch at
    position p cannot change earlier positions under causal attention, so they are not recomputed.
    """
    c = config
    x = hs("blocks.hook_resid_pre", x)
    h = layer_norm(x, p["ln1_w"], p["ln1_b"], c.eps, hs, "blocks.ln1")
    q = hs("blocks.attn.hook_q", jnp.einsum("BTD,NDH->BTNH", h, p["W_Q"]) + lift(p["b_Q"], 4))
    k = hs("blocks.attn.hook_k", jnp.einsum("BSD,NDH->BSNH", h, p["W_K"]) + lift(p["b_K"], 4))
    v = hs("blocks.attn.hook_v", jnp.einsum("BSD,NDH->BSNH", h, p["W_V"]) + lift(p["b_V"], 4))
    if prefix_kv is not None:
        k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    T, S = x.shape[1], k.shape[1]
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(jnp.asarray(c.d_head, q.dtype))
    causal = jnp.arange(S - T, S)[:, None] >= jnp.arange(S)[None, :]
    scores = hs("blocks.attn.hook_attn_scores", jnp.where(causal, scores, jnp.asarray(-jnp.inf, scores.dtype)))
    # Softmax in at least float32; masked entries are -inf (TransformerLens's convention).
    pattern = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1)
    pattern = hs("blocks.attn.hook_pattern", pattern.astype(x.dtype))
    z = hs("blocks.attn.hook_z", jnp.einsum("BNTS,BSNH->BTNH", pattern, v))
    attn_out = hs("blocks.hook_attn_out", jnp.einsum("BTNH,NHD->BTD", z, p["W_O"]) + lift(p["b_O"], 3))
    x = hs("blocks.hook_resid_mid", x + attn_out)
    h = layer_norm(x, p["ln2_w"], p["ln2_b"], c.eps, hs, "blocks.ln2")
    pre = hs("blocks.mlp.hook_pre", jnp.einsum("BTD,DF->BTF", h, p["W_in"]) + lift(p["b_in"], 3))
    post = hs("blocks.mlp.hook_post", activation(c.act_fn, pre))
    mlp_out = hs("blocks.hook_mlp_out", jnp.einsum("BTF,FD->BTD", post, p["W_out"]) + lift(p["b_out"], 3))
    return hs("blocks.hook_resid_post", x + mlp_out)


def unembed(config: ModelConfig, params: Params, x, hs: SiteHandler):
    """Final layer norm and unembedding: ``[B, T, D] -> [B, T, V]`` logits."""
    h = layer_norm(x, params["ln_f_w"], params["ln_f_b"], config.eps, hs, "ln_final")
    return jnp.einsum("BTD,DV->BTV", h, params["W_U"]) + lift(params["b_U"], 3)


def run_blocks(
    config: ModelConfig,
    blocks: Params,
    x,
    ivs: Interventions = NONE,
    capture: frozenset = frozenset(),
    layers=None,
):
    """Scan the blocks over ``x``. Returns ``(x, captures)``, captures stacked ``[L, ...]``.

    ``layers`` (int array, default ``arange(n_layers)``) gives each scanned block's true layer
    index, so a caller can run a contiguous slice of the stack with interventions still keyed by
    absolute layer.
    """
    n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    if layers is None:
        layers = jnp.arange(n, dtype=jnp.int32)

    def body(x, xs):
        p, layer = xs
        hs = SiteHandler(ivs, capture, layer)
        x = block(config, p, x, hs)
        return x, hs.captured

    return jax.lax.scan(body, x, (blocks, layers))


def forward(
    config: ModelConfig,
    params: Params,
    tokens,
    interventions: Interventions | None = None,
    capture: frozenset = frozenset(),
):
    """The whole model as a pure function.

    Args:
        config: static model config.
        params: parameter pytree (see module docstring).
        tokens: int array ``[B, T]``.
        interventions: edits applied at sites (default: none).
        capture: canonical site names whose activations to return.

    Returns:
        ``(logits [B, T, V], captures)`` where ``captures`` maps canonical name -> activation;
        per-layer sites are stacked ``[L, ...]``.
    """
    ivs = NONE if interventions is None else interventions
    hs = SiteHandler(ivs, capture)
    x = embed(config, params, tokens, hs)
    x, block_caps = run_blocks(config, params["blocks"], x, ivs, capture)
    logits = unembed(config, params, x, hs)
    return logits, {**hs.captured, **block_caps}


def run_blocks_from(
    config: ModelConfig,
    blocks: Params,
    x,
    start,
    ivs: Interventions = NONE,
    pos_offset: int = 0,
    prefix_kv=None,
):
    """Run blocks ``start..n_layers-1`` (``start`` may be traced) on residual stream ``x``.

    Args:
        x: ``[B, T - pos_offset, D]``, the residual stream entering block ``start`` at positions
            ``pos_offset..``.
        start: first block to run (a traced int is fine: one program serves every start layer).
        ivs: interventions, keyed by absolute layer; positions in whole-sequence coordinates.
        pos_offset: static number of leading positions not recomputed.
        prefix_kv: ``(k, v)`` stacked over layers, ``[L, B, T, N, H]`` (only positions
            ``< pos_offset`` are read), required when ``pos_offset > 0``.

    Returns:
        the residual stream after the last block, ``[B, T - pos_offset, D]``.
    """
    n = jax.tree_util.tree_leaves(blocks)[0].shape[0]

    def body(layer, x):
        p = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), blocks)
        kv = None
        if pos_offset:
            kv = tuple(
                jax.lax.slice_in_dim(jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), 0, pos_offset, axis=1)
                for a in prefix_kv
            )
        return block(config, p, x, SiteHandler(ivs, frozenset(), layer, pos_offset), kv)

    return jax.lax.fori_loop(start, n, body, x)


def logits_at(config: ModelConfig, params: Params, x, ivs: Interventions = NONE, pos_offset: int = 0):
    """Final layer norm and unembedding of residual rows ``x`` ``[B, R, D]`` -> ``[B, R, V]``."""
    return unembed(config, params, x, SiteHandler(ivs, frozenset(), None, pos_offset))
