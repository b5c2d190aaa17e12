"""Edges of the residual graph: edge attribution patching (EAP, Syed et al. 2023), EAP-IG (Hanna
et al. 2024), and exact edge patching to check them against.

Upstream nodes write to the residual stream: the embedding (token + position), every attention
head's output (``z_h @ W_O[h]``) and every MLP's output. Downstream nodes read it: every head's
query, key and value input, every MLP's input, and the logits. An *edge* u -> d is u's
contribution to d's input. To take gradients per edge, each downstream node gets its own copy of
its residual input plus a zero-valued delta (``[.., head, d_model]`` for q/k/v), so one backward
pass yields ∂metric/∂input for every downstream node at once, and

    EAP(u -> d) = (out_u[src] - out_u[run]) · ∂metric/∂input_d            (summed over pos, d_model)

EAP-IG averages the gradient over ``ig_steps`` points on the straight line between the run's and
the source's token embeddings (midpoint rule; steps are vmapped). Exact edge patching adds
``out_u[src] - out_u[run]`` to d's input alone and reruns the model (vmapped over edges).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as _metrics
from ._errors import InputError
from .config import ModelConfig
from .interventions import NONE
from .model import HookedModel, check_tokens
from .models._layers import SiteHandler, activation, layer_norm, lift
from .patching import answer_arrays

_NO_SITES = SiteHandler(NONE, frozenset())


def _ln(x, w, b, eps):
    return layer_norm(x, w, b, eps, _NO_SITES, "blocks.ln1")


def edge_forward(config: ModelConfig, params, tokens, deltas, embed=None):
    """GPT-2 forward with a separate residual input per downstream node.

    Args:
        deltas: ``q``/``k``/``v`` ``[L, B, T, N, D]``, ``mlp`` ``[L, B, T, D]``, ``logits``
            ``[B, T, D]``: added to each downstream node's own copy of its input.
        embed: optional token-embedding override ``[B, T, D]`` (for EAP-IG interpolation).

    Returns:
        logits ``[B, T, V]`` and the upstream outputs: ``embed`` ``[B, T, D]``, ``heads``
        ``[L, B, T, N, D]`` (per-head writes, without ``b_O``), ``mlp`` ``[L, B, T, D]``.
    """
    c = config
    T = tokens.shape[1]
    emb = params["W_E"][tokens] if embed is None else embed
    x0 = emb + lift(params["W_pos"][:T], 3)

    def body(x, xs):
        p, d = xs
        hq = _ln(x[:, :, None, :] + d["q"], lift(p["ln1_w"], 4), lift(p["ln1_b"], 4), c.eps)
        hk = _ln(x[:, :, None, :] + d["k"], lift(p["ln1_w"], 4), lift(p["ln1_b"], 4), c.eps)
        hv = _ln(x[:, :, None, :] + d["v"], lift(p["ln1_w"], 4), lift(p["ln1_b"], 4), c.eps)
        q = jnp.einsum("BTND,NDH->BTNH", hq, p["W_Q"]) + lift(p["b_Q"], 4)
        k = jnp.einsum("BSND,NDH->BSNH", hk, p["W_K"]) + lift(p["b_K"], 4)
        v = jnp.einsum("BSND,NDH->BSNH", hv, p["W_V"]) + lift(p["b_V"], 4)
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(c.d_head)
        causal = jnp.tril(jnp.ones((1, 1, T, T), bool))
        pattern = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        z = jnp.einsum("BNTS,BSNH->BTNH", pattern, v)
        heads = jnp.einsum("BTNH,NHD->BTND", z, p["W_O"])
        mid = x + jnp.sum(heads, axis=2) + lift(p["b_O"], 3)
        h2 = _ln(mid + d["mlp"], lift(p["ln2_w"], 3), lift(p["ln2_b"], 3), c.eps)
        mlp = jnp.einsum("BTF,FD->BTD", activation(c.act_fn, jnp.einsum("BTD,DF->BTF", h2, p["W_in"]) + lift(p["b_in"], 3)),
                         p["W_out"]) + lift(p["b_out"], 3)
        return mid + mlp, (heads, mlp)

    per_layer = {k: deltas[k] for k in ("q", "k", "v", "mlp")}
    x, (heads, mlp) = jax.lax.scan(body, x0, (params["blocks"], per_layer))
    h = _ln(x + deltas["logits"], lift(params["ln_f_w"], 3), lift(params["ln_f_b"], 3), c.eps)
    logits = jnp.einsum("BTD,DV->BTV", h, params["W_U"]) + lift(params["b_U"], 3)
    return logits, {"embed": x0, "heads": heads, "mlp": mlp}


def zero_deltas(config: ModelConfig, B: int, T: int, dtype):
    L, N, D = config.n_layers, config.n_heads, config.d_model
    return {"q": jnp.zeros((L, B, T, N, D), dtype), "k": jnp.zeros((L, B, T, N, D), dtype),
            "v": jnp.zeros((L, B, T, N, D), dtype), "mlp": jnp.zeros((L, B, T, D), dtype),
            "logits": jnp.zeros((B, T, D), dtype)}


@dataclasses.dataclass
class EdgeGraph:
    """Names and validity of the residual graph's edges for one config."""

    up: list[str]
    down: list[str]
    valid: np.ndarray  # [U, V] bool: u precedes d

    @classmethod
    def of(cls, config: ModelConfig) -> "EdgeGraph":
        L, N = config.n_layers, config.n_heads
        up, up_layer = ["embed"], [-1]
        for layer in range(L):
            up += [f"L{layer}H{h}" for h in range(N)] + [f"MLP{layer}"]
            up_layer += [layer] * N + [layer + 0.5]
        down, down_layer = [], []
        for layer in range(L):
            for kind in ("q", "k", "v"):
                down += [f"L{layer}H{h}.{kind}" for h in range(N)]
                down_layer += [layer] * N
            down.append(f"MLP{layer}.in")
            down_layer.append(layer + 0.5)
        down.append("logits")
        down_layer.append(L)
        valid = np.asarray(up_layer)[:, None] < np.asarray(down_layer)[None, :]
        return cls(up, down, valid)


