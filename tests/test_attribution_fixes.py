"""Regression tests for attribution fixes: AtP*'s GradDrop as in the paper (gradient dropped at
layer l's attention and MLP outputs), attention-score attribution without NaN, the QK fix for
every ``by`` of q/k, and ``by`` validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch.attribution import attribution_patch
from tests.test_attribution import prompts, saturated_model, scaled_model, to64

B = 3


def est_of(r, direction="denoise"):
    """Estimated change of the metric ``[*grid, batch]`` (what attribution adds to the run's metric)."""
    run = r.corrupt if direction == "denoise" else r.clean
    return r.per_prompt[..., 0, :] - run[0]


# ----------------------------------------------------------------------------------------------
# An independent GPT-2 forward (plain jnp, no hooks) with additive deltas at chosen sites and
# jax.lax.stop_gradient on one layer's attention and MLP outputs: the paper's GradDrop.

_REF_SITES = ("resid_pre", "z", "attn_out", "resid_mid", "post", "mlp_out", "resid_post")


def _ln(x, w, b, eps):
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w[None, None] + b[None, None]


def ref_forward(cfg, params, tokens, deltas, drop=None, ln_drop=None):
    """Logits ``[B, T, V]``. ``deltas``: short site name -> ``[L, ...]`` added to the activation.
    ``drop``: layer whose attn_out and mlp_out pass no gradient (paper's GradDrop).
    ``ln_drop``: layer whose two layer-norm outputs pass no gradient (the old, wrong definition)."""
    T = tokens.shape[1]
    x = params["W_E"][tokens] + params["W_pos"][:T][None]
    blocks = params["blocks"]
    for l in range(cfg.n_layers):
        p = {k: v[l] for k, v in blocks.items()}
        d = {k: v[l] for k, v in deltas.items()}
        x = x + d.get("resid_pre", 0.0)
        h = _ln(x, p["ln1_w"], p["ln1_b"], cfg.eps)
        if ln_drop == l:
            h = jax.lax.stop_gradient(h)
        q = jnp.einsum("btd,ndh->btnh", h, p["W_Q"]) + p["b_Q"][None, None]
        k = jnp.einsum("btd,ndh->btnh", h, p["W_K"]) + p["b_K"][None, None]
        v = jnp.einsum("btd,ndh->btnh", h, p["W_V"]) + p["b_V"][None, None]
        s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.d_head)
        s = jnp.where(np.tril(np.ones((T, T), bool))[None, None], s, -jnp.inf)
        z = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v) + d.get("z", 0.0)
        attn = jnp.einsum("btnh,nhd->btd", z, p["W_O"]) + p["b_O"][None, None] + d.get("attn_out", 0.0)
        if drop == l:
            attn = jax.lax.stop_gradient(attn)
        x = x + attn + d.get("resid_mid", 0.0)
        h = _ln(x, p["ln2_w"], p["ln2_b"], cfg.eps)
        if ln_drop == l:
            h = jax.lax.stop_gradient(h)
        pre = jnp.einsum("btd,df->btf", h, p["W_in"]) + p["b_in"][None, None]
        assert cfg.act_fn == "gelu_new"
        post = jax.nn.gelu(pre, approximate=True) + d.get("post", 0.0)
        mlp = jnp.einsum("btf,fd->btd", post, p["W_out"]) + p["b_out"][None, None] + d.get("mlp_out", 0.0)
        if drop == l:
            mlp = jax.lax.stop_gradient(mlp)
        x = x + mlp + d.get("resid_post", 0.0)
    h = _ln(x, params["ln_f_w"], params["ln_f_b"], cfg.eps)
    return jnp.einsum("btd,dv->btv", h, params["W_U"]) + params["b_U"][None, None]


_CANON = {"resid_pre": "blocks.hook_resid_pre", "z": "blocks.attn.hook_z", "attn_out": "blocks.hook_attn_out",
          "resid_mid": "blocks.hook_resid_mid", "post": "blocks.mlp.hook_post", "mlp_out": "blocks.hook_mlp_out",
          "resid_post": "blocks.hook_resid_post"}
