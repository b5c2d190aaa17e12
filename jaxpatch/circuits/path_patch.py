"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of sender components
along their direct paths into receivers, every (sender, receiver) pair in one compiled program.

**The definition implemented.** Let *run* be the prompt being patched (the corrupted prompt when
denoising, the clean one when noising) and *source* the other. For a sender set S (heads, MLPs,
the embedding) and a receiver set R (heads' query/key/value inputs, MLP inputs, the logits):

1. Run *run* with every component frozen to its *run* value except the senders, which take their
   *source* outputs. Each receiver's residual input is then, exactly,
   ``resid_r[run] + Σ_{s∈S} (out_s[source] − out_s[run])``: only the senders' direct writes differ.
2. Run *run* again with each receiver's input replaced by that value -- the receiver's own layer
   norm recomputes its scale on it (exact, nothing linearised) -- and everything downstream of the
   receivers recomputed normally. Receivers are fixed to their step-1 inputs, so a receiver's
   change does not reach another receiver (Wang et al.'s step 3). The metric of this run is the
   pair's value.

A sender's write is its exactly additive contribution to the residual stream (a head's result
through ``W_O``; on post-norm families, Gemma 2/3, through the post-attention norm at its own run's
scale: :func:`jaxpatch.models.head_writes`, as for the edge methods), so step 1 needs no third run.

A receiver ``L{l}H{h}.q`` is head h's query input (``.k``/``.v``: the key/value input, per key/value
head under grouped-query attention, ``L{l}KV{k}.k``), ``MLP{l}.in`` the MLP's input, ``logits``
the final residual stream. Every receiver must read the stream after every sender of its pair
writes it (a head's write may feed its own layer's MLP unless attention and MLP run in parallel).

**How it runs.** Two unpatched runs give every upstream node's output and every receiver's
unpatched input; a pair's receiver inputs are then data (``where`` masks over per-head input
copies, the model's on-demand sites ``blocks.hook_q_input`` ...), so one forward per pair runs
under ``vmap``, pairs chunked with ``lax.map`` -- sorted by their first receiver's layer, each
chunk starting there from the run's cached residual stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import metrics as _metrics
from .. import models
from .._errors import InputError
from ..config import ModelConfig
from ..edges import _up_stack, edge_forward, zero_deltas
from ..interventions import Edit, Interventions
from ..model import HookedModel
from ..results import PatchResult
from . import _engine
from ._graph import as_group, down_index, graph_of, group_label, up_index

_RUN_SITES = frozenset({"blocks.hook_resid_pre", "blocks.hook_mlp_in", "blocks.hook_resid_post"})


def _receiver_masks(config: ModelConfig, graph, groups):
    """Per receiver group: ``q [L, N]``, ``k``/``v`` ``[L, K]``, ``mlp [L]``, ``logits []`` bools,
    and each group's first layer (``L`` for the logits alone)."""
    L, N, K = config.n_layers, config.n_heads, config.n_kv_heads
    P = N + 2 * K + 1
    G = len(groups)
    flat = np.zeros((G, L * P + 1), bool)
    for i, g in enumerate(groups):
        for r in g:
            flat[i, down_index(graph, r)] = True
    per = flat[:, : L * P].reshape(G, L, P)
    masks = {"q": per[:, :, :N], "k": per[:, :, N:N + K], "v": per[:, :, N + K:N + 2 * K], "mlp": per[:, :, N + 2 * K],
             "logits": flat[:, -1]}
    first = np.where(per.any(-1).any(-1), np.argmax(per.any(-1), axis=-1), L).astype(np.int32)
    return masks, first


@partial(jax.jit, static_argnames=("config",))
def _runs(config, params, run_tokens, src_tokens, attention_mask):
    B, T = run_tokens.shape
    zeros = zero_deltas(config, B, T, params["W_E"].dtype)
    _, run_out = edge_forward(config, params, run_tokens, zeros, attention_mask=attention_mask)
    _, src_out = edge_forward(config, params, src_tokens, zeros, attention_mask=attention_mask)
    _, caps = models.forward(config, params, run_tokens, None, _RUN_SITES, attention_mask)
    delta = _up_stack(src_out) - _up_stack(run_out)  # [U, B, T, D]
    # the stream entering each block, and after the last: [L + 1, B, T, D]
    resid = jnp.concatenate([caps["blocks.hook_resid_pre"], caps["blocks.hook_resid_post"][-1:]], axis=0)
    return delta, resid, caps["blocks.hook_mlp_in"]


