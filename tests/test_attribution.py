"""Attribution patching against its slow twins: exact patching where the model is linear in the
site, finite differences, exact softmax at saturated attention (QK fix), float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch.attribution import attribution_patch


def scaled_model(seed=0, scale=5.0, **cfg_kw):
    kw = dict(n_layers=3, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)
    kw.update(cfg_kw)
    cfg = jaxpatch.ModelConfig.gpt2(**kw)
    # Weights do not depend on eps: draw them with the eps-free config (the same weights; one
    # compiled init program per config, shared with the other tests of these sizes).
    init_cfg = jaxpatch.ModelConfig.gpt2(**{k: v for k, v in kw.items() if k != "eps"})
    m = jaxpatch.HookedModel(cfg, jaxpatch.HookedModel.from_config(init_cfg, seed=seed).params)
    m.params = jax.tree_util.tree_map(lambda a: a * scale if a.ndim >= 2 else a, m.params)
    return m


def prompts(d_vocab=61, B=3, T=8, seed=0, positions=(2,)):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, d_vocab, (B, T))
    corrupt = clean.copy()
    for p in positions:
        corrupt[:, p] = (corrupt[:, p] + 1 + rng.integers(0, d_vocab - 1, B)) % d_vocab
    return clean, corrupt, rng.integers(0, d_vocab, B), rng.integers(0, d_vocab, B)


def linear_layer_norms(m):
    """With eps = 1e12 every layer norm is linear up to ~1e-11 (centring times 1e-6); rescale its weight by 1e6
    so activations keep their usual size. Needs a model built with ``eps=1e12``."""
    assert m.config.eps == 1e12
    p = m.params
    for k in ("ln1_w", "ln2_w"):
        p["blocks"][k] = p["blocks"][k] * 1e6
    p["ln_f_w"] = p["ln_f_w"] * 1e6
    return m


def to64(model):
    return jaxpatch.HookedModel(model.config, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.params))


LINEAR_SITES = [("z", ("layer", "head")), ("mlp_out", ("layer", "pos")), ("post", ("layer", "neuron")),
                ("resid_post", ("layer", "pos"))]


def linear_model(site):
    m = linear_layer_norms(to64(scaled_model(eps=1e12, scale=5.0)))
    if site in ("z",):
        m.params["blocks"]["W_out"] = m.params["blocks"]["W_out"].at[-1].set(0.0)
    return m


@pytest.fixture(scope="module")
def linear_estimates():
    """``(site, direction) -> `` the AtP estimate on :func:`linear_model` (site): one attribution
    call per model and direction for all the sites that share the model (one compiled program)."""
    cache = {}

    def get(site, direction):
        if (site, direction) not in cache:
            group = [(s, by) for s, by in LINEAR_SITES if (s == "z") == (site == "z")]
            clean, corrupt, ans, wrong = prompts()
            with jax.enable_x64(True):
                res = attribution_patch(linear_model(site), clean, corrupt, targets=group, direction=direction,
                                        answer=ans, wrong=wrong)
            for (s, _), r in zip(group, res.values()):
                cache[(s, direction)] = r
        return cache[(site, direction)]

    return get


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site,by", LINEAR_SITES)
def test_atp_is_exact_where_the_model_is_linear_in_the_site(x64, linear_estimates, direction, site, by):
    # A huge layer-norm epsilon makes every layer norm linear (centring times a constant), the
    # last block's MLP output weight is zeroed, and the metric (logit difference) is linear in the
    # logits: everything after the last block's heads is linear, so first-order attribution must
    # equal exact patching there.
    m = linear_model(site)
    clean, corrupt, ans, wrong = prompts()
    kw = dict(site=site, by=by, direction=direction, answer=ans, wrong=wrong)
    exact = jaxpatch.activation_patch(m, clean, corrupt, mesh=None, **kw)
    est = linear_estimates(site, direction)
    assert est.site == exact.site and est.axes == by
    last = m.config.n_layers - 1
    np.testing.assert_allclose(est.values()[last], exact.values()[last], rtol=1e-8, atol=1e-10)
    effect = exact.values()[last] - exact.baselines()["corrupt" if direction == "denoise" else "clean"]
    assert np.abs(effect).max() > 1e-3  # the patches do something


FD_CASES = [
    ("resid_pre", ("layer", "pos"), {"layer": 1, "pos": 2}),
    ("z", ("layer", "pos", "head"), {"layer": 2, "pos": 7, "head": 1}),
    ("v", ("layer", "head"), {"layer": 0, "head": 3}),
    ("pattern", ("layer", "head", "dest_pos"), {"layer": 1, "head": 2, "dest_pos": 6}),
    ("post", ("layer", "neuron"), {"layer": 2, "neuron": 7}),
]


@pytest.fixture(scope="module")
def fd_estimates():
    """``direction -> [AtP estimate per FD_CASES entry]``: one attribution call (one compiled
    program) per direction for every case's target."""
    cache = {}

    def get(direction):
        if direction not in cache:
            clean, corrupt, ans, wrong = prompts()
            with jax.enable_x64(True):
                res = attribution_patch(to64(scaled_model()), clean, corrupt, targets=[(s, by) for s, by, _ in FD_CASES],
                                        direction=direction, answer=ans, wrong=wrong)
            cache[direction] = list(res.values())
        return cache[direction]

    return get


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("case", range(len(FD_CASES)), ids=[c[0] for c in FD_CASES])
def test_atp_equals_finite_differences(x64, fd_estimates, direction, case):
    site, by, component = FD_CASES[case]
    m = to64(scaled_model())
    clean, corrupt, ans, wrong = prompts()
    est = fd_estimates(direction)[case]
    assert est.axes == by
    c = est.site
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, rc = m.run(run, capture={c})
    _, sc = m.run(src, capture={c})
    diff = sc[c] - rc[c]
    idx = {("d_mlp" if a == "neuron" else "q_pos" if a == "dest_pos" else a): v for a, v in component.items()}
    layer = idx.pop("layer")
    b = np.arange(3)

    def metric(eps):
        iv = m.add(c, eps * diff, stacked=True, layer=layer, **idx)
        lg = np.asarray(m(run, iv))[:, -1]
        return lg[b, ans] - lg[b, wrong]

    h = 1e-5
    fd = (metric(h) - metric(-h)) / (2 * h)  # d metric / d eps at 0, per prompt
    grid_ix = tuple(component[a] for a in by)
    got = est.per_prompt[grid_ix][0] - np.asarray(metric(0.0))
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(fd).max() > 1e-4


