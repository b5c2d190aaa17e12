"""Attribution patching: first-order estimates of every patch at once (Nanda 2023; AtP* of Kramár
et al. 2024, arXiv 2403.00745).

AtP estimates the effect of patching activation ``a`` from the run's value to the source's as
``(a_src - a_run) · ∂metric/∂a``, summed over the component's entries. The gradients come from ONE
backward pass with respect to zero-valued deltas added at every requested site (the forward is
unchanged), not hooks and not one pass per site.

AtP* adds two corrections:

* **QK fix.** For queries and keys, the attention softmax is recomputed exactly for the patched
  scores and only the map from the pattern to the metric is linearised:
  ``(pattern_patched - pattern_run) · ∂metric/∂pattern``. Plain AtP misses patches that move a
  saturated softmax. The patched scores come from the queries/keys the attention actually reads
  (after q/k norms and the rotary embedding, ``hook_rot_q``/``hook_rot_k``) through the model's own
  :func:`~jaxpatch.models.transformer.attention_logits` (grouped-query heads, attention scale,
  soft-capping, causal mask, sliding windows, padding), so every family gets the exact softmax. A
  key head of a grouped-query model feeds its whole group of query heads: its estimate sums theirs.
* **GradDrop.** For each layer l, ``AtP_{-l}`` recomputes the gradient with the backward flow
  through layer l's *contribution to the residual stream* dropped: the gradient is zeroed at
  layer l's outputs, ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out`` (the paper's
  definition). The estimate is ``Σ_l |AtP_{-l}(n)| / (L - 1)``, which exposes components whose
  direct and indirect effects cancel. A component inside block l (q/k/v, scores, pattern, z,
  attn_out, the layer norms, MLP pre/post, mlp_out) reaches the output only through layer l's
  outputs, so its own layer's term is exactly zero and L - 1 terms remain (dropping an earlier
  layer leaves its gradient unchanged: those terms equal ``|AtP(n)|``). The L variants share one
  forward pass (:func:`~jaxpatch.interventions.grad_gate`); only the backward is batched.

  Residual-stream nodes (``resid_pre``/``resid_mid``/``resid_post``) are not in the paper. They
  sit on the skip path, so no variant zeroes them (``resid_pre`` of layer l keeps its direct path
  when layer l is dropped; ``resid_post`` of layer l is downstream of layers 0..l, whose terms all
  equal ``|AtP|``); jaxpatch divides their sum by L instead, so that, as for components, GradDrop
  equals ``|AtP(n)|`` when no drop changes the node's gradient (e.g. ``resid_post`` of the last
  layer). Scores of residual and component sites are therefore on the same scale.

Entries equal in both runs contribute exactly zero, so masked attention scores (-inf in both runs)
give 0, not ``-inf - (-inf) = NaN``.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as _metrics
from . import byo as _byo
from . import multihost as _multihost
from . import planner as _planner
from ._errors import InputError
from .interventions import NONE, OFFSET_AXES, Edit, Interventions
from .model import HookedModel, check_attention_mask, check_tokens
from . import models
from .patching import DEFAULT_AXES, _labels, _site, answer_arrays
from .results import PatchResult
from .sites import SITES
from . import sweep as _sweep
from .sweep import GRID_AXES

_QK = ("blocks.attn.hook_q", "blocks.attn.hook_k")
#: The sites :func:`_qk_inputs` reads.
_QK_READ = frozenset(_QK) | {"blocks.attn.hook_rot_q", "blocks.attn.hook_rot_k"}
#: GradDrop gates: layer l's contribution to the residual stream (its attention and MLP outputs).
_GD_SITES = ("blocks.hook_attn_out", "blocks.hook_mlp_out")
#: Residual-stream sites: no GradDrop variant zeroes them, so their sum is divided by L, not L - 1.
_RESID_SITES = frozenset({"blocks.hook_resid_pre", "blocks.hook_resid_mid", "blocks.hook_resid_post"})


@dataclasses.dataclass(frozen=True)
class Target:
    """One estimate to produce: a site and the grid axes to resolve it by."""

    site: str
    axes: tuple[str, ...]


def _metric_fn(metric):
    names = _metrics.check_names(metric)
    if len(names) != 1:
        raise InputError("Attribution takes exactly one metric (its gradient is what is propagated).")
    if isinstance(names[0], str) and names[0] in _metrics.DISCRETE or (isinstance(names[0], str) and names[0].startswith("top")):
        raise InputError(
            f"Metric {names[0]!r} is piecewise constant (its gradient is zero almost everywhere): "
            "attribution needs a differentiable metric such as 'logit_diff', 'logprob', 'prob' or 'kl'."
        )
    return names


def _suffix_shape(config, site: str, B: int, T: int, offset: int) -> tuple[int, ...]:
    """One layer's activation shape at ``site`` in a run of positions ``offset..`` only."""
    shape = SITES[site].shape(config, B, T)
    return tuple(n - offset if a in OFFSET_AXES else n for a, n in zip(SITES[site].axes, shape))


