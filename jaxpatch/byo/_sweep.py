"""Sweeps and attribution for :class:`~jaxpatch.byo.Patchable` models.

The built-in transformer's sweep reuses cached prefixes; a model brought by the user is opaque,
so each patch is one full forward pass. The sweep is still one compiled program: the patches are
a pytree of int32 index arrays ``[n_patches]`` (one per grid axis), each turned into a ``where``
mask inside the forward, vmapped in chunks with ``jax.lax.map`` (no Python loop over patches, no
host sync per patch, one compilation for any indices). Attribution (AtP) is one forward and one
backward pass with respect to zero deltas at the sites.
"""

from __future__ import annotations

import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import metrics as _metrics
from .._errors import InputError, NonFiniteError
from ..interventions import ALL
from ..results import PatchResult
from ..user_metric import TracedMetric, trace
from ._model import Patchable, _batch_size, run
from ._site import SiteEdit, SiteInfo

DIRECTIONS = ("denoise", "noise")
BASELINES = ("resample", "mean", "zero")


# ----------------------------------------------------------------------------------------------
# Metrics of the model's outputs


def _prepare_metrics(names, out_aval, B: int):
    """Trace user metrics on the whole output ``[batch, ...]``; built-in metrics read rows
    ``[batch, classes]`` (a 2-D output, or a 3-D ``[batch, pos, vocab]`` one at ``answer_pos``)."""
    if not hasattr(out_aval, "shape") or not out_aval.shape or out_aval.shape[0] != B:
        raise InputError(f"The model's output must be one array with a leading batch axis of {B}; got {out_aval}. "
                         "Pass output= to the adapter to select it from a pytree.")
    dtype = jnp.promote_types(out_aval.dtype, jnp.float32)
    static, consts = [], []
    for n in names:
        if callable(n):
            tm, c = trace(n, jax.ShapeDtypeStruct(out_aval.shape, dtype))
            if tm.out_aval.shape != (B,):
                raise InputError(f"Metric {tm.name!r} must return one value per example, shape ({B},), from the model's "
                                 f"outputs {tuple(out_aval.shape)}; it returned shape {tm.out_aval.shape}.")
            static.append(tm)
            consts.append(c)
        else:
            if len(out_aval.shape) not in (2, 3):
                raise InputError(f"Metric {n!r} reads class scores [batch, classes] or logits [batch, pos, vocab]; this "
                                 f"model outputs {tuple(out_aval.shape)}. Pass a callable metric (outputs -> [batch]).")
            static.append(n)
            consts.append(())
    return tuple(static), tuple(consts)


def _compute(names, out, ctx):
    """Metric values ``[n_metrics, B]`` of outputs ``out`` ``[B, ...]``."""
    out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    rows = None
    vals = []
    for i, n in enumerate(names):
        if isinstance(n, TracedMetric):
            vals.append(n(ctx["metric_consts"][i], out).astype(out.dtype))
            continue
        if rows is None:
            rows = out if out.ndim == 2 else jnp.take_along_axis(out, ctx["answer_pos"][:, None, None], axis=1)[:, 0]
        vals.append(_metrics.compute((n,), rows, ctx["answer"], ctx["wrong"], ctx.get("clean_logprobs"))[0])
    return jnp.stack(vals)


def _rows(out, ctx):
    out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    return out if out.ndim == 2 else jnp.take_along_axis(out, ctx["answer_pos"][:, None, None], axis=1)[:, 0]


