"""The one forward pass: a decoder-only transformer whose family differences are config, not code.

Every family (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2/3, Gemma 1-3) runs through these
functions; :class:`~jaxpatch.config.ModelConfig` says which options apply (rotary or learned
positions, LayerNorm or RMSNorm, gated MLP, parallel attention+MLP, grouped-query attention,
biases, q/k norms, post-norms, soft-capping, sliding windows). Nothing outside
:mod:`jaxpatch.models` knows which family it runs.

Parameters are a plain dict pytree; per-layer weights live under ``"blocks"`` stacked on a
leading layer axis ``L``. Entries marked (opt) exist only when the config says so::

    W_E [V, D]   W_pos [n_ctx, D] (learned positions)   ln_f_w [D]   ln_f_b [D] (layernorm)
    W_U [D, V] (untied; tied models read W_E.T)   b_U [V] (unembed_bias)
    blocks:
      ln1_w [L, D]  ln1_b [L, D] (layernorm)
      W_Q [L, N, D, H]  W_K, W_V [L, K, D, H]  b_Q [L, N, H]  b_K, b_V [L, K, H] (qkv_bias)
      q_norm_w, k_norm_w [L, H] (qk_norm)
      W_O [L, N, H, D]  b_O [L, D] (o_bias)
      ln1_post_w [L, D] (post_norms; + ln1_post_b with layernorm)
      ln2_w [L, D]  ln2_b [L, D] (layernorm)
      W_in [L, D, F]  b_in [L, F] (mlp_bias)  W_gate [L, D, F] (gated_mlp)
      W_out [L, F, D]  b_out [L, D] (mlp_bias)
      ln2_post_w [L, D] (post_norms)

RMSNorm weights are stored as the multiplier actually applied (Gemma's ``1 + w`` is folded in
when loading). Einsum letters: see :mod:`jaxpatch.models._layers`; K is the key/value-head axis.

Positions. ``positions`` ``[B, T]`` are the position ids (real tokens counted, so a padded prompt
gets the positions it would have alone); ``key_mask`` ``[B, T]`` marks real tokens. Queries attend
to real keys at or before them (and, in sliding layers, fewer than ``sliding_window`` back).

Suffix runs. ``run_blocks_from`` recomputes positions ``pos_offset..`` only, reading the earlier
positions' keys/values (rotated, for rotary models) from a cache: exact, because under causal
attention later positions never change earlier ones.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import JaxpatchError
from ..config import ModelConfig
from ..interventions import NONE, Interventions
from ._layers import SiteHandler, activation, layer_norm, lift, rms_norm
from .layer_weights import at as _at, map_weight as _map_weight, mm as _mm, value as _value

Params = dict[str, Any]

#: The key/value sites a suffix run reads for the positions it does not recompute.
def kv_sites(config: ModelConfig) -> tuple[str, str]:
    """Canonical sites whose stacked values a suffix run needs as its prefix cache: the keys the
    attention reads (after rotary embedding) and the values."""
    k = "blocks.attn.hook_rot_k" if config.positional == "rotary" else "blocks.attn.hook_k"
    return k, "blocks.attn.hook_v"


# ----------------------------------------------------------------------------------------------
# Positions


def default_positions(tokens, attention_mask=None):
    """Position ids ``[B, T]``: real tokens counted from 0 (left or right padding alike)."""
    B, T = tokens.shape
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _inv_freq(config: ModelConfig, base: float, scaling: dict, max_pos):
    """Rotary inverse frequencies ``[..., rotary_dim / 2]`` (``...``: the shape of ``max_pos``, the
    largest position id, for dynamic scaling), float32, in ``transformers``' float32
    arithmetic operation by operation (``1.0 / (base ** (arange(0, dim, 2).float() / dim))``, every
    step rounded to float32; torch evaluates ``s / t`` as ``t.reciprocal() * s``), so the tables
    match transformers' to the rounding of cos/sin."""
    f32 = np.float32
    rd = config.rotary_dim
    exps = np.arange(0, rd, 2).astype(f32) / f32(rd)

    def _pow_f32(b):  # base ** exps in float32: the correctly rounded power of the float32 base
        return (np.float64(f32(b)) ** exps.astype(np.float64)).astype(f32)  # (torch's can be 1 ulp off)

    rtype = scaling.get("rope_type", "default")
    if rtype == "dynamic":  # NTK: the base grows once the sequence outgrows the trained length
        orig = int(scaling["original_max_position_embeddings"])
        factor = float(scaling["factor"])
        # Up to the trained length transformers keeps its initial table, computed in Python floats.
        b0 = base * ((factor * orig / orig) - (factor - 1)) ** (rd / (rd - 2))
        static = jnp.asarray(f32(1.0) / _pow_f32(b0))
        seq_len = jnp.maximum(max_pos + 1, orig)
        grown = (f32(factor) * seq_len.astype(jnp.float32) / f32(orig) - f32(factor - 1)) ** f32(rd / (rd - 2))
        b = f32(base) * grown
        dynamic = f32(1.0) / (b[..., None] ** lift(jnp.asarray(exps), b.ndim + 1))
        return jnp.where(seq_len[..., None] > orig, dynamic, lift(static, b.ndim + 1))
    inv = f32(1.0) / _pow_f32(base)
    if rtype == "linear":
        inv = inv / f32(scaling["factor"])
    elif rtype == "llama3":
        factor = f32(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = f32(old / lo), f32(old / hi)
        wavelen = (f32(1.0) / inv) * f32(2 * math.pi)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = ((f32(1.0) / wavelen) * f32(old) - f32(lo)) / f32(hi - lo)
        smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return jnp.asarray(inv.astype(f32))


def rotary_tables(config: ModelConfig, positions):
    """``(cos, sin)`` ``[n_bases, B, T, rotary_dim / 2]``: index 0 the global base (with the
    config's scaling), index 1 the local base of sliding layers (Gemma 3; else equal to 0).

    Dynamic NTK scaling depends on the sequence length; it is taken per prompt (its largest
    position id), so a prompt in a padded batch gets the tables it gets alone."""
    scaling = dict(config.rope_scaling)
    max_pos = jnp.max(positions, axis=1)  # [B]
    B = positions.shape[0]
    tables = [_inv_freq(config, config.rope_base, scaling, max_pos)]
    if config.rope_local_base is not None:
        tables.append(_inv_freq(config, config.rope_local_base, {}, max_pos))
    else:
        tables.append(tables[0])
    tables = [jnp.broadcast_to(inv, (B, inv.shape[-1])) for inv in tables]
    ang = jnp.stack([positions.astype(jnp.float32)[..., None] * inv[:, None, :] for inv in tables])
    return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x, cos, sin, rotary_dim: int):
    """Rotate the first ``rotary_dim`` dims of each head (GPT-NeoX / Llama "rotate half" layout).
    ``x`` ``[B, T, N, H]``; ``cos``/``sin`` ``[B, T, rotary_dim / 2]``."""
    half = rotary_dim // 2
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Pieces


def _norm(config: ModelConfig, x, w, b, hs: SiteHandler, prefix: str):
    if config.norm == "rmsnorm":
        return rms_norm(x, w, config.eps, hs, prefix)
    return layer_norm(x, w, b, config.eps, hs, prefix)