def _suffix(x, site: str, offset: int):
    """Stacked ``[L, ...]`` whole-sequence activations of ``site`` at positions ``offset..``."""
    for i, a in enumerate(SITES[site].axes):
        if a in OFFSET_AXES:
            x = jax.lax.slice_in_dim(x, offset, None, axis=i + 1)
    return x


def _pad_front(x, axis: int, n: int):
    """``n`` zeros before ``x`` along ``axis``."""
    return jnp.concatenate([jnp.zeros(x.shape[:axis] + (n,) + x.shape[axis + 1:], x.dtype), x], axis=axis)


@partial(jax.jit, static_argnames=("config", "sites", "names", "drop", "remat", "offset"))
def _run_and_grad(config, params, tokens, ctx, *, sites, names, drop, remat=False, offset=0, prefix_kv=None):
    """Metric per prompt, the run's activations at ``sites`` and ∂(Σ metric)/∂activation there.

    With ``drop`` the gradients get a leading ``[n_layers]`` axis: variant l zeroes the gradient at
    layer l's attention and MLP outputs (GradDrop); the forward pass is shared. The gates come
    after any delta at those sites, so a delta at layer l's attn_out/mlp_out gets zero in variant l.

    ``offset``/``prefix_kv``: the run is computed at positions ``offset..`` only, from the source
    run's keys and values before (:func:`models.forward`'s ``prefix``); activations and gradients
    then cover positions ``offset..`` along ``pos``/``q_pos``.
    """
    B, T = tokens.shape
    L = config.n_layers
    prefix = (offset, prefix_kv) if offset else None

    def f(deltas, gates):
        edits = {s: (Edit(delta=d, stacked=True),) for s, d in deltas.items()}
        if gates is not None:
            for s in _GD_SITES:
                edits[s] = edits.get(s, ()) + (Edit(grad_scale=jnp.reshape(gates, (L,) + (1,) * 3), stacked=True),)
        rows, caps = models.forward(config, params, tokens, Interventions(edits), frozenset(sites), ctx.get("attention_mask"),
                                    remat=remat, rows=ctx["answer_pos"], prefix=prefix)  # [B, V]: the answer rows only
        m = _metrics.compute_ctx(names, rows, ctx)[0]
        return jnp.sum(m), (m, caps)

    shapes = {s: (L,) + _suffix_shape(config, s, B, T, offset) for s in sites}
    zeros = {s: jnp.zeros(shp, params["W_E"].dtype) for s, shp in shapes.items()}
    if not drop:
        grads, (m, caps) = jax.grad(f, has_aux=True)(zeros, None)
        return m, caps, grads
    (m, caps) = f(zeros, None)[1]
    gates = 1.0 - jnp.eye(L, dtype=params["W_E"].dtype)  # row l: drop layer l
    grads = jax.vmap(lambda g: jax.grad(f, has_aux=True)(zeros, g)[0])(gates)
    return m, caps, grads


def _first_order(src, run, g):
    """``(src - run) · g`` elementwise, exactly 0 where ``src == run``: masked attention scores are
    -inf in both runs (their difference would be NaN) and a non-finite gradient there must not
    turn the zero into NaN either."""
    return jnp.where(src == run, jnp.zeros((), g.dtype), (src - run) * g)


def _reduce(prod, site: str, axes: tuple[str, ...]):
    """Sum an elementwise product ``[L, B, ...site axes]`` down to ``[*grid, B]``."""
    site_axes = ("layer",) + SITES[site].axes
    keep = [site_axes.index(GRID_AXES[a]) for a in axes] + [site_axes.index("batch")]
    drop = tuple(i for i in range(len(site_axes)) if i not in keep)
    out = jnp.sum(prod, axis=drop)
    remaining = [i for i in range(len(site_axes)) if i not in drop]
    return jnp.transpose(out, [remaining.index(k) for k in keep])


