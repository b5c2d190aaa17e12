"""The AtP+QK / AtP* QK fix for every family: rotary embeddings, grouped-query attention, q/k norms,
a custom attention scale, attention soft-capping, sliding windows and padding.

Two checks. (1) The defining property on random (nonlinear) models: the QK-fixed estimate of a
q/k patch equals ``(pattern_patched - pattern_run) · ∂metric/∂pattern`` at the patched layer, with
``pattern_patched`` from a full forward pass with that patch applied at ``hook_q``/``hook_k``
(a slow twin: one forward per patch). (2) Where the model is linear after the pattern (one active
layer, the other inert, MLPs zeroed, norms made linear by a huge epsilon, no final soft-cap), the
QK fix is exact, so ``atp+qk`` equals the exact sweep :func:`jaxpatch.activation_patch`.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import models
from jaxpatch.attribution import attribution_patch
from jaxpatch.interventions import Edit, Interventions

T = 8
_COMMON = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16)


def llama_cfg(**kw):
    """Llama-style: rotary, RMSNorm, gated SiLU MLP, grouped-query attention (2 query heads per kv head)."""
    c = dict(_COMMON, architecture="llama", n_kv_heads=2, positional="rotary", norm="rmsnorm", gated_mlp=True,
             act_fn="silu", qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)
    c.update(kw)
    return jaxpatch.ModelConfig(**c)


def gemma2_cfg(**kw):
    """Gemma-2-style: attention soft-capping, a custom scale, a sliding layer then a full one,
    post-norms, scaled embeddings, final soft-capping."""
    c = dict(_COMMON, architecture="gemma2", n_kv_heads=2, positional="rotary", norm="rmsnorm", gated_mlp=True,
             act_fn="gelu_pytorch_tanh", qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False,
             tied_embeddings=True, post_norms=True, scale_embed=True, attn_softcap=50.0, final_softcap=30.0,
             attn_scale=0.25, sliding_window=3, layer_types=("sliding_attention", "full_attention"))
    c.update(kw)
    return jaxpatch.ModelConfig(**c)


def qwen3_cfg(**kw):
    """Qwen3-style: per-head RMS q/k norms before the rotary embedding, GQA, q/k/v biases."""
    return llama_cfg(**{"architecture": "qwen3", "qk_norm": True, "qkv_bias": True, **kw})


def learned_qknorm_cfg(**kw):
    """Learned positions with q/k norms: no site holds the normed keys, the QK fix applies the norm."""
    return llama_cfg(**{"positional": "learned", "norm": "layernorm", "qk_norm": True, **kw})


CFGS = {"llama": llama_cfg, "gemma2": gemma2_cfg, "qwen3": qwen3_cfg, "learned_qknorm": learned_qknorm_cfg}


def model_of(cfg, seed=0, scale=4.0, init_cfg=None):
    """Random weights (times ``scale``) for ``cfg``, drawn by ``init_cfg``'s init program when given:
    a config that differs from ``cfg`` only in options the weights do not depend on (``eps``,
    ``final_softcap``) draws the same weights and reuses a compiled init (one per config)."""
    m = jaxpatch.HookedModel.from_config(init_cfg or cfg, seed=seed)
    m = jaxpatch.HookedModel(cfg, m.params)
    m.params = jax.tree_util.tree_map(lambda a: a * scale if a.ndim >= 2 else a, m.params)
    return m


def to64(m):
    return jaxpatch.HookedModel(m.config, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), m.params))


def prompts(d_vocab=50, B=3, seed=0, positions=(1, 4, 7)):
    """Clean/corrupt token pairs differing at ``positions``; the last one is the answer position,
    so patching queries matters too."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, d_vocab, (B, T))
    corrupt = clean.copy()
    for p in positions:
        corrupt[:, p] = (corrupt[:, p] + 1 + rng.integers(0, d_vocab - 1, B)) % d_vocab
    return clean, corrupt, rng.integers(0, d_vocab, B), rng.integers(0, d_vocab, B)


def left_padding(B=3):
    """Row 0 unpadded, row 1 two padding tokens on the left, row 2 three (the answer, at T-1, is real)."""
    mask = np.ones((B, T), np.int32)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return mask


def est_of(r):
    """Estimated change of the metric ``[*grid, batch]`` (denoising: the run is the corrupt one)."""
    return r.per_prompt[..., 0, :] - r.corrupt[0]


# ----------------------------------------------------------------------------------------------
# (1) The defining property, against a forward pass per patch


