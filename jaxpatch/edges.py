"""Edges of the residual graph: edge attribution patching (EAP, Syed et al. 2023), EAP-IG (Hanna
et al. 2024), and exact edge patching to check them against.

Upstream nodes write to the residual stream: the embedding (token + position), every attention
head's output (``z_h @ W_O[h]``) and every MLP's output. Downstream nodes read it: every head's
query, key and value input, every MLP's input, and the logits. An *edge* u -> d is u's
contribution to d's input. To take gradients per edge, each downstream node gets its own copy of
its residual input plus a zero-valued delta (``[.., head, d_model]`` for q/k/v) -- the model's own
forward pass provides these copies as on-demand sites (``blocks.hook_q_input`` ...), so there is
one forward pass in jaxpatch -- and one backward pass yields ∂metric/∂input for every downstream
node at once, and

    EAP(u -> d) = (out_u[src] - out_u[run]) · ∂metric/∂input_d            (summed over pos, d_model)

EAP-IG averages the gradient over ``ig_steps`` points on the straight line between the run's and
the source's token embeddings (midpoint rule; steps are vmapped). Exact edge patching adds
``out_u[src] - out_u[run]`` to d's input alone and reruns the model (vmapped over edges).

Across processes (after ``jax.distributed.initialize``), :func:`edge_attribution_patch` with
``mesh="auto"`` (default) splits the prompts over the processes (each computes
``ceil(batch / processes)`` of them on its first device; a collective, every process calls; a user
metric runs whole on each process), equal to one process to float rounding (a prompt's estimate in
a smaller batch may round differently; ``tests/test_multihost_gather.py``: 1e-5 relative).
:func:`exact_edge_patch` with ``mesh="auto"`` (default) splits its edges over every device of every
process (inputs checked equal across processes, then replicated; a collective); with
``mesh=None`` each process that returns a result runs it whole on its first device, with no
collective, bitwise equal to one process. ``gather="all"`` (default) returns the result on every
process; ``gather="process0"`` on process 0 only, the others returning ``None`` (split results
travel to process 0 alone; an unsplit call is not computed there). Any other value is an
:class:`~jaxpatch.InputError`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as _metrics
from . import models
from . import multihost as _multihost
from ._errors import InputError
from .config import ModelConfig
from .interventions import Edit, Interventions
from .model import HookedModel, check_attention_mask, check_tokens
from .patching import answer_arrays

#: Sites the edge methods read (upstream outputs) in the one forward pass.
_UP_SITES = frozenset({"blocks.hook_resid_pre", "blocks.hook_mlp_out", "hook_embed"})


def _check_additive(config: ModelConfig) -> None:
    if config.post_norms and config.o_bias:  # models.head_writes needs a constant bias part
        raise InputError(
            f"Edge methods decompose each attention output into per-head writes to the residual stream; this "
            f"{config.architecture} model has an attention output bias before a post-norm, so the bias's write "
            f"differs between runs and belongs to no node. Use node-level methods "
            f"(jaxpatch.activation_patch / attribution_patch) instead.")


def edge_forward(config: ModelConfig, params, tokens, deltas, embed=None, attention_mask=None, rows=None):
    """The model's one forward pass with a separate residual input per downstream node.

    Each downstream node reads its own copy of the residual stream (the model's on-demand sites
    ``blocks.hook_q_input``/``hook_k_input``/``hook_v_input`` per head, ``blocks.hook_mlp_in``,
    and the final residual stream for the logits), to which ``deltas`` are added:
    ``q`` ``[L, B, T, N, D]``, ``k``/``v`` ``[L, B, T, K, D]``, ``mlp`` ``[L, B, T, D]``,
    ``logits`` ``[B, T, D]``.

    Args:
        embed: optional replacement of ``hook_embed`` ``[B, T, D]`` (EAP-IG interpolation).
        rows: optional int ``[B]``: only position ``rows[b]``'s logits (``[B, V]``), as for
            :func:`jaxpatch.models.forward`.

    Returns:
        logits ``[B, T, V]`` (``[B, V]`` with ``rows``) and the upstream outputs: ``embed`` ``[B, T, D]`` (the residual
        stream entering block 0), ``heads`` ``[L, B, T, N, D]`` (per-head writes,
        :func:`jaxpatch.models.head_writes`: without ``b_O``; through the post-norm where the family
        has one), ``mlp`` ``[L, B, T, D]``, and the token embeddings ``tok`` ``[B, T, D]``.
    """
    edits = {
        "blocks.hook_q_input": (Edit(delta=deltas["q"], stacked=True),),
        "blocks.hook_k_input": (Edit(delta=deltas["k"], stacked=True),),
        "blocks.hook_v_input": (Edit(delta=deltas["v"], stacked=True),),
        "blocks.hook_mlp_in": (Edit(delta=deltas["mlp"], stacked=True),),
        "blocks.hook_resid_post": (Edit(layers=jnp.asarray(config.n_layers - 1, jnp.int32), delta=deltas["logits"]),),
    }
    if embed is not None:
        edits["hook_embed"] = (Edit(value=embed),)
    capture = _UP_SITES | frozenset(models.head_write_sites(config))
    logits, caps = models.forward(config, params, tokens, Interventions(edits), capture, attention_mask, rows=rows)
    return logits, {"embed": caps["blocks.hook_resid_pre"][0], "heads": models.head_writes(config, params, caps),
                    "mlp": caps["blocks.hook_mlp_out"], "tok": caps["hook_embed"]}


def zero_deltas(config: ModelConfig, B: int, T: int, dtype):
    L, N, K, D = config.n_layers, config.n_heads, config.n_kv_heads, config.d_model
    return {"q": jnp.zeros((L, B, T, N, D), dtype), "k": jnp.zeros((L, B, T, K, D), dtype),
            "v": jnp.zeros((L, B, T, K, D), dtype), "mlp": jnp.zeros((L, B, T, D), dtype),
            "logits": jnp.zeros((B, T, D), dtype)}


@dataclasses.dataclass
class EdgeGraph:
    """Names and validity of the residual graph's edges for one config.

    Upstream: ``embed``, per layer its heads ``L{l}H{h}`` and ``MLP{l}``. Downstream: per layer
    each query head's input ``L{l}H{h}.q``, each key/value head's inputs (``L{l}H{h}.k``; under
    grouped-query attention ``L{l}KV{k}.k``/``.v``), ``MLP{l}.in``, and ``logits``. An edge is
    valid when the upstream node writes before the downstream node reads (with parallel
    attention+MLP, a layer's MLP does not read its own layer's heads).
    """

    up: list[str]
    down: list[str]
    valid: np.ndarray  # [U, V] bool: u precedes d

    @classmethod
    def of(cls, config: ModelConfig) -> "EdgeGraph":
        L, N, K = config.n_layers, config.n_heads, config.n_kv_heads
        kv = "KV" if K != N else "H"
        up, up_layer = ["embed"], [-1]
        for layer in range(L):
            up += [f"L{layer}H{h}" for h in range(N)] + [f"MLP{layer}"]
            up_layer += [layer] * N + [layer + 0.5]
        down, down_layer = [], []
        for layer in range(L):
            down += [f"L{layer}H{h}.q" for h in range(N)]
            down += [f"L{layer}{kv}{h}.{kind}" for kind in ("k", "v") for h in range(K)]
            down_layer += [layer] * (N + 2 * K)
            down.append(f"MLP{layer}.in")
            down_layer.append(layer if config.parallel_attn_mlp else layer + 0.5)
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
    K = grads["k"].shape[3]
    per_layer = jnp.concatenate([jnp.moveaxis(grads["q"], 3, 1), jnp.moveaxis(grads["k"], 3, 1),
                                 jnp.moveaxis(grads["v"], 3, 1), grads["mlp"][:, None]], axis=1)  # [L, N+2K+1, B, T, D]
    return jnp.concatenate([per_layer.reshape(L * (N + 2 * K + 1), B, T, D), grads["logits"][None]], axis=0)


def _deltas_at(config: ModelConfig, v, dx):
    """Deltas that add ``dx`` ``[B, T, D]`` to downstream node ``v``'s input alone."""
    L, N, K, D = config.n_layers, config.n_heads, config.n_kv_heads, config.d_model
    B, T = dx.shape[:2]
    flat = jnp.zeros((L * (N + 2 * K + 1) + 1, B, T, D), dx.dtype).at[v].set(dx)
    per_layer = flat[:-1].reshape(L, N + 2 * K + 1, B, T, D)
    return {"q": jnp.moveaxis(per_layer[:, :N], 1, 3), "k": jnp.moveaxis(per_layer[:, N:N + K], 1, 3),
            "v": jnp.moveaxis(per_layer[:, N + K:N + 2 * K], 1, 3), "mlp": per_layer[:, N + 2 * K], "logits": flat[-1]}


