"""A custom metric (TransformerLens style: full logits -> scalar) gets only the logits rows it can
read: the compiled sweep program unembeds the positions from the metric's proved first read
position on, and builds no full ``[.., pos, vocab]`` logits array padded with zeros (XLA removes
the zero padding the engine writes for the unread positions, since the metric slices it away).
The control, a metric that reads every position, does hold such an array, so the check can fail.

With ``LAZY_LOGITS`` (the default, :mod:`jaxpatch.lazy_logits`) a metric that gathers a few logits
gets no vocabulary-wide array at all: each logit it reads is one dot product."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch.compat.transformer_lens import patching

V, T, B = 1013, 11, 3  # distinct sizes, so that a [.., T, V] shape cannot be something else


def _compiled_text(monkeypatch, metric):
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=V, n_ctx=16)
    m = jaxpatch.HookedModel.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, V, (B, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 4] = (corrupt[:, 4] + 1) % V
    _, cache = m.run_with_cache(clean)
    calls = []
    core = sw._core

    def spy(*a, **k):
        calls.append((a, k))
        return core(*a, **k)

    monkeypatch.setattr(sw, "_core", spy)
    out = patching.get_act_patch_resid_pre(m, corrupt, cache, metric)
    assert np.ptp(np.asarray(out)) > 0  # the sweep ran and its patches differ
    a, k = calls[0]
    return core.lower(*a, **k).compile().as_text()


def _vocab_shapes(text):
    """Float arrays with a vocabulary axis (the index proxy of lazy_logits is int32)."""
    return {s for s in re.findall(r"f32\[([0-9,]+)\]", text) if s.split(",")[-1] == str(V)}


def test_a_last_position_metric_unembeds_only_that_row(monkeypatch):
    monkeypatch.setattr(sw, "LAZY_LOGITS", False)
    text = _compiled_text(monkeypatch, lambda lg: jnp.mean(lg[:, -1, 5] - lg[:, -1, 7]))
    shapes = _vocab_shapes(text)
    assert any(s != f"32,{V}" and s != str(V) for s in shapes), shapes  # unembedded rows are in the program
    assert not any(s.split(",")[-2:-1] == [str(T)] for s in shapes), shapes


def test_control_a_metric_of_every_position_holds_full_logits(monkeypatch):
    monkeypatch.setattr(sw, "LAZY_LOGITS", False)
    text = _compiled_text(monkeypatch, lambda lg: jnp.mean(lg[:, :, 5]))
    assert any(s.split(",")[-2:-1] == [str(T)] for s in _vocab_shapes(text))


def test_lazy_logits_compute_no_vocabulary_wide_array(monkeypatch):
    text = _compiled_text(monkeypatch, lambda lg: jnp.mean(lg[:, -1, 5] - lg[:, -1, 7]))
    assert _vocab_shapes(text) <= {f"32,{V}", str(V)}, _vocab_shapes(text)  # the unembedding weights only