def _up_stack(outs):
    """Upstream outputs ``[U, B, T, D]`` in EdgeGraph order (embed, then per layer heads + MLP)."""
    L, B, T, N, D = outs["heads"].shape
    per_layer = jnp.concatenate([jnp.moveaxis(outs["heads"], 3, 1), outs["mlp"][:, None]], axis=1)  # [L, N+1, B, T, D]
    return jnp.concatenate([outs["embed"][None], per_layer.reshape(L * (N + 1), B, T, D)], axis=0)


def _down_stack(grads):
    """Downstream input gradients ``[V, B, T, D]`` in EdgeGraph order."""
    L, B, T, N, D = grads["q"].shape
    qkv = jnp.stack([jnp.moveaxis(grads[k], 3, 1) for k in ("q", "k", "v")], axis=1)  # [L, 3, N, B, T, D]
    per_layer = jnp.concatenate([qkv.reshape(L, 3 * N, B, T, D), grads["mlp"][:, None]], axis=1)
    return jnp.concatenate([per_layer.reshape(L * (3 * N + 1), B, T, D), grads["logits"][None]], axis=0)


def _metric(names, logits, ctx):
    rows = jnp.take_along_axis(logits, ctx["answer_pos"][:, None, None], axis=1)[:, 0]
    return _metrics.compute_ctx(names, rows, ctx)[0]


@partial(jax.jit, static_argnames=("config", "names", "ig_steps"))
def _eap_core(config, params, run_tokens, src_tokens, ctx, *, names, ig_steps):
    B, T = run_tokens.shape
    zeros = zero_deltas(config, B, T, params["W_E"].dtype)
    _, run_out = edge_forward(config, params, run_tokens, zeros)
    _, src_out = edge_forward(config, params, src_tokens, zeros)
    diff = _up_stack(src_out) - _up_stack(run_out)  # [U, B, T, D]

    def grads_at(embed):
        f = lambda d: jnp.sum(_metric(names, edge_forward(config, params, run_tokens, d, embed)[0], ctx))  # noqa: E731
        return jax.grad(f)(zeros)

    if ig_steps is None:
        g = grads_at(None)
    else:
        e_run, e_src = params["W_E"][run_tokens], params["W_E"][src_tokens]
        alphas = (jnp.arange(ig_steps, dtype=e_run.dtype) + 0.5) / ig_steps
        g_all = jax.vmap(lambda a: grads_at(e_run + a * (e_src - e_run)))(alphas)
        g = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), g_all)
    return jnp.einsum("ubtd,vbtd->uvb", diff, _down_stack(g))