def _answers(names, answer, wrong, answer_pos, B, out_shape):
    """Per-example ``answer``, ``wrong``, ``answer_pos`` int arrays ``[B]`` (zeros where unused)."""
    needs = any(isinstance(n, str) and n != "kl" for n in names)  # kl compares with the clean run

    def per(x, what):
        if x is None:
            return np.zeros((B,), np.int32)
        arr = np.asarray(x)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{what} must be integers; got {arr.tolist() if arr.size <= 8 else arr.dtype!r}.")
        arr = np.full((B,), arr) if arr.ndim == 0 else arr
        if arr.shape != (B,):
            raise InputError(f"{what} must be a scalar or have one entry per example, shape ({B},); got {arr.shape}.")
        return arr.astype(np.int32)

    if needs and answer is None:
        raise InputError("Built-in metrics need answer= (the correct class / next token per example).")
    if needs and wrong is None and _metrics.needs_wrong(names):
        raise InputError("Metric 'logit_diff' needs wrong= (the contrast class / token per example).")
    ans, wr = per(answer, "answer"), per(wrong if wrong is not None else answer, "wrong")
    if any(isinstance(n, str) for n in names):
        V = out_shape[-1]
        for what, ids in (("answer", ans), ("wrong", wr)):
            if np.any((ids < 0) | (ids >= V)):
                raise InputError(f"{what} ids must lie in [0, {V}) (the model's last output axis).")
    apos = per(answer_pos, "answer_pos")
    if len(out_shape) == 3:
        T = out_shape[1]
        if np.any((apos < -T) | (apos >= T)):
            raise InputError(f"answer_pos must lie in [-{T}, {T}) for outputs with {T} positions.")
        apos = apos % T
    return ans, wr, apos


# ----------------------------------------------------------------------------------------------
# The sweep spec: a pytree of int32 index arrays


def _site_list(site) -> tuple[str, ...]:
    if isinstance(site, str):
        return (site,)
    names = tuple(site)
    if not names or not all(isinstance(s, str) for s in names):
        raise InputError(f"site must be a site name or a list of site names; got {site!r}.")
    if len(set(names)) != len(names):
        raise InputError(f"site lists a site twice: {names}.")
    return names


def _grid_axes(infos: dict[str, SiteInfo], names) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The axes a sweep over ``names`` may use (``site`` first for several) and their sizes."""
    first = infos[names[0]]
    for n in names[1:]:
        if (infos[n].axes, infos[n].shape) != (first.axes, first.shape):
            raise InputError(f"A sweep over several sites needs the same axes and shape at each; {names[0]!r} has "
                             f"{first.axes} {first.shape}, {n!r} has {infos[n].axes} {infos[n].shape}.")
    axes = tuple(a for a in first.axes if a != "batch")
    sizes = tuple(first.size(a) for a in axes)
    if len(names) > 1:
        axes, sizes = ("site",) + axes, (len(names),) + sizes
    return axes, sizes


def _default_by(grid_axes):
    out = [a for a in grid_axes if a in ("site", "layer")]
    rest = [a for a in grid_axes if a not in ("site", "layer")]
    return tuple(out + rest[:1]) or tuple(grid_axes[:1])


def grid(infos, names, by) -> tuple[dict[str, np.ndarray], tuple[str, ...], tuple[int, ...]]:
    """Every combination of the ``by`` axes: ``({axis: int32 [P]}, axes, shape)``."""
    valid, sizes = _grid_axes(infos, names)
    if isinstance(by, str):
        raise InputError(f"by must be a sequence of axis names, not the string {by!r}.")
    by = tuple(by) if by is not None else _default_by(valid)
    for a in by:
        if a not in valid:
            raise InputError(f"Cannot sweep {list(names)} by {a!r}: valid axes {list(valid)} (each at most once).")
    if len(set(by)) != len(by):
        raise InputError(f"by={by} repeats an axis; valid axes {list(valid)}, each at most once.")
    shape = tuple(sizes[valid.index(a)] for a in by)
    idx = np.indices(shape).reshape(len(shape), -1).astype(np.int32)
    return {a: idx[i] for i, a in enumerate(by)}, by, shape


def from_rows(infos, names, rows) -> tuple[dict[str, np.ndarray], list[str]]:
    """Explicit patches: each row a dict axis -> index; an axis a row does not give is patched whole."""
    valid, sizes = _grid_axes(infos, names)
    if isinstance(rows, dict) or not len(rows):
        raise InputError("patches= must be a non-empty list of dicts such as {'layer': 1, 'pos': 3}.")
    out = {a: np.full((len(rows),), ALL, np.int32) for a in valid}
    labels = []
    for r, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"patches[{r}] must be a dict axis -> index (joint patches are not supported for these "
                             f"models); got {row!r}.")
        for a, i in row.items():
            if a not in valid:
                raise InputError(f"patches[{r}] has axis {a!r}; valid axes {list(valid)}.")
            if a == "site" and isinstance(i, str):
                i = names.index(i) if i in names else -1
            arr = np.asarray(i)
            if arr.ndim or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"patches[{r}][{a!r}] must be one integer; got {i!r}.")
            n = sizes[valid.index(a)]
            if not -n <= int(i) < n:
                raise InputError(f"patches[{r}][{a!r}] = {int(i)} out of range: valid 0..{n - 1}.")
            out[a][r] = int(i) % n
        labels.append(", ".join(f"{a}={names[v] if a == 'site' else v}" for a, v in row.items()) or "all")
    if len(names) > 1 and np.any(out["site"] == ALL):
        raise InputError("With several sites, each row of patches= must give 'site'.")
    return out, labels


# ----------------------------------------------------------------------------------------------
# The compiled sweep


def _row_edits(names, row, source):
    """Edits for one patch ``row`` (scalars per axis): each site's source where the row selects."""
    edits = {}
    for k, n in enumerate(names):
        index = {a: v for a, v in row.items() if a != "site"}
        enabled = (row["site"] == k) if "site" in row else None
        edits[n] = (SiteEdit(value=source[n], index=index, enabled=enabled),)
    return edits