#: per site: its grid for the test and the einsum reducing (src - run) * grad ``[L, B, ...]`` to it.
_GRID = {"resid_pre": (("layer", "pos"), "lbtd->ltb"), "z": (("layer", "head"), "lbtnh->lnb"),
         "attn_out": (("layer", "pos"), "lbtd->ltb"), "resid_mid": (("layer", "pos"), "lbtd->ltb"),
         "post": (("layer", "neuron"), "lbtf->lfb"), "mlp_out": (("layer", "pos"), "lbtd->ltb"),
         "resid_post": (("layer", "pos"), "lbtd->ltb")}


def ref_atp_minus_l(m, clean, corrupt, ans, wrong, sites, **drop_kw):
    """Per site: AtP with the given drop (one separate jax.grad of the reference forward), ``[*grid, B]``,
    denoising (run = corrupt, source = clean), logit-difference metric, last position."""
    with jax.enable_x64(True):
        m = to64(m)  # captures in float64 too
        params, cfg = m.params, m.config
        canon = {_CANON[s] for s in sites}
        _, src = m.run(clean, capture=canon)
        _, run = m.run(corrupt, capture=canon)
        b = np.arange(len(ans))
        zeros = {s: jnp.zeros(run[_CANON[s]].shape, jnp.float64) for s in sites}

        def metric(deltas):
            lg = ref_forward(cfg, params, jnp.asarray(corrupt), deltas, **drop_kw)[:, -1]
            return jnp.sum(lg[b, ans] - lg[b, wrong])

        g = jax.grad(metric)(zeros)
        out = {}
        for s in sites:
            diff = np.asarray(src[_CANON[s]], np.float64) - np.asarray(run[_CANON[s]], np.float64)
            out[s] = np.einsum(_GRID[s][1], diff * np.asarray(g[s]))
        return out


def ref_graddrop(m, clean, corrupt, ans, wrong, sites):
    """The paper's AtP*_GD, computed as a Python loop of L separate gradients."""
    L = m.config.n_layers
    per = [ref_atp_minus_l(m, clean, corrupt, ans, wrong, sites, drop=l) for l in range(L)]
    return {s: sum(np.abs(p[s]) for p in per) / (L if s.startswith("resid") else L - 1) for s in sites}, per


def test_reference_forward_is_the_model(x64):
    m = to64(scaled_model(scale=2.0))
    clean, *_ = prompts()
    zeros = {}
    np.testing.assert_allclose(ref_forward(m.config, m.params, jnp.asarray(clean), zeros), m(clean), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def graddrop_reference():
    """The float64 reference of both dtypes' cases (the same model and prompts): computed once."""
    m32 = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    want, per = ref_graddrop(m32, clean, corrupt, ans, wrong, _REF_SITES)
    plain = ref_atp_minus_l(m32, clean, corrupt, ans, wrong, ("z",))["z"]
    return want, per, plain


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_graddrop_equals_loop_of_stop_gradient_reference(graddrop_reference, dtype):
    """atp* == Σ_l |AtP_{-l}| / (L - 1) (L for residual sites), AtP_{-l} from an independent forward
    with stop_gradient on layer l's attn_out and mlp_out, one jax.grad per l.
    Tolerances: float64 rtol 1e-9 of the largest score; float32 (vs the float64 reference) 2e-4."""
    m32 = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    want, per, plain = graddrop_reference
    targets = [(s, _GRID[s][0]) for s in _REF_SITES]
    kw = dict(targets=targets, method="atp*", answer=ans, wrong=wrong)
    if dtype == "float64":
        with jax.enable_x64(True):
            got = attribution_patch(to64(m32), clean, corrupt, **kw)
        tol = 1e-9
    else:
        got = attribution_patch(m32, clean, corrupt, **kw)
        tol = 2e-4
    for s in _REF_SITES:
        g, w = est_of(got[(_CANON[s], _GRID[s][0])]), want[s]
        assert np.abs(w).max() > 1e-3, s
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.abs(w).max(), err_msg=s)
    # The drops do something: some AtP_{-l} differs from plain AtP (l != own layer).
    assert np.abs(per[2]["z"][0] - plain[0]).max() > 0.05 * np.abs(plain[0]).max()