def _metric_of(names, config, params, tokens, deltas, ctx, embed=None, every_row=False):
    """The metric ``[B]`` of a run with ``deltas``: only the answer rows are unembedded, or with
    ``every_row`` (the plain computation, kept by the slow twin :func:`_exact_core`) every
    position is, and the answer rows are taken from the full logits."""
    apos = ctx["answer_pos"]
    out, _ = edge_forward(config, params, tokens, deltas, embed, ctx.get("attention_mask"), rows=None if every_row else apos)
    rows = jnp.take_along_axis(out, apos[:, None, None], axis=1)[:, 0] if every_row else out
    return _metrics.compute_ctx(names, rows, ctx)[0]


@partial(jax.jit, static_argnames=("config", "names", "ig_steps"))
def _eap_core(config, params, run_tokens, src_tokens, ctx, *, names, ig_steps):
    B, T = run_tokens.shape
    zeros = zero_deltas(config, B, T, params["W_E"].dtype)
    _, run_out = edge_forward(config, params, run_tokens, zeros, attention_mask=ctx.get("attention_mask"))
    _, src_out = edge_forward(config, params, src_tokens, zeros, attention_mask=ctx.get("attention_mask"))
    diff = _up_stack(src_out) - _up_stack(run_out)  # [U, B, T, D]

    def grads_at(embed):
        f = lambda d: jnp.sum(_metric_of(names, config, params, run_tokens, d, ctx, embed))  # noqa: E731
        return jax.grad(f)(zeros)

    if ig_steps is None:
        g = grads_at(None)
    else:
        e_run, e_src = run_out["tok"], src_out["tok"]
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