def _qk_inputs(config, params, caps):
    """Queries ``[L, B, T, N, H]`` and keys ``[L, B, S, K, H]`` as the attention reads them (after
    the q/k norm and the rotary embedding). Patching ``hook_q``/``hook_k`` entries replaces exactly
    the corresponding entries here by the source run's: norm and rotation act on each entry alone,
    at its position, and positions are the same in both runs."""
    if config.positional == "rotary":
        return caps["blocks.attn.hook_rot_q"], caps["blocks.attn.hook_rot_k"]
    q, k = caps["blocks.attn.hook_q"], caps["blocks.attn.hook_k"]
    if config.qk_norm:  # normed but not rotated: no site holds them, apply the model's norm
        b = params["blocks"]
        norm = jax.vmap(lambda x, w: models.head_rms(x, w, config.eps))
        q, k = norm(q, b["q_norm_w"]), norm(k, b["k_norm_w"])
    return q, k


def _scores_from(config, q, k, key_mask):
    """Masked pre-softmax scores ``[L, B, N, T, S]`` (-inf where not visible) and ``visible``
    ``[L, B, 1, T, S]`` from q ``[L, B, T, N, H]`` and k ``[L, B, S, K, H]``: the model's own
    :func:`~jaxpatch.models.transformer.attention_logits` per layer (scale, soft-cap, grouped
    heads, causal mask, sliding window, padding)."""
    T = q.shape[2]
    idx = jnp.arange(T, dtype=jnp.int32)
    return jax.vmap(lambda qq, kk, w: models.attention_logits(config, qq, kk, idx, idx, w, key_mask))(
        q, k, models.layer_windows(config))


def _pattern_of(scores, visible):
    """Softmax over keys as the model takes it: a row with no visible key (a padding query) is 0."""
    any_visible = jnp.any(visible, axis=-1, keepdims=True)
    s = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    return jax.nn.softmax(jnp.where(any_visible, s, 0.0), axis=-1) * any_visible


