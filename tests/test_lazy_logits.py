"""A custom metric evaluated on only the logits it reads (jaxpatch.lazy_logits) equals the metric
on full logits: directly, for metrics of many shapes (gathers, slices, fills, softmaxes, sub-calls,
mixed fills), and inside sweeps, against ``sweep.LAZY_LOGITS = False`` (the slow twin that hands
the metric its full logits) for several families (tied embeddings, unembedding bias, final softcap).

Tolerance: 2e-5 relative to max(1, |value|) (a dot product summed in another order than the
unembedding matmul's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxpatch
from jaxpatch import lazy_logits as lz
from jaxpatch import sweep as sw
from jaxpatch.compat.transformer_lens import patching
from jaxpatch.user_metric import first_position_read, trace

TOL = 2e-5
B, T, V, D, FIRST = 3, 7, 1013, 8, 2
rng = np.random.default_rng(0)
ANS, WRONG = rng.integers(0, V, B), rng.integers(0, V, B)
BJ = np.arange(B)
OOB = np.array([4, V + 6, 11])  # one column out of range


def _m_gather(lg):
    return jnp.mean(lg[BJ, -1, ANS] - lg[BJ, -1, WRONG])


def _m_slice_then_index(lg):
    last = lg[:, -1, :]
    return (last[jnp.arange(B), ANS] - last[jnp.arange(B), WRONG]).mean()


def _m_take_along_axis(lg):  # a FILL_OR_DROP gather (NaN fill) inside a jitted sub-program
    return (jnp.take_along_axis(lg[:, -1], ANS[:, None], -1) - jnp.take_along_axis(lg[:, -2], WRONG[:, None], -1)).sum()


def _m_fill_out_of_range(lg):
    return lg.at[BJ, -1, OOB].get(mode="fill", fill_value=-7.0).sum()


def _m_mixed_fills(lg):
    a = lg.at[BJ, -1, OOB].get(mode="fill", fill_value=-7.0)
    b = jnp.take_along_axis(lg[:, -1], ANS[:, None], -1)[:, 0]
    return jnp.concatenate([a, b]).sum()


def _m_log_softmax(lg):  # the whole vocabulary: one unembedding of the read rows
    lp = jax.nn.log_softmax(lg[:, -2:], axis=-1)
    return lp[BJ, -1, ANS].mean() + lg[:, -2, 3].sum()


def _m_where_concat(lg):
    a, b = lg[BJ, -1, ANS], lg[BJ, -3, WRONG]
    pick = jnp.where(jnp.array([True, False, True]), a, b)
    return jnp.concatenate([pick, a * 2.0]).sum()


def _m_transpose(lg):
    return lg.transpose(2, 0, 1)[ANS, BJ, -1].sum()


def _m_dynamic_slice(lg):
    return lax.dynamic_slice(lg, (0, 5, 3), (B, 2, 4)).sum()


def _m_jitted_slice(lg):
    return jax.jit(lambda x: x[:, -1, :5])(lg).max()


def _m_reshape(lg):
    return lg[:, 3:].reshape(B, -1)[:, 7 + 0 * ANS].sum()


def _m_one_logit(lg):
    return lg[1, -1, 3]


def _m_astype(lg):
    return lg[BJ, -1, ANS].astype(jnp.float32).sum() + lg[BJ, -1, WRONG].astype(jnp.bfloat16).astype(jnp.float32).sum()


METRICS = [_m_gather, _m_slice_then_index, _m_take_along_axis, _m_fill_out_of_range, _m_mixed_fills, _m_log_softmax,
           _m_where_concat, _m_transpose, _m_dynamic_slice, _m_jitted_slice, _m_reshape, _m_one_logit, _m_astype]
#: metrics that read few logits: computed one dot product each, never a vocabulary-wide table
FEW = {_m_gather, _m_slice_then_index, _m_take_along_axis, _m_fill_out_of_range, _m_mixed_fills, _m_where_concat,
       _m_transpose, _m_one_logit, _m_astype}


def _table(first=FIRST):
    """Residual rows ``[B, T - first, D]``, an unembedding ``[D, V]`` and the full logits, with a
    huge value at positions ``< first`` (a metric proved not to read them never sees it)."""
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    full = x @ w
    full[:, :first] = 1e6
    return jnp.asarray(x[:, first:]), jnp.asarray(w), jnp.asarray(full)


def _logits(x, w):
    return lz.Logits(x, T, V, jnp.float32, lambda r: jnp.einsum("BRD,DV->BRV", r, w),
                     lambda h, v: jnp.einsum("...D,...D->...", h, jnp.moveaxis(w[:, v], 0, -1)))


@pytest.mark.parametrize("metric", METRICS, ids=lambda f: f.__name__)
def test_lazy_evaluation_equals_the_metric_on_full_logits(metric):
    tm, consts = trace(metric, jax.ShapeDtypeStruct((B, T, V), jnp.float32))
    first = first_position_read(tm, consts)  # 0 where the proof cannot see through (a transpose)
    x, w, full = _table(first)
    want = np.asarray(tm(consts, full))
    lg = _logits(x, w)
    got = np.asarray(jax.jit(lambda c, x_: lz.evaluate(tm.jaxpr, c, _logits(x_, w))[0])(consts, x))
    assert np.isfinite(want).all()
    assert np.max(np.abs(got - want)) <= TOL * max(1.0, float(np.max(np.abs(want)))), (got, want)
    lz.evaluate(tm.jaxpr, consts, lg)  # eagerly, to read what it computed
    if metric in FEW:
        assert lg.counts["tables"] == 0 and lg.counts["elements"] > 0, lg.counts
    if metric is _m_log_softmax:
        assert lg.counts["tables"] == 1, lg.counts


def test_fill_value_is_restored_where_a_gather_reads_out_of_range():
    x, w, full = _table()
    tm, consts = trace(_m_fill_out_of_range, jax.ShapeDtypeStruct(full.shape, full.dtype))
    got = lz.evaluate(tm.jaxpr, consts, _logits(x, w))[0]
    inside = float(full[0, -1, OOB[0]] + full[2, -1, OOB[2]])
    assert abs(float(got) - (inside - 7.0)) <= TOL * max(1.0, abs(inside))


def test_a_position_the_proof_excluded_reads_nan_never_another_position():
    """If a metric could reach a logit before the first computed position (a broken proof), the
    value is NaN (reported by the sweep), not a neighbouring position's logit."""
    x, w, full = _table()
    tm, consts = trace(lambda lg: lg[0, 0, 1] + lg[0, -1, 1], jax.ShapeDtypeStruct(full.shape, full.dtype))
    assert np.isnan(float(lz.evaluate(tm.jaxpr, consts, _logits(x, w))[0]))