def test_graddrop_last_layer_node_is_plain_atp_in_two_layers(x64):
    """2 layers: for a layer-1 node, dropping layer 0 cannot change its gradient and dropping its own
    layer zeroes it, so AtP*_GD = (|AtP| + 0) / 1 = |AtP| exactly. The old definition (layer-norm
    reads of layer 1 stopped) keeps layer 1's direct path: |AtP| + |AtP_direct| != |AtP|."""
    m = to64(scaled_model(n_layers=2, scale=2.0))
    clean, corrupt, ans, wrong = prompts()
    targets = [("z", ("layer", "head")), ("mlp_out", ("layer", "pos")), ("post", ("layer", "neuron")),
               ("resid_post", ("layer", "pos"))]
    star = attribution_patch(m, clean, corrupt, targets=targets, method="atp*", answer=ans, wrong=wrong)
    plain = attribution_patch(m, clean, corrupt, targets=targets, method="atp", answer=ans, wrong=wrong)
    for key in star:
        s, p = est_of(star[key])[1], np.abs(est_of(plain[key])[1])
        assert p.max() > 1e-3, key
        np.testing.assert_allclose(s, p, rtol=1e-10, atol=1e-13, err_msg=str(key))
    # The old definition differs here (so this test fails on it): by a lot for z.
    old0 = ref_atp_minus_l(m, clean, corrupt, ans, wrong, ("z",), ln_drop=0)["z"][1]
    old1 = ref_atp_minus_l(m, clean, corrupt, ans, wrong, ("z",), ln_drop=1)["z"][1]
    p = np.abs(est_of(plain[("blocks.attn.hook_z", ("layer", "head"))])[1])
    assert np.abs(np.abs(old0) + np.abs(old1) - p).max() > 0.1 * p.max()


def inert_last_layer(m):
    """Zero the last layer's attention and MLP outputs: dropping it changes no gradient."""
    bl = m.params["blocks"]
    for k in ("W_O", "b_O", "W_out", "b_out"):
        bl[k] = bl[k].at[-1].set(0.0)
    return m


OWN_LAYER_CASES = [
    ("z", ("layer", "head")), ("mlp_out", ("layer", "pos")), ("post", ("layer", "neuron")),
    ("attn_out", ("layer", "pos")), ("v", ("layer", "pos", "head")), ("pattern", ("layer", "head", "dest_pos")),
    ("pre", ("layer", "neuron")), ("q", ("layer", "pos", "head")), ("k", ("layer", "head")),
]
RESID_SITES = ["resid_pre", "resid_mid", "resid_post"]


@pytest.fixture(scope="module")
def inert_estimates():
    """``(method, site, by) -> `` estimate ``[*grid, B]`` on the inert-last-layer model, for every
    case of the two tests below: one attribution call per method (atp* for every target; plain atp
    for the non-q/k ones; atp+qk for q/k), so three compiled programs instead of one per case."""
    clean, corrupt, ans, wrong = prompts()
    every = OWN_LAYER_CASES + [(s, ("layer", "pos")) for s in RESID_SITES]
    calls = {"atp*": every, "atp": [t for t in every if t[0] not in ("q", "k")],
             "atp+qk": [t for t in every if t[0] in ("q", "k")]}
    out = {}
    with jax.enable_x64(True):
        m = inert_last_layer(to64(scaled_model(scale=2.0)))
        for method, targets in calls.items():
            res = attribution_patch(m, clean, corrupt, targets=targets, method=method, answer=ans, wrong=wrong)
            for (site, by), r in zip(targets, res.values()):
                assert r.axes == tuple(by)
                out[(method, site, tuple(by))] = est_of(r)
    return out


