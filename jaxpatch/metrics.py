"""Patching metrics (Heimersheim & Nanda 2024, §4): pure JAX functions of the logits at the answer
position, one value per prompt, and their normalisation to the clean/corrupt baselines.

Names accepted wherever metrics are asked for:

==================  ==================================================================
``logit_diff``      logit[answer] - logit[wrong] (the recommended default)
``logprob``         log softmax[answer]
``prob``            softmax[answer]
``kl``              KL(clean || patched) of the next-token distribution (0 on the clean run)
``accuracy``        1.0 if the answer is the top-1 token else 0.0; ``top5_accuracy`` etc. for top-k
``rank``            number of tokens with a strictly larger logit than the answer (0 = top)
==================  ==================================================================
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError, JaxpatchError
from .user_metric import TracedMetric, trace

METRICS = ("logit_diff", "logprob", "prob", "kl", "accuracy", "rank")
_TOPK = re.compile(r"^top(\d+)_accuracy$")
#: Metrics whose value is piecewise constant in the logits (no useful gradient).
DISCRETE = ("accuracy", "rank")


def check_names(names) -> tuple[str, ...]:
    """Validate metric names; returns them as a tuple (a single string is one metric)."""
    if isinstance(names, str) or callable(names):
        names = (names,)
    names = tuple(names)
    if not names:
        raise InputError(f"Give at least one metric; valid: {list(METRICS)} or 'top<k>_accuracy'.")
    for n in names:
        if callable(n):
            continue
        if not isinstance(n, str) or (n not in METRICS and not _TOPK.match(n)):
            raise InputError(f"Unknown metric {n!r}; valid: {list(METRICS)} or 'top<k>_accuracy' (e.g. 'top5_accuracy').")
        m = _TOPK.match(n)
        if m and int(m.group(1)) < 1:
            raise InputError(f"Metric {n!r}: k must be >= 1 (e.g. 'top1_accuracy', 'top5_accuracy').")
    labels = [name_of(n) for n in names]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise InputError(
            f"Metric names repeat: {dup}. Each metric labels a column of the results: give user metrics "
            f"distinct names (def my_metric(logits): ..., or set fn.__name__)."
        )
    return names


def prepare(names: tuple, batch: int, d_vocab: int, dtype) -> tuple[tuple, tuple]:
    """Trace every user metric afresh for answer-position logits ``[batch, d_vocab]``.

    Returns ``(static_names, consts)``: the names with each callable replaced by a hashable
    :class:`~jaxpatch.user_metric.TracedMetric` (compiled programs key on its structure), and per
    metric its closed-over constants (``()`` for built-in metrics), passed to :func:`compute` as
    data so compiled programs always see their current values.
    """
    example = jax.ShapeDtypeStruct((batch, d_vocab), jnp.promote_types(dtype, jnp.float32))
    static, consts = [], []
    for n in names:
        if callable(n):
            tm, c = trace(n, example)
            if tm.out_aval.shape != (batch,):
                raise InputError(
                    f"Metric {tm.name!r} must return one value per prompt, shape ({batch},), from logits "
                    f"[batch, d_vocab] at the answer position; it returned shape {tm.out_aval.shape}."
                )
            if not (jnp.issubdtype(tm.out_aval.dtype, jnp.floating) or jnp.issubdtype(tm.out_aval.dtype, jnp.integer)
                    or tm.out_aval.dtype == jnp.bool_):
                raise InputError(f"Metric {tm.name!r} must return numbers; it returned dtype {tm.out_aval.dtype}.")
            static.append(tm)
            consts.append(c)
        else:
            static.append(n)
            consts.append(())
    return tuple(static), tuple(consts)


def needs_wrong(names) -> bool:
    return "logit_diff" in names


def _take(x, idx):
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def compute(names: tuple, logits, answer, wrong=None, clean_logprobs=None, consts=None):
    """Metric values ``[len(names), B]`` from answer-position logits ``[B, V]``.

    Args:
        names: metric names and :class:`TracedMetric` s (static; see :func:`prepare`).
        logits: ``[B, V]`` logits at each prompt's answer position.
        answer: ``[B]`` int answer token per prompt.
        wrong: ``[B]`` int contrast token (for ``logit_diff``).
        clean_logprobs: ``[B, V]`` clean-run log-probabilities (for ``kl``).
        consts: per metric, the constants of a traced user metric (from :func:`prepare`).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    out = []
    for i, n in enumerate(names):
        if isinstance(n, TracedMetric):
            out.append(n(consts[i], logits).astype(logits.dtype))
        elif callable(n):
            raise TypeError("internal: user metrics must be traced with metrics.prepare() first")
        elif n == "logit_diff":
            out.append(_take(logits, answer) - _take(logits, wrong))
        elif n == "logprob":
            out.append(_take(logprobs, answer))
        elif n == "prob":
            out.append(jnp.exp(_take(logprobs, answer)))
        elif n == "kl":
            p = jnp.exp(clean_logprobs)
            out.append(jnp.sum(jnp.where(p > 0, p * (clean_logprobs - logprobs), 0.0), axis=-1))
        elif n == "rank":
            out.append(jnp.sum(logits > _take(logits, answer)[:, None], axis=-1).astype(logits.dtype))
        else:
            k = 1 if n == "accuracy" else int(_TOPK.match(n).group(1))
            rank = jnp.sum(logits > _take(logits, answer)[:, None], axis=-1)
            out.append((rank < k).astype(logits.dtype))
    return jnp.stack(out)