def _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction, attention_mask=None):
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    from .attribution import _metric_fn

    names = _metric_fn(metric)
    cfg = model.config
    _check_additive(cfg)
    clean, corrupt = check_tokens(cfg, clean_tokens), check_tokens(cfg, corrupt_tokens)
    if clean.shape != corrupt.shape:
        raise InputError(f"clean_tokens {tuple(clean.shape)} and corrupt_tokens {tuple(corrupt.shape)} must have the same shape.")
    B, T = clean.shape
    mask = check_attention_mask(attention_mask, clean)
    ans, wr, apos = answer_arrays(cfg, names, answer, wrong, answer_pos, B, T, mask)
    names, consts = _metrics.prepare(names, B, cfg.d_vocab, model.dtype)  # traced afresh: current values
    clean_rows = jnp.take_along_axis(model(clean, attention_mask=mask), jnp.asarray(apos)[:, None, None], axis=1)[:, 0]
    ctx = {"answer_pos": jnp.asarray(apos), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wr),
           "clean_logprobs": jax.nn.log_softmax(clean_rows.astype(jnp.promote_types(clean_rows.dtype, jnp.float32)), -1),
           "metric_consts": consts}
    if mask is not None:
        ctx["attention_mask"] = mask
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    return names, run, src, ctx


def edge_attribution_patch(model: HookedModel, clean_tokens, corrupt_tokens, *, direction="denoise", metric="logit_diff",
                           answer=None, wrong=None, answer_pos=-1, ig_steps: int | None = None,
                           attention_mask=None, mesh="auto", gather: str = "all") -> EdgeResult | None:
    """EAP (``ig_steps=None``) or EAP-IG (``ig_steps=K``) scores for every edge, one call.

    ``mesh="auto"`` splits the prompts over the processes of a multi-process run (``None``: the
    whole call on this process; see the module docstring and
    :func:`jaxpatch.attribution_patch`'s ``mesh``).

    Returns an :class:`EdgeResult` of estimated metric changes per edge and prompt (``None`` on
    processes other than 0 under ``gather="process0"``; see the module docstring).
    """
    gather = _multihost.check_gather(gather)
    _multihost.check_prompt_mesh(mesh)
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise InputError(f"ig_steps must be a positive int or None, got {ig_steps!r}.")
    names, run, src, ctx = _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction,
                                   attention_mask)
    B = run.shape[0]
    share = _multihost.prompt_share(mesh, B, names, model.params)  # this process's prompts when they are split over processes
    spread = _multihost.spread(model.params)  # weights over several processes: one program that every process joins
    if share is None and not spread and not _multihost.keeps_result(gather):  # "process0" on another process: nothing to compute
        return None
    if share is not None or spread:  # every process must hold the same call: never a silent mix of two
        from .resume import fingerprint

        _multihost.check_same("inputs (model weights, prompts, metric or options)", fingerprint(
            model.config, model.params, run, src, ctx, names, ig_steps, direction))
    if share is not None:
        run, src = run[share], src[share]
        ctx = {k: (v if k == "metric_consts" else v[share]) for k, v in ctx.items()}
    out = _eap_core(model.config, model.params, run, src, ctx, names=names, ig_steps=ig_steps)
    if spread:
        out = _multihost.collect(out, gather)
        if out is None:  # "process0" on another process
            return None
    if share is not None:
        out = _multihost.gather_prompts(out, B, gather)
        if out is None:  # "process0" on another process
            return None
    return EdgeResult(EdgeGraph.of(model.config), np.asarray(out), "eap" if ig_steps is None else f"eap-ig{ig_steps}",
                      direction, _metrics.name_of(names[0]))