def _patched_metrics(model, names, params, inputs, row, source, ctx, metric_names):
    """The sweep kernel: metrics ``[n_metrics, B]`` of one patched forward pass."""
    out = run(model, params, inputs, _row_edits(names, row, source))[0]
    return _compute(metric_names, out, ctx)


@partial(jax.jit, static_argnames=("model", "names", "metric_names", "chunk"))
def _sweep_core(params, inputs, idx, source, ctx, *, model, names, metric_names, chunk):
    def one(row):
        return _patched_metrics(model, names, params, inputs, row, source, ctx, metric_names)

    return jax.lax.map(one, idx, batch_size=chunk)  # [P, M, B]


def _labels(axes, shape, names, first_input, token_labels):
    out = {}
    for a, n in zip(axes, shape):
        if a == "site":
            out[a] = list(names)
        elif a == "layer":
            out[a] = [f"L{i}" for i in range(n)]
        elif a == "pos" and token_labels is not None and first_input is not None:
            ids = np.asarray(first_input).reshape(-1).tolist()
            toks = token_labels(ids) if callable(token_labels) else [token_labels[i] for i in ids]
            out[a] = [f"{i}:{toks[i]}" if i < len(toks) else str(i) for i in range(n)]
        else:
            out[a] = [str(i) for i in range(n)]
    return out


def _check_model(model):
    if not isinstance(model, Patchable):
        raise InputError(
            f"Got a {type(model).__name__} as the model. jaxpatch patches a HookedModel (jaxpatch.load_pretrained, "
            "HookedModel.from_config) or a jaxpatch.byo.Patchable: wrap a Flax linen module with "
            "jaxpatch.byo.from_flax(module, variables), an nnx module with jaxpatch.byo.from_nnx(module), an Equinox "
            "module with jaxpatch.byo.from_equinox(module), a function with jaxpatch.patchable(fn, params).")


def _refuse(**given):
    for k, (v, default) in given.items():
        if not (v is default or v == default):
            raise InputError(f"{k}={v!r} is for jaxpatch's built-in transformers; models brought from Flax, Equinox or "
                             "plain JAX do not take it.")