def name_of(metric) -> str:
    if isinstance(metric, str):
        return metric
    if isinstance(metric, TracedMetric):
        return metric.name
    return getattr(metric, "__name__", None) or repr(metric)


def compute_ctx(names: tuple, logits, ctx):
    """:func:`compute` with the per-prompt data taken from an engine's ``ctx`` dict."""
    return compute(names, logits, ctx["answer"], ctx.get("wrong"), ctx.get("clean_logprobs"), ctx.get("metric_consts"))


def gap_floor(logit_rows, dtype) -> float:
    """The smallest clean-corrupt gap that is more than floating-point rounding: runs of different
    batch sizes round differently (~eps x the logits' magnitude), so a smaller gap is noise and
    normalising by it would turn noise into effects of any size."""
    scale = max([1.0] + [float(np.max(np.abs(np.asarray(r, np.float64)))) for r in logit_rows if r is not None])
    return float(64 * np.finfo(np.dtype(dtype)).eps * scale)


def normalise(values, clean, corrupt, direction: str, name: str = "metric", floor: float = 0.0):
    """Normalise raw metric values (mean over prompts) to the baselines, as a fraction of the gap.

    denoising: ``(m - m_corrupt) / (m_clean - m_corrupt)``; noising: ``(m_clean - m) /
    (m_clean - m_corrupt)``, with m_clean and m_corrupt the *means over prompts* (dividing by the
    mean gap, not each prompt's own, so near-zero-gap prompts cannot blow up). Effects keep their
    sign. ``floor``: gaps at most this large are rounding noise (see :func:`gap_floor`).

    Raises:
        JaxpatchError: a baseline is NaN/inf, or the gap is zero or rounding noise.
    """
    c, k = float(np.mean(clean)), float(np.mean(corrupt))
    if not (np.isfinite(c) and np.isfinite(k)):
        raise JaxpatchError(f"Metric {name!r} has a non-finite baseline (clean {c}, corrupt {k}); cannot normalise.")
    gap = c - k
    if gap == 0 or abs(gap) <= max(1e-7 * max(abs(c), abs(k)), floor):
        raise JaxpatchError(
            f"Metric {name!r}: the clean and corrupt baselines are equal up to floating-point rounding (clean "
            f"{c:.6g}, corrupt {k:.6g}, gap {gap:.3g}, rounding floor {floor:.2g}); the normalised effect is "
            f"undefined. Use raw values, or corrupted prompts that change the behaviour."
        )
    v = np.asarray(values, dtype=np.float64)
    return (v - k) / gap if direction == "denoise" else (c - v) / gap