def saturated_model():
    """One layer whose head 0 attends almost one-hot (huge q·k scale); nothing nonlinear after the
    pattern (MLP zeroed, layer norms linear by a huge epsilon)."""
    m = linear_layer_norms(to64(scaled_model(n_layers=1, n_heads=2, d_model=16, eps=1e12, scale=5.0, seed=3)))
    p = m.params
    p["blocks"]["W_Q"] = p["blocks"]["W_Q"] * 200
    p["blocks"]["W_K"] = p["blocks"]["W_K"] * 200
    p["blocks"]["W_out"] = p["blocks"]["W_out"] * 0
    p["blocks"]["b_out"] = p["blocks"]["b_out"] * 0
    return m


#: Every q/k target of the two saturated-attention tests: their atp+qk estimates come from one call
#: each, with this same target list (same shapes), so they share one compiled program.
QK_TARGETS = [("k", ("layer", "pos", "head")), ("k", ("layer", "head")), ("q", ("layer", "head")), ("q", ("layer", "pos", "head"))]


def qk_fixed(m, clean, corrupt, ans, wrong):
    """``(site, by) -> `` the atp+qk estimate, for every ``QK_TARGETS`` entry."""
    res = attribution_patch(m, clean, corrupt, targets=QK_TARGETS, method="atp+qk", answer=ans, wrong=wrong)
    return dict(zip(QK_TARGETS, res.values()))


def test_qk_fix_matches_exact_key_patch_at_saturated_attention(x64):
    m = saturated_model()
    clean, corrupt, ans, wrong = prompts(d_vocab=61, B=4, T=6, seed=5, positions=(1, 3))
    _, cache = m.run_with_cache(clean, names=["blocks.0.attn.hook_pattern"])
    assert float(jnp.max(cache["blocks.0.attn.hook_pattern"][:, :, 1:], axis=-1).min()) > 0.98  # saturated
    kw = dict(site="k", by=("layer", "pos", "head"), answer=ans, wrong=wrong)
    exact = jaxpatch.activation_patch(m, clean, corrupt, mesh=None, **kw)
    plain = attribution_patch(m, clean, corrupt, method="atp", **kw)
    fixes = qk_fixed(m, clean, corrupt, ans, wrong)
    fixed = fixes[("k", ("layer", "pos", "head"))]
    base = exact.baselines()["corrupt"]
    e, p, f = exact.values() - base, plain.values() - base, fixed.values() - base
    big = np.abs(e) > 0.1 * np.abs(e).max()
    assert big.any()
    np.testing.assert_allclose(f, e, rtol=1e-6, atol=1e-8 * np.abs(e).max())  # exact after the softmax
    assert np.abs(p[big]).max() < 0.05 * np.abs(e[big]).min()  # plain AtP misses them (false negatives)
    for by in (("layer", "head"),):  # all-position keys and queries are fixed too
        for site in ("k", "q"):
            ex = jaxpatch.activation_patch(m, clean, corrupt, site=site, by=by, answer=ans, wrong=wrong, mesh=None)
            fx = fixes[(site, by)]
            np.testing.assert_allclose(fx.values(), ex.values(), rtol=1e-6, atol=1e-8 * np.abs(ex.values()).max())