def activation_patch(model: Patchable, clean_tokens, corrupt_tokens=None, *, site=None, by=None, patches=None,
                     direction="denoise", baseline="resample", metrics=("logit_diff",), answer=None, wrong=None,
                     answer_pos=-1, reference_tokens=None, noise_positions=None, noise_scale=3.0, n_noise=10, seed=0,
                     token_labels=None, chunk_size=None, mesh="auto", position_buckets="auto", progress=None,
                     attention_mask=None, **other) -> PatchResult:
    """:func:`jaxpatch.activation_patch` for a :class:`Patchable` model (see its docstring).

    ``clean_tokens``/``corrupt_tokens`` are the model's inputs (any pytree with a leading batch
    axis). ``site`` is a site name or a list of names of equal shape (an extra ``site`` grid axis);
    ``by`` any of the site's axes but ``batch`` (default: ``layer`` inside :func:`jaxpatch.scan`,
    then the first axis after ``batch``). Metrics: built-in names read ``[batch, classes]`` or
    ``[batch, pos, vocab]`` outputs; a callable gets the whole output and returns ``[batch]``.
    """
    _check_model(model)
    _refuse(noise_positions=(noise_positions, None), mesh=(mesh, "auto"), position_buckets=(position_buckets, "auto"),
            attention_mask=(attention_mask, None), **{k: (v, None) for k, v in other.items()})
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if baseline not in BASELINES:
        raise InputError(f"baseline must be one of {BASELINES} for these models, got {baseline!r} (the 'noise' baseline "
                         "corrupts built-in token embeddings; give noisy inputs as corrupt_tokens instead).")
    if baseline in ("mean", "zero") and direction == "denoise":
        raise InputError(f"The {baseline!r} baseline is an ablation: use direction='noise' (patch it into the clean run).")
    if site is None:
        raise InputError("Give site= (a site name, or a list of names); model.sites(inputs) lists them.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise InputError(f"chunk_size must be an int >= 1; got {chunk_size!r}.")
    names_m = _metrics.check_names(metrics)
    B = _batch_size(clean_tokens)
    if corrupt_tokens is not None:
        if jax.tree_util.tree_structure(corrupt_tokens) != jax.tree_util.tree_structure(clean_tokens) or any(
                np.shape(a) != np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(clean_tokens),
                                                           jax.tree_util.tree_leaves(corrupt_tokens))):
            raise InputError("clean and corrupted inputs must have the same structure and shapes.")
    elif baseline == "resample":
        raise InputError("baseline='resample' needs corrupted inputs.")
    names = _site_list(site)
    infos = model.check_sites(names, clean_tokens)
    out_aval = model.output_shape(clean_tokens)
    static_names, consts = _prepare_metrics(names_m, out_aval, B)
    ans, wr, apos = _answers(names_m, answer, wrong, answer_pos, B, out_aval.shape)
    if patches is not None:
        if by is not None:
            raise InputError("Give either by= or patches=, not both.")
        idx, row_labels = from_rows(infos, names, patches)
        axes, shape = ("patch",), (len(row_labels),)
    else:
        idx, axes, shape = grid(infos, names, by)
        row_labels = None

    t0 = time.perf_counter()
    capture = frozenset(names)
    clean_out, clean_caps = model._jit_run(model.params, clean_tokens, {}, capture=capture)
    corrupt_out = corrupt_caps = None
    if corrupt_tokens is not None:
        corrupt_out, corrupt_caps = model._jit_run(model.params, corrupt_tokens, {}, capture=capture)
    ctx = {"answer": jnp.asarray(ans), "wrong": jnp.asarray(wr), "answer_pos": jnp.asarray(apos),
           "metric_consts": consts}
    if any(n == "kl" for n in static_names):
        ctx["clean_logprobs"] = jax.nn.log_softmax(_rows(clean_out, ctx), -1)
    m_clean = np.asarray(_compute(static_names, clean_out, ctx))
    m_corrupt = None if corrupt_out is None else np.asarray(_compute(static_names, corrupt_out, ctx))
    for what, m in (("clean", m_clean), ("corrupted", m_corrupt)):
        if m is not None and not np.all(np.isfinite(m)):
            raise NonFiniteError(f"The {what} run's metric values are NaN or inf: no patching effect can be measured "
                                 "against it. Check the model, the inputs and the metric.")

    if direction == "denoise":
        run_inputs, source = corrupt_tokens, {n: clean_caps[n] for n in names}
    else:
        run_inputs = clean_tokens
        if baseline == "resample":
            source = {n: corrupt_caps[n] for n in names}
        elif baseline == "mean":
            ref = reference_tokens if reference_tokens is not None else (
                corrupt_tokens if corrupt_tokens is not None else clean_tokens)
            _, ref_caps = model._jit_run(model.params, ref, {}, capture=capture)
            source = {n: jnp.mean(ref_caps[n], axis=infos[n].axes.index("batch"), keepdims=True) for n in names}
        else:
            source = {n: jnp.zeros((), infos[n].dtype) for n in names}
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    P = len(next(iter(idx.values())))
    chunk = int(min(chunk_size or 64, P))
    padded = math.ceil(P / chunk) * chunk  # full chunks only: one trace of the kernel
    idx_j = {a: jnp.asarray(np.concatenate([v, np.repeat(v[:1], padded - P)])) for a, v in idx.items()}
    out = _sweep_core(model.params, run_inputs, idx_j, source, ctx, model=model, names=names,
                      metric_names=static_names, chunk=chunk)
    out = np.asarray(out)[:P]  # [P, M, B]: the one host transfer
    sweep_s = time.perf_counter() - t0
    bad = np.flatnonzero(~np.all(np.isfinite(out), axis=(1, 2)))
    if bad.size:
        where = [{a: int(idx[a][p]) for a in idx if idx[a][p] != ALL} for p in bad[:5]]
        raise NonFiniteError(f"{bad.size} patched run(s) gave NaN or inf metric values, e.g. the patches {where}.")
    M = len(names_m)
    first = jax.tree_util.tree_leaves(clean_tokens)[0]
    if row_labels is not None:
        labels = {"patch": row_labels}
    else:
        labels = _labels(axes, shape, names, np.asarray(first[0]) if first.ndim == 2 else None, token_labels)
    per = out.reshape(shape + (M, B))
    info = {"setup_s": setup_s, "sweep_s": sweep_s, "n_patches": P, "batch": B, "chunk_size": chunk,
            "model": model.name, "gap_floor": _metrics.gap_floor(
                [_rows(clean_out, ctx), None if corrupt_out is None else _rows(corrupt_out, ctx)],
                jnp.promote_types(out_aval.dtype, jnp.float32)) if out_aval.ndim in (2, 3) else 0.0}
    return PatchResult(",".join(names), direction, baseline, tuple(_metrics.name_of(n) for n in names_m), axes, labels,
                       per, m_clean, m_corrupt, info)


