"""Attribution (AtP, AtP*, EAP, EAP-IG) unembeds only the answer rows: ``models.forward(...,
rows=)`` applies the final norm everywhere (its hook sites unchanged) and the vocabulary matmul to
each prompt's answer position only (exact edge and circuit patching already unembed only those
rows: ``jaxpatch.circuits._engine``). The slow twin is the forward that unembeds every position
and then takes the rows: results equal it, and its compiled program holds a ``[B, T, V]`` logits
array where the fast one holds none (so the check can fail)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import attribution as at
from jaxpatch import edges
from jaxpatch import models
from jaxpatch.config import ModelConfig

B, T, V = 3, 10, 67  # distinct sizes: a [B, T, V] shape cannot be something else
GEMMA2 = ModelConfig(n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_head=12, d_mlp=64, d_vocab=V, n_ctx=16,
                     architecture="gemma2", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="gelu",
                     qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=True,
                     post_norms=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4,
                     layer_types=("sliding_attention", "full_attention", "sliding_attention"))
CONFIGS = {"gpt2": ModelConfig.gpt2(n_layers=3, d_model=48, n_heads=4, d_vocab=V, n_ctx=16), "gemma2": GEMMA2}


@functools.lru_cache(maxsize=None)
def _model(name):
    m = jaxpatch.HookedModel.from_config(CONFIGS[name], seed=0)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 3 else a, m.params)  # larger effects
    return m


def _setup(name):
    m = _model(name)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, V, (B, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 3] = (corrupt[:, 3] + 5) % V
    apos = np.array([T - 1, 6, 8])  # per-prompt answer rows
    return m, clean, corrupt, dict(answer=clean[:, -1], wrong=(clean[:, -1] + 3) % V, answer_pos=apos)


_FORWARD = models.forward
_CORES = {(at, "_atp_core"): at._atp_core, (edges, "_eap_core"): edges._eap_core}


def _all_rows_forward(*a, rows=None, **k):
    """The slow twin: unembed every position, then take the rows."""
    logits, caps = _FORWARD(*a, **k)
    if rows is None:
        return logits, caps
    if k.get("prefix") is not None:  # the logits cover positions pos_offset.. only
        rows = rows - k["prefix"][0]
    return jnp.take_along_axis(logits, jnp.reshape(rows, (-1, 1, 1)), axis=1)[:, 0], caps


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_rows_equal_the_full_logits_rows(name):
    m, clean, _, kw = _setup(name)
    sites = frozenset({"ln_final.hook_scale", "ln_final.hook_normalized"})
    rows = jnp.asarray(kw["answer_pos"])
    full, caps_full = jax.jit(lambda p, t: _FORWARD(m.config, p, t, None, sites))(m.params, clean)
    part, caps_part = jax.jit(lambda p, t, r: _FORWARD(m.config, p, t, None, sites, rows=r))(m.params, clean, rows)
    want = np.asarray(full)[np.arange(B), kw["answer_pos"]]
    assert part.shape == (B, V)
    np.testing.assert_allclose(np.asarray(part), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    for s in sites:  # the final norm's hook sites still cover every position
        np.testing.assert_array_equal(np.asarray(caps_part[s]), np.asarray(caps_full[s]))


def _vocab_shapes(text):
    return {s for s in re.findall(r"\[([0-9,]+)\]", text) if s.split(",")[-1] == str(V)}


def _has_full_logits(text):
    return any(s.split(",")[-2:] == [str(T), str(V)] for s in _vocab_shapes(text))


def _spy(monkeypatch, module, name):
    calls, core = [], _CORES[module, name]

    def spy(*a, **k):
        calls.append((a, k))
        return core(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls, core


def _run(monkeypatch, name, what, slow):
    if slow:
        monkeypatch.setattr(models, "forward", _all_rows_forward)
    jax.clear_caches()  # models.forward is read when a program is traced
    m, clean, corrupt, kw = _setup(name)
    if what in ("atp", "atp*"):
        calls, core = _spy(monkeypatch, at, "_atp_core")
        out = jaxpatch.attribution_patch(m, clean, corrupt, targets=[("z", ("layer", "pos", "head")), ("resid_pre", None)],
                                         method=what, mesh=None, remat=False, metric="logprob" if what == "atp" else "kl",
                                         direction="noise" if what == "atp" else "denoise", **kw)
        vals = np.concatenate([r.per_prompt.ravel() for r in out.values()])
    else:
        calls, core = _spy(monkeypatch, edges, "_eap_core")
        vals = edges.edge_attribution_patch(m, clean, corrupt, ig_steps=2, **kw).per_prompt.ravel()
    a, k = calls[0]
    return vals, core.lower(*a, **k).compile().as_text()


@pytest.mark.parametrize("name,what", [("gpt2", "atp"), ("gemma2", "atp*"), ("gpt2", "eap-ig")])
def test_attribution_unembeds_only_answer_rows(monkeypatch, name, what):
    fast, fast_text = _run(monkeypatch, name, what, slow=False)
    slow, slow_text = _run(monkeypatch, name, what, slow=True)
    assert np.ptp(slow) > 1e-3  # the estimates differ between units: the comparison can fail
    # float32: the same products; only the logits rows nobody reads are left out
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5 * np.abs(slow).max(), err_msg=f"{name} {what}")
    assert _has_full_logits(slow_text), "control: the all-rows forward holds [B, T, V] logits"
    assert not _has_full_logits(fast_text), sorted(_vocab_shapes(fast_text))