@pytest.mark.parametrize("site,by", OWN_LAYER_CASES)
def test_graddrop_own_layer_term_is_zero(inert_estimates, site, by):
    """3 layers, the last one inert: for a layer-1 node, dropping layer 0 or layer 2 leaves its
    gradient unchanged, so AtP*_GD = (|AtP| + own + |AtP|) / 2 equals |AtP| iff its own layer's
    term is zero. (q/k: atp* uses the QK fix, compared with |atp+qk|.)"""
    star = inert_estimates[("atp*", site, by)]
    ref = np.abs(inert_estimates[("atp+qk" if site in ("q", "k") else "atp", site, by)])
    assert ref[1].max() > 1e-4
    np.testing.assert_allclose(star[1], ref[1], rtol=1e-9, atol=1e-12 * ref[1].max())
    np.testing.assert_allclose(star[2], 0.0, atol=1e-12 * ref[1].max())  # the inert layer's nodes do nothing


@pytest.mark.parametrize("site", RESID_SITES)
def test_graddrop_residual_nodes_divide_by_n_layers(inert_estimates, site):
    """Residual nodes have no zero term: in the last (inert) layer all 3 terms equal |AtP|, and
    GradDrop divides by L = 3, so it equals |AtP| there (as it does for components)."""
    star = inert_estimates[("atp*", site, ("layer", "pos"))]
    plain = np.abs(inert_estimates[("atp", site, ("layer", "pos"))])
    assert plain[2].max() > 1e-3
    np.testing.assert_allclose(star[2], plain[2], rtol=1e-9, atol=1e-12 * plain[2].max())


# ----------------------------------------------------------------------------------------------
# Attention scores


def _scores_setup(dtype):
    m = scaled_model(scale=2.0)
    if dtype == "float64":
        m = to64(m)
    return (m,) + prompts()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_attn_scores_attribution_is_finite_and_zero_where_masked(dtype, method):
    with jax.enable_x64(dtype == "float64"):
        m, clean, corrupt, ans, wrong = _scores_setup(dtype)
        bys = [("layer", "head"), ("layer", "head", "dest_pos", "src_pos"), ("src_pos", "layer", "dest_pos", "head")]
        res = attribution_patch(m, clean, corrupt, targets=[("attn_scores", by) for by in bys], method=method,
                                answer=ans, wrong=wrong)
        heads, full, swapped = (est_of(res[("blocks.attn.hook_attn_scores", by)]) for by in bys)
    assert np.isfinite(heads).all() and np.isfinite(full).all()
    T = clean.shape[1]
    masked = np.triu(np.ones((T, T), bool), k=1)  # src > dest
    assert (full[:, :, masked] == 0).all()
    assert np.abs(full[:, :, ~masked]).max() > 1e-4
    np.testing.assert_array_equal(swapped, np.transpose(full, (3, 0, 2, 1, 4)))
    if method == "atp":  # signed: a head's estimate is the sum of its entries'
        np.testing.assert_allclose(heads, full.sum(axis=(2, 3)), rtol=1e-4 if dtype == "float32" else 1e-10,
                                   atol=(1e-4 if dtype == "float32" else 1e-12) * np.abs(heads).max())


