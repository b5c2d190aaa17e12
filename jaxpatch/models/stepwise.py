"""The forward pass one block at a time, for callers that carry their own state between layers.

Circuit evaluation needs this: each downstream node's input mixes upstream outputs of the run in
progress with ablated ones, so a layer's inputs depend on the outputs of the layers already run
in the same pass, which a single :func:`~jaxpatch.models.forward` with fixed edits cannot express.
These functions are the pieces of :func:`~jaxpatch.models.transformer.forward` itself (embedding,
one block, the heads' writes), so a stepwise run is the model's own computation, whatever the
family.
"""

from __future__ import annotations

import jax

from ..interventions import NONE, Interventions
from . import transformer as _t
from ._layers import SiteHandler


def embed_stream(config, params, tokens, run_ctx):
    """The residual stream entering block 0 ``[B, T, D]`` (token + learned position embedding)."""
    return _t.embed(config, params, tokens, SiteHandler(NONE, frozenset()), run_ctx["positions"])


def block_at(config, params, layer, x, run_ctx, interventions: Interventions = NONE, capture: frozenset = frozenset()):
    """Block ``layer`` (a traced int) on residual stream ``x`` ``[B, T, D]``.

    ``interventions`` apply to this block (unstacked values are this layer's; stacked ones are
    indexed by ``layer``). Returns ``(x_out [B, T, D], captures)``; captures are this layer's
    activations, unstacked.
    """
    p = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), params["blocks"])
    window = jax.lax.dynamic_index_in_dim(_t._windows(config), layer, 0, keepdims=False)
    local = jax.lax.dynamic_index_in_dim(_t._local(config), layer, 0, keepdims=False)
    hs = SiteHandler(interventions, capture, layer)
    out = _t.block(config, p, x, hs, _t._layer_ctx(config, run_ctx, layer, window, local))
    return out, hs.captured


def head_writes_at(config, params, layer, caps):
    """Each head's exactly additive write ``[B, T, N, D]`` of block ``layer`` from that block's
    captures of :func:`~jaxpatch.models.head_write_sites` (see
    :func:`~jaxpatch.models.head_writes`)."""
    one = {"blocks": jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, layer, 1, 0), params["blocks"])}
    return _t.head_writes(config, one, {k: v[None] for k, v in caps.items()})[0]