@dataclasses.dataclass
class EdgeResult:
    """Per-edge effects (estimated or exact) on the metric: ``per_prompt`` ``[U, V, B]``."""

    graph: EdgeGraph
    per_prompt: np.ndarray
    method: str
    direction: str
    metric: str

    def scores(self) -> np.ndarray:
        """Mean effect over prompts ``[U, V]``; invalid edges (d before u) are 0."""
        return np.where(self.graph.valid, self.per_prompt.mean(-1), 0.0)

    def top(self, k: int = 10):
        s = self.scores()
        flat = np.argsort(-np.abs(s).reshape(-1))[:k]
        return [(self.graph.up[i // s.shape[1]], self.graph.down[i % s.shape[1]], float(s.reshape(-1)[i])) for i in flat]


def _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction):
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    from .attribution import _metric_fn

    names = _metric_fn(metric)
    cfg = model.config
    clean, corrupt = check_tokens(cfg, clean_tokens), check_tokens(cfg, corrupt_tokens)
    if clean.shape != corrupt.shape:
        raise InputError(f"clean_tokens {tuple(clean.shape)} and corrupt_tokens {tuple(corrupt.shape)} must have the same shape.")
    B, T = clean.shape
    ans, wr, apos = answer_arrays(cfg, names, answer, wrong, answer_pos, B, T)
    names, consts = _metrics.prepare(names, B, cfg.d_vocab, model.dtype)  # traced afresh: current values
    clean_rows = jnp.take_along_axis(model(clean), jnp.asarray(apos)[:, None, None], axis=1)[:, 0]
    ctx = {"answer_pos": jnp.asarray(apos), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wr),
           "clean_logprobs": jax.nn.log_softmax(clean_rows.astype(jnp.promote_types(clean_rows.dtype, jnp.float32)), -1),
           "metric_consts": consts}
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    return names, run, src, ctx


def edge_attribution_patch(model: HookedModel, clean_tokens, corrupt_tokens, *, direction="denoise", metric="logit_diff",
                           answer=None, wrong=None, answer_pos=-1, ig_steps: int | None = None) -> EdgeResult:
    """EAP (``ig_steps=None``) or EAP-IG (``ig_steps=K``) scores for every edge, one call.

    Returns an :class:`EdgeResult` of estimated metric changes per edge and prompt.
    """
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise InputError(f"ig_steps must be a positive int or None, got {ig_steps!r}.")
    names, run, src, ctx = _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction)
    out = _eap_core(model.config, model.params, run, src, ctx, names=names, ig_steps=ig_steps)
    return EdgeResult(EdgeGraph.of(model.config), np.asarray(out), "eap" if ig_steps is None else f"eap-ig{ig_steps}",
                      direction, _metrics.name_of(names[0]))


@partial(jax.jit, static_argnames=("config", "names"))
def _exact_core(config, params, run_tokens, src_tokens, ctx, up_idx, down_idx, *, names):
    B, T = run_tokens.shape
    zeros = zero_deltas(config, B, T, params["W_E"].dtype)
    _, run_out = edge_forward(config, params, run_tokens, zeros)
    _, src_out = edge_forward(config, params, src_tokens, zeros)
    diff = _up_stack(src_out) - _up_stack(run_out)
    L, N = config.n_layers, config.n_heads
    m_run = _metric(names, edge_forward(config, params, run_tokens, zeros)[0], ctx)

    def one(u, v):
        dx = diff[u]  # [B, T, D] added to downstream input v alone
        flat = jnp.zeros((L * (3 * N + 1) + 1, B, T, config.d_model), dx.dtype).at[v].set(dx)
        per_layer = flat[:-1].reshape(L, 3 * N + 1, B, T, config.d_model)
        qkv = per_layer[:, : 3 * N].reshape(L, 3, N, B, T, config.d_model)
        d = {"q": jnp.moveaxis(qkv[:, 0], 1, 3), "k": jnp.moveaxis(qkv[:, 1], 1, 3), "v": jnp.moveaxis(qkv[:, 2], 1, 3),
             "mlp": per_layer[:, 3 * N], "logits": flat[-1]}
        return _metric(names, edge_forward(config, params, run_tokens, d)[0], ctx) - m_run

    return jax.lax.map(lambda uv: one(*uv), (up_idx, down_idx))


def exact_edge_patch(model: HookedModel, clean_tokens, corrupt_tokens, edges, *, direction="denoise", metric="logit_diff",
                     answer=None, wrong=None, answer_pos=-1) -> np.ndarray:
    """Exact effect of patching each edge ``(up_name, down_name)`` alone: ``[n_edges, B]``."""
    names, run, src, ctx = _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction)
    g = EdgeGraph.of(model.config)
    try:
        u = np.array([g.up.index(a) for a, _ in edges], np.int32)
        v = np.array([g.down.index(b) for _, b in edges], np.int32)
    except ValueError as e:
        raise InputError(f"Unknown edge endpoint: {e}. Upstream: {g.up[:4]}..., downstream: {g.down[:4]}...") from None
    bad = [(a, b) for (a, b), i, j in zip(edges, u, v) if not g.valid[i, j]]
    if bad:
        raise InputError(f"Edges must go forward (upstream node before downstream node); invalid: {bad[:5]}.")
    return np.asarray(_exact_core(model.config, model.params, run, src, ctx, jnp.asarray(u), jnp.asarray(v), names=names))