@partial(jax.jit, static_argnames=("cfg",))
def _twin_patterns(cfg, params, run, src, ans, wrong, am, sels):
    """The slow twin's model runs, in one program: the run's pattern ``p_run`` and ``∂m/∂pattern``
    ``g`` (``[L, B, heads, T, T]``), and for each site's patches ``sels[site]`` (``[P, L, B, T,
    heads, 1]``: entries of ``hook_{site}`` taken from the source) the pattern of a full forward
    pass with that one patch applied (``[P, L, B, heads, T, T]``; one forward per patch, vmapped)."""
    rows = jnp.arange(run.shape[0])

    def metric(logits):  # logit difference at the last position (a real token in every prompt)
        return logits[rows, -1, ans] - logits[rows, -1, wrong]

    def with_pattern_delta(d):
        ivs = Interventions({"blocks.attn.hook_pattern": (Edit(delta=d, stacked=True),)})
        logits, caps = models.forward(cfg, params, run, ivs, frozenset({"blocks.attn.hook_pattern"}), am)
        return jnp.sum(metric(logits)), caps["blocks.attn.hook_pattern"]

    names = {site: f"blocks.attn.hook_{site}" for site in sels}
    _, caps_src = models.forward(cfg, params, src, None, frozenset(names.values()), am)
    _, p_run = with_pattern_delta(jnp.zeros((cfg.n_layers, run.shape[0], cfg.n_heads, T, T), params["W_E"].dtype))
    g = jax.grad(lambda d: with_pattern_delta(d)[0])(jnp.zeros_like(p_run))

    def patched_pattern(name, sel):
        ivs = Interventions({name: (Edit(mask=sel, value=caps_src[name], stacked=True),)})
        return models.forward(cfg, params, run, ivs, frozenset({"blocks.attn.hook_pattern"}), am)[1]["blocks.attn.hook_pattern"]

    patched = {site: jax.vmap(partial(patched_pattern, names[site]))(sel) for site, sel in sels.items()}
    return p_run, g, patched


def slow_twins(m, clean, corrupt, ans, wrong, mask, sites, bys):
    """``Σ (pattern_patched - pattern_run) · ∂m/∂pattern`` at the patched layer, per patch
    ``[*grid, B]``, for each ``(site, by)``: each patch of ``hook_{site}`` (by ``by``) applied in a
    full forward pass of its own (all of them batched in one compiled program)."""
    cfg = m.config
    B = clean.shape[0]
    am = None if mask is None else jnp.asarray(mask)
    names = frozenset(f"blocks.attn.hook_{site}" for site in sites)
    acts = jax.eval_shape(lambda: models.forward(cfg, m.params, jnp.asarray(clean), None, names, am))[1]
    sizes = {site: {"layer": cfg.n_layers, "pos": T, "head": acts[f"blocks.attn.hook_{site}"].shape[3]} for site in sites}
    patches, sels = {}, {}
    for site in sites:
        heads = sizes[site]["head"]
        sel = []
        for by in bys:
            shape = tuple(sizes[site][a] for a in by)
            for idx in np.ndindex(*shape):
                at = dict(zip(by, idx))
                one = np.zeros((cfg.n_layers, B, T, heads, 1), bool)
                one[at["layer"], :, at.get("pos", slice(None)), at.get("head", slice(None))] = True
                patches.setdefault((site, by), []).append((idx, at["layer"], len(sel)))
                sel.append(one)
        sels[site] = jnp.asarray(np.stack(sel))
    p_run, g, patched = _twin_patterns(cfg, m.params, jnp.asarray(corrupt), jnp.asarray(clean), jnp.asarray(ans),
                                       jnp.asarray(wrong), am, sels)
    p_run, g = np.asarray(p_run), np.asarray(g)
    out = {}
    for (site, by), entries in patches.items():
        p_new = np.asarray(patched[site])
        o = np.zeros(tuple(sizes[site][a] for a in by) + (B,))
        for idx, layer, k in entries:
            o[idx] = np.sum((p_new[k, layer] - p_run[layer]) * g[layer], axis=(1, 2, 3))
        out[(site, by)] = o
    return out


BYS = [("layer", "head"), ("layer", "pos", "head")]