def test_qk_fix_query_by_position_is_exact_after_softmax(x64):
    m = saturated_model()
    clean, corrupt, ans, wrong = prompts(d_vocab=61, B=4, T=6, seed=6, positions=(2, 4))
    kw = dict(site="q", by=("layer", "pos", "head"), answer=ans, wrong=wrong)
    exact = jaxpatch.activation_patch(m, clean, corrupt, mesh=None, **kw)
    fixed = qk_fixed(m, clean, corrupt, ans, wrong)[("q", ("layer", "pos", "head"))]
    np.testing.assert_allclose(fixed.values(), exact.values(), rtol=1e-6, atol=1e-8 * np.abs(exact.values()).max())


@pytest.mark.parametrize("method", ["atp", "atp+qk", "atp*"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_float32_agrees_with_float64(method, direction):
    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    targets = [("resid_pre", None), ("z", ("layer", "pos", "head")), ("k", ("layer", "head")), ("pattern", ("layer", "head"))]
    kw = dict(targets=targets, direction=direction, method=method, answer=ans, wrong=wrong)
    r32 = attribution_patch(m, clean, corrupt, **kw)
    with jax.enable_x64(True):
        r64 = attribution_patch(to64(m), clean, corrupt, **kw)
    def estimates(r):  # estimated change of the metric per patch and prompt
        run = r.corrupt if direction == "denoise" else r.clean
        return r.per_prompt[..., 0, :] - run[0]

    for key in r32:
        a, b = estimates(r32[key]), estimates(r64[key])
        assert np.abs(b).max() > 1e-4, key
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0, err_msg=str(key))


def test_graddrop_equals_loop_of_stopped_gradients():
    """AtP* GradDrop == Σ_l |AtP with the gradient at layer l's attn_out and mlp_out zeroed| / (L-1)
    (the paper's definition: layer l's contribution to the residual stream), each variant computed
    separately by a plain jax.grad through the public forward with a gradient gate on layer l."""
    from jaxpatch.models import gpt2

    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    star = attribution_patch(m, clean, corrupt, site="z", by=("layer", "head"), method="atp*", answer=ans, wrong=wrong)
    cfg, L, b = m.config, m.config.n_layers, np.arange(3)
    _, src = m.run(clean, capture={"blocks.attn.hook_z"})
    _, run = m.run(corrupt, capture={"blocks.attn.hook_z"})
    diff = src["blocks.attn.hook_z"] - run["blocks.attn.hook_z"]
    total = 0.0

    def f(delta, drop):
        iv = m.add("blocks.attn.hook_z", delta, stacked=True)
        for s in ("blocks.hook_attn_out", "blocks.hook_mlp_out"):
            iv = iv + jaxpatch.Interventions({s: (jaxpatch.Edit(layers=drop, value=None, grad_scale=jnp.zeros(())),)})
        lg = gpt2.forward(cfg, m.params, jnp.asarray(corrupt), iv)[0][:, -1]
        return jnp.sum(lg[b, ans] - lg[b, wrong])

    grad = jax.jit(jax.grad(f))  # one program; the dropped layer is an input
    for drop in range(L):
        g = grad(jnp.zeros_like(diff), jnp.asarray(drop))
        total = total + np.abs(np.einsum("lbtnh->lnb", np.asarray(g * diff)))
    expected = total / (L - 1)
    got = star.per_prompt[:, :, 0, :] - star.corrupt[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())
    plain = attribution_patch(m, clean, corrupt, site="z", by=("layer", "head"), method="atp", answer=ans, wrong=wrong)
    assert not np.allclose(np.abs(plain.per_prompt[:, :, 0] - plain.corrupt[0]), got)  # GradDrop changes something


def test_attribution_errors():
    m = scaled_model()
    clean, corrupt, ans, wrong = prompts()
    with pytest.raises(jaxpatch.InputError, match="piecewise constant"):
        attribution_patch(m, clean, corrupt, metric="accuracy", answer=ans)
    with pytest.raises(jaxpatch.InputError, match="floating"):
        attribution_patch(m, clean, corrupt, metric=lambda lg: jnp.argmax(lg, -1), answer=ans)
    with pytest.raises(jaxpatch.InputError, match="same shape"):
        attribution_patch(m, clean, corrupt[:, :5], answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match="Cannot attribute"):
        attribution_patch(m, clean, corrupt, site="resid_pre", by=("layer", "head"), answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match="per-layer sites"):
        attribution_patch(m, clean, corrupt, site="hook_embed", answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.UnknownSiteError, match="Did you mean"):
        attribution_patch(m, clean, corrupt, site="blocks.attn.hook_zz", answer=ans, wrong=wrong)


def test_answer_ids_are_range_checked_everywhere():
    from jaxpatch import edges

    m = scaled_model()
    clean, corrupt, ans, wrong = prompts()
    bad = np.array([3, 4, 61])
    with pytest.raises(jaxpatch.InputError, match=r"answer token ids must lie in \[0, 61\)"):
        attribution_patch(m, clean, corrupt, answer=bad, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match=r"wrong token ids must lie in \[0, 61\)"):
        edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=bad)
    with pytest.raises(jaxpatch.InputError, match="answer_pos must lie in"):
        attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong, answer_pos=8)