def _output(config: ModelConfig, p: Params, out, bias: str | None, norm: str, hs: SiteHandler, site: str):
    """A sublayer's write to the residual stream: its bias, then (post-norm families) its post-norm
    ``{norm}_post``, then the site ``site``."""
    if bias is not None:
        out = out + lift(p[bias], 3)
    if config.post_norms:
        out = _norm(config, out, p[f"{norm}_post_w"], p.get(f"{norm}_post_b"), hs, f"blocks.{norm}_post")
    return hs(site, out)


def _head_rms(x, w, eps):
    """RMSNorm over each head's ``d_head`` (Qwen3 / Gemma 3 q/k norm)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * lift(w, x.ndim).astype(y.dtype)).astype(x.dtype)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed(config: ModelConfig, params: Params, tokens, hs: SiteHandler, positions=None):
    """Token (+ learned position) embedding -> the residual stream entering block 0 ``[B, T, D]``."""
    e = params["W_E"][tokens]
    if config.scale_embed:
        e = e * jnp.asarray(math.sqrt(config.d_model), e.dtype)
    e = hs("hook_embed", e)
    if config.positional == "learned":
        if positions is None:
            positions = default_positions(tokens)
        return e + hs("hook_pos_embed", params["W_pos"][positions])
    return e


def _attn_scale(c: ModelConfig) -> float:
    """The factor scores are multiplied by: the config's, else ``1 / sqrt(d_head)``."""
    return c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.d_head)


def _in_window(qi, ki, window):
    """Which keys at sequence indices ``ki`` a query at ``qi`` may see (broadcast): earlier or the
    same position, within the sliding ``window``."""
    return (ki <= qi) & (qi - ki < window)


def attention_logits(config: ModelConfig, q, k, q_index, k_index, window, key_mask, allowed=None):
    """The attention's masked pre-softmax scores, exactly as :func:`block` computes them.

    Args:
        q: queries ``[B, T, N, H]`` as the attention reads them (after the q norm and rotary
            embedding: ``hook_rot_q`` of rotary models).
        k: keys ``[B, S, K, H]``, likewise (``hook_rot_k``); ``K = n_kv_heads``.
        q_index, k_index: sequence indices ``[T]`` (or ``[B, T]``: per prompt) / ``[S]`` of the
            query and key rows.
        window: this layer's sliding window (a scalar; a huge number if none).
        key_mask: ``[B, S]``, true at real (non-padding) keys.
        allowed: optional ``[T, S]`` (or ``[B, T, S]``): which keys each query may see at all,
            on top of the causal, window and padding masks (packed suffix runs: see
            :func:`run_blocks_packed`).

    Returns:
        ``(scores [B, N, T, S], visible [B, 1, T, S])``: ``scores`` are ``q·k`` (query head n reads
        key head ``n // (n_heads // n_kv_heads)``) times the attention scale, soft-capped, and
        ``-inf`` where the key is not visible (later, outside the window, or padding).
    """
    c = config
    group = c.n_heads // c.n_kv_heads
    k_att = jnp.repeat(k, group, axis=2) if group > 1 else k  # grouped-query attention
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k_att) * jnp.asarray(_attn_scale(c), q.dtype)
    scores = _softcap(scores, c.attn_softcap)
    qi = q_index[..., :, None]
    ki = k_index.reshape((1,) * (qi.ndim - 1) + k_index.shape)
    visible = _in_window(qi, ki, window)  # [(B,) T, S]
    if allowed is not None:
        visible = visible & allowed
    visible = (visible[None, None] if visible.ndim == 2 else visible[:, None]) & key_mask[:, None, None, :].astype(bool)
    return jnp.where(visible, scores, jnp.asarray(-jnp.inf, scores.dtype)), visible


def _rows(a, read):
    """Rows ``read`` ``[B, R]`` of ``a`` ``[B, T, ...]`` -> ``[B, R, ...]``."""
    return jnp.take_along_axis(a, read.reshape(read.shape + (1,) * (a.ndim - 2)), axis=1)


def _unfused_qkv(c: ModelConfig, w):
    """The fused ``[D, (N + 2K) H]`` weights as ``W_Q`` ``[N, D, H]``, ``W_K``, ``W_V`` ``[K, D, H]``."""
    N, K, H = c.n_heads, c.n_kv_heads, c.d_head
    D = w.shape[0]
    parts = (w[:, : N * H], w[:, N * H: (N + K) * H], w[:, (N + K) * H:])
    return tuple(jnp.transpose(a.reshape(D, n, H), (1, 0, 2)) for a, n in zip(parts, (N, K, K)))


def _fused_qkv(c: ModelConfig, h, w, read):
    """Queries ``[B, T|R, N, H]``, keys and values ``[B, T, K, H]`` of normed rows ``h`` from the
    fused ``[D, (N + 2K) H]`` weights; with ``read``, queries of those rows only (the key/value
    columns then multiply every row, the query columns only the read rows)."""
    N, K, H = c.n_heads, c.n_kv_heads, c.d_head
    B, T = h.shape[:2]
    if read is None:
        qkv = _mm("BTD,DX->BTX", h, w)
        q, kv = qkv[..., : N * H], qkv[..., N * H:]
    else:
        q = _mm("BRD,DX->BRX", _rows(h, read), _map_weight(w, lambda a: a[:, : N * H]))
        kv = _mm("BTD,DX->BTX", h, _map_weight(w, lambda a: a[:, N * H:]))
    q = q.reshape(q.shape[:2] + (N, H))
    return q, kv[..., : K * H].reshape(B, T, K, H), kv[..., K * H:].reshape(B, T, K, H)


def _softmax_rows(scores, visible):
    """Softmax in at least float32 over the last axis; masked entries are -inf (TransformerLens's
    convention). A row with no visible key (a padding query) gets zeros, never NaN."""
    s32 = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    any_visible = jnp.any(visible, axis=-1, keepdims=True)
    return jax.nn.softmax(jnp.where(any_visible, s32, 0.0), axis=-1) * any_visible


def _dense_attention(c: ModelConfig, q, k, v, prefix_kv, q_index, allowed, ctx, hs: SiteHandler, dtype):
    """``z`` ``[B, T, N, H]``: every query against every key (the cached prefix ``prefix_kv``, then
    ``k``/``v``), masked (see :func:`attention_logits`)."""
    if prefix_kv is not None:
        k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    group = c.n_heads // c.n_kv_heads
    v_att = jnp.repeat(v, group, axis=2) if group > 1 else v  # query head n reads value head n // group
    scores, visible = attention_logits(c, q, k, q_index, ctx["k_index"], ctx["window"], ctx["key_mask"], allowed)
    scores = hs("blocks.attn.hook_attn_scores", scores)
    pattern = hs("blocks.attn.hook_pattern", _softmax_rows(scores, visible).astype(dtype))
    if allowed is None:
        z = jnp.einsum("BNTS,BSNH->BTNH", pattern, v_att)
    else:  # packed rows: another patch's NaN/inf values must not reach this one through zero weights
        bad = ~jnp.all(jnp.isfinite(v_att), axis=(2, 3))  # [B, S]
        seen = jnp.broadcast_to(allowed, (bad.shape[0],) + allowed.shape[-2:])  # [B, T, S]
        leak = jnp.any(seen & bad[:, None, :], axis=-1)  # [B, T]: a key of its own run is non-finite
        z = jnp.einsum("BNTS,BSNH->BTNH", pattern, jnp.where(bad[:, :, None, None], jnp.zeros((), v_att.dtype), v_att))
        z = jnp.where(leak[:, :, None, None], jnp.asarray(jnp.nan, z.dtype), z)
    return z


