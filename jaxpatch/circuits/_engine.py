"""The one mechanism behind circuit evaluation, node probes and exact edge patching: a forward pass
in which chosen edges of the residual graph carry another run's value.

Every downstream node d (a head's q/k/v input, an MLP's input, the logits) reads its own copy of
the residual stream. In a *masked* forward with weights ``w`` ``[U, V]`` (1 on the chosen edges)
and upstream outputs ``other`` ``[U, B, T, D]`` of another run (a corrupted run, a mean over
reference prompts, a clean run)::

    input_d = resid_d + Σ_u w[u, d] · (other_u − cur_u)

where ``cur_u`` is upstream node u's output *in the pass in progress*. An edge with weight 1
delivers the other run's value of u to d; every other edge delivers the value computed now, so
a change propagates along the edges that carry current values. Because ``cur_u`` depends on the
layers already run, the pass goes one block at a time (:func:`jaxpatch.models.block_at`),
carrying the upstream outputs so far; a layer's MLP may read its own layer's heads, so on such
models the block is first run for its attention writes, then again with the MLP's input set.

Special cases: all weights 0 is the unpatched run; the weights of every edge not in a circuit,
with ``other`` the corrupted run, run the circuit alone (all weights 1: the corrupted run);
``w[u, :] = 1`` patches node u's output; one edge is exact edge patching.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import metrics as _metrics
from .. import models
from .._errors import InputError, NonFiniteError
from ..config import ModelConfig
from ..edges import _check_additive, _up_stack, edge_forward, zero_deltas
from ..interventions import Edit, Interventions
from ..model import HookedModel, check_attention_mask, check_tokens
from ..patching import answer_arrays

_Q, _K, _V, _MLP = "blocks.hook_q_input", "blocks.hook_k_input", "blocks.hook_v_input", "blocks.hook_mlp_in"


def setup(model: HookedModel, clean_tokens, corrupt_tokens, metrics, answer, wrong, answer_pos, attention_mask,
          need_corrupt: bool = True):
    """Validated ``(names, clean, corrupt, ctx)``; ``ctx`` holds answer data, clean log-probs and
    the metrics' constants (traced afresh: current values)."""
    cfg = model.config
    _check_additive(cfg)
    names = _metrics.check_names(metrics)
    clean = check_tokens(cfg, clean_tokens)
    B, T = clean.shape
    corrupt = None
    if corrupt_tokens is not None:
        corrupt = check_tokens(cfg, corrupt_tokens)
        if corrupt.shape != clean.shape:
            raise InputError(f"clean_tokens {tuple(clean.shape)} and corrupt_tokens {tuple(corrupt.shape)} must have the "
                             f"same shape.")
    elif need_corrupt:
        raise InputError("corrupt_tokens are needed here (the run patched from, or patched into).")
    mask = check_attention_mask(attention_mask, clean)
    ans, wr, apos = answer_arrays(cfg, names, answer, wrong, answer_pos, B, T, mask)
    static, consts = _metrics.prepare(names, B, cfg.d_vocab, model.dtype)
    clean_rows = jnp.take_along_axis(model(clean, attention_mask=mask), jnp.asarray(apos)[:, None, None], axis=1)[:, 0]
    ctx = {"answer_pos": jnp.asarray(apos), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wr),
           "clean_logprobs": jax.nn.log_softmax(clean_rows.astype(jnp.promote_types(clean_rows.dtype, jnp.float32)), -1),
           "metric_consts": consts}
    if mask is not None:
        ctx["attention_mask"] = mask
    return static, clean, corrupt, ctx


def baselines(model, names, clean, corrupt, ctx):
    """``(m_clean [M, B], m_corrupt [M, B], gap_floor)`` of the unpatched runs."""
    rows = [jnp.take_along_axis(model(t, attention_mask=ctx.get("attention_mask")), ctx["answer_pos"][:, None, None],
                                axis=1)[:, 0] for t in (clean, corrupt)]
    m = [np.asarray(_metrics.compute_ctx(names, r, ctx)) for r in rows]
    return m[0], m[1], _metrics.gap_floor(rows, rows[0].dtype)


def _x_metrics(config, params, names, x, ctx):
    """Metrics ``[M, B]`` from the final residual stream ``x`` ``[B, T, D]`` (answer rows only)."""
    rows = jnp.take_along_axis(x, ctx["answer_pos"][:, None, None], axis=1)  # [B, 1, D]
    return _metrics.compute_ctx(names, models.logits_at(config, params, rows)[:, 0], ctx)