def test_attn_scores_attribution_matches_softmax_chain_rule_and_finite_differences(x64):
    """Every unmasked entry: Δscore · p (g - Σ p g), with g = ∂m/∂pattern from a separate jax.grad
    at the pattern (rtol 1e-9 of the largest); three entries against central finite differences
    (h = 1e-5, rtol 1e-6)."""
    m, clean, corrupt, ans, wrong = _scores_setup("float64")
    full = attribution_patch(m, clean, corrupt, site="attn_scores", by=("layer", "head", "dest_pos", "src_pos"),
                             answer=ans, wrong=wrong)
    got = est_of(full)  # [L, N, T, S, B]
    c, cp = "blocks.attn.hook_attn_scores", "blocks.attn.hook_pattern"
    _, src = m.run(clean, capture={c})
    _, run = m.run(corrupt, capture={c, cp})
    T = clean.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    ds = np.where(causal, np.asarray(src[c]) - np.asarray(np.where(causal, run[c], 0.0)), 0.0)  # [L,B,N,T,S]
    b = np.arange(B)

    def metric_of(iv):
        lg = m(corrupt, iv)[:, -1]
        return lg[b, ans] - lg[b, wrong]

    g = jax.grad(lambda d: jnp.sum(metric_of(m.add(cp, d, stacked=True))))(jnp.zeros(run[cp].shape))
    p = np.asarray(run[cp])
    g = np.asarray(g)
    dm_ds = p * (g - np.sum(p * g, axis=-1, keepdims=True))
    want = np.einsum("lbnts->lntsb", ds * dm_ds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())

    h = 1e-5
    for layer, head, t, s in [(0, 1, 7, 2), (1, 3, 5, 2), (2, 0, 7, 7)]:
        def at(eps):
            return np.asarray(metric_of(m.add(c, eps * ds, stacked=True, layer=layer, head=head, q_pos=t, k_pos=s)))

        fd = (at(h) - at(-h)) / (2 * h)
        assert np.abs(fd).max() > 1e-6
        np.testing.assert_allclose(got[layer, head, t, s], fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# QK fix for every `by` of q and k


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_supports_every_by(x64, site):
    """Axes not asked for are summed: the QK-fixed estimate without 'head' is the per-head one
    summed over heads (heads do not interact before the pattern), in any axis order. For q, rows
    are independent too, so the all-position estimate is the per-position one summed."""
    m = to64(scaled_model(scale=2.0))
    clean, corrupt, ans, wrong = prompts()
    bys = [("layer", "pos", "head"), ("layer", "head"), ("layer", "pos"), ("layer",), ("pos", "layer"),
           ("head", "pos", "layer"), ("head", "layer")]

    def estimates(method):  # one call (one compile) per method, every by as a target
        res = attribution_patch(m, clean, corrupt, targets=[(site, by) for by in bys], method=method, answer=ans, wrong=wrong)
        return {by: est_of(res[(f"blocks.attn.hook_{site}", by)]) for by in bys}

    run = estimates("atp+qk")
    lph, lh = run[("layer", "pos", "head")], run[("layer", "head")]
    tol = dict(rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(run[("layer", "pos")], lph.sum(axis=2), **tol)
    np.testing.assert_allclose(run[("layer",)], lh.sum(axis=1), **tol)
    np.testing.assert_allclose(run[("pos", "layer")], np.transpose(lph.sum(axis=2), (1, 0, 2)), **tol)
    np.testing.assert_allclose(run[("head", "pos", "layer")], np.transpose(lph, (2, 1, 0, 3)), **tol)
    np.testing.assert_allclose(run[("head", "layer")], np.transpose(lh, (1, 0, 2)), **tol)
    if site == "q":
        np.testing.assert_allclose(lh, lph.sum(axis=1), **tol)
        np.testing.assert_allclose(run[("layer",)], lph.sum(axis=(1, 2)), **tol)
    assert np.abs(lph).max() > 1e-3
    star = estimates("atp*")
    for by in bys:
        assert star[by].shape[:-1] == tuple({"layer": 3, "pos": 8, "head": 4}[a] for a in by)
        assert np.isfinite(star[by]).all() and (star[by] >= 0).all() and star[by].max() > 0
    np.testing.assert_allclose(star[("pos", "layer")], np.transpose(star[("layer", "pos")], (1, 0, 2)), **tol)
    np.testing.assert_allclose(star[("head", "pos", "layer")], np.transpose(star[("layer", "pos", "head")], (2, 1, 0, 3)), **tol)


NO_HEAD_BYS = [("layer",), ("layer", "pos"), ("pos", "layer")]


def saturated_case():
    m = saturated_model()
    return (m,) + prompts(d_vocab=61, B=4, T=6, seed=5, positions=(1, 3, 5))


@pytest.fixture(scope="module")
def saturated_estimates():
    """``(method, site, by) -> `` atp+qk and plain atp results for every case below: one call per
    method with every (site, by) as a target."""
    targets = [(site, by) for site in ("q", "k") for by in NO_HEAD_BYS]
    out = {}
    with jax.enable_x64(True):
        m, clean, corrupt, ans, wrong = saturated_case()
        for method in ("atp+qk", "atp"):
            res = attribution_patch(m, clean, corrupt, targets=targets, method=method, answer=ans, wrong=wrong)
            for (site, by), r in zip(targets, res.values()):
                assert r.axes == by
                out[(method, site, by)] = r
    return out


@pytest.mark.parametrize("site", ["q", "k"])
@pytest.mark.parametrize("by", NO_HEAD_BYS)
def test_qk_fix_without_head_is_exact_at_saturated_attention(x64, saturated_estimates, site, by):
    """One layer, nothing nonlinear after the pattern: patching q or k of all heads at once is the
    sum of per-head pattern changes, each exact under the QK fix, so atp+qk equals the exact sweep
    (to 1e-9 of the largest effect), where plain AtP misses it. The answer position is corrupted
    too, so patching queries matters."""
    m, clean, corrupt, ans, wrong = saturated_case()
    kw = dict(site=site, by=by, answer=ans, wrong=wrong)
    exact = jaxpatch.activation_patch(m, clean, corrupt, mesh=None, **kw)
    fixed = saturated_estimates[("atp+qk", site, by)]
    plain = saturated_estimates[("atp", site, by)]
    base = exact.baselines()["corrupt"]
    e, f, p = exact.values() - base, fixed.values() - base, plain.values() - base
    assert np.abs(e).max() > 1e-3
    np.testing.assert_allclose(f, e, rtol=0, atol=1e-9 * np.abs(e).max())
    assert np.abs(p - e).max() > 0.5 * np.abs(e).max()


# ----------------------------------------------------------------------------------------------
# `by` validation


@pytest.mark.parametrize("site,by,match", [
    ("resid_pre", ("layer", "pos", "pos"), r"by=\('layer', 'pos', 'pos'\): \['pos'\] repeated; valid axes for 'blocks.hook_resid_pre': \['layer', 'pos'\]"),
    ("z", ("layer", "layer", "head"), r"\['layer'\] repeated; valid axes for 'blocks.attn.hook_z': \['layer', 'pos', 'head'\]"),
    ("resid_pre", ("layer", "head"), r"'head' is not an axis of this site; valid axes for 'blocks.hook_resid_pre'"),
    ("pattern", ("layer", "pos"), r"'pos' is not an axis of this site \(attention scores and patterns are by 'dest_pos'/'src_pos'"),
    ("q", ("layer", "neuron"), r"'neuron' is not an axis"),
    ("z", ("layer", "bogus"), r"'bogus' is not an axis"),
    ("z", ("head",), r"by=\('head',\): 'layer' missing"),
    ("z", "layer", r"by must be a sequence of axis names"),
])
def test_invalid_by_is_a_clear_input_error(site, by, match):
    m = scaled_model()
    clean, corrupt, ans, wrong = prompts()
    with pytest.raises(jaxpatch.InputError, match=match):
        attribution_patch(m, clean, corrupt, site=site, by=by, answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match=match):
        attribution_patch(m, clean, corrupt, targets=[("z", None), (site, by)], answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match="pairs"):
        attribution_patch(m, clean, corrupt, targets=["z"], answer=ans, wrong=wrong)