def _tiled_attention(c: ModelConfig, q, k, v, prefix_kv, ctx):
    """``z`` ``[B, R, N, H]`` of packed rows (:func:`run_blocks_packed`), by tiles of ``t`` rows.

    A segment is at most ``t`` rows long, so the rows a query of tile ``j`` may attend to lie in
    tiles ``j - 1`` and ``j``: each tile's queries read the cached keys ``[T]`` and those ``2t``
    packed keys, not all ``R`` (the same visible keys as :func:`_dense_attention` over
    ``T + R`` keys, whose other keys are masked). ``ctx["tiles"]`` holds the tile masks (see
    :func:`_packed_tiles`). As in the dense path, a non-finite value of a patch's own run (its
    segment's rows, its cached keys before its first position) makes its rows NaN, and no other
    segment's values reach it."""
    tl = ctx["tiles"]
    B, R, N, H = q.shape
    t = tl["q_index"].shape[1]
    nt = R // t
    group = c.n_heads // c.n_kv_heads
    rep = (lambda a: jnp.repeat(a, group, axis=-2)) if group > 1 else (lambda a: a)  # noqa: E731
    kc, vc = (a.astype(k.dtype) for a in prefix_kv)  # [B, T, K, H]
    T = kc.shape[1]
    tiled = lambda a: a.reshape((B, nt, t) + a.shape[2:])  # noqa: E731  [B, nt, t, ...]
    qt, kt = tiled(q), tiled(rep(k))
    # Scores against the cached keys, the previous tile's rows (none before tile 0) and the tile's
    # own rows, side by side: [B, N, nt, t, T + 2t].
    s_prev = jnp.einsum("BjqNH,BjsNH->BNjqs", qt[:, 1:], kt[:, :-1])
    scores = jnp.concatenate([
        jnp.einsum("BjqNH,BSNH->BNjqS", qt, rep(kc)),
        jnp.concatenate([jnp.zeros_like(s_prev[:, :, :1]), s_prev], axis=2),
        jnp.einsum("BjqNH,BjsNH->BNjqs", qt, kt)], axis=-1) * jnp.asarray(_attn_scale(c), q.dtype)
    scores = _softcap(scores, c.attn_softcap)
    qi, ki = tl["q_index"][:, :, None], tl["k_index"][:, None, :]  # [nt, t, 1], [nt, 1, T + 2t]
    visible = _in_window(qi, ki, ctx["window"]) & tl["allowed"]  # [nt, t, T + 2t]
    visible = visible[None, None] & tl["key_mask"][:, None, :, None, :]  # [B, 1, nt, t, T + 2t]
    scores = jnp.where(visible, scores, jnp.asarray(-jnp.inf, scores.dtype))
    pattern = _softmax_rows(scores, visible).astype(q.dtype)
    # Zero weights must not meet non-finite values of other patches' rows: those values are
    # zeroed, and a patch whose own run holds one gets NaN rows.
    bad_c = ~jnp.all(jnp.isfinite(vc), axis=(2, 3))  # [B, T]
    bad_p = ~jnp.all(jnp.isfinite(v), axis=(2, 3))  # [B, R]
    zero = lambda a, bad: jnp.where(bad[:, :, None, None], jnp.zeros((), a.dtype), a)  # noqa: E731
    vc, vt = rep(zero(vc, bad_c)), tiled(rep(zero(v, bad_p)))
    z_prev = jnp.einsum("BNjqs,BjsNH->BjqNH", pattern[:, :, 1:, :, T: T + t], vt[:, :-1])
    z = (jnp.einsum("BNjqS,BSNH->BjqNH", pattern[..., :T], vc)
         + jnp.einsum("BNjqs,BjsNH->BjqNH", pattern[..., T + t:], vt)
         + jnp.concatenate([jnp.zeros_like(z_prev[:, :1]), z_prev], axis=1)).reshape(B, R, N, H)
    slot, S = tl["slot"], tl["n_slots"]
    seg_bad = jnp.zeros((B, S + 1), bool).at[:, slot].max(bad_p)  # [B, S + 1] (S: the padding rows)
    before = tl["allowed"][..., :T].reshape(R, T)  # [R, T]: the cached keys each row's patch reads
    leak = seg_bad[:, slot] | jnp.any(before[None] & bad_c[:, None, :], axis=-1)  # [B, R]
    return jnp.where(leak[:, :, None, None], jnp.asarray(jnp.nan, z.dtype), z)


#: Sites a block computes before the heads' outputs ``z``: a block entered with given ``z``
#: (:func:`block`'s ``z``) does not compute them.
BEFORE_Z = frozenset({
    "blocks.hook_resid_pre", "blocks.ln1.hook_scale", "blocks.ln1.hook_normalized", "blocks.hook_q_input",
    "blocks.hook_k_input", "blocks.hook_v_input", "blocks.attn.hook_q", "blocks.attn.hook_k", "blocks.attn.hook_v",
    "blocks.attn.hook_rot_q", "blocks.attn.hook_rot_k", "blocks.attn.hook_attn_scores", "blocks.attn.hook_pattern",
})