@partial(jax.jit, static_argnames=("config",))
def up_outputs(config: ModelConfig, params, tokens, attention_mask=None):
    """Upstream outputs ``[U, B, T, D]`` (EdgeGraph order) of an unpatched run."""
    B, T = tokens.shape
    _, out = edge_forward(config, params, tokens, zero_deltas(config, B, T, params["W_E"].dtype),
                          attention_mask=attention_mask)
    return _up_stack(out)


def masked_metrics(config: ModelConfig, params, names, tokens, w, other, ctx):
    """Metrics ``[M, B]`` of one masked forward on ``tokens`` (module docstring).

    Args:
        w: ``[U, V]`` float weights (valid edges only; 1 = the edge carries ``other``).
        other: ``[U, B, T, D]`` upstream outputs the chosen edges carry.
    """
    L, N, K = config.n_layers, config.n_heads, config.n_kv_heads
    P = N + 2 * K + 1  # downstream nodes per layer: q heads, k heads, v heads, MLP input
    U = w.shape[0]
    run_ctx = models.run_context(config, tokens, ctx.get("attention_mask"))
    x0 = models.embed_stream(config, params, tokens, run_ctx)
    cur0 = jnp.zeros((U,) + x0.shape, x0.dtype).at[0].set(x0)
    w = w.astype(x0.dtype)
    w_layers = jnp.moveaxis(jnp.reshape(w[:, : L * P], (U, L, P)), 1, 0)  # [L, U, P]
    write_sites = frozenset(models.head_write_sites(config))
    sequential = not config.parallel_attn_mlp  # the MLP reads its own layer's heads

    def body(carry, xs):
        x, cur = carry
        wl, layer = xs
        d = jnp.einsum("UP,UBTD->PBTD", wl, other - cur)  # this layer's heads' writes are still 0 in cur
        attn = {_Q: (Edit(delta=jnp.moveaxis(d[:N], 0, 2)),), _K: (Edit(delta=jnp.moveaxis(d[N:N + K], 0, 2)),),
                _V: (Edit(delta=jnp.moveaxis(d[N + K:N + 2 * K], 0, 2)),)}
        d_mlp = d[N + 2 * K]
        if sequential:
            _, c1 = models.block_at(config, params, layer, x, run_ctx, Interventions(attn), write_sites)
            hw1 = models.head_writes_at(config, params, layer, c1)  # [B, T, N, D]
            w_heads = jax.lax.dynamic_slice_in_dim(wl[:, N + 2 * K], 1 + layer * (N + 1), N)  # [N]
            d_mlp = d_mlp - jnp.einsum("N,BTND->BTD", w_heads, hw1)
        ivs = Interventions({**attn, _MLP: (Edit(delta=d_mlp),)})
        x_new, caps = models.block_at(config, params, layer, x, run_ctx, ivs, write_sites | {"blocks.hook_mlp_out"})
        hw = models.head_writes_at(config, params, layer, caps)
        new = jnp.concatenate([jnp.moveaxis(hw, 2, 0), caps["blocks.hook_mlp_out"][None]], axis=0)  # [N + 1, B, T, D]
        cur = jax.lax.dynamic_update_slice_in_dim(cur, new.astype(cur.dtype), 1 + layer * (N + 1), axis=0)
        return (x_new, cur), None

    (x, cur), _ = jax.lax.scan(body, (x0, cur0), (w_layers, jnp.arange(L, dtype=jnp.int32)))
    x = x + jnp.einsum("U,UBTD->BTD", w[:, -1], other - cur)
    return _x_metrics(config, params, names, x, ctx)


def sharded_map(fn, shared, items, chunk: int, mesh):
    """``lax.map(lambda it: fn(shared, it), items, batch_size=chunk)`` over the leading axis of
    ``items``; with a 1-D ``("sweep",)`` mesh the items are padded (repeating the first) to a
    multiple of its size and split over its devices, each mapping its share (``shard_map``), and
    ``shared`` is replicated. ``chunk=None``: one item at a time (``fn`` vectorises itself)."""
    if mesh is None:
        return jax.lax.map(lambda it: fn(shared, it), items, batch_size=chunk)
    from jax.sharding import PartitionSpec as P

    n = jax.tree_util.tree_leaves(items)[0].shape[0]
    d = mesh.size
    pad = (-n) % d
    if pad:
        items = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0), items)
    per = (n + pad) // d
    size = None if chunk is None else min(chunk, per)
    run = jax.shard_map(lambda sh, it: jax.lax.map(lambda x: fn(sh, x), it, batch_size=size), mesh=mesh,
                        in_specs=(P(), P("sweep")), out_specs=P("sweep"), check_vma=False)
    return jax.tree_util.tree_map(lambda a: a[:n], run(shared, items))