# ----------------------------------------------------------------------------------------------
# Attribution patching


@partial(jax.jit, static_argnames=("model", "sites", "metric_names"))
def _atp_core(params, run_inputs, src_inputs, ctx, *, model, sites, metric_names):
    """The source run's captures, the run's metric, captures and ∂(Σ metric)/∂activation."""
    capture = frozenset(sites)
    src_out, src_caps, _, _ = run(model, params, src_inputs, {}, capture)

    def f(deltas):
        edits = {s: (SiteEdit(delta=d),) for s, d in deltas.items()}
        out, caps, _, _ = run(model, params, run_inputs, edits, capture)
        m = _compute(metric_names, out, ctx)[0]
        return jnp.sum(m), (m, caps)

    zeros = {s: jnp.zeros(src_caps[s].shape, src_caps[s].dtype) for s in sites}
    grads, (m_run, run_caps) = jax.grad(f, has_aux=True)(zeros)
    m_src = _compute(metric_names, src_out, ctx)[0]
    return m_run, m_src, src_caps, run_caps, grads


def _reduce(prod, info: SiteInfo, keep):
    """Sum ``prod`` (external layout) to ``[*keep, batch]``."""
    order = [info.axes.index(a) for a in keep] + [info.axes.index("batch")]
    drop = tuple(i for i in range(len(info.axes)) if i not in order)
    out = jnp.sum(prod, axis=drop)
    remaining = [i for i in range(len(info.axes)) if i not in drop]
    return jnp.transpose(out, [remaining.index(k) for k in order])