def block(config: ModelConfig, p: Params, x, hs: SiteHandler, ctx, prefix_kv=None, read=None, z=None):
    """One transformer block on residual stream ``x`` ``[B, T, D]`` (``p``: that layer's params).

    ``ctx``: per-run data for this layer: ``positions`` ``[B, T]`` of the rows in ``x``,
    ``key_mask`` ``[B, S]`` (all keys), ``q_index``/``k_index`` (sequence indices), ``window``
    (this layer's sliding window, or a huge number), ``cos``/``sin`` (rotary tables of the rows).
    ``prefix_kv``: ``(k, v)`` ``[B, s, K, H]`` of positions ``0..s-1`` (see module docstring).
    ``read``: ``[B, R]`` row indices into ``x``: compute every row's keys and values but the
    queries, attention, MLP and output of these rows only (``[B, R, D]``): a last layer whose other
    rows nothing reads. Not with edits or captures (``hs`` must do nothing).
    ``z``: the heads' outputs ``[B, T, N, H]`` of these rows, known already (a run's cache, where
    nothing before them changed): the block starts there, computing no queries, keys, values or
    attention (``hs`` must not act on :data:`BEFORE_Z` sites; not with ``read``).
    """
    c = config
    if z is not None:
        if read is not None or hs.wants(*BEFORE_Z):
            raise JaxpatchError("internal: a block entered at z cannot read rows or act on sites before z.")
        return _after_z(c, p, x, z.astype(x.dtype), hs)
    x = hs("blocks.hook_resid_pre", x)
    h = _norm(c, x, p["ln1_w"], p.get("ln1_b"), hs, "blocks.ln1")
    split = hs.wants("blocks.hook_q_input", "blocks.hook_k_input", "blocks.hook_v_input")
    if read is not None and (split or hs.ivs or hs.capture):
        raise JaxpatchError("internal: a block computing only some rows cannot apply edits or captures.")
    if split:  # per-head copies of the attention's input (edge methods patch one head's input)
        N, K = c.n_heads, c.n_kv_heads
        xq = hs("blocks.hook_q_input", jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (N, x.shape[-1])))
        xk = hs("blocks.hook_k_input", jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (K, x.shape[-1])))
        xv = hs("blocks.hook_v_input", jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (K, x.shape[-1])))
        if hs.wants("blocks.ln1.hook_scale", "blocks.ln1.hook_normalized"):
            raise JaxpatchError("Per-head attention inputs (hook_q_input/hook_k_input/hook_v_input) cannot be "
                                "combined with edits or captures of blocks.ln1 sites in one run.")
        nq = SiteHandler(NONE, frozenset())
        hq = _norm(c, xq, p["ln1_w"], p.get("ln1_b"), nq, "blocks.ln1")
        hk = _norm(c, xk, p["ln1_w"], p.get("ln1_b"), nq, "blocks.ln1")
        hv = _norm(c, xv, p["ln1_w"], p.get("ln1_b"), nq, "blocks.ln1")
        w_q, w_k, w_v = (_unfused_qkv(c, _value(p[_FUSED_QKV])) if _FUSED_QKV in p
                         else (_value(p["W_Q"]), _value(p["W_K"]), _value(p["W_V"])))
        q = jnp.einsum("BTND,NDH->BTNH", hq, w_q)
        k = jnp.einsum("BSKD,KDH->BSKH", hk, w_k)
        v = jnp.einsum("BSKD,KDH->BSKH", hv, w_v)
    elif _FUSED_QKV in p:  # one matmul for queries, keys and values (matmul_major_blocks)
        q, k, v = _fused_qkv(c, h, p[_FUSED_QKV], read)
    else:
        q = _mm("BTD,NDH->BTNH", h if read is None else _rows(h, read), p["W_Q"])
        k = _mm("BSD,KDH->BSKH", h, p["W_K"])
        v = _mm("BSD,KDH->BSKH", h, p["W_V"])
    q_index, q_cos, q_sin, allowed = ctx["q_index"], ctx.get("cos"), ctx.get("sin"), ctx.get("allowed")
    if read is not None:  # from here on only the read rows (their residual, queries, positions)
        x = _rows(x, read)
        q_index = _rows(jnp.broadcast_to(q_index, read.shape[:1] + q_index.shape), read)
        if allowed is not None:
            allowed = _rows(jnp.broadcast_to(allowed, read.shape[:1] + allowed.shape[-2:]), read)
        if c.positional == "rotary":
            q_cos, q_sin = _rows(q_cos, read), _rows(q_sin, read)
    if c.qkv_bias:
        q, k, v = q + lift(p["b_Q"], 4), k + lift(p["b_K"], 4), v + lift(p["b_V"], 4)
    q = hs("blocks.attn.hook_q", q)
    k = hs("blocks.attn.hook_k", k)
    v = hs("blocks.attn.hook_v", v)
    if c.qk_norm:
        q, k = _head_rms(q, p["q_norm_w"], c.eps), _head_rms(k, p["k_norm_w"], c.eps)
    if c.positional == "rotary":
        q = hs("blocks.attn.hook_rot_q", apply_rotary(q, q_cos, q_sin, c.rotary_dim))
        k = hs("blocks.attn.hook_rot_k", apply_rotary(k, ctx["cos"], ctx["sin"], c.rotary_dim))
    if ctx.get("tiles") is not None and read is None:  # packed rows, attention by tiles
        if hs.wants("blocks.attn.hook_attn_scores", "blocks.attn.hook_pattern"):
            raise JaxpatchError("internal: tiled packed attention cannot edit or capture scores or patterns.")
        z = _tiled_attention(c, q, k, v, prefix_kv, ctx)
    else:
        z = _dense_attention(c, q, k, v, prefix_kv, q_index, allowed, ctx, hs, x.dtype)
    return _after_z(c, p, x, z, hs)


def _after_z(c: ModelConfig, p: Params, x, z, hs: SiteHandler):
    """The rest of :func:`block` from the heads' outputs ``z`` on: output projection, MLP."""
    z = hs("blocks.attn.hook_z", z)
    if hs.wants("blocks.attn.hook_result"):  # per-head writes to the residual stream
        result = hs("blocks.attn.hook_result", _mm("BTNH,NHD->BTND", z, p["W_O"]))
        attn_out = jnp.sum(result, axis=2)
    else:
        attn_out = _mm("BTNH,NHD->BTD", z, p["W_O"])
    attn_out = _output(c, p, attn_out, "b_O" if c.o_bias else None, "ln1", hs, "blocks.hook_attn_out")
    mid = hs("blocks.hook_resid_mid", x + attn_out)
    mlp_in = hs("blocks.hook_mlp_in", x if c.parallel_attn_mlp else mid)
    h = _norm(c, mlp_in, p["ln2_w"], p.get("ln2_b"), hs, "blocks.ln2")
    if c.gated_mlp:
        lin = _mm("BTD,DF->BTF", h, p["W_in"])
        pre = _mm("BTD,DF->BTF", h, p["W_gate"])
        if c.mlp_bias:
            lin, pre = lin + lift(p["b_in"], 3), pre + lift(p["b_gate"], 3)
        lin = hs("blocks.mlp.hook_pre_linear", lin)
        pre = hs("blocks.mlp.hook_pre", pre)
        post = hs("blocks.mlp.hook_post", activation(c.act_fn, pre) * lin)
    else:
        pre = _mm("BTD,DF->BTF", h, p["W_in"])
        if c.mlp_bias:
            pre = pre + lift(p["b_in"], 3)
        pre = hs("blocks.mlp.hook_pre", pre)
        post = hs("blocks.mlp.hook_post", activation(c.act_fn, pre))
    mlp_out = _mm("BTF,FD->BTD", post, p["W_out"])
    mlp_out = _output(c, p, mlp_out, "b_out" if c.mlp_bias else None, "ln2", hs, "blocks.hook_mlp_out")
    return hs("blocks.hook_resid_post", mid + mlp_out)


def head_write_sites(config: ModelConfig) -> tuple[str, ...]:
    """The sites :func:`head_writes` reads from a forward pass."""
    if config.post_norms:
        return ("blocks.attn.hook_result", "blocks.ln1_post.hook_scale")
    return ("blocks.attn.hook_result",)


def head_writes(config: ModelConfig, params: Params, caps):
    """Each attention head's write to the residual stream ``[L, B, T, N, D]``.

    They sum over heads to ``hook_attn_out`` less a part that is the same in every run (the
    output bias; a post-norm's bias). Without post-norms a head's write is its
    ``attn.hook_result``. With post-norms (Gemma 2/3) the norm acts on the sum of the heads, and
    is linear in it once its scale is fixed, so each head's write is its result passed through the
    norm at the scale the run computed (LayerNorm also centres each head's result): exactly
    additive, never linearised.
    """
    result = caps["blocks.attn.hook_result"]
    if not config.post_norms:
        return result
    if config.o_bias:
        raise JaxpatchError(
            "Per-head writes are not defined for a model with both an attention output bias and post-norms: the "
            "bias passes through the post-norm at each run's own scale, so it is not a constant. No supported "
            "family has both.")
    rf = result.astype(jnp.promote_types(result.dtype, jnp.float32))
    if config.norm == "layernorm":
        rf = rf - jnp.mean(rf, axis=-1, keepdims=True)
    scale = caps["blocks.ln1_post.hook_scale"][:, :, :, None, :]  # [L, B, T, 1, 1]
    w = params["blocks"]["ln1_post_w"][:, None, None, None, :]
    return ((rf / scale.astype(rf.dtype)) * w.astype(rf.dtype)).astype(result.dtype)