def host(x) -> np.ndarray:
    """A circuit program's output as numpy on this process (made whole on every process first when
    the weights are spread over several: a collective)."""
    from .. import multihost

    return np.asarray(multihost.replicated(x))


def resolve_mesh(mesh, params=None):
    """``"auto"``: every device (``None`` with one): this process's, or in a multi-process run
    (``jax.distributed``) every process's; ``None``: one device; or a 1-D mesh with axis
    ``"sweep"`` (its devices may be in several processes). Weights spread over several processes
    (a sharded model) run as one program over their own mesh: ``"auto"`` then means ``None``."""
    from .. import multihost

    if mesh is None or (isinstance(mesh, str) and mesh == "auto" and multihost.spread(params)):
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise InputError(f"mesh must be 'auto', None or a jax.sharding.Mesh with axis 'sweep'; got {mesh!r}.")
        devs = jax.devices() if jax.process_count() > 1 else jax.local_devices()
        return jax.sharding.Mesh(np.array(devs), ("sweep",)) if len(devs) > 1 else None
    if tuple(mesh.axis_names) != ("sweep",):
        raise InputError(f"Circuit methods shard over a 1-D mesh with axis 'sweep'; got axes {tuple(mesh.axis_names)}.")
    if multihost.spread(params):
        raise InputError("This model's weights are sharded over several processes: circuit methods then run as one "
                         "program over the weights' own mesh; pass mesh='auto' or None.")
    return mesh


def global_inputs(mesh, what: str, args: tuple, static=()) -> tuple:
    """``args`` as they enter a circuit program on ``mesh``: unchanged unless the mesh spans
    processes; then, after checking that every process was given the same ``args`` and ``static``
    (their fingerprints are compared: never a silent mix of two calls), global arrays replicated
    over the mesh, built from each process's own copy (a collective: every process calls)."""
    from .. import multihost

    if not multihost.spans_processes(mesh):
        return args
    from ..resume import fingerprint

    multihost.check_same(what, fingerprint(args, static))
    return multihost.replicate(args, mesh)


@partial(jax.jit, static_argnames=("config", "names", "chunk", "mesh"))
def masked_sweep(config: ModelConfig, params, names, tokens, ws, other, ctx, *, chunk: int, mesh=None):
    """:func:`masked_metrics` for a stack of weights ``ws`` ``[C, U, V]``, vmapped in chunks of
    ``chunk`` (``lax.map``), split over ``mesh``'s devices if given: ``[C, M, B]``."""
    def fn(sh, w):
        p, t, o, c = sh
        return masked_metrics(config, p, names, t, w, o, c)

    return sharded_map(fn, (params, tokens, other, ctx), ws, chunk, mesh)


def default_chunk(config: ModelConfig, B: int, T: int, n: int, chunk_size) -> int:
    """Circuits per vectorised chunk: ``chunk_size`` if given, else what keeps the carried upstream
    outputs of one chunk near 256 MiB."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        return int(min(chunk_size, n))
    U = 1 + config.n_layers * (config.n_heads + 1)
    per = 4 * U * B * T * config.d_model * 4  # cur, other - cur, and their einsum operands
    return int(max(1, min(n, (256 << 20) // max(per, 1))))


def check_finite(what: str, values, labels=None):
    """Raise :class:`NonFiniteError` naming the runs whose metrics are NaN/inf."""
    v = np.asarray(values)
    if np.all(np.isfinite(v)):
        return
    bad = np.flatnonzero(~np.all(np.isfinite(v.reshape(v.shape[0], -1)), axis=1))
    names = [labels[i] for i in bad[:5]] if labels is not None else bad[:5].tolist()
    raise NonFiniteError(f"{what}: metric values are NaN or inf for {names}{' ...' if len(bad) > 5 else ''}. "
                         f"Check the model's weights, the prompts and the metric.")