def _one_pair(config, params, names, run_tokens, ctx, delta, resid, mlp_in, sender, rq, rk, rv, rm, rlog, start):
    """Metrics ``[M, B]`` of one (sender set, receiver set) pair (module docstring)."""
    L = config.n_layers
    d = jnp.einsum("U,UBTD->BTD", sender.astype(delta.dtype), delta)  # the senders' direct writes
    ivs = Interventions({
        "blocks.hook_q_input": (Edit(value=(resid[:L] + d[None])[:, :, :, None, :], mask=rq[:, None, None, :, None], stacked=True),),
        "blocks.hook_k_input": (Edit(value=(resid[:L] + d[None])[:, :, :, None, :], mask=rk[:, None, None, :, None], stacked=True),),
        "blocks.hook_v_input": (Edit(value=(resid[:L] + d[None])[:, :, :, None, :], mask=rv[:, None, None, :, None], stacked=True),),
        "blocks.hook_mlp_in": (Edit(value=mlp_in + d[None], mask=rm[:, None, None, None], stacked=True),),
    })
    run_ctx = models.run_context(config, run_tokens, ctx.get("attention_mask"))
    x = jax.lax.dynamic_index_in_dim(resid, start, 0, keepdims=False)  # the run's stream entering block `start`
    x = models.run_blocks_from(config, params["blocks"], x, start, run_ctx, ivs)
    x = jnp.where(rlog, resid[L] + d, x)  # the logits as a receiver: the final stream
    return _engine._x_metrics(config, params, names, x, ctx)


@partial(jax.jit, static_argnames=("config", "names", "mesh"))
def _pairs_core(config, params, names, run_tokens, ctx, delta, resid, mlp_in, pairs, *, mesh=None):
    """Metrics ``[n_chunks, chunk, M, B]`` of pairs given in chunks (each leaf ``[n_chunks, chunk, ...]``).

    Every pair of a chunk starts at the chunk's earliest first layer: one loop bound, not one per
    pair, so ``vmap`` does not turn the block loop's weight reads into per-pair gathers (a chunk of
    64 GPT-2-small pairs copied 64 layers' weights per block, up to 2x the pair's cost). Exact: no
    receiver reads a layer before its pair's own first layer, so the extra blocks recompute the
    run's own stream."""
    def fn(sh, p):
        prm, *rest = sh
        start = jnp.min(p[-1])
        return jax.vmap(lambda *q: _one_pair(config, prm, names, *rest, *q, start))(*p[:-1])

    return _engine.sharded_map(fn, (params, run_tokens, ctx, delta, resid, mlp_in), pairs, None, mesh)