@partial(jax.jit, static_argnames=("config", "names"))
def _exact_core(config, params, run_tokens, src_tokens, ctx, up_idx, down_idx, *, names):
    B, T = run_tokens.shape
    zeros = zero_deltas(config, B, T, params["W_E"].dtype)
    _, run_out = edge_forward(config, params, run_tokens, zeros, attention_mask=ctx.get("attention_mask"))
    _, src_out = edge_forward(config, params, src_tokens, zeros, attention_mask=ctx.get("attention_mask"))
    diff = _up_stack(src_out) - _up_stack(run_out)
    m_run = _metric_of(names, config, params, run_tokens, zeros, ctx, every_row=True)

    def one(u, v):
        d = _deltas_at(config, v, diff[u])  # out_u[src] - out_u[run], added to downstream input v alone
        return _metric_of(names, config, params, run_tokens, d, ctx, every_row=True) - m_run

    return jax.lax.map(lambda uv: one(*uv), (up_idx, down_idx))


def exact_edge_patch(model: HookedModel, clean_tokens, corrupt_tokens, edges, *, direction="denoise", metric="logit_diff",
                     answer=None, wrong=None, answer_pos=-1, attention_mask=None, mesh="auto",
                     gather: str = "all") -> np.ndarray | None:
    """Exact effect of patching each edge ``(up_name, down_name)`` alone: ``[n_edges, B]``
    (``None`` on processes other than 0 under ``gather="process0"``; see the module docstring).

    ``mesh``: ``"auto"`` (default) splits the edges over every device (this process's; in a
    multi-process run every process's), ``None`` runs them on one device, or a 1-D
    ``jax.sharding.Mesh`` with axis ``"sweep"`` (as :func:`jaxpatch.evaluate_circuit`)."""
    gather = _multihost.check_gather(gather)
    names, run, src, ctx = _setup(model, clean_tokens, corrupt_tokens, metric, answer, wrong, answer_pos, direction,
                                   attention_mask)
    g = EdgeGraph.of(model.config)
    try:
        u = np.array([g.up.index(a) for a, _ in edges], np.int32)
        v = np.array([g.down.index(b) for _, b in edges], np.int32)
    except ValueError as e:
        raise InputError(f"Unknown edge endpoint: {e}. Upstream: {g.up[:4]}..., downstream: {g.down[:4]}...") from None
    bad = [(a, b) for (a, b), i, j in zip(edges, u, v) if not g.valid[i, j]]
    if bad:
        raise InputError(f"Edges must go forward (upstream node before downstream node); invalid: {bad[:5]}.")
    from .circuits import _engine

    spread = _multihost.spread(model.params)  # weights over several processes: one program that every process joins
    mesh = _engine.resolve_mesh(mesh, model.params)
    multi = _multihost.spans_processes(mesh)  # edges split over every process's devices
    if not (spread or multi) and not _multihost.keeps_result(gather):  # "process0" on another process: nothing to compute
        return None
    if spread:  # every process must hold the same call: never a silent mix of two
        from .resume import fingerprint

        _multihost.check_same("inputs (model weights, prompts, edges, metric or options)", fingerprint(
            model.config, model.params, run, src, ctx, names, u, v))
    # One edge patched = the circuit engine's masked forward with that one edge carrying the source
    # run's value (jaxpatch.circuits._engine); _exact_core above is its tested slow twin.
    ws = np.zeros((len(u) + 1,) + g.valid.shape, bool)
    ws[np.arange(len(u)), u, v] = True  # the last row patches nothing: the run itself
    other = _engine.up_outputs(model.config, model.params, src, ctx.get("attention_mask"))
    chunk = _engine.default_chunk(model.config, run.shape[0], run.shape[1], len(ws), None)
    args = _engine.global_inputs(mesh, "inputs (model weights, prompts, edges, metric or options)",
                                 (model.params, run, jnp.asarray(ws), other, ctx), (names, chunk))
    out = _engine.masked_sweep(model.config, args[0], names, *args[1:], chunk=chunk, mesh=mesh)
    out = _multihost.collect(out, gather) if (spread or multi) else np.asarray(out)
    if out is None:  # gather="process0" on another process
        return None
    out = out[:, 0]
    return out[:-1] - out[-1]