def _model(name):
    from tests.test_skip import _families

    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=16) if name == "gpt2" \
        else _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=3)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, m.params)
    if "b_U" in m.params:  # a non-zero unembedding bias, so it is exercised
        m.params["b_U"] = jnp.asarray(np.random.default_rng(1).normal(size=m.params["b_U"].shape), m.params["b_U"].dtype)
    return m


def _sweep_metric(n):
    """A logit difference (a few logits: one dot product each) plus a log-probability under a
    softmax over the last two positions (the whole vocabulary: one unembedding of those rows)."""
    bj, ans, wrong = np.arange(n), np.arange(n) % 5 + 1, np.arange(n) % 7 + 9

    def metric(lg):
        diff = jnp.mean(lg[bj, -1, ans] - lg[bj, -1, wrong])
        return diff + 0.25 * jax.nn.log_softmax(lg[:, -2:], axis=-1)[bj, 0, ans].mean()

    return metric


@pytest.mark.parametrize("name,fn", [("gpt2", "get_act_patch_resid_pre"), ("gpt2", "get_act_patch_attn_head_out_all_pos"),
                                     ("llama", "get_act_patch_resid_pre"), ("gemma2", "get_act_patch_resid_pre")])
def test_sweeps_with_lazy_logits_equal_full_logits(monkeypatch, name, fn):
    """Packed (resid_pre) and vectorised (heads over all positions) sweeps; GPT-2 (unembedding
    bias), Llama, Gemma 2 (tied embeddings, final softcap)."""
    m = _model(name)
    r = np.random.default_rng(4)
    clean = r.integers(0, m.config.d_vocab, (3, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % m.config.d_vocab
    _, cache = m.run_with_cache(clean)
    out = {}
    for lazy in (True, False):
        monkeypatch.setattr(sw, "LAZY_LOGITS", lazy)
        out[lazy] = np.asarray(getattr(patching, fn)(m, corrupt, cache, _sweep_metric(3)))
    want = out[False]
    assert np.ptp(want) > 0
    assert np.max(np.abs(out[True] - want)) <= TOL * max(1.0, float(np.max(np.abs(want))))