def _unembedding(params: Params):
    """The unembedding ``[D, V]``: ``W_U``, or the embedding's transpose for tied embeddings."""
    return params["W_U"] if "W_U" in params else params["W_E"].T


def unembed(config: ModelConfig, params: Params, x, hs: SiteHandler, rows=None):
    """Final norm and unembedding: ``[B, T, D] -> [B, T, V]`` logits.

    ``rows`` (int ``[B]``, optional): unembed only position ``rows[b]`` of prompt ``b`` ->
    ``[B, V]``. The final norm (and its hook sites) still covers every position; only the
    vocabulary matmul, most of the unembedding's cost, is restricted."""
    h = _norm(config, x, params["ln_f_w"], params.get("ln_f_b"), hs, "ln_final")
    w_u = _unembedding(params)
    if rows is None:
        logits = jnp.einsum("BTD,DV->BTV", h, w_u)
    else:
        h = jnp.take_along_axis(h, jnp.reshape(rows, (-1, 1, 1)), axis=1)[:, 0]  # [B, D]
        logits = jnp.einsum("BD,DV->BV", h, w_u)
    if config.unembed_bias:
        logits = logits + lift(params["b_U"], logits.ndim)
    return _softcap(logits, config.final_softcap)


# ----------------------------------------------------------------------------------------------
# Running the stack


def _windows(config: ModelConfig) -> jnp.ndarray:
    """Per-layer sliding window as data ``[L]`` (a number larger than any sequence if none)."""
    big = np.iinfo(np.int32).max
    return jnp.asarray([config.sliding_window if s else big for s in config.sliding_layers], jnp.int32)


def _local(config: ModelConfig) -> jnp.ndarray:
    return jnp.asarray([1 if s else 0 for s in config.sliding_layers], jnp.int32)


def run_context(config: ModelConfig, tokens, attention_mask=None, positions=None):
    """Per-run data shared by every layer: positions, key mask, rotary tables."""
    B, T = tokens.shape
    if positions is None:
        positions = default_positions(tokens, attention_mask)
    key_mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    ctx = {"positions": positions, "key_mask": key_mask}
    if config.positional == "rotary":
        ctx["cos"], ctx["sin"] = rotary_tables(config, positions)
    return ctx


def _layer_ctx(config: ModelConfig, run_ctx, layer, window, local, pos_offset: int = 0):
    T = run_ctx["positions"].shape[1]
    ctx = {"key_mask": run_ctx["key_mask"], "window": window,
           "q_index": jnp.arange(pos_offset, T, dtype=jnp.int32), "k_index": jnp.arange(T, dtype=jnp.int32)}
    if config.positional == "rotary":
        cos = jax.lax.dynamic_index_in_dim(run_ctx["cos"], local, 0, keepdims=False)[:, pos_offset:]
        sin = jax.lax.dynamic_index_in_dim(run_ctx["sin"], local, 0, keepdims=False)[:, pos_offset:]
        ctx["cos"], ctx["sin"] = cos, sin
    return ctx


#: What a gradient through :func:`run_blocks` (``remat=False``) keeps of each block for its backward
#: pass: the outputs of the matmuls over token rows (the projections and the MLP's two); the rest
#: (norms, activation functions, attention) is recomputed from them, elementwise or small. Keeping
#: every intermediate instead (``None``: the plain scan, the twin the tests compare against) stores
#: and reloads many more stacked ``[L, ...]`` arrays: forward+backward of GPT-2 small (all weights'
#: gradients) measured 3-11 % slower. Without a gradient it changes nothing.
GRAD_SAVES = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def run_blocks(config: ModelConfig, blocks: Params, x, run_ctx, ivs: Interventions = NONE,
               capture: frozenset = frozenset(), remat: bool = False, pos_offset: int = 0, prefix_kv=None):
    """Scan every block over ``x``. Returns ``(x, captures)``, captures stacked ``[L, ...]``.

    ``remat``: a gradient through the scan recomputes each block from its input instead of
    keeping its matmul outputs (:data:`GRAD_SAVES`; ``jax.checkpoint``): less memory, one more forward.
    ``pos_offset``/``prefix_kv``: ``x`` covers positions ``pos_offset..`` only; the keys and values
    of the positions before are ``prefix_kv`` (see :func:`forward`'s ``prefix``)."""
    layers = jnp.arange(config.n_layers, dtype=jnp.int32)
    kv = tuple(jax.lax.slice_in_dim(a, 0, pos_offset, axis=2) for a in prefix_kv) if pos_offset else None

    def body(x, xs):
        p, layer, window, local, kv = xs
        hs = SiteHandler(ivs, capture, layer, pos_offset)
        x = block(config, p, x, hs, _layer_ctx(config, run_ctx, layer, window, local, pos_offset), kv)
        return x, hs.captured

    xs = (blocks, layers, _windows(config), _local(config), kv)
    if remat:
        body = jax.checkpoint(body)
    elif GRAD_SAVES is not None:
        body = jax.checkpoint(body, policy=GRAD_SAVES, prevent_cse=False)  # the scan already keeps CSE out
    return jax.lax.scan(body, x, xs)


def forward(config: ModelConfig, params: Params, tokens, interventions: Interventions | None = None,
            capture: frozenset = frozenset(), attention_mask=None, remat: bool = False, rows=None, prefix=None):
    """The whole model as a pure function.

    Args:
        config: static model config.
        params: parameter pytree (see module docstring).
        tokens: int array ``[B, T]``.
        interventions: edits applied at sites (default: none).
        capture: canonical site names whose activations to return.
        attention_mask: optional ``[B, T]`` (1 = real token, 0 = padding).
        remat: recompute each block in a gradient's backward pass (see :func:`run_blocks`).
        rows: optional int ``[B]``: the logits of position ``rows[b]`` of each prompt only
            (``[B, V]``; a metric that reads the answer position needs no other row, and the
            unembedding of the rest is most of its cost). Captures are unchanged.
        prefix: optional ``(pos_offset, prefix_kv)`` (``pos_offset`` a static int): compute
            positions ``pos_offset..`` only. ``prefix_kv`` holds the :func:`kv_sites`
            activations, stacked ``[L, B, >= pos_offset, K, H]``, of a run whose tokens (and
            attention mask) equal ``tokens`` before ``pos_offset``: under causal attention every
            activation there is that run's, so only its keys and values are read. The logits,
            the blocks' captures along ``pos``/``q_pos`` and the final norm's sites then cover
            positions ``pos_offset..``; ``rows`` stay whole-sequence positions, each at least
            ``pos_offset``; interventions are in whole-sequence coordinates.

    Returns:
        ``(logits [B, T, V], captures)`` (``[B, V]`` with ``rows``); per-layer captures are
        stacked ``[L, ...]``.
    """
    ivs = NONE if interventions is None else interventions
    pos_offset, prefix_kv = (0, None) if prefix is None else prefix
    run_ctx = run_context(config, tokens, attention_mask)
    hs = SiteHandler(ivs, capture)
    x = embed(config, params, tokens, hs, run_ctx["positions"])[:, pos_offset:]
    x, block_caps = run_blocks(config, params["blocks"], x, run_ctx, ivs, capture, remat, pos_offset, prefix_kv)
    hs_final = SiteHandler(ivs, capture, None, pos_offset)
    logits = unembed(config, params, x, hs_final, None if rows is None else rows - pos_offset)
    return logits, {**hs.captured, **hs_final.captured, **block_caps}


