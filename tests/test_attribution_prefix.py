"""Attribution's run starts at the first position where the prompts differ
(:data:`jaxpatch.attribution.SAME_PREFIX`): before it every activation of the run equals the
source's (causal attention, same tokens and mask), so every estimate there is exactly zero and the
run's forward and backward cover the positions from there on, reading the source's keys and
values before. The slow twin (``SAME_PREFIX = False``) runs every position; results agree to
float32 rounding for every method, target and direction, per-prompt answer rows and padding, and
the fast program is shown to take the shortcut (so the comparison can fail)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import attribution as at
from jaxpatch import models
from jaxpatch.config import ModelConfig
from jaxpatch.patching import DEFAULT_AXES

B, T, V = 3, 10, 67
LLAMA = ModelConfig(n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_head=12, d_mlp=64, d_vocab=V, n_ctx=16,
                    architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu",
                    qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False,
                    qk_norm=True)
GEMMA2 = ModelConfig(n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_head=12, d_mlp=64, d_vocab=V, n_ctx=16,
                     architecture="gemma2", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="gelu",
                     qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=True,
                     post_norms=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4,
                     layer_types=("sliding_attention", "full_attention", "sliding_attention"))
CONFIGS = {"gpt2": ModelConfig.gpt2(n_layers=3, d_model=48, n_heads=4, d_vocab=V, n_ctx=16), "llama": LLAMA,
           "gemma2": GEMMA2}
#: every per-layer site by its default grid, and the query/key/pattern grids the QK fix resolves
TARGETS = [(s, None) for s in DEFAULT_AXES] + [("q", ("layer", "pos", "head")), ("k", ("layer", "pos", "head")),
                                               ("pattern", ("layer", "dest_pos", "src_pos", "head"))]


@functools.lru_cache(maxsize=None)
def _model(name):
    m = jaxpatch.HookedModel.from_config(CONFIGS[name], seed=0)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 3 else a, m.params)  # larger effects
    return m


def _prompts(first=4, pad=False):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, V, (B, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, first] = (corrupt[:, first] + 5) % V
    corrupt[1, first + 3] = (corrupt[1, first + 3] + 7) % V
    kw = dict(answer=clean[:, -1], wrong=(clean[:, -1] + 3) % V, answer_pos=np.array([T - 1, 7, 8]))
    if pad:  # prompt 2 is padded on the right after position 8 (its answer row)
        mask = np.ones((B, T), np.int32)
        mask[2, 9:] = 0
        kw["attention_mask"] = mask
    return clean, corrupt, kw


def _offsets(monkeypatch):
    """Records the ``prefix`` offsets attribution's forward passes get."""
    seen, forward = [], models.forward

    def spy(*a, prefix=None, **k):
        seen.append(0 if prefix is None else prefix[0])
        return forward(*a, prefix=prefix, **k)

    monkeypatch.setattr(models, "forward", spy)
    return seen


def _estimates(monkeypatch, name, same_prefix, **kw):
    monkeypatch.setattr(at, "SAME_PREFIX", same_prefix)
    jax.clear_caches()  # the spy is read when a program is traced
    seen = _offsets(monkeypatch)
    res = jaxpatch.attribution_patch(_model(name), mesh=None, **kw)
    return {k: (r.per_prompt, r.clean, r.corrupt) for k, r in res.items()}, seen


@pytest.mark.parametrize("name,method,direction,metric,pad", [
    ("gpt2", "atp", "noise", "logprob", True),
    ("llama", "atp+qk", "denoise", "kl", False),
    ("gemma2", "atp*", "denoise", "logit_diff", True),
])
def test_run_from_the_first_difference_equals_every_position(monkeypatch, name, method, direction, metric, pad):
    clean, corrupt, kw = _prompts(pad=pad)
    args = dict(clean_tokens=clean, corrupt_tokens=corrupt, targets=TARGETS, method=method, direction=direction,
                metric=metric, **kw)
    fast, seen = _estimates(monkeypatch, name, True, **args)
    assert 4 in seen, seen  # the run started at position 4 (the first difference)
    slow, seen = _estimates(monkeypatch, name, False, **args)
    assert set(seen) == {0}, seen
    spread = max(float(np.ptp(v[0])) for v in slow.values())
    assert spread > 1e-3  # estimates differ between patches: the comparison can fail
    for key, (est, clean_m, corrupt_m) in slow.items():
        f = fast[key]
        np.testing.assert_allclose(f[1], clean_m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f[2], corrupt_m, rtol=1e-5, atol=1e-6)
        # float32: the same sums of products, computed over fewer rows
        np.testing.assert_allclose(f[0], est, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(est).max())),
                                   err_msg=f"{name} {method} {key}")


def test_offset_is_the_first_difference_before_every_answer_row():
    clean, corrupt, kw = _prompts(first=4)
    cfg = CONFIGS["gpt2"]
    assert at._same_prefix(cfg, clean, corrupt, kw["answer_pos"]) == 4
    assert at._same_prefix(cfg, clean, corrupt, np.array([9, 3, 9])) == 3  # an answer row before it
    assert at._same_prefix(cfg, clean, clean, kw["answer_pos"]) == 7  # identical prompts: the first answer row
    normed = ModelConfig.gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=V, n_ctx=16, qk_norm=True)
    assert at._same_prefix(normed, clean, corrupt, kw["answer_pos"]) == 0  # its cached keys are not a site


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_with_a_prefix_equals_the_whole_forward(name):
    """``models.forward(prefix=)`` from another run's keys and values equals the whole forward at
    positions ``offset..``: logits, captures, and answer rows."""
    m = _model(name)
    clean, corrupt, kw = _prompts(first=4)
    cfg, o = m.config, 4
    sites = frozenset(DEFAULT_AXES) | frozenset(models.kv_sites(cfg))
    whole, caps = jax.jit(lambda p, t: models.forward(cfg, p, t, None, sites))(m.params, corrupt)
    _, src = jax.jit(lambda p, t: models.forward(cfg, p, t, None, sites))(m.params, clean)
    kv = tuple(src[k] for k in models.kv_sites(cfg))
    part, pcaps = jax.jit(lambda p, t, kv: models.forward(cfg, p, t, None, sites, prefix=(o, kv)))(m.params, corrupt, kv)
    scale = float(np.abs(whole).max())
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole)[:, o:], rtol=1e-5, atol=1e-5 * scale)
    for s in sites:
        got = np.asarray(pcaps[s])
        want = np.asarray(at._suffix(caps[s], s, o))
        assert got.shape == want.shape, s
        finite = np.abs(want[np.isfinite(want)])  # masked attention scores are -inf in both
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(finite.max())), err_msg=s)
    rows = jnp.asarray(kw["answer_pos"])
    r = jax.jit(lambda p, t, kv, r: models.forward(cfg, p, t, None, prefix=(o, kv), rows=r)[0])(m.params, corrupt, kv, rows)
    np.testing.assert_allclose(np.asarray(r), np.asarray(whole)[np.arange(B), kw["answer_pos"]], rtol=1e-5,
                               atol=1e-5 * scale)