@pytest.fixture(scope="module", params=["llama", "gemma2", "qwen3", "learned_qknorm", "llama_padded", "gemma2_padded"])
def qk_case(request):
    """Per family: the model, the QK-fixed estimates of q and k by every ``BYS`` (one
    attribution call) and their slow twins."""
    family = request.param
    padded = family.endswith("_padded")
    with jax.enable_x64(True):
        m = to64(model_of(CFGS[family.removesuffix("_padded")](), seed=1))
        clean, corrupt, ans, wrong = prompts(d_vocab=m.config.d_vocab)
        mask = left_padding() if padded else None
        res = attribution_patch(m, clean, corrupt, targets=[(site, by) for site in "qk" for by in BYS], method="atp+qk",
                                answer=ans, wrong=wrong, attention_mask=mask)
        got = {(site, by): est_of(res[(f"blocks.attn.hook_{site}", by)]) for site in "qk" for by in BYS}
        want = slow_twins(m, clean, corrupt, ans, wrong, mask, "qk", BYS)
    return m.config, padded, got, want


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_is_the_exact_pattern_change_times_the_pattern_gradient(qk_case, site):
    cfg, padded, gots, wants = qk_case
    for by in BYS:
        got, want = gots[(site, by)], wants[(site, by)]
        heads = cfg.n_heads if site == "q" else cfg.n_kv_heads
        assert got.shape == want.shape and want.shape[by.index("head")] == heads
        assert np.abs(want).max() > 1e-2  # the patches do something
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())  # measured ~2e-15
        if padded and "pos" in by:  # patching a padding position changes nothing
            pos = by.index("pos")
            assert np.all(np.take(got, [0, 1], axis=pos)[..., 1] == 0) and np.all(np.take(got, [0, 1, 2], axis=pos)[..., 2] == 0)


# ----------------------------------------------------------------------------------------------
# (2) Exact where the model is linear after the pattern


def linear_after_pattern(cfg, active, seed=2, init_cfg=None):
    """Only layer ``active`` writes to the residual stream (the other's W_O is zero), every MLP
    writes zero, and every norm is linear up to ~1e-11 (epsilon 1e12, weights times 1e6, so
    activations keep their size): the logit difference is linear in layer ``active``'s pattern."""
    m = to64(model_of(cfg, seed=seed, scale=4.0, init_cfg=init_cfg))
    b = m.params["blocks"]
    for k in ("ln1_w", "ln2_w", "ln1_post_w", "ln2_post_w", "q_norm_w", "k_norm_w"):
        if k in b:
            b[k] = b[k] * 1e6
    b["ln1_w"] = b["ln1_w"] * 20  # the embeddings are small (~0.1): attention inputs of a real norm's size
    m.params["ln_f_w"] = m.params["ln_f_w"] * 1e6
    b["W_out"] = b["W_out"] * 0
    b["W_O"] = b["W_O"].at[1 - active].set(0.0)
    return m


@pytest.mark.parametrize("family,active", [("llama", 0), ("llama", 1), ("gemma2", 0), ("gemma2", 1), ("qwen3", 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_qk_fix_equals_exact_patching_when_linear_after_the_pattern(x64, family, active, padded):
    kw = {"eps": 1e12}
    if family == "gemma2":
        kw["final_softcap"] = None
    m = linear_after_pattern(CFGS[family](**kw), active, init_cfg=CFGS[family]())  # same weights as drawn for CFGS[family](**kw)
    clean, corrupt, ans, wrong = prompts(d_vocab=m.config.d_vocab, seed=3)
    mask = left_padding() if padded else None
    kw = dict(answer=ans, wrong=wrong, attention_mask=mask)
    bys = (("layer", "head"), ("layer", "pos", "head"))
    fixed_all = attribution_patch(m, clean, corrupt, targets=[(s, by) for s in ("q", "k") for by in bys],
                                  method="atp+qk", **kw)  # one program for the four estimates
    for site in ("q", "k"):
        for by in bys:
            exact = jaxpatch.activation_patch(m, clean, corrupt, mesh=None, site=site, by=by, **kw)
            fixed = fixed_all[(f"blocks.attn.hook_{site}", by)]
            base = exact.baselines()["corrupt"]
            e, f = exact.values() - base, fixed.values() - base
            assert np.abs(e).max() > 1e-2
            np.testing.assert_allclose(f, e, rtol=0, atol=1e-8 * np.abs(e).max(), err_msg=f"{site} {by}")
            assert np.abs(np.take(e, [1 - active], axis=0)).max() < 1e-8 * np.abs(e).max()  # the inert layer


# ----------------------------------------------------------------------------------------------
# AtP* runs for every family


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_atp_star_runs_on_q_and_k_of_every_family(family):
    m = model_of(CFGS[family](), seed=4)
    clean, corrupt, ans, wrong = prompts(d_vocab=m.config.d_vocab, seed=4)
    targets = [(s, by) for s in ("q", "k") for by in (("layer",), ("layer", "head"), ("layer", "pos", "head"))]
    res = attribution_patch(m, clean, corrupt, targets=targets, method="atp*", answer=ans, wrong=wrong,
                            attention_mask=left_padding())
    for (site, by), r in res.items():
        est = est_of(r)
        heads = m.config.n_heads if site.endswith("_q") else m.config.n_kv_heads
        assert est.shape[:-1] == tuple({"layer": 2, "pos": T, "head": heads}[a] for a in by)
        assert np.isfinite(est).all() and (est >= 0).all() and est.max() > 0