_MATMUL_MAJOR = ":matmul_major"
#: a layer's query, key and value weights side by side ``[D, (N + 2K) H]`` (see matmul_major_blocks)
_FUSED_QKV = "W_QKV:fused"
#: weight -> (its stacked layout's axes moved so that each layer's matmul reads it in place, the
#: per-layer transpose back to the layout the block names)
_FWD = {"W_Q": (0, 2, 1, 3), "W_K": (0, 2, 1, 3), "W_V": (0, 2, 1, 3), "W_O": (0, 2, 1, 3)}
_BACK = {"W_Q": (1, 0, 2), "W_K": (1, 0, 2), "W_V": (1, 0, 2), "W_O": (1, 0, 2)}


def matmul_major_blocks(blocks: Params) -> Params:
    """``blocks`` with the attention weights stored ``[L, D, N, H]`` / ``[L, H, N, D]`` (keys
    marked ``:matmul_major``) for :func:`run_blocks_from` / :func:`run_blocks_packed`: transposed
    once per program instead of once per layer per patched run (each layer's slice is then read by
    its matmul in place). The query, key and value weights are one ``[L, D, (N + 2K) H]`` matrix
    (:data:`_FUSED_QKV`), so each layer projects its rows with one matmul three times as wide."""
    out = dict(blocks)
    for name, perm in _FWD.items():
        out[name + _MATMUL_MAJOR] = jnp.transpose(out.pop(name), perm)
    parts = [out.pop(n + _MATMUL_MAJOR) for n in ("W_Q", "W_K", "W_V")]  # [L, D, N|K, H]
    out[_FUSED_QKV] = jnp.concatenate([w.reshape(w.shape[:2] + (-1,)) for w in parts], axis=-1)
    return out


def _layer_params(blocks: Params, layer) -> Params:
    """One layer's parameters of stacked ``blocks`` (matmul-major weights in the block's layout,
    the fused query/key/value matrix as it is: see :func:`block`). Weights held per layer
    (:mod:`.layer_weights`) come as views the block's matmuls read in place, never copied out."""
    p = {k: _at(a, layer) for k, a in blocks.items()}
    for k in [k for k in p if k.endswith(_MATMUL_MAJOR)]:
        name = k[: -len(_MATMUL_MAJOR)]
        p[name] = _map_weight(p.pop(k), lambda a, perm=_BACK[name]: jnp.transpose(a, perm))
    return p


def run_blocks_from(config: ModelConfig, blocks: Params, x, start, run_ctx, ivs: Interventions = NONE,
                    pos_offset: int = 0, prefix_kv=None, read=None, full_last=True, first_z=None):
    """Run blocks ``start..n_layers-1`` (``start`` may be traced) on residual stream ``x``.

    Args:
        x: ``[B, T - pos_offset, D]``: the residual stream entering block ``start`` at positions
            ``pos_offset..``.
        run_ctx: :func:`run_context` of the whole (unpatched) sequence.
        ivs: interventions keyed by absolute layer; positions in whole-sequence coordinates.
        pos_offset: static number of leading positions not recomputed.
        prefix_kv: the :func:`kv_sites` activations stacked ``[L, B, T, K, H]`` (only positions
            ``< pos_offset`` are read), required when ``pos_offset > 0``.

        read: ``[B, R]`` indices of the rows of ``x`` the caller reads after the last block; then
            only those rows are returned (``[B, R, D]``).
        full_last: with ``read``, a (traced) bool: false computes the last block's queries,
            attention and MLP for the read rows only (keys and values for all), which is exact
            only when no edit of ``ivs`` applies in the last layer; true runs it whole.
        first_z: the heads' outputs ``z`` ``[B, T - pos_offset, N, H]`` entering layer ``start``'s
            output projection, known already (the run's cache, when ``ivs`` acts on no
            :data:`BEFORE_Z` site of that layer): layer ``start`` computes no queries, keys,
            values or attention. Unless ``start`` is the last layer (it then runs whole).

    Returns:
        the residual stream after the last block, ``[B, T - pos_offset, D]`` (``[B, R, D]`` with
        ``read``).
    """
    windows, local = _windows(config), _local(config)
    L = config.n_layers

    def layer_args(layer):
        p = _layer_params(blocks, layer)
        kv = None
        if pos_offset:
            kv = tuple(
                jax.lax.slice_in_dim(jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), 0, pos_offset, axis=1)
                for a in prefix_kv
            )
        return p, _layer_ctx(config, run_ctx, layer, windows[layer], local[layer], pos_offset), kv

    def body(layer, x):
        p, ctx, kv = layer_args(layer)
        return block(config, p, x, SiteHandler(ivs, frozenset(), layer, pos_offset), ctx, kv)

    lo = start
    if first_z is not None:
        lo = jnp.where(start < L - 1, start + 1, start)

        def from_z(x):
            p, _, _ = layer_args(start)
            return block(config, p, x, SiteHandler(ivs, frozenset(), start, pos_offset), None, z=first_z)

        x = jax.lax.cond(start < L - 1, from_z, lambda x: x, x)
    if read is None:
        return jax.lax.fori_loop(lo, L, body, x)
    # The loop runs the last block too when it must run whole (one compiled block body serves
    # both); otherwise the last block computes only the read rows.
    x = jax.lax.fori_loop(lo, jnp.where(full_last, L, L - 1), body, x)
    last = jnp.asarray(L - 1, jnp.int32)

    def rows_only(x):  # no edit applies in the last layer: its unread rows feed nothing
        p, ctx, kv = layer_args(last)
        return block(config, p, x, SiteHandler(NONE, frozenset(), last, pos_offset), ctx, kv, read=read)

    # Done already: the last block ran whole, or the chunk starts past the last layer (padding).
    done = full_last | (start >= L)
    return jax.lax.cond(done, lambda x: _rows(x, read), rows_only, x)


def packed_layout(first, n_pos: int, rows: int):
    """The row layout of a packed suffix run (see :func:`run_blocks_packed`).

    ``first`` ``[S]``: the first position each of ``S`` segments recomputes (``n_pos``: an empty
    segment). Segment ``i`` holds positions ``first[i]..n_pos-1`` in consecutive rows, segments
    one after another; rows past the last segment are padding. Returns ``dict(slot [rows]`` (the
    segment of each row; ``S`` for padding), ``pos [rows]`` (each row's sequence position; 0 for
    padding), ``first [rows]`` (its segment's first position; 1 for padding), ``start [S]`` (each
    segment's first row)``. Traced: one compiled program serves every layout."""
    first = jnp.asarray(first, jnp.int32)
    lens = jnp.maximum(n_pos - first, 0)
    ends = jnp.cumsum(lens)
    start = ends - lens
    r = jnp.arange(rows, dtype=jnp.int32)
    slot = jnp.searchsorted(ends, r, side="right").astype(jnp.int32)  # rows past the segments: S
    S = first.shape[0]
    real = slot < S
    s = jnp.minimum(slot, S - 1)
    pos = jnp.where(real, first[s] + r - start[s], 0)
    return {"slot": slot, "pos": pos, "first": jnp.where(real, first[s], 1), "start": start}


#: Packed rows attend by tiles (:func:`_tiled_attention`: each query reads ``T + 2t`` keys, not
#: ``T + rows``) where the rows split into at least two tiles; ``False`` is the slow twin (dense).
TILED_ATTENTION = True


