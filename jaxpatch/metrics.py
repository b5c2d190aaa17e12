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
    if len(set(names)) != len(names):
        raise InputError(f"Metric names repeat: {names}.")
    return names


def needs_wrong(names) -> bool:
    return "logit_diff" in names


def _take(x, idx):
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def compute(names: tuple[str, ...], logits, answer, wrong=None, clean_logprobs=None):
    """Metric values ``[len(names), B]`` from answer-position logits ``[B, V]``.

    Args:
        names: metric names (static).
        logits: ``[B, V]`` logits at each prompt's answer position.
        answer: ``[B]`` int answer token per prompt.
        wrong: ``[B]`` int contrast token (for ``logit_diff``).
        clean_logprobs: ``[B, V]`` clean-run log-probabilities (for ``kl``).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    out = []
    for n in names:
        if callable(n):
            out.append(_custom(n, logits))
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
    return metric if isinstance(metric, str) else getattr(metric, "__name__", repr(metric))


def _custom(fn, logits):
    val = jnp.asarray(fn(logits))
    if val.shape != logits.shape[:1]:
        raise InputError(
            f"Metric {name_of(fn)!r} must return one value per prompt, shape {logits.shape[:1]}, from logits "
            f"[batch, d_vocab] at the answer position; it returned shape {val.shape}."
        )
    return val.astype(logits.dtype)


def normalise(values, clean, corrupt, direction: str, name: str = "metric"):
    """Normalise raw metric values (mean over prompts) to the baselines, as a fraction of the gap.

    denoising: ``(m - m_corrupt) / (m_clean - m_corrupt)``; noising: ``(m_clean - m) /
    (m_clean - m_corrupt)``, with m_clean and m_corrupt the *means over prompts* (dividing by the
    mean gap, not each prompt's own, so near-zero-gap prompts cannot blow up). Effects keep their
    sign.

    Raises:
        JaxpatchError: a baseline is NaN/inf, or the gap is zero (clean == corrupt).
    """
    c, k = float(np.mean(clean)), float(np.mean(corrupt))
    if not (np.isfinite(c) and np.isfinite(k)):
        raise JaxpatchError(f"Metric {name!r} has a non-finite baseline (clean {c}, corrupt {k}); cannot normalise.")
    gap = c - k
    if gap == 0 or abs(gap) <= 1e-7 * max(abs(c), abs(k), 1e-30):
        raise JaxpatchError(
            f"Metric {name!r}: the clean and corrupt baselines are equal ({c:.6g}); the normalised effect is "
            f"undefined. Use raw values, or corrupted prompts that change the behaviour."
        )
    v = np.asarray(values, dtype=np.float64)
    return (v - k) / gap if direction == "denoise" else (c - v) / gap