def attribution_patch(model: Patchable, clean_tokens, corrupt_tokens, *, targets=None, site=None, by=None,
                      direction="denoise", method="atp", metric="logit_diff", answer=None, wrong=None, answer_pos=-1,
                      token_labels=None, attention_mask=None, **other):
    """:func:`jaxpatch.attribution_patch` (AtP) for a :class:`Patchable` model.

    Estimates every patch of the sweep ``(site, by)`` as ``(a_src - a_run) · ∂metric/∂a`` summed
    over the axes not in ``by``, from one forward and one backward pass. ``site`` may be a list of
    equal-shaped sites (a ``site`` axis). Only ``method="atp"``: AtP*'s QK fix and GradDrop need the
    attention and layer structure of jaxpatch's own transformers.
    """
    _check_model(model)
    _refuse(attention_mask=(attention_mask, None), **{k: (v, None) for k, v in other.items()})
    if method != "atp":
        raise InputError(f"method={method!r} needs the attention and layer structure of jaxpatch's built-in "
                         "transformers; models brought from Flax, Equinox or plain JAX support method='atp'.")
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    names_m = _metrics.check_names(metric)
    if len(names_m) != 1:
        raise InputError("Attribution takes exactly one metric (its gradient is what is propagated).")
    if isinstance(names_m[0], str) and (names_m[0] in _metrics.DISCRETE or names_m[0].startswith("top")):
        raise InputError(f"Metric {names_m[0]!r} is piecewise constant: attribution needs a differentiable metric.")
    B = _batch_size(clean_tokens)
    if corrupt_tokens is None:
        raise InputError("attribution_patch needs corrupted inputs.")
    single = targets is None
    tlist = [(site, by)] if single else list(targets)
    parsed = []
    for entry in tlist:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or entry[0] is None:
            raise InputError(f"targets entries must be (site, by) pairs; got {entry!r}.")
        names = _site_list(entry[0])
        infos = model.check_sites(names, clean_tokens)
        _, axes, _ = grid(infos, names, entry[1])
        parsed.append((names, axes, infos))
    out_aval = model.output_shape(clean_tokens)
    static_names, consts = _prepare_metrics(names_m, out_aval, B)
    if isinstance(static_names[0], TracedMetric) and not jnp.issubdtype(static_names[0].out_aval.dtype, jnp.floating):
        raise InputError(f"Metric returns {static_names[0].out_aval.dtype}; attribution needs a floating metric.")
    ans, wr, apos = _answers(names_m, answer, wrong, answer_pos, B, out_aval.shape)
    ctx = {"answer": jnp.asarray(ans), "wrong": jnp.asarray(wr), "answer_pos": jnp.asarray(apos), "metric_consts": consts}
    run_inputs, src_inputs = (corrupt_tokens, clean_tokens) if direction == "denoise" else (clean_tokens, corrupt_tokens)
    if any(n == "kl" for n in static_names):
        clean_out = model._jit_run(model.params, clean_tokens, {})[0]
        ctx["clean_logprobs"] = jax.nn.log_softmax(_rows(clean_out, ctx), -1)
    sites = tuple(sorted({n for names, _, _ in parsed for n in names}))
    t0 = time.perf_counter()
    m_run, m_src, src_caps, run_caps, grads = _atp_core(model.params, run_inputs, src_inputs, ctx, model=model,
                                                        sites=sites, metric_names=static_names)
    m_run, m_src = np.asarray(m_run), np.asarray(m_src)
    m_clean, m_corrupt = (m_src, m_run) if direction == "denoise" else (m_run, m_src)
    first = jax.tree_util.tree_leaves(clean_tokens)[0]
    results = {}
    for names, axes, infos in parsed:
        per_site = []
        for n in names:
            prod = jnp.where(src_caps[n] == run_caps[n], 0.0, (src_caps[n] - run_caps[n]) * grads[n])
            per_site.append(_reduce(prod, infos[n], tuple(a for a in axes if a != "site")))
        est = per_site[0]
        if len(names) > 1:  # a "site" axis, or (by without "site") the sites patched jointly: their sum
            est = jnp.stack(per_site)
            est = jnp.moveaxis(est, 0, axes.index("site")) if "site" in axes else jnp.sum(est, axis=0)
        est = np.asarray(est)
        per = m_run + est  # numpy: est is [*grid, batch]
        labels = _labels(axes, est.shape[:-1], names, np.asarray(first[0]) if first.ndim == 2 else None, token_labels)
        results[(",".join(names), axes)] = PatchResult(
            ",".join(names), direction, "resample", (_metrics.name_of(names_m[0]),), axes, labels, per[..., None, :],
            m_clean[None], m_corrupt[None], info={"method": "atp", "estimate": True, "signed": True,
                                                  "wall_s": time.perf_counter() - t0})
    if single:
        return next(iter(results.values()))
    return results


__all__ = ["activation_patch", "attribution_patch"]
