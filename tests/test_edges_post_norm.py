"""Edges on post-norm families (Gemma 2/3): each head's write is its result passed through the
post-attention norm at the run's own scale, which is exactly additive. Checked against
hand-built computations from the model's own sites."""

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import edges, models
from jaxpatch.config import ModelConfig

ATOL = 3e-5  # float32 fast path vs float32 hand-built twin


def _cfg(norm="rmsnorm", **kw):
    base = dict(n_layers=3, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=30, n_ctx=12, architecture="gemma2",
                n_kv_heads=2, positional="rotary", norm=norm, gated_mlp=True, act_fn="gelu_new", qkv_bias=False,
                o_bias=False, mlp_bias=False, unembed_bias=False, post_norms=True, scale_embed=True,
                attn_softcap=50.0, final_softcap=30.0, sliding_window=3,
                layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    base.update(kw)
    return ModelConfig(**base)


def _model(cfg, seed=3, scale=2.0):
    m = jaxpatch.HookedModel.from_config(cfg, seed=seed)
    m.params = jax.tree_util.tree_map(lambda a: a * scale if a.ndim >= 2 else a, m.params)
    return m


def _prompts():
    rng = np.random.default_rng(5)
    clean = rng.integers(1, 30, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 11) % 30
    return clean, corrupt, np.array([3, 4]), np.array([7, 9])


def _writes(m, tokens):
    caps = m.run(tokens, capture=set(models.head_write_sites(m.config)) | {"blocks.hook_attn_out"})[1]
    return np.asarray(models.head_writes(m.config, m.params, caps)), np.asarray(caps["blocks.hook_attn_out"])


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_head_writes_sum_to_the_attention_output(norm):
    m = _model(_cfg(norm))
    clean, *_ = _prompts()
    writes, attn_out = _writes(m, clean)
    const = 0.0 if norm == "rmsnorm" else np.asarray(m.params["blocks"]["ln1_post_b"])[:, None, None, :]
    assert np.abs(attn_out).max() > 0.1
    np.testing.assert_allclose(writes.sum(3) + const, attn_out, atol=ATOL * np.abs(attn_out).max(), rtol=0)


def test_head_write_is_the_result_through_the_post_norm_at_the_runs_scale():
    m = _model(_cfg())
    clean, *_ = _prompts()
    caps = m.run(clean, capture={"blocks.attn.hook_result", "blocks.ln1_post.hook_scale"})[1]
    r = np.asarray(caps["blocks.attn.hook_result"], np.float64)
    s = np.asarray(caps["blocks.ln1_post.hook_scale"], np.float64)
    w = np.asarray(m.params["blocks"]["ln1_post_w"], np.float64)
    ref = np.einsum("lbtnd,lbt,ld->lbtnd", r, 1.0 / s[..., 0], w)
    np.testing.assert_allclose(_writes(m, clean)[0], ref, atol=ATOL * np.abs(ref).max(), rtol=0)


def _logit_diff(logits, ans, wrong):
    lg = np.asarray(logits)[:, -1]
    b = np.arange(len(ans))
    return lg[b, ans] - lg[b, wrong]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_edges_equal_hand_built_patches(direction):
    m = _model(_cfg())
    clean, corrupt, ans, wrong = _prompts()
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    w_run, w_src = _writes(m, run)[0], _writes(m, src)[0]
    base = _logit_diff(m(run), ans, wrong)
    edge_list = [("L0H1", "logits"), ("L1H3", "logits"), ("L0H2", "L2H1.q"), ("L0H0", "L1KV1.k"), ("L1H2", "MLP1.in")]
    got = edges.exact_edge_patch(m, clean, corrupt, edge_list, direction=direction, answer=ans, wrong=wrong)
    want = []
    for (layer, head), site, sel in [((0, 1), "blocks.2.hook_resid_post", {}), ((1, 3), "blocks.2.hook_resid_post", {}),
                                     ((0, 2), "blocks.2.hook_q_input", {"head": 1}),
                                     ((0, 0), "blocks.1.hook_k_input", {"head": 1}), ((1, 2), "blocks.1.hook_mlp_in", {})]:
        d = w_src[layer, :, :, head] - w_run[layer, :, :, head]  # [B, T, D]
        if sel:
            full = np.zeros(d.shape[:2] + (m.config.n_heads if "q_input" in site else m.config.n_kv_heads,) + d.shape[2:],
                            np.float32)
            full[:, :, sel["head"]] = d
            d = full
        want.append(_logit_diff(m(run, m.add(site, d)), ans, wrong) - base)
    want = np.stack(want)
    assert np.abs(want).max() > 1e-3  # the edges carry effects
    np.testing.assert_allclose(got, want, atol=ATOL * max(1.0, np.abs(want).max()), rtol=0)


def test_eap_equals_finite_differences_along_each_edge_and_float32_agrees_with_float64(x64):
    m = _model(_cfg())
    clean, corrupt, ans, wrong = _prompts()
    m64 = jaxpatch.HookedModel(m.config, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), m.params))
    r64 = edges.edge_attribution_patch(m64, clean, corrupt, answer=ans, wrong=wrong)  # denoise: run = corrupt
    g = r64.graph
    w_run, w_src = _writes(m64, corrupt)[0], _writes(m64, clean)[0]
    eps = 1e-4
    for (layer, head), down, site, sel in [((1, 1), "logits", "blocks.2.hook_resid_post", None),  # layer 1 is global
                                           ((1, 0), "L2H1.q", "blocks.2.hook_q_input", 1),
                                           ((0, 3), "L1KV0.v", "blocks.1.hook_v_input", 0)]:
        d = w_src[layer, :, :, head] - w_run[layer, :, :, head]
        if sel is not None:
            full = np.zeros(d.shape[:2] + (4 if "q_input" in site else 2,) + d.shape[2:])
            full[:, :, sel] = d
            d = full
        fd = (_logit_diff(m64(corrupt, m64.add(site, eps * d)), ans, wrong)
              - _logit_diff(m64(corrupt, m64.add(site, -eps * d)), ans, wrong)) / (2 * eps)
        est = r64.per_prompt[g.up.index(f"L{layer}H{head}"), g.down.index(down)]
        assert np.abs(fd).max() > 1e-5  # the edge carries an effect
        np.testing.assert_allclose(est, fd, atol=1e-6 * np.abs(fd).max(), rtol=0)
    with jax.enable_x64(False):
        r32 = edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong)
    s64 = r64.scores()
    np.testing.assert_allclose(r32.scores(), s64, atol=1e-4 * np.abs(s64).max(), rtol=0)


def test_post_norm_with_attention_output_bias_is_refused_clearly():
    m = _model(_cfg(o_bias=True))
    clean, corrupt, ans, wrong = _prompts()
    with pytest.raises(jaxpatch.InputError, match="output bias before a post-norm"):
        edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong)