def _per_kv_head(config, est):
    """Sum ``[L, B, N, X]`` over each group of query heads sharing a key/value head -> ``[L, B, K, X]``."""
    K = config.n_kv_heads
    if K == config.n_heads:
        return est
    L, B, N, X = est.shape
    return jnp.sum(jnp.reshape(est, (L, B, K, N // K, X)), axis=3)


def _leave_one_out(a, g, neutral):
    """For every s along the last axis: ``(m, Σ_{j≠s} exp(a_j - m) g_j, Σ_{j≠s} exp(a_j - m))``."""

    def combine(x, y):
        m = jnp.maximum(x[0], y[0])
        ex, ey = jnp.exp(x[0] - m), jnp.exp(y[0] - m)
        return m, x[1] * ex + y[1] * ey, x[2] * ex + y[2] * ey

    axis = a.ndim - 1
    elems = (a, g, jnp.ones_like(a))
    pre = jax.lax.associative_scan(combine, elems, axis=axis)
    suf = jax.lax.associative_scan(combine, elems, axis=axis, reverse=True)
    pad = lambda v, fill: jnp.full(v.shape[:-1] + (1,), fill, v.dtype)  # noqa: E731
    shift_r = lambda v, fill: jnp.concatenate([pad(v, fill), v[..., :-1]], axis=-1)  # noqa: E731
    shift_l = lambda v, fill: jnp.concatenate([v[..., 1:], pad(v, fill)], axis=-1)  # noqa: E731
    left = (shift_r(pre[0], neutral), shift_r(pre[1], 0.0), shift_r(pre[2], 0.0))
    right = (shift_l(suf[0], neutral), shift_l(suf[1], 0.0), shift_l(suf[2], 0.0))
    return combine(left, right)


def _qk_fix(config, site, axes, run, src, g_pattern, key_mask):
    """QK-fixed estimate ``[*grid, B]`` for a q or k site: exact softmax, linear after it.

    ``axes`` is any order of ``layer`` with optional ``pos`` and ``head``; an axis not requested is
    summed over (heads never interact before the pattern, and the map after it is linearised, so
    a patch of several heads' queries/keys is the sum of the per-head estimates; a key head of a
    grouped-query model feeds every query head of its group, whose estimates are summed).
    ``run``/``src``: dicts with q ``[L, B, T, N, H]`` and k ``[L, B, S, K, H]`` as the attention
    reads them (:func:`_qk_inputs`); ``g_pattern``: ∂m/∂pattern ``[L, B, N, T, S]``;
    ``key_mask``: ``[B, S]`` real keys.
    """
    s_run, visible = _scores_from(config, run["q"], run["k"], key_mask)
    p_run = _pattern_of(s_run, visible)
    g_pattern = g_pattern.astype(p_run.dtype)
    by_pos = "pos" in axes
    if site == "blocks.attn.hook_q":
        p_new = _pattern_of(_scores_from(config, src["q"], run["k"], key_mask)[0], visible)  # every query row patched
        dp_g = jnp.sum((p_new - p_run) * g_pattern, axis=-1)  # [L, B, N, T]: row t alone is patch (t)
        est = dp_g if by_pos else jnp.sum(dp_g, axis=-1, keepdims=True)
    else:
        c, _ = _scores_from(config, run["q"], src["k"], key_mask)  # every key patched
        if not by_pos:
            p_new = _pattern_of(c, visible)
            est = jnp.sum((p_new - p_run) * g_pattern, axis=(-1, -2))[..., None]
        else:
            # Patch key s only: column s of every row's scores changes to c[t, s] (the scores are
            # entrywise functions of q_t·k_s, soft-cap included, and the mask does not change).
            # Softmax with one logit replaced, in closed form and O(T^2): with a the run's scores
            # and c_ts the patched score of key s, the new pattern puts mass exp(c_ts)/Z' on s and
            # spreads the rest over j≠s in proportion to exp(a_tj). Leave-one-out sums over j≠s
            # come from prefix and suffix scans of (max, Σ exp(a-max)·g, Σ exp(a-max)), so a
            # saturated entry (p_ts ≈ 1, or scores ~1e4) loses no precision and never overflows,
            # and an unchanged key (c = a) gives no change up to rounding. Invisible entries
            # (-inf) become a huge finite negative (no inf - inf) and their changes are dropped.
            a = s_run.astype(p_run.dtype)
            big_neg = jnp.asarray(jnp.finfo(a.dtype).min / 4, a.dtype)
            a = jnp.where(visible, a, big_neg)
            c = jnp.where(visible, c.astype(a.dtype), big_neg)
            g = jnp.where(visible, g_pattern, 0.0)
            logz = jax.nn.logsumexp(a, axis=-1, keepdims=True)  # [L,B,N,T,1]
            p_a = jnp.exp(a - logz)
            m_ex, g_ex, z_ex = _leave_one_out(a, g, big_neg)
            log_rest = m_ex + jnp.log(z_ex)  # log Σ_{j≠s} exp(a_tj)
            g_rest = jnp.where(z_ex > 0, g_ex / jnp.where(z_ex > 0, z_ex, 1.0), 0.0)  # mean of g over j≠s
            logz_new = jnp.logaddexp(log_rest, c)
            new = jnp.exp(log_rest - logz_new) * g_rest + jnp.exp(c - logz_new) * g
            old = jnp.sum(p_a * g, axis=-1, keepdims=True)
            delta = new - old
            est = jnp.sum(jnp.where(visible, delta, 0.0), axis=-2)  # sum over queries t -> [L,B,N,S]
        est = _per_kv_head(config, est)  # a key head's patch moves its whole group's patterns
    # est: [L, B, N, X] with X = pos (or 1 for all positions); sum what is not asked for, then
    # reorder to the grid.
    est = jnp.transpose(est, (0, 3, 2, 1))  # [L, X, N, B]
    have = ["layer", "pos", "head"]
    if not by_pos:
        est, have = est[:, 0], ["layer", "head"]  # [L, N, B]
    for a in list(have):
        if a not in axes:
            est = jnp.sum(est, axis=have.index(a))
            have.remove(a)
    perm = [have.index(a) for a in axes] + [len(have)]
    return jnp.transpose(est, perm)


def _whole(x, site: str, offset: int, front=None):
    """Whole-sequence stacked activations of ``site`` from ``x`` at positions ``offset..``: the
    first ``offset`` positions are ``front``'s (stacked whole-sequence values), or zeros."""
    for i, a in enumerate(SITES[site].axes):
        if a in OFFSET_AXES:
            head = (jnp.zeros(x.shape[:i + 1] + (offset,) + x.shape[i + 2:], x.dtype) if front is None
                    else jax.lax.slice_in_dim(front, 0, offset, axis=i + 1).astype(x.dtype))
            x = jnp.concatenate([head, x], axis=i + 1)
    return x


@partial(jax.jit, static_argnames=("config", "sites", "names", "targets", "method", "denoise", "remat", "offset"))
def _atp_core(config, params, run_tokens, src_tokens, ctx, *, sites, names, targets, method, denoise, remat=False,
              offset=0):
    """Everything in one program: the source run (with captures), the run's forward and backward
    (GradDrop variants batched for ``atp*``), and every target's estimate ``[*grid, B]``.

    ``offset``: the run and the source agree (tokens, mask) before this position, so every
    activation there is equal in both and every estimate there is exactly zero (an estimate is
    ``(src - run) · g``; a query or key patch there moves no pattern): the run's forward and
    backward cover positions ``offset..`` only, reading the source's keys and values before."""
    apos = ctx["answer_pos"]  # every logit read is at the answer rows: only those are unembedded
    kv = models.kv_sites(config) if offset else ()
    src_rows, src_caps = models.forward(config, params, src_tokens, NONE, frozenset(sites) | frozenset(kv),
                                        ctx.get("attention_mask"), rows=apos)
    if any(n == "kl" for n in names):  # the clean run's distribution
        clean_rows = src_rows if denoise else models.forward(config, params, run_tokens, attention_mask=ctx.get("attention_mask"),
                                                             rows=apos)[0]
        ctx = {**ctx, "clean_logprobs": jax.nn.log_softmax(clean_rows.astype(jnp.promote_types(clean_rows.dtype, jnp.float32)), -1)}
    m_src = _metrics.compute_ctx(names, src_rows, ctx)[0]
    prefix_kv = tuple(src_caps[k] for k in kv) if offset else None
    m_run, run_caps, grads = _run_and_grad(config, params, run_tokens, ctx, sites=sites, names=names, drop=method == "atp*",
                                           remat=remat, offset=offset, prefix_kv=prefix_kv)
    qk = method in ("atp*", "atp+qk")
    mask = ctx.get("attention_mask")
    key_mask = jnp.ones(run_tokens.shape, bool) if mask is None else mask.astype(bool)

    def estimate(t: Target, g):
        if qk and t.site in _QK:
            pat = "blocks.attn.hook_pattern"
            caps = run_caps
            if offset:  # the run's queries and keys before the offset are the source's
                caps = {k: _whole(v, k, offset, src_caps[k]) for k, v in run_caps.items() if k in _QK_READ}
            qk_run = dict(zip("qk", _qk_inputs(config, params, caps)))
            qk_src = dict(zip("qk", _qk_inputs(config, params, src_caps)))
            g_pattern = _whole(g[pat], pat, offset) if offset else g[pat]  # rows there change nothing
            return _qk_fix(config, t.site, t.axes, qk_run, qk_src, g_pattern, key_mask)
        if not offset:
            return _reduce(_first_order(src_caps[t.site], run_caps[t.site], g[t.site]), t.site, t.axes)
        est = _reduce(_first_order(_suffix(src_caps[t.site], t.site, offset), run_caps[t.site], g[t.site]), t.site, t.axes)
        for i, a in enumerate(t.axes):  # positions before the offset: exactly zero
            if GRID_AXES[a] in OFFSET_AXES:
                est = _pad_front(est, i, offset)
        return est

    ests = []
    for t in targets:
        if method == "atp*":
            per_drop = jax.vmap(lambda g: estimate(t, g))(grads)  # [L, *grid, B]
            # Components: their own layer's term is 0, L - 1 remain. Residual nodes: none is 0.
            n_terms = config.n_layers if t.site in _RESID_SITES else config.n_layers - 1
            ests.append(jnp.sum(jnp.abs(per_drop), axis=0) / n_terms)
        else:
            ests.append(estimate(t, grads))
    return m_run, m_src, tuple(ests)


#: The run's forward and backward start at the first position where the prompts differ (see
#: :func:`_atp_core`); ``False`` runs every position (the slow twin the tests compare with).
SAME_PREFIX = True


def _same_prefix(config, clean, corrupt, answer_pos) -> int:
    """How many leading positions the run may take from the source: those before the first at
    which any clean and corrupted prompt differ, and before every answer position (the metric's
    rows must be computed). 0 when off (:data:`SAME_PREFIX`) or when the cached keys a suffix run
    reads are not a site (q/k norm without rotary: ``kv_sites`` holds the keys before the norm)."""
    if not SAME_PREFIX or (config.qk_norm and config.positional != "rotary"):
        return 0
    return min(_sweep.first_difference(clean, corrupt), int(np.min(answer_pos)))


def _target(site, by, model) -> Target:
    """Validate one ``(site, by)``: every axis known, present on the site, named once; ``layer`` in."""
    c = _site(site, model)
    if isinstance(by, str):
        raise InputError(f"by must be a sequence of axis names such as ('layer', 'pos'), not the string {by!r}.")
    axes = tuple(by or DEFAULT_AXES.get(c, ("layer",)))
    valid = [a for a in GRID_AXES if a == "layer" or GRID_AXES[a] in SITES[c].axes]
    rule = f"valid axes for {c!r}: {valid}, each at most once, 'layer' included"
    for a in axes:
        if a not in valid:
            hint = " (attention scores and patterns are by 'dest_pos'/'src_pos', not 'pos')" if a == "pos" else ""
            raise InputError(f"Cannot attribute {c!r} by={axes!r}: {a!r} is not an axis of this site{hint}; {rule}.")
    repeated = [a for a in valid if axes.count(a) > 1]
    if repeated:
        raise InputError(f"Cannot attribute {c!r} by={axes!r}: {repeated} repeated; {rule}.")
    if "layer" not in axes:
        raise InputError(f"Cannot attribute {c!r} by={axes!r}: 'layer' missing; {rule}.")
    return Target(c, axes)


#: Programs compiled by :func:`_plan_remat` (a budgeted call compiles its candidates itself, and
#: jit's cache does not hold them), keyed by everything the program depends on; most recent last.
_PLANNED: dict = {}
_PLANNED_MAX = 8


def _signature(tree):
    """What a compiled program depends on in its arguments: structure, shapes, dtypes, shardings."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves)


def _compiled_for(key, build):
    """``build()``'s compiled program, from :data:`_PLANNED` when the same ``key`` was built."""
    if key in _PLANNED:
        _PLANNED[key] = _PLANNED.pop(key)  # most recent last
        return _PLANNED[key]
    out = _PLANNED[key] = build()
    while len(_PLANNED) > _PLANNED_MAX:
        _PLANNED.pop(next(iter(_PLANNED)))
    return out


def _plan_remat(remat, memory_budget, params, compile_with):
    """``(remat, compiled program or None, info)`` for :func:`attribution_patch`'s ``remat=`` and
    ``memory_budget=`` (see there): with a budget, each candidate (``False`` first, then
    ``True``) is compiled and its ``memory_analysis()`` compared with the budget."""
    if not (remat is True or remat is False or (isinstance(remat, str) and remat == "auto")):
        raise InputError(f"remat must be 'auto', True or False; got {remat!r}.")
    leaf = jax.tree_util.tree_leaves(params)[0]
    devices = sorted(leaf.sharding.device_set, key=lambda d: d.id) if isinstance(leaf, jax.Array) else jax.devices()[:1]
    if memory_budget is not None:
        budget, source = _planner.parse_bytes(memory_budget), "memory_budget="
    else:
        budget, source = _planner.device_budget(devices), "free device memory"
    if budget is None:  # nothing to plan against (a CPU reports no memory): keep every value
        return (False if remat == "auto" else remat), None, {}
    mine = [d for d in devices if d.process_index == jax.process_index()] or devices
    resident = _planner.resident_bytes(params, mine[0])  # weights already on a device are not counted again
    need = {}
    for r in ((False, True) if remat == "auto" else (remat,)):
        compiled = compile_with(r)
        need[r] = _planner.estimate(compiled, 1, resident=resident).need()
        if need[r] <= budget:
            return r, compiled, {"memory_budget": budget, "memory_need": need}
    tried = ", ".join(f"remat={r}: {_planner.fmt_bytes(n)}" for r, n in need.items())
    raise _planner.MemoryPlanError(
        f"attribution_patch does not fit the memory budget ({source}: {_planner.fmt_bytes(budget)} per device): {tried} "
        f"beyond the weights already on the device. To fit: fewer prompts per call (split the batch: estimates are per "
        f"prompt), shorter prompts, fewer targets or sites per call, method='atp' instead of 'atp*' (GradDrop runs one "
        f"backward pass per layer), a smaller dtype (dtype='bfloat16' when loading), or a larger memory_budget= if the "
        f"device really has more free memory.")


def attribution_patch(
    model: HookedModel,
    clean_tokens,
    corrupt_tokens,
    *,
    targets: Sequence[tuple[str, Sequence[str] | None]] | None = None,
    site: str = "resid_pre",
    by: Sequence[str] | None = None,
    direction: str = "denoise",
    method: str = "atp",
    metric="logit_diff",
    answer=None,
    wrong=None,
    answer_pos=-1,
    token_labels=None,
    attention_mask=None,
    mesh="auto",
    gather: str = "all",
    remat="auto",
    memory_budget=None,
):
    """Estimate every patch of one or several sweeps from gradients (see module docstring).

    Args:
        model, clean_tokens, corrupt_tokens, direction, answer, wrong, answer_pos, token_labels:
            as for :func:`jaxpatch.activation_patch` (a :class:`jaxpatch.byo.Patchable` model
            supports ``method="atp"``).
        site, by: one target (default residual stream by layer x position). ``by`` names each grid
            axis once, includes ``"layer"``, and uses only axes the site has: ``pos``, ``head``,
            ``neuron``, ``dest_pos``/``src_pos`` (attention scores and pattern); result axes are in
            the order given. Axes not named are summed over (e.g. q/k by ``("layer",)``).
        targets: several targets at once, ``[(site, by), ...]``; all share one backward pass.
        method: ``"atp"`` (plain), ``"atp*"`` (QK fix + GradDrop), or ``"atp+qk"`` (QK fix only).
        metric: one differentiable metric name or a callable of answer-position logits -> [batch].
        mesh: ``"auto"`` (default): in a multi-process run (after ``jax.distributed.initialize``)
            the prompts are split over the processes, each computing ``ceil(batch / processes)``
            of them on its first device, and the per-prompt estimates gathered (a collective: every
            process must call); with a user metric (which may mix prompts), or in one process, the
            whole call runs on each process's first device. ``None``: the whole call on this
            process's first device, no collective. Estimates of a prompt computed in a smaller
            batch equal the whole batch's to float rounding (XLA may block a matmul differently):
            ``tests/test_multihost_gather.py`` checks 2 processes against 1 to 1e-5 relative.
        gather: in a multi-process run, ``"all"`` (default: every process returns the result) or
            ``"process0"`` (only process 0 does; the others return ``None``), as for
            :func:`jaxpatch.activation_patch`. With the prompts split, the estimates travel to
            process 0 only; without, the other processes validate the arguments and return
            ``None`` without computing.
        remat: the backward pass keeps each block's token-row matmul outputs and recomputes the
            rest from them (``False``: ``models.transformer.GRAD_SAVES``) or recomputes each block
            from its input (``True``: ``jax.checkpoint``; about half the memory for GPT-2 small at
            8 x 128 tokens, 270 vs 546 MiB for ``resid_pre``, for one more forward pass).
            ``"auto"`` (default): with a known memory budget (``memory_budget=``, or what the
            device reports: GPUs, TPUs), the compiled program's own memory analysis decides:
            ``False`` when it fits, else ``True``; without one (CPUs), ``False``.
        memory_budget: bytes per device (or ``"2GiB"``, ``"512MB"``) the call may use; with a
            budget (given or reported) a program that does not fit raises a
            :class:`jaxpatch.planner.MemoryPlanError` saying what to change.

    Returns:
        a :class:`PatchResult` (one target) or a dict ``site/by -> PatchResult`` (several), whose
        ``values`` are the *estimated* metric after each patch (the run's metric plus the
        estimated change), so they compare directly with :func:`jaxpatch.activation_patch`.
        For ``atp*`` the GradDrop estimate is unsigned (a magnitude used for ranking).
        ``None`` on processes other than 0 under ``gather="process0"``.

    Raises:
        InputError: a ``by`` with an unknown, repeated or site-foreign axis, or without ``layer``;
            a ``gather`` other than ``"all"``/``"process0"``; a ``mesh`` other than ``"auto"``/``None``.
    """
    gather = _multihost.check_gather(gather)
    _multihost.check_prompt_mesh(mesh)
    if not isinstance(model, HookedModel):  # a Flax / Equinox / plain-JAX model: jaxpatch.byo's engine (one process)
        if remat not in ("auto", False) or memory_budget is not None:
            raise InputError("remat= and memory_budget= apply to jaxpatch's own models (HookedModel); a bring-your-own "
                             "model runs its own forward pass.")
        kw = dict(locals())
        del kw["gather"], kw["mesh"], kw["remat"], kw["memory_budget"]
        res = _byo.attribution_patch(**kw)
        return res if _multihost.keeps_result(gather) else None
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    if method not in ("atp", "atp*", "atp+qk"):
        raise InputError(f"method must be 'atp', 'atp+qk' or 'atp*', got {method!r}.")
    names = _metric_fn(metric)
    cfg = model.config
    clean = check_tokens(cfg, clean_tokens)
    corrupt = check_tokens(cfg, corrupt_tokens)
    if clean.shape != corrupt.shape:
        raise InputError(f"clean_tokens {tuple(clean.shape)} and corrupt_tokens {tuple(corrupt.shape)} must have the same shape.")
    B, T = clean.shape
    mask = check_attention_mask(attention_mask, clean)
    ans, wr, apos = answer_arrays(cfg, names, answer, wrong, answer_pos, B, T, mask)
    single = targets is None
    if single:
        tlist = [_target(site, by, model)]
    else:
        tlist = []
        for entry in targets:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise InputError(f"targets entries must be (site, by) pairs; got {entry!r}.")
            tlist.append(_target(entry[0], entry[1], model))
    qk = method in ("atp*", "atp+qk")
    sites = {t.site for t in tlist}
    if qk and sites & set(_QK):
        rot = ("blocks.attn.hook_rot_q", "blocks.attn.hook_rot_k") if cfg.positional == "rotary" else ()
        sites |= {"blocks.attn.hook_q", "blocks.attn.hook_k", "blocks.attn.hook_pattern", *rot}
    sites = tuple(sorted(sites))

    t0 = time.perf_counter()
    run_tokens, src_tokens = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    ctx = {"answer_pos": jnp.asarray(apos), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wr)}
    if mask is not None:
        ctx["attention_mask"] = mask
    names, consts = _metrics.prepare(names, B, cfg.d_vocab, model.dtype)  # traced afresh: current values
    ctx["metric_consts"] = consts
    if not isinstance(names[0], str):  # a user metric must return floats to have a gradient
        if not jnp.issubdtype(names[0].out_aval.dtype, jnp.floating):
            raise InputError(f"Metric returns {names[0].out_aval.dtype}; attribution needs a floating, differentiable metric.")
    if cfg.n_layers < 2 and method == "atp*":
        raise InputError("GradDrop needs at least 2 layers.")
    share = _multihost.prompt_share(mesh, B, names, model.params)  # this process's prompts when they are split over processes
    spread = _multihost.spread(model.params)  # weights over several processes: one program that every process joins
    if share is None and not spread and not _multihost.keeps_result(gather):  # "process0" on another process: nothing to compute
        return None
    if share is not None or spread:  # every process must hold the same call: never a silent mix of two
        from .resume import fingerprint

        _multihost.check_same("inputs (model weights, prompts, targets, metric or options)", fingerprint(
            cfg, model.params, run_tokens, src_tokens, ctx, sites, names, tuple(tlist), method, direction))
    if share is not None:
        run_tokens, src_tokens = run_tokens[share], src_tokens[share]
        ctx = {k: (v if k == "metric_consts" else v[share]) for k, v in ctx.items()}
    static = dict(sites=sites, names=names, targets=tuple(tlist), method=method, denoise=direction == "denoise",
                  offset=_same_prefix(cfg, clean, corrupt, apos))
    args = (model.params, run_tokens, src_tokens, ctx)
    key = (cfg, tuple(static.items()), _signature(args))
    remat, compiled, plan = _plan_remat(remat, memory_budget, model.params, lambda r: _compiled_for(
        key + (r,), lambda: _atp_core.lower(cfg, *args, **static, remat=r).compile()))
    if compiled is not None:  # the planned program itself (jit's cache does not hold it)
        m_run, m_src, ests = compiled(*args)
    else:
        m_run, m_src, ests = _atp_core(cfg, model.params, run_tokens, src_tokens, ctx, **static, remat=remat)
    if spread:
        gathered = _multihost.collect((m_run, m_src, ests), gather)
        if gathered is None:  # "process0" on another process
            return None
        m_run, m_src, ests = gathered
    if share is not None:
        gathered = _multihost.gather_prompts((m_run, m_src, ests), B, gather)
        if gathered is None:  # "process0" on another process
            return None
        m_run, m_src, ests = gathered
    m_run, m_src = np.asarray(m_run), np.asarray(m_src)
    m_clean, m_corrupt = (m_src, m_run) if direction == "denoise" else (m_run, m_src)
    elapsed = time.perf_counter() - t0
    results = {}
    for t, est in zip(tlist, ests):
        per = m_run[None] + np.asarray(est)  # estimated metric after the patch
        labels = _labels(t.axes, est.shape[:-1], np.asarray(clean[0]), token_labels, t.site, cfg)
        results[(t.site, t.axes)] = PatchResult(
            t.site, direction, "resample", tuple(_metrics.name_of(n) for n in names), t.axes, labels,
            per[..., None, :], m_clean[None], m_corrupt[None],
            info={"method": method, "estimate": True, "wall_s": elapsed, "signed": method != "atp*", "remat": remat,
                  **plan})
    if single:
        return next(iter(results.values()))
    return results