def path_patch(
    model: HookedModel,
    clean_tokens,
    corrupt_tokens,
    *,
    senders: Sequence,
    receivers: Sequence,
    direction: str = "denoise",
    metrics=("logit_diff",),
    answer=None,
    wrong=None,
    answer_pos=-1,
    attention_mask=None,
    chunk_size: int | None = None,
    invalid: str = "raise",
    mesh=None,
) -> PatchResult:
    """Path-patch every sender into every receiver: a ``sender x receiver`` grid, one program.

    Args:
        model: a :class:`~jaxpatch.HookedModel` (any family).
        clean_tokens, corrupt_tokens: ``[batch, pos]`` prompts of the same shape.
        senders: components whose direct paths are patched, each a name (``"embed"``, ``"L0H1"``,
            ``"MLP2"``) or a list/tuple/set of names patched jointly (labelled ``"L0H0+L0H1"``).
        receivers: each a name (``"L1H0.q"``, ``"L1H0.k"``, ``"L1H0.v"``, ``"L1KV0.k"`` under
            grouped-query attention, ``"MLP1.in"``, ``"logits"``) or a set of them.
        direction: ``"denoise"`` (run the corrupted prompt, senders' clean writes) or ``"noise"``
            (run the clean prompt, senders' corrupted writes).
        metrics, answer, wrong, answer_pos, attention_mask: as in
            :func:`jaxpatch.activation_patch`.
        chunk_size: pairs per vectorised chunk (default: all pairs, up to 64).
        mesh: ``None`` (default, one device), ``"auto"`` (every local device) or a 1-D
            ``jax.sharding.Mesh`` with axis ``"sweep"``: pairs are split over its devices.
        invalid: ``"raise"`` (default): a pair whose receiver reads the stream at or before a
            sender's layer is an error; ``"nan"``: such cells are NaN (a full head x head grid),
            listed in ``info["invalid"]``.

    Returns:
        a :class:`~jaxpatch.PatchResult` with axes ``("sender", "receiver")``, site ``"path"``;
        ``normalized()`` is the fraction of the clean/corrupted gap each path restores
        (denoising) or destroys (noising).

    Raises:
        InputError: an unknown name (the closest valid ones suggested), an empty sender or
            receiver set, or a receiver at or before its sender's layer.
    """
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    if invalid not in ("raise", "nan"):
        raise InputError(f"invalid must be 'raise' or 'nan', got {invalid!r}.")
    cfg = model.config
    graph = graph_of(cfg)
    if isinstance(senders, str) or isinstance(receivers, str):
        raise InputError("senders and receivers are lists (of names or of name sets), e.g. senders=['L0H0'], "
                         "receivers=['L1H1.k'].")
    s_groups = [as_group(s, "sender") for s in senders]
    r_groups = [as_group(r, "receiver") for r in receivers]
    if not s_groups:
        raise InputError("Empty sender set: give at least one sender (e.g. senders=['L0H0']).")
    if not r_groups:
        raise InputError("Empty receiver set: give at least one receiver (e.g. receivers=['L1H0.k']).")
    s_idx = [[up_index(graph, n, "sender") for n in g] for g in s_groups]
    r_idx = [[down_index(graph, n, "receiver") for n in g] for g in r_groups]
    S, R = len(s_groups), len(r_groups)
    valid = np.array([[all(graph.valid[u, v] for u in su for v in rv) for rv in r_idx] for su in s_idx])
    bad = [(group_label(s_groups[i]), group_label(r_groups[j])) for i, j in np.argwhere(~valid)]
    if bad and invalid == "raise":
        raise InputError(f"Receiver at or before its sender's layer in {len(bad)} pair(s), e.g. {bad[:3]}: a receiver must "
                         f"read the residual stream after every sender writes it (a later layer; a head may feed its own "
                         f"layer's MLP unless attention and MLP run in parallel). Pass invalid='nan' to get NaN cells.")
    if not valid.any():
        raise InputError("No (sender, receiver) pair is valid: every receiver reads the stream before its senders write.")

    names, clean, corrupt, ctx = _engine.setup(model, clean_tokens, corrupt_tokens, metrics, answer, wrong, answer_pos,
                                               attention_mask)
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    t0 = time.perf_counter()
    delta, resid, mlp_in = _runs(cfg, model.params, run, src, ctx.get("attention_mask"))
    m_clean, m_corrupt, floor = _engine.baselines(model, names, clean, corrupt, ctx)
    _engine.check_finite("The clean and corrupted runs", np.stack([m_clean, m_corrupt]), ["clean", "corrupted"])

    smask = np.zeros((S, len(graph.up)), bool)
    for i, su in enumerate(s_idx):
        smask[i, su] = True
    rmasks, first = _receiver_masks(cfg, graph, r_groups)
    si, ri = np.nonzero(valid)
    order = np.argsort(first[ri], kind="stable")  # chunks start at their first receiver's layer
    si, ri = si[order], ri[order]
    pairs = (jnp.asarray(smask[si]), *(jnp.asarray(rmasks[k][ri]) for k in ("q", "k", "v", "mlp", "logits")),
             jnp.asarray(first[ri]))
    n = len(si)
    chunk = int(min(n, 64)) if chunk_size is None else _engine.default_chunk(cfg, 1, 1, n, chunk_size)
    mesh = _engine.resolve_mesh(mesh, model.params)
    if mesh is not None:
        chunk = min(chunk, -(-n // mesh.size))  # at least one chunk per device
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # consecutive chunks of `chunk` sorted pairs, the last padded with repeats of the last pair
    take = np.minimum(np.arange(-(-n // chunk) * chunk), n - 1)
    chunked = jax.tree_util.tree_map(lambda a: a[take].reshape((-1, chunk) + a.shape[1:]), pairs)
    args = _engine.global_inputs(mesh, "inputs (model weights, prompts, senders, receivers, metric or options)",
                                 (model.params, run, ctx, delta, resid, mlp_in, chunked), names)
    out = _engine.host(_pairs_core(cfg, args[0], names, *args[1:], mesh=mesh))
    out = out.reshape((-1,) + out.shape[2:])[:n]  # [n, M, B]
    sweep_s = time.perf_counter() - t0
    labels = [f"{group_label(s_groups[a])} -> {group_label(r_groups[b])}" for a, b in zip(si, ri)]
    _engine.check_finite("Path patching", out, labels)
    M, B = out.shape[1:]
    per = np.full((S, R, M, B), np.nan, out.dtype)
    per[si, ri] = out
    info = {"setup_s": setup_s, "sweep_s": sweep_s, "n_pairs": n, "chunk_size": chunk, "batch": B,
            "invalid": bad, "valid": valid,
            "gap_floor": floor}
    return PatchResult("path", direction, "resample", tuple(_metrics.name_of(m) for m in names), ("sender", "receiver"),
                       {"sender": [group_label(g) for g in s_groups], "receiver": [group_label(g) for g in r_groups]},
                       per, np.asarray(m_clean), np.asarray(m_corrupt), info)
