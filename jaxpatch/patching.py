"""Exact activation patching: the researcher-facing entry point :func:`activation_patch`.

Denoising runs the corrupted prompt and patches in clean activations (is this component
*sufficient* to restore the behaviour?); noising runs the clean prompt and patches in corrupted
activations (is it *necessary*?). Both directions use the same sweep spec. Baselines are data:

* ``resample`` — activations of corrupted prompts (several corrupted sets: an extra grid axis);
* ``mean`` — the mean activation over a reference batch (noising only: an ablation);
* ``zero`` — zeros (noising only);
* ``noise`` — ROME causal tracing: Gaussian noise (``noise_scale`` x the embedding std) added to
  the token embeddings at ``noise_positions``, ``n_noise`` samples batched as extra prompts.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as _metrics
from . import byo as _byo
from . import multihost as _multihost
from . import sweep as _sweep
from ._errors import InputError, NonFiniteError
from .interventions import NONE, Interventions, add
from .model import HookedModel, check_attention_mask, check_tokens, last_real_position
from .results import PatchResult
from .sites import SHORT_NAMES, SITES, canonical, check_available

#: Default grid axes per site when ``by`` is not given.
DEFAULT_AXES = {
    "blocks.hook_resid_pre": ("layer", "pos"),
    "blocks.hook_resid_mid": ("layer", "pos"),
    "blocks.hook_resid_post": ("layer", "pos"),
    "blocks.hook_attn_out": ("layer", "pos"),
    "blocks.hook_mlp_out": ("layer", "pos"),
    "blocks.attn.hook_z": ("layer", "head"),
    "blocks.attn.hook_q": ("layer", "head"),
    "blocks.attn.hook_k": ("layer", "head"),
    "blocks.attn.hook_v": ("layer", "head"),
    "blocks.attn.hook_pattern": ("layer", "head"),
    "blocks.attn.hook_attn_scores": ("layer", "head"),
    "blocks.mlp.hook_post": ("layer", "neuron"),
    "blocks.mlp.hook_pre": ("layer", "neuron"),
}

DIRECTIONS = ("denoise", "noise")
BASELINES = ("resample", "mean", "zero", "noise")


def _site(name: str, model: HookedModel) -> str:
    c = SHORT_NAMES.get(name, name)
    if c not in SITES:
        c = canonical(name)  # raises UnknownSiteError with a suggestion
    check_available(c, model.config)
    if not SITES[c].per_layer:
        raise InputError(f"Sweeps patch per-layer sites; {name!r} is not one. Per-layer sites: {list(DEFAULT_AXES)}.")
    return c


def int_array(x, what: str) -> np.ndarray:
    """``x`` as an int array, refusing anything that is not integer-valued by type (floats such as
    2.7 or 3.0, booleans, strings): a truncated or reinterpreted index is a silently wrong answer."""
    arr = np.asarray(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        shown = arr.tolist() if arr.size <= 8 else f"an array of dtype {arr.dtype}"
        raise InputError(f"{what} must be integers (Python int or an integer array); got {shown!r} ({arr.dtype}).")
    return arr


def _per_prompt(x, B: int, what: str) -> np.ndarray:
    arr = int_array(x, what)
    if arr.ndim == 0:
        arr = np.full((B,), arr)
    if arr.shape != (B,):
        raise InputError(f"{what} must be a scalar or have one entry per prompt (shape ({B},)); got shape {arr.shape}.")
    return arr.astype(np.int32)


def noise_position_indices(positions, T: int) -> np.ndarray:
    """Positions for the ``noise`` baseline as int indices in ``[0, T)``.

    Accepts integer indices (negative counts from the end) or a boolean mask of length ``T``
    (``[False, True, True, False]`` corrupts positions 1 and 2), never reading one as the other.
    """
    arr = np.asarray(positions)
    if arr.dtype == bool:
        if arr.shape != (T,):
            raise InputError(f"noise_positions as a boolean mask must have one entry per position, shape ({T},); "
                             f"got shape {arr.shape}. Or pass integer positions.")
        idx = np.flatnonzero(arr)
    else:
        idx = int_array(arr, "noise_positions").reshape(-1)
        bad = idx[(idx < -T) | (idx >= T)]
        if bad.size:
            raise InputError(f"noise_positions {sorted(set(bad.tolist()))} out of range for prompts of {T} tokens: "
                             f"valid -{T}..{T - 1}.")
        idx = np.unique(idx % T)
    if idx.size == 0:
        raise InputError("noise_positions selects no position: the noise baseline would corrupt nothing.")
    return idx.astype(np.int32)


def answer_arrays(cfg, names, answer, wrong, answer_pos, B: int, T: int, attention_mask=None):
    """Validated per-prompt ``(answer, wrong, answer_pos)`` int arrays ``[B]`` (positions made
    non-negative). ``wrong`` defaults to ``answer`` when no metric needs it. With an
    ``attention_mask``, a negative ``answer_pos`` counts back from each prompt's last real token
    (``-1``: the last real token), and every answer position must be a real token."""
    if answer is None:
        raise InputError("Give answer= (the correct next token per prompt) for the metrics.")
    if wrong is None and _metrics.needs_wrong(names):
        raise InputError("Metric 'logit_diff' needs wrong= (the contrast token per prompt).")
    ans = _per_prompt(answer, B, "answer")
    wr = _per_prompt(wrong if wrong is not None else answer, B, "wrong")
    for what, ids in (("answer", ans), ("wrong", wr)):
        if np.any((ids < 0) | (ids >= cfg.d_vocab)):
            raise InputError(f"{what} token ids must lie in [0, {cfg.d_vocab}).")
    apos = _per_prompt(answer_pos, B, "answer_pos")
    if np.any((apos < -T) | (apos >= T)):
        raise InputError(f"answer_pos must lie in [-{T}, {T}) for prompts of {T} tokens.")
    if attention_mask is None:
        return ans, wr, apos % T
    m = np.asarray(attention_mask)
    apos = np.where(apos < 0, last_real_position(m, B, T) + 1 + apos, apos).astype(np.int32)
    bad = [b for b in range(B) if not (0 <= apos[b] < T and m[b, apos[b]])]
    if bad:
        raise InputError(f"answer_pos {answer_pos!r} falls on padding (or before the prompt) for prompt(s) {bad[:10]}; "
                         "answer positions must be real tokens (negative positions count back from each prompt's last real token).")
    return ans, wr, apos


def embedding_noise(model: HookedModel, batch: int, n_pos: int, positions, scale: float, n_samples: int, seed: int) -> Interventions:
    """Gaussian noise on ``hook_embed`` at ``positions`` for ``n_samples`` copies of a batch
    (batch axis ``n_samples * batch``, sample-major), std ``scale`` x std of the embedding matrix."""
    std = float(jnp.std(model.params["W_E"].astype(jnp.float32)))
    noise = jax.random.normal(jax.random.PRNGKey(seed), (n_samples * batch, n_pos, model.config.d_model)) * (scale * std)
    return add(model.config, "hook_embed", noise.astype(model.dtype), pos=np.asarray(positions, np.int32))


def activation_patch(
    model: HookedModel,
    clean_tokens,
    corrupt_tokens=None,
    *,
    site: str = "resid_pre",
    by: Sequence[str] | None = None,
    patches=None,
    direction: str = "denoise",
    baseline: str = "resample",
    metrics: Sequence[str | Callable] | str = ("logit_diff",),
    answer=None,
    wrong=None,
    answer_pos=-1,
    reference_tokens=None,
    noise_positions=None,
    noise_scale: float = 3.0,
    n_noise: int = 10,
    seed: int = 0,
    token_labels: Callable | Sequence[str] | None = None,
    chunk_size: int | None = None,
    mesh="auto",
    position_buckets: int | str = "auto",
    progress: bool | None = None,
    attention_mask=None,
    checkpoint_dir=None,
    memory_budget: int | str | None = None,
    gather: str = "all",
    skip: bool = True,
    pack: bool | str = "auto",
) -> PatchResult | None:
    """Patch every component of a sweep and measure several metrics, in one compiled program.

    Args:
        model: a :class:`HookedModel`, or a :class:`jaxpatch.byo.Patchable` (a Flax, Equinox or
            plain-JAX model; see :mod:`jaxpatch.byo` for how its sites, inputs and metrics work).
        clean_tokens: ``[batch, pos]`` prompts where the model shows the behaviour.
        corrupt_tokens: ``[batch, pos]`` corrupted prompts (same shape), or ``[n_sets, batch, pos]``
            for several corrupted sets (an extra ``corrupt_set`` grid axis). Needed for
            ``baseline="resample"``; optional for mean/zero (then used only for normalisation).
        site: the site to patch: a short (``"resid_pre"``, ``"z"``, ``"pattern"``, ``"post"``...)
            or canonical name.
        by: grid axes, from ``layer``, ``pos``, ``head``, ``neuron``, ``dest_pos``, ``src_pos``
            (default per site: residual/attn_out/mlp_out by layer x pos, heads by layer x head over
            all positions, neurons by layer x neuron).
        patches: instead of ``by``: explicit rows (see :func:`jaxpatch.sweep.from_rows`), each a
            component (``{"layer": 3, "pos": 5}``) or a list of components patched jointly.
            A component patches exactly the indices it gives and the whole of every axis it does
            not give; components may give different axes. Unknown keys are errors.
        direction: ``"denoise"`` or ``"noise"``.
        baseline: ``"resample"``, ``"mean"``, ``"zero"`` or ``"noise"`` (see module docstring).
        metrics: metric names (see :mod:`jaxpatch.metrics`) and/or callables of answer-position
            logits ``[batch, d_vocab] -> [batch]``; all computed from the same patched runs. A
            callable is traced afresh on every call, so arrays and globals it reads are always
            current (as for the baselines); give callables distinct ``__name__`` s.
        answer: int token per prompt (or one for all) whose logit the metrics read.
        wrong: contrast token per prompt, for ``logit_diff``.
        answer_pos: position whose logits are read (default last), per prompt or one for all.
        reference_tokens: prompts whose mean activation is the ``mean`` baseline (default: the
            corrupted prompts if given, else the clean ones).
        noise_positions: positions whose embeddings the ``noise`` baseline corrupts: integer
            indices, or a boolean mask with one entry per position.
        noise_scale, n_noise, seed: Gaussian-noise corruption settings.
        token_labels: a vocabulary list or ``ids -> strings`` function to label positions.
        chunk_size: patches per vectorised chunk (memory/speed knob).
        mesh: ``"auto"`` shards the sweep over all local devices; ``None`` forces one device.
        position_buckets: static position offsets for prefix reuse (1 disables; ``"auto"`` weighs
            compile time against FLOPs saved).
        progress: a progress bar per chunk: ``None`` on a terminal only, ``True``/``False`` force.
        attention_mask: ``[batch, pos]`` (1 = real token) for padded prompts (left or right
            padding; see ``model.to_tokens_padded``), shared by the clean and corrupted prompts,
            which must be padded alike. Each prompt's effects are those it would have alone; the
            default ``answer_pos=-1`` is each prompt's last real token; padding is never read.
        checkpoint_dir: a directory where each completed group of chunks is written; rerun with
            the same arguments after an interruption, only the missing chunks are computed and the
            result is bitwise identical to an uninterrupted run. A directory written by a
            different sweep (model, prompts, spec, metrics, options) is refused
            (:class:`jaxpatch.resume.SweepCheckpointError`); see :mod:`jaxpatch.resume`.
        memory_budget: bytes per device (or a size such as ``"2GiB"``) the sweep may use: the
            chunk size is then chosen from the compiled program's memory analysis (on GPUs/TPUs
            the device's reported free memory is used without it; ``chunk_size`` overrides).
            :class:`jaxpatch.planner.MemoryPlanError` says what to change when nothing fits.
        gather: where the result goes in a multi-process run (after ``jax.distributed.initialize``;
            see :mod:`jaxpatch.multihost`): ``"all"`` (default) returns it on every process;
            ``"process0"`` on process 0 only, every other process returning ``None`` (their values
            are sent to process 0 alone, never gathered to them). In one process both are the same.
        skip: run only the patches that can change the metric: patches at positions before the
            first position where the clean and corrupted (or noised) prompts differ (no-ops:
            identical activations there), after the last answer position, or at positions the
            metric does not read in the last layer after its key/value read (dead) get the
            unpatched run's metric without a forward of their own (one of them, the cheapest,
            runs to supply it; exact; ``info["skipped_noop"]``,
            ``info["skipped_dead"]``). ``False`` runs every patch.
        pack: lay each chunk's patches end to end on one row axis, each recomputing only the
            positions it can change (see :mod:`jaxpatch.packed`; ``info["packed_rows"]``).
            ``"auto"`` (default) packs by-position sweeps when that executes less and no
            ``chunk_size`` is given; ``True`` requires it; ``False`` runs vectorised chunks.

    Returns:
        a :class:`PatchResult` (``None`` on processes other than 0 under ``gather="process0"``).

    Raises:
        InputError: a bad argument (named, with what is valid).
        NonFiniteError: a NaN/inf in a baseline run, or in a patched run's logits or metric
            values (the message names the patches).
    """
    gather = _multihost.check_gather(gather)
    if not isinstance(model, HookedModel):  # a Flax / Equinox / plain-JAX model: jaxpatch.byo's engine
        kw = dict(locals())
        del kw["gather"], kw["skip"], kw["pack"]  # byo sweeps run every patch (skipping is an exact shortcut only)
        res = _byo.activation_patch(**kw)
        return res if _multihost.keeps_result(gather) else None
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if baseline not in BASELINES:
        raise InputError(f"baseline must be one of {BASELINES}, got {baseline!r}.")
    if baseline in ("mean", "zero") and direction == "denoise":
        raise InputError(f"The {baseline!r} baseline is an ablation: use direction='noise' (patch it into the clean run).")
    if not isinstance(skip, bool):
        raise InputError(f"skip must be True or False; got {skip!r}.")
    names = _metrics.check_names(metrics)
    cfg = model.config
    clean = check_tokens(cfg, clean_tokens)
    B, T = clean.shape
    sets = None
    if corrupt_tokens is not None:
        ct = np.asarray(corrupt_tokens)
        if ct.ndim == 3:
            sets = ct.shape[0]
            if ct.shape[1:] != (B, T):
                raise InputError(f"corrupt_tokens sets have shape {ct.shape[1:]} but clean_tokens is {(B, T)}; they must match.")
            corrupt = check_tokens(cfg, ct.reshape(sets * B, T))
        else:
            corrupt = check_tokens(cfg, ct)
            if corrupt.shape != (B, T):
                raise InputError(f"clean_tokens {(B, T)} and corrupt_tokens {tuple(corrupt.shape)} must have the same shape.")
    elif baseline == "resample":
        raise InputError("baseline='resample' needs corrupt_tokens.")
    mask = check_attention_mask(attention_mask, clean)
    if mask is not None and baseline == "mean":
        raise InputError("baseline='mean' averages each position over prompts, which padding misaligns; "
                         "use equal-length prompts (no attention_mask) for mean ablation.")
    ans, wr, apos = answer_arrays(cfg, names, answer, wrong, answer_pos, B, T, mask)
    static_names, metric_consts = _metrics.prepare(names, B, cfg.d_vocab, model.dtype)
    c = _site(site, model)
    if patches is not None:
        if by is not None:
            raise InputError("Give either by= or patches=, not both.")
        spec = _sweep.from_rows(cfg, c, patches, T)
    else:
        spec = _sweep.grid(cfg, c, by or DEFAULT_AXES.get(c, ("layer",)), T)

    # --- the two reference runs and the run being patched -------------------------------------
    capture = _sweep.run_sites(cfg, c) | {c}
    t0 = time.perf_counter()
    clean_logits, clean_caps = model.run(clean, capture=capture, attention_mask=mask)
    noise_iv = None
    if baseline == "noise":
        if noise_positions is None:
            raise InputError("baseline='noise' needs noise_positions= (e.g. the subject tokens' positions).")
        if isinstance(n_noise, bool) or not isinstance(n_noise, (int, np.integer)) or n_noise < 1:
            raise InputError(f"n_noise must be an int >= 1 (noise samples per prompt); got {n_noise!r}.")
        if not np.isfinite(noise_scale) or noise_scale <= 0:
            raise InputError(f"noise_scale must be a positive finite number; got {noise_scale!r}.")
        noise_iv = embedding_noise(model, B, T, noise_position_indices(noise_positions, T), noise_scale, int(n_noise), seed)
        rep = n_noise
        corrupt = jnp.tile(clean, (rep, 1))
    else:
        rep = sets or 1
    rep_mask = None if mask is None else jnp.tile(mask, (rep, 1))  # the run's mask, per set / sample
    corrupt_caps = corrupt_logits = None
    if corrupt_tokens is not None or baseline == "noise":
        corrupt_logits, corrupt_caps = model.run(corrupt, noise_iv, capture=capture, attention_mask=rep_mask)

    rows = lambda lg: jnp.take_along_axis(lg, jnp.asarray(np.tile(apos, rep))[:, None, None], axis=1)[:, 0]  # noqa: E731
    clean_rows = rows(jnp.tile(clean_logits, (rep, 1, 1)))
    ctx = {
        "answer_pos": jnp.asarray(np.tile(apos, rep)),
        "answer": jnp.asarray(np.tile(ans, rep)),
        "wrong": jnp.asarray(np.tile(wr, rep)),
        "clean_logprobs": jax.nn.log_softmax(clean_rows.astype(jnp.promote_types(clean_rows.dtype, jnp.float32)), -1),
        "metric_consts": metric_consts,
    }
    m_clean = _metrics.compute_ctx(static_names, clean_rows, ctx)
    m_corrupt = None
    if corrupt_logits is not None:
        m_corrupt = _metrics.compute_ctx(static_names, rows(corrupt_logits), ctx)

    for what, m in (("clean", m_clean), ("corrupted", m_corrupt)):
        bad = [] if m is None else [n for n, row in zip(names, np.asarray(m)) if not np.all(np.isfinite(row))]
        if bad:
            raise NonFiniteError(f"The {what} run's metric values are NaN or inf for {[_metrics.name_of(n) for n in bad]}: "
                                 f"no patching effect can be measured against it. Check the model's weights, the prompts and the metric.")

    src_stacked = True
    if direction == "denoise":  # run the corrupted prompt, patch in clean activations
        run_caps, run_ivs = corrupt_caps, (noise_iv or NONE)
        source = jax.tree_util.tree_map(lambda a: jnp.tile(a, (1, rep) + (1,) * (a.ndim - 2)), clean_caps[c])
    else:  # run the clean prompt (tiled per corrupted set / noise sample), patch in corrupted activations
        run_caps = {k: jnp.tile(v, (1, rep) + (1,) * (v.ndim - 2)) for k, v in clean_caps.items()}
        run_ivs = NONE
        if baseline in ("resample", "noise"):
            source = corrupt_caps[c]
        elif baseline == "mean":
            ref = reference_tokens if reference_tokens is not None else (corrupt if corrupt_tokens is not None else clean)
            ref = check_tokens(cfg, ref)
            if ref.shape[1] != T:
                raise InputError(f"reference_tokens have {ref.shape[1]} positions; the prompts have {T}.")
            source = jnp.mean(model.run(ref, capture={c})[1][c], axis=1, keepdims=True)
        else:  # zero
            source, src_stacked = jnp.zeros((), model.dtype), False
    run_tokens = corrupt if direction == "denoise" else jnp.tile(clean, (rep, 1))
    run_cache = _sweep.run_cache(cfg, run_caps, run_tokens, rep_mask)
    # Positions before the first at which the two runs' inputs to block 0 differ (tokens, noise)
    # hold identical activations at every layer (causal attention, same padding): patches there
    # are no-ops and are not run. Only the resample and noise sources are runs of the model.
    same_before = 0
    if skip and baseline in ("resample", "noise"):
        r0 = lambda caps: caps["blocks.hook_resid_pre"][0]  # noqa: E731
        same_before = _sweep.first_difference(jnp.tile(r0(clean_caps), (rep, 1, 1)), r0(corrupt_caps))
    setup_s = time.perf_counter() - t0

    checkpoint = None
    if checkpoint_dir is not None:
        from . import resume as _resume

        checkpoint = _resume.for_activation_patch(
            checkpoint_dir, model, spec, names=names, static_names=static_names, metric_consts=metric_consts,
            prompts=(clean, corrupt_tokens, mask, reference_tokens), answers=(ans, wr, apos),
            options=(direction, baseline, noise_positions, noise_scale, n_noise, seed))
    t0 = time.perf_counter()
    with _multihost.gathering(gather):  # read by multihost.fetch / resume.run_groups in a multi-process sweep
        out, pl = _sweep.run(cfg, model.params, spec, run_cache, source, src_stacked, static_names, ctx, T,
                             run_ivs=run_ivs, chunk_size=chunk_size, mesh=mesh, position_buckets=position_buckets,
                             progress=progress, checkpoint=checkpoint, memory_budget=memory_budget,
                             same_before=same_before, skip=skip, pack=pack)
    if not _multihost.keeps_result(gather):  # gather="process0" on another process: it holds zeros, not the result
        return None
    out = np.asarray(out)  # [P, M, rep*B]: the one host transfer
    sweep_s = time.perf_counter() - t0

    M = len(names)
    per = out.reshape((spec.size, M, rep, B))
    mc = np.asarray(m_clean).reshape(M, rep, B)[:, 0]
    mk = None if m_corrupt is None else np.asarray(m_corrupt).reshape(M, rep, B)
    axes, shape = spec.grid_axes, spec.grid_shape
    if sets is not None and baseline == "resample":
        per = np.moveaxis(per, 2, 0).reshape((sets,) + shape + (M, B))
        axes, shape = ("corrupt_set",) + axes, (sets,) + shape
        mk = np.moveaxis(mk, 1, 0)  # [sets, M, B]
    else:  # noise samples count as extra prompts
        per = per.reshape(shape + (M, rep * B))
        mc = np.tile(mc, (1, rep))
        mk = None if mk is None else mk.reshape(M, rep * B)
    labels = _labels(axes, shape, np.asarray(clean[0]), token_labels, c, cfg)
    info = {"setup_s": setup_s, "sweep_s": sweep_s, "n_patches": spec.size, "batch": B, "chunk_size": pl.chunk,
            "gap_floor": _metrics.gap_floor([clean_rows, None if corrupt_logits is None else rows(corrupt_logits)],
                                            clean_rows.dtype),
            "executed_rows": _sweep.executed_rows(pl, cfg.n_layers, T), "minimal_rows": _sweep.minimal_rows(spec, cfg.n_layers, T, pl.same_before, pl.live),
            "skipped_noop": pl.n_noop, "skipped_dead": pl.n_dead, "same_before": pl.same_before,
            "packed_rows": pl.packed}
    return PatchResult(c, direction, baseline, tuple(_metrics.name_of(n) for n in names), axes, labels, per, mc, mk, info)


def _labels(axes, shape, first_prompt, token_labels, site: str | None = None, config=None) -> dict[str, list[str]]:
    """Axis labels; heads of key/value sites under grouped-query attention are ``KV<i>``."""
    kv = site is not None and config is not None and SITES[site].kv and config.n_kv_heads != config.n_heads
    out = {}
    for a, n in zip(axes, shape):
        if a == "layer":
            out[a] = [f"L{i}" for i in range(n)]
        elif a == "head":
            out[a] = [f"KV{i}" if kv else f"H{i}" for i in range(n)]
        elif a == "neuron":
            out[a] = [f"N{i}" for i in range(n)]
        elif a in ("pos", "dest_pos", "src_pos"):
            toks = None
            if token_labels is not None:
                ids = first_prompt.tolist()
                toks = token_labels(ids) if callable(token_labels) else [token_labels[i] for i in ids]
            out[a] = [f"{i}:{toks[i]}" if toks else str(i) for i in range(n)]
        elif a == "corrupt_set":
            out[a] = [f"set{i}" for i in range(n)]
    return out