def tile_rows(rows: int, n_pos: int) -> int:
    """Rows per attention tile of a packed chunk of ``rows`` rows: the smallest divisor of ``rows``
    that holds a whole segment (``>= n_pos`` rows) and leaves at least two tiles; 0 if none
    (the chunk attends densely)."""
    return next((t for t in range(n_pos, rows // 2 + 1) if rows % t == 0), 0)


def _packed_tiles(layout, key_mask, T: int):
    """Tile masks of a packed layout for :func:`_tiled_attention`, or ``None`` (dense: see
    :func:`tile_rows`). Keys of tile ``j``: the cached positions ``0..T-1``, then the packed rows
    of tiles ``j - 1`` and ``j`` (``2t``; before row 0, none). Returns ``dict(q_index [nt, t]``
    (each query row's position), ``k_index [nt, T + 2t]`` (each key's position), ``allowed
    [nt, t, T + 2t]`` (cached keys before the query's segment's first position; packed keys of its
    own segment), ``key_mask [B, nt, T + 2t]`` (real, non-padding keys), ``slot [rows]`` and
    ``n_slots``)."""
    pos, slot, first = layout["pos"], layout["slot"], layout["first"]
    R = pos.shape[0]
    t = tile_rows(R, T)
    if not t:
        return None
    nt = R // t
    kr = (jnp.arange(nt, dtype=jnp.int32)[:, None] - 1) * t + jnp.arange(2 * t, dtype=jnp.int32)[None, :]  # [nt, 2t]
    real = kr >= 0
    kr = jnp.maximum(kr, 0)
    q_slot = slot.reshape(nt, t)
    cached = jnp.arange(T, dtype=jnp.int32)[None, :] < first[:, None]  # [R, T]
    own = real[:, None, :] & (slot[kr][:, None, :] == q_slot[:, :, None])  # [nt, t, 2t]
    allowed = jnp.concatenate([cached.reshape(nt, t, T), own], axis=-1)
    k_index = jnp.concatenate([jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (nt, T)), pos[kr]], axis=-1)
    B = key_mask.shape[0]
    km = jnp.concatenate([jnp.broadcast_to(key_mask[:, None, :], (B, nt, T)), key_mask[:, pos[kr]]], axis=-1)
    return {"q_index": pos.reshape(nt, t), "k_index": k_index, "allowed": allowed, "key_mask": km.astype(bool),
            "slot": slot, "n_slots": layout["start"].shape[0]}


def run_blocks_packed(config: ModelConfig, blocks: Params, cache, start, run_ctx, layout, hs_of, read, full_last=True,
                      side=None, lead=None):
    """Suffix runs of several patches packed into one row axis: blocks ``start..n_layers-1``.

    Each patch (segment) recomputes only the positions it can change, ``first..n_pos-1``
    (:func:`packed_layout`), instead of every patch in a vectorised chunk recomputing the
    positions from the chunk's earliest one. Row ``r`` of segment ``i`` at position ``q`` attends
    to the cached run's keys/values at positions ``< first[i]`` (unchanged under causal attention)
    and to its own segment's rows at positions ``<= q``: per segment, exactly the attention of
    :func:`run_blocks_from` with ``pos_offset = first[i]``. Where the rows split into tiles of at
    least a sequence (:func:`tile_rows`), each tile's queries read only the cached keys and the
    packed keys of that tile and the one before it (:func:`_tiled_attention`), which hold every key
    a segment may see.

    Args:
        cache: the run's ``resid`` ``[L, B, T, D]`` and :func:`kv_sites` ``k``, ``v``
            ``[L, B, T, K, H]``.
        start: the (traced) first layer; every segment starts from the cached residual there.
        run_ctx: :func:`run_context` of the whole run.
        layout: :func:`packed_layout`.
        hs_of: ``layer -> SiteHandler`` applying the patches' edits to packed activations
            ``[B, rows, ...]``.
        read: ``[B, R]`` rows the caller reads after the last block (returned ``[B, R, D]``).
        full_last: a (traced) bool: false computes only the read rows' queries, attention and MLP
            in the last block (exact when no edit applies there).
        side: ``(pos [S], row [S], hs_of)`` for edits of a site whose edit in a layer changes that
            layer's output at the edited row only (:data:`jaxpatch.sites.LOCAL_SITES`): layer
            ``start`` then runs for one row per segment, at position ``pos`` (attending to the
            cached keys before it and its own: a one-row segment), with ``hs_of(start)``'s edits;
            segment ``i``'s result replaces packed row ``row[i]`` (``rows``: none, its edit is in a
            later layer) of the cached residual entering layer ``start + 1``, where every segment
            starts. The other rows of layer ``start`` cannot change there: not running them is
            exact. Not when ``start`` is the last layer (the whole block runs as without ``side``).
        lead: ``(k, ok, hs_of)`` (``k`` static): where the traced ``ok`` holds, layer ``start``
            runs for the first ``k`` packed rows alone (with ``hs_of(start)``'s edits, applied to
            ``[B, k, ...]``) and the other rows enter layer ``start + 1`` from the cached residual.
            The caller guarantees that then every segment editing layer ``start`` lies in the
            first ``k`` rows, so the rows after them cannot change in that layer (their edits are
            in later layers). Not when ``start`` is the last layer (it runs whole), nor with ``side``.
    """
    windows, local = _windows(config), _local(config)
    L, T = config.n_layers, run_ctx["positions"].shape[1]
    pos = layout["pos"]

    def attend(layout):  # what each packed row's query may read
        pos, slot, first = layout["pos"], layout["slot"], layout["first"]
        key_mask = jnp.concatenate([run_ctx["key_mask"], run_ctx["key_mask"][:, pos]], axis=1)  # [B, T + rows]
        # Cached keys before the segment's first position; packed keys of the segment itself.
        allowed = jnp.concatenate([jnp.arange(T, dtype=jnp.int32)[None, :] < first[:, None],
                                   slot[:, None] == slot[None, :]], axis=1)  # [rows, T + rows]
        k_index = jnp.concatenate([jnp.arange(T, dtype=jnp.int32), pos])
        tiles = _packed_tiles(layout, run_ctx["key_mask"], T) if TILED_ATTENTION else None
        return {"pos": pos, "key_mask": key_mask, "k_index": k_index, "allowed": allowed, "tiles": tiles}

    whole = attend(layout)

    def layer_args(layer, pos=pos, key_mask=whole["key_mask"], k_index=whole["k_index"], allowed=whole["allowed"],
                   tiles=whole["tiles"]):
        p = _layer_params(blocks, layer)
        ctx = {"key_mask": key_mask, "window": windows[layer], "q_index": pos, "k_index": k_index, "allowed": allowed,
               "tiles": tiles}
        if config.positional == "rotary":
            ctx["cos"] = jax.lax.dynamic_index_in_dim(run_ctx["cos"], local[layer], 0, keepdims=False)[:, pos]
            ctx["sin"] = jax.lax.dynamic_index_in_dim(run_ctx["sin"], local[layer], 0, keepdims=False)[:, pos]
        kv = tuple(jax.lax.dynamic_index_in_dim(cache[n], layer, 0, keepdims=False) for n in ("k", "v"))
        return p, ctx, kv

    def body(layer, x):
        p, ctx, kv = layer_args(layer)
        return block(config, p, x, hs_of(layer), ctx, kv)

    resid_at = lambda layer: jax.lax.dynamic_index_in_dim(cache["resid"], jnp.minimum(layer, L - 1), 0, keepdims=False)  # noqa: E731
    lo = start
    if side is not None:
        side_pos, side_row, side_hs = side
        lo = jnp.where(start < L - 1, start + 1, start)  # the last layer runs whole (no cached residual after it)

        def one_row_each(x):  # layer `start` for each segment's edited row alone
            S = side_pos.shape[0]
            own = jnp.arange(S, dtype=jnp.int32)
            p, ctx, kv = layer_args(start, pos=side_pos,
                                    key_mask=jnp.concatenate([run_ctx["key_mask"], run_ctx["key_mask"][:, side_pos]], axis=1),
                                    k_index=jnp.concatenate([jnp.arange(T, dtype=jnp.int32), side_pos]),
                                    allowed=jnp.concatenate([jnp.arange(T, dtype=jnp.int32)[None, :] < side_pos[:, None],
                                                             own[:, None] == own[None, :]], axis=1), tiles=None)
            y = block(config, p, resid_at(start)[:, side_pos], side_hs(start), ctx, kv)
            return x.at[:, side_row].set(y.astype(x.dtype), mode="drop")

        x = jax.lax.cond(start < L - 1, one_row_each, lambda x: x, resid_at(lo)[:, pos])
    elif lead is not None:
        k, ok, lead_hs = lead
        ok = ok & (start < L - 1)  # the last layer runs whole (no cached residual after it)
        lo = jnp.where(ok, start + 1, start)
        head = attend({n: layout[n][:k] for n in ("pos", "slot", "first")} | {"start": layout["start"]})

        def first_rows(x):  # layer `start` for the first k rows alone
            p, ctx, kv = layer_args(start, **head)
            y = block(config, p, resid_at(start)[:, head["pos"]], lead_hs(start), ctx, kv)
            return x.at[:, :k].set(y.astype(x.dtype))

        x = jax.lax.cond(ok, first_rows, lambda x: x, resid_at(lo)[:, pos])
    else:
        x = resid_at(start)[:, pos]
    x = jax.lax.fori_loop(lo, jnp.where(full_last, L, L - 1), body, x)
    last = jnp.asarray(L - 1, jnp.int32)

    def rows_only(x):  # no edit applies in the last layer: its unread rows feed nothing
        p, ctx, kv = layer_args(last)
        return block(config, p, x, SiteHandler(NONE, frozenset(), last), ctx, kv, read=read)

    done = full_last | (start >= L)
    return jax.lax.cond(done, lambda x: _rows(x, read), rows_only, x)


def logits_at(config: ModelConfig, params: Params, x, ivs: Interventions = NONE, pos_offset: int = 0):
    """Final norm and unembedding of residual rows ``x`` ``[B, R, D]`` -> ``[B, R, V]``."""
    return unembed(config, params, x, SiteHandler(ivs, frozenset(), None, pos_offset))


# ----------------------------------------------------------------------------------------------
# Random parameters (tests, toys)


def logits_columns(config: ModelConfig, params: Params, x, columns):
    """Final norm and the logits of given tokens only: residual rows ``x`` ``[..., B, D]``,
    ``columns`` ``[B, C]`` token ids per prompt -> ``[..., B, C]``, equal to ``logits_at``'s
    columns (each is one dot product with that token's unembedding column)."""
    h = _norm(config, x, params["ln_f_w"], params.get("ln_f_b"), SiteHandler(NONE, frozenset()), "ln_final")
    w_u = _unembedding(params)  # [D, V]
    cols = jnp.take(w_u, columns, axis=1)  # [D, B, C]
    logits = jnp.einsum("...BD,DBC->...BC", h, cols.astype(h.dtype))
    if config.unembed_bias:
        bias = jnp.take(params["b_U"], columns).astype(logits.dtype)
        logits = logits + bias.reshape((1,) * (logits.ndim - 2) + bias.shape)
    return _softcap(logits, config.final_softcap)


def logits_elements(config: ModelConfig, params: Params, x, tokens):
    """Final norm and single logits: residual rows ``x`` ``[..., D]`` and one token id each
    ``[...]`` -> ``[...]``, each equal to ``logits_at``'s logit of that token for that row (one dot
    product with the token's unembedding column)."""
    h = _norm(config, x, params["ln_f_w"], params.get("ln_f_b"), SiteHandler(NONE, frozenset()), "ln_final")
    w_u = _unembedding(params)  # [D, V]
    cols = jnp.moveaxis(jnp.take(w_u, tokens, axis=1), 0, -1)  # [..., D]
    logits = jnp.einsum("...D,...D->...", h, cols.astype(h.dtype))
    if config.unembed_bias:
        logits = logits + jnp.take(params["b_U"], tokens).astype(logits.dtype)
    return _softcap(logits, config.final_softcap)


def _draw(key, shape):
    """Standard normal float32 draws, fenced off from the arithmetic that scales them: inside a
    compiled init (see :func:`jaxpatch.models.init_params`) XLA would otherwise fold the scale
    into the sampler and change the last bit of the weights that seeds have always drawn."""
    return jax.lax.optimization_barrier(jax.random.normal(key, shape, jnp.float32))


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, init_range: float = 0.02) -> Params:
    """Random parameters of the layout in the module docstring.

    Biases and norm weights are random too (not zeros/ones) so parity tests exercise them.
    """
    c = config
    L, N, K, D, H, F, V = c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab
    keys = iter(jax.random.split(key, 48))

    def normal(shape, std=init_range):
        return (std * _draw(next(keys), shape)).astype(dtype)

    def near_one(shape):
        return (1.0 + 0.1 * _draw(next(keys), shape)).astype(dtype)

    ln = c.norm == "layernorm"
    blocks = {"ln1_w": near_one((L, D)), "W_Q": normal((L, N, D, H)), "W_K": normal((L, K, D, H)),
              "W_V": normal((L, K, D, H)), "W_O": normal((L, N, H, D)), "ln2_w": near_one((L, D)),
              "W_in": normal((L, D, F)), "W_out": normal((L, F, D))}
    if ln:
        blocks["ln1_b"], blocks["ln2_b"] = normal((L, D)), normal((L, D))
    if c.qkv_bias:
        blocks.update(b_Q=normal((L, N, H)), b_K=normal((L, K, H)), b_V=normal((L, K, H)))
    if c.qk_norm:
        blocks.update(q_norm_w=near_one((L, H)), k_norm_w=near_one((L, H)))
    if c.o_bias:
        blocks["b_O"] = normal((L, D))
    if c.gated_mlp:
        blocks["W_gate"] = normal((L, D, F))
    if c.mlp_bias:
        blocks.update(b_in=normal((L, F)), b_out=normal((L, D)))
        if c.gated_mlp:
            blocks["b_gate"] = normal((L, F))
    if c.post_norms:
        blocks.update(ln1_post_w=near_one((L, D)), ln2_post_w=near_one((L, D)))
        if ln:
            blocks.update(ln1_post_b=normal((L, D)), ln2_post_b=normal((L, D)))
    params = {"W_E": normal((V, D)), "blocks": blocks, "ln_f_w": near_one((D,))}
    if ln:
        params["ln_f_b"] = normal((D,))
    if c.positional == "learned":
        params["W_pos"] = normal((c.n_ctx, D))
    if not c.tied_embeddings:
        params["W_U"] = normal((D, V))
    if c.unembed_bias:
        params["b_U"] = jnp.zeros((V,), dtype)
    return params
