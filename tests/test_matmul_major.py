"""Suffix runs read the attention weights stored matmul-major (``models.matmul_major_blocks``,
``sweep.MATMUL_MAJOR``): the sweep program transposes each stacked weight once instead of copying
every layer's slice for every patched run, and its results equal the plain layout's (the slow
twin), for a GPT-2 model, a grouped-query Llama-style model and a Gemma-2-style model."""

from __future__ import annotations

import itertools
import re

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch.config import ModelConfig

CORE = sw._core  # the compiled sweep program (the tests below wrap it to see its arguments)
CHUNK_FN = sw._chunk_fn
D, N, K, H = 48, 4, 2, 12  # distinct sizes: a weight slice's shape cannot be something else
LLAMA = dict(architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu", qkv_bias=False,
             o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)
CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=3, d_model=D, n_heads=N, d_vocab=61, n_ctx=16),
    "llama": ModelConfig(n_layers=3, d_model=D, n_heads=N, n_kv_heads=K, d_head=H, d_mlp=64, d_vocab=61, n_ctx=16,
                         **LLAMA),
    "gemma2": ModelConfig(n_layers=3, d_model=D, n_heads=N, n_kv_heads=K, d_head=H, d_mlp=64, d_vocab=61, n_ctx=16,
                          architecture="gemma2", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="gelu",
                          qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=True,
                          post_norms=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4,
                          layer_types=("sliding_attention", "full_attention", "sliding_attention")),
}


def _setup(name):
    m = jaxpatch.HookedModel.from_config(CONFIGS[name], seed=0)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 3 else a, m.params)  # larger effects
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 61, (3, 10)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % 61
    return m, clean, corrupt, dict(answer=clean[:, -1], wrong=(clean[:, -1] + 3) % 61, mesh=None, progress=False)


def _fresh_sweep_program(monkeypatch, major):
    """Set the flag and drop the compiled sweep programs: the flag is read when ``sw._core`` is
    traced (in ``sw._chunk_fn``, its only reader), so only that program is traced again; the
    model's other programs (its runs, the metric baselines) stay compiled. Returns the flags
    ``_chunk_fn`` saw, to check that the sweep really was traced again."""
    monkeypatch.setattr(sw, "MATMUL_MAJOR", major)
    CORE.clear_cache()
    seen = []
    chunk_fn = sw._chunk_fn

    def spy(*a, **k):
        seen.append(sw.MATMUL_MAJOR)
        return chunk_fn(*a, **k)

    monkeypatch.setattr(sw, "_chunk_fn", spy)
    return seen


def _sweep(monkeypatch, major, name, site, by):
    seen = _fresh_sweep_program(monkeypatch, major)
    m, clean, corrupt, kw = _setup(name)
    out = jaxpatch.activation_patch(m, clean, corrupt, site=site, by=by, metrics=("logit_diff", "kl"), **kw).per_prompt
    monkeypatch.setattr(sw, "_chunk_fn", CHUNK_FN)
    assert seen and set(seen) == {major}  # traced again, with this flag
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matmul_major_weights_equal_the_plain_layout(monkeypatch, name):
    for site, by in (("resid_pre", ("layer", "pos")), ("z", ("layer", "head", "pos"))):
        plain = _sweep(monkeypatch, False, name, site, by)
        major = _sweep(monkeypatch, True, name, site, by)
        assert np.ptp(plain) > 1e-2
        # float32: the same products, read from another layout, but the fused query/key/value
        # matmul sums in another order than three separate ones. Measured: up to 2.9e-7 apart on
        # values up to 0.28 (Llama, z; 2.7e-7 before packed side rows, outside the tests' XLA
        # flags), while the metrics subtract logits of order 1; so 1e-6 relative to
        # max(1, |value|), the suite's convention (tests.test_skip.close), 20x tighter than its
        # float32 tolerance.
        np.testing.assert_allclose(major, plain, rtol=0, atol=1e-6 * max(1.0, np.abs(plain).max()), err_msg=f"{name} {site}")


def compiled_sweep_text(monkeypatch, name: str) -> str:
    """The optimised HLO of the program a ``resid_pre`` sweep of model ``name`` runs (its
    ``sw._core`` call, lowered again with the same arguments)."""
    m, clean, corrupt, kw = _setup(name)
    calls = []

    def spy(*a, **k):
        calls.append((a, k))
        return CORE(*a, **k)

    monkeypatch.setattr(sw, "_core", spy)
    jaxpatch.activation_patch(m, clean, corrupt, site="resid_pre", **kw)
    monkeypatch.setattr(sw, "_core", CORE)
    monkeypatch.setattr(sw, "_chunk_fn", CHUNK_FN)
    return CORE.lower(*calls[0][0], **calls[0][1]).compile().as_text()


def _weight_slice_copies(monkeypatch, major):
    seen = _fresh_sweep_program(monkeypatch, major)
    text = compiled_sweep_text(monkeypatch, "llama")
    assert seen and set(seen) == {major}
    slices = {",".join(map(str, p)) for dims in ((N, D, H), (K, D, H), (N, H, D)) for p in itertools.permutations(dims)}
    return [s for s in re.findall(r"= f32\[([0-9,]+)\]\{[0-9,]+\} copy\(", text) if s in slices]


def test_no_layer_copies_its_weight_slice(monkeypatch):
    assert _weight_slice_copies(monkeypatch, True) == []
    assert _weight_slice_copies(monkeypatch, False)  # the control: the plain layout copies slices
