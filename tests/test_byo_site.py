"""jaxpatch.site in plain JAX: edits and captures as data, inside jaxpatch.scan (the layer is data),
sweeps against a loop of single patches, AtP against finite differences, and the errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import byo
from jaxpatch.byo import _sweep as byo_sweep

L, D, V, T, B = 3, 8, 11, 5, 4
AX = ("batch", "pos", "d_model")
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, whole model


def init(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"emb": jax.random.normal(k[0], (V, D)), "w": 0.3 * jax.random.normal(k[1], (L, D, D)),
            "out": jax.random.normal(k[2], (D, V))}


def apply(params, toks):
    """A residual toy model: layers stacked on a leading axis and scanned."""
    x = jaxpatch.site("embed", params["emb"][toks], axes=AX)

    def layer(x, w):
        x = jaxpatch.site("resid_pre", x, axes=AX)
        h = jaxpatch.site("hidden", jnp.tanh(jnp.einsum("btd,de->bte", x, w)), axes=AX)
        return x + h, None

    x, _ = jaxpatch.scan(layer, x, params["w"])
    return jnp.einsum("btd,dv->btv", x, params["out"])


def apply_unrolled(params, toks, patch=None):
    """The same model by hand, a Python loop over layers; ``patch = (site, layer, pos, value)``
    replaces ``[:, pos]`` of that site at that layer by ``value[:, pos]``. Returns logits and the
    per-layer activations."""
    x = params["emb"][toks]
    acts = {"resid_pre": [], "hidden": []}

    def maybe(name, l, a):
        if patch is not None and patch[0] == name and patch[1] == l:
            a = a.at[:, patch[2]].set(patch[3][:, patch[2]])
        acts[name].append(a)
        return a

    for l in range(L):
        x = maybe("resid_pre", l, x)
        h = maybe("hidden", l, jnp.tanh(jnp.einsum("btd,de->bte", x, params["w"][l])))
        x = x + h
    return jnp.einsum("btd,dv->btv", x, params["out"]), {k: jnp.stack(v) for k, v in acts.items()}


@pytest.fixture(scope="module")
def setup():
    params = init()
    clean = jax.random.randint(jax.random.PRNGKey(7), (B, T), 0, V)
    corrupt = (clean + 1) % V
    return byo.patchable(apply, params, name="toy"), params, clean, corrupt


def logit_diff(logits):
    return logits[:, -1, 0] - logits[:, -1, 1]


def test_site_is_the_identity_outside_jaxpatch(setup):
    model, params, clean, _ = setup
    ref = apply_unrolled(params, clean)[0]
    np.testing.assert_allclose(apply(params, clean), ref, **TOL)
    np.testing.assert_allclose(jax.jit(apply)(params, clean), ref, **TOL)
    np.testing.assert_allclose(model(clean), ref, **TOL)


def test_sites_carry_the_layer_axis_inside_scan(setup):
    model, params, clean, _ = setup
    sites = model.sites(clean)
    assert sites == {"embed": (AX, (B, T, D)), "resid_pre": (("layer",) + AX, (L, B, T, D)),
                     "hidden": (("layer",) + AX, (L, B, T, D))}
    _, caps = model.run_with_cache(clean)
    _, ref = apply_unrolled(params, clean)
    for name in ("resid_pre", "hidden"):
        np.testing.assert_allclose(caps[name], ref[name], **TOL)
    np.testing.assert_allclose(caps["embed"], params["emb"][clean], **TOL)


@pytest.mark.parametrize("name,layer,pos", [("resid_pre", 0, 2), ("hidden", 1, 4), ("hidden", 2, 0), ("resid_pre", 2, 3)])
def test_replace_inside_scan_equals_hand_written_patch(setup, name, layer, pos):
    model, params, clean, corrupt = setup
    _, src = apply_unrolled(params, clean)
    patched = model(corrupt, model.replace(name, src[name], layer=layer, pos=pos))
    ref, _ = apply_unrolled(params, corrupt, (name, layer, pos, src[name][layer]))
    np.testing.assert_allclose(patched, ref, **TOL)
    assert not np.allclose(patched, model(corrupt))  # the patch did something


def test_zero_and_add_edits(setup):
    model, params, clean, _ = setup
    x = params["emb"][clean]
    out = model(clean, byo.combine(model.zero("embed", pos=1), model.add("embed", jnp.ones((D,)), pos=[1, 3])))
    x2 = x.at[:, 1].set(1.0).at[:, 3].add(1.0)

    def rest(x):
        for l in range(L):
            x = x + jnp.tanh(jnp.einsum("btd,de->bte", x, params["w"][l]))
        return jnp.einsum("btd,dv->btv", x, params["out"])

    np.testing.assert_allclose(out, rest(x2), **TOL)


def test_sweep_equals_loop_of_single_patches_and_compiles_once(setup, monkeypatch):
    _, params, clean, corrupt = setup
    model = byo.patchable(apply, params)  # a fresh model: nothing compiled for it yet
    traced = chex.assert_max_traces(byo_sweep._patched_metrics, n=1)
    count = []

    def counted(*a, **k):
        count.append(1)
        return traced(*a, **k)

    monkeypatch.setattr(byo_sweep, "_patched_metrics", counted)
    results = []
    for c, k in ((clean, corrupt), (corrupt, clean)):  # new data, same shapes: no retrace
        res = jaxpatch.activation_patch(model, c, k, site="hidden", by=("layer", "pos"), metrics=(logit_diff, "kl"),
                                        chunk_size=4)
        _, src = model.run_with_cache(c, ["hidden"])
        loop = np.zeros((L, T))
        for l in range(L):
            for p in range(T):
                out = model(k, model.replace("hidden", src["hidden"], layer=l, pos=p))
                loop[l, p] = float(jnp.mean(logit_diff(out)))
        np.testing.assert_allclose(res.values("logit_diff"), loop, **TOL)
        results.append(res)
    assert len(count) == 1  # traced once (chunks of 4: 15 patches padded to 16), then reused
    assert res.axes == ("layer", "pos") and res.labels["layer"] == ["L0", "L1", "L2"]
    assert not np.allclose(results[0].values(), results[1].values())


def test_noise_with_mean_and_zero_baselines(setup):
    model, params, clean, corrupt = setup
    _, caps = apply_unrolled(params, corrupt)
    mean = jnp.mean(caps["resid_pre"], axis=1, keepdims=True)  # [L, 1, T, D]
    res = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", by=("layer", "pos"), direction="noise",
                                    baseline="mean", metrics=(logit_diff,))
    ref, _ = apply_unrolled(params, clean, ("resid_pre", 1, 2, jnp.broadcast_to(mean[1], (B, T, D))))
    np.testing.assert_allclose(res.values()[1, 2], np.mean(logit_diff(ref)), **TOL)
    res = jaxpatch.activation_patch(model, clean, None, site="resid_pre", by=("layer", "pos"), direction="noise",
                                    baseline="zero", metrics=(logit_diff,))
    ref, _ = apply_unrolled(params, clean, ("resid_pre", 2, 4, jnp.zeros((B, T, D))))
    np.testing.assert_allclose(res.values()[2, 4], np.mean(logit_diff(ref)), **TOL)


def test_atp_equals_finite_differences(setup, x64):
    """AtP is the derivative of the metric along the straight line from the run's activation to
    the source's: a central finite difference of exact patches along that line (float64)."""
    _, params, clean, corrupt = setup
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    model = byo.patchable(apply, params)
    est = jaxpatch.attribution_patch(model, clean, corrupt, site="hidden", by=("layer", "pos"), metric=logit_diff)
    _, run_caps = model.run_with_cache(corrupt, ["hidden"])
    _, src_caps = model.run_with_cache(clean, ["hidden"])
    diff = src_caps["hidden"] - run_caps["hidden"]
    m0 = est.corrupt[0]  # the run's metric per prompt
    h = 1e-5
    for l, p in [(0, 1), (1, 3), (2, 4), (0, 4)]:
        up = logit_diff(model(corrupt, model.add("hidden", h * diff, layer=l, pos=p)))
        down = logit_diff(model(corrupt, model.add("hidden", -h * diff, layer=l, pos=p)))
        fd = (np.asarray(up) - np.asarray(down)) / (2 * h)
        np.testing.assert_allclose(est.per_prompt[l, p, 0] - m0, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(est.effects()).max() > 1e-3


def test_duplicate_site_name_is_an_error():
    def f(params, x):
        x = jaxpatch.site("h", x)
        return jaxpatch.site("h", x * 2)

    model = byo.patchable(f, {})
    with pytest.raises(byo.SiteError, match="'h' is declared twice"):
        model.sites(jnp.ones((2, 3)))

    def g(params, x):  # the same name inside and outside a scan
        x = jaxpatch.site("h", x)
        return jaxpatch.scan(lambda c, _: (jaxpatch.site("h", c), None), x, length=2)[0]

    with pytest.raises(byo.SiteError, match="declared twice"):
        byo.patchable(g, {}).sites(jnp.ones((2, 3)))


def test_site_inside_the_models_own_vmap(x64):
    """A site inside the model's own jax.vmap (nested too) is seen whole, mapped axes first:
    capture, replace and AtP (gradients through custom_vmap) against hand-written versions."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 4)).astype(jnp.float64)

    def f(w, x):  # x [batch, rows, 3]: maps over batch, then rows
        h = jax.vmap(jax.vmap(lambda r: jaxpatch.site("row", jnp.tanh(r @ w))))(x)
        return jnp.sum(h ** 2, axis=1)  # [batch, 4]

    def by_hand(w, x, row=None, value=None):
        h = jnp.tanh(jnp.einsum("brd,de->bre", x, w))
        if row is not None:
            h = h.at[:, row].set(value[:, row])
        return jnp.sum(h ** 2, axis=1), h

    model = byo.patchable(f, w)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3)).astype(jnp.float64)
    xc = -x[::-1]
    assert model.sites(x) == {"row": (("batch", "dim1", "dim2"), (2, 5, 4))}
    _, caps = model.run_with_cache(x)
    _, h = by_hand(w, x)
    np.testing.assert_allclose(caps["row"], h, rtol=1e-12)
    np.testing.assert_allclose(model(xc, model.replace("row", h, dim1=3)), by_hand(w, xc, 3, h)[0], rtol=1e-12)
    metric = lambda o: o[:, 0] - o[:, 1]  # noqa: E731
    res = jaxpatch.activation_patch(model, x, xc, site="row", by=("dim1",), metrics=(metric,))
    np.testing.assert_allclose(res.values(), [np.mean(metric(by_hand(w, xc, r, h)[0])) for r in range(5)], rtol=1e-12)
    est = jaxpatch.attribution_patch(model, x, xc, site="row", by=("dim1",), metric=metric)
    hc = by_hand(w, xc)[1]
    for r in range(5):
        eps = 1e-6
        up = metric(by_hand(w, xc, r, hc + eps * (h - hc))[0])
        down = metric(by_hand(w, xc, r, hc - eps * (h - hc))[0])
        np.testing.assert_allclose(est.per_prompt[r, 0] - est.corrupt[0], (up - down) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_site_inside_other_transformations_is_an_error():
    def f(params, x):
        return jax.checkpoint(lambda r: jaxpatch.site("h", r))(x)

    with pytest.raises(byo.SiteError, match="'h' was reached inside a transformation"):
        byo.patchable(f, {}).sites(jnp.ones((2, 3)))

    def g(params, x):  # jax.lax.scan instead of jaxpatch.scan
        return jax.lax.scan(lambda c, _: (jaxpatch.site("h", c), None), x, length=2)[0]

    with pytest.raises(byo.SiteError, match="use jaxpatch.scan|jaxpatch.scan"):
        byo.patchable(g, {}).sites(jnp.ones((2, 3)))

    def k(params, x):  # jaxpatch.scan inside the model's own vmap
        body = lambda c, _: (jaxpatch.site("h", c, axes=("d",)), None)  # noqa: E731
        return jax.vmap(lambda r: jaxpatch.scan(body, r, length=2)[0])(x)

    with pytest.raises(byo.SiteError, match="jaxpatch.scan inside a transformation"):
        byo.patchable(k, {}).sites(jnp.ones((2, 3)))


def test_axes_must_fit():
    with pytest.raises(byo.SiteError, match="must name each"):
        byo.patchable(lambda p, x: jaxpatch.site("a", x, axes=("batch",)), {}).sites(jnp.ones((2, 3)))
    with pytest.raises(byo.SiteError, match="first axis must be 'batch'"):
        byo.patchable(lambda p, x: jaxpatch.site("a", x, axes=("pos", "batch")), {}).sites(jnp.ones((2, 3)))


def test_unknown_site_lists_valid_sites_closest_first(setup):
    model, _, clean, corrupt = setup
    with pytest.raises(jaxpatch.UnknownSiteError) as e:
        jaxpatch.activation_patch(model, clean, corrupt, site="hiden", metrics=(logit_diff,))
    assert "Valid sites, closest first: ['hidden', " in str(e.value)
    with pytest.raises(jaxpatch.InputError, match="valid axes"):
        jaxpatch.activation_patch(model, clean, corrupt, site="hidden", by=("layer", "head"), metrics=(logit_diff,))
    with pytest.raises(jaxpatch.InputError, match="built-in transformers"):
        jaxpatch.activation_patch(model, clean, corrupt, site="hidden", metrics=(logit_diff,), attention_mask=clean)
    with pytest.raises(jaxpatch.InputError, match=r"Got a function as the model.*jaxpatch.patchable\(fn, params\)"):
        jaxpatch.activation_patch(apply, clean, corrupt, site="hidden", metrics=(logit_diff,))
    with pytest.raises(jaxpatch.InputError, match="Got a function as the model"):
        jaxpatch.attribution_patch(apply, clean, corrupt, site="hidden", metric=logit_diff)


def test_per_example_model_equals_batched(setup):
    """batched=False: jaxpatch vmaps a one-example function; sites gain a leading batch axis."""
    model, params, clean, corrupt = setup

    def one(params, toks):
        return apply(params, toks[None])[0]

    def apply_one(params, toks):  # the same model written for one example, sites without batch
        x = jaxpatch.site("embed", params["emb"][toks], axes=("pos", "d_model"))

        def layer(x, w):
            x = jaxpatch.site("resid_pre", x, axes=("pos", "d_model"))
            h = jaxpatch.site("hidden", jnp.tanh(x @ w), axes=("pos", "d_model"))
            return x + h, None

        x, _ = jaxpatch.scan(layer, x, params["w"])
        return x @ params["out"]

    per_ex = byo.patchable(apply_one, params, batched=False)
    assert per_ex.sites(clean) == model.sites(clean)
    a = jaxpatch.activation_patch(per_ex, clean, corrupt, site="resid_pre", by=("layer", "pos"), metrics=(logit_diff,))
    b = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", by=("layer", "pos"), metrics=(logit_diff,))
    np.testing.assert_allclose(a.per_prompt, b.per_prompt, **TOL)
    # an edit of one example (batch index) reaches only that example
    _, src = model.run_with_cache(clean, ["hidden"])
    out = per_ex(corrupt, per_ex.replace("hidden", src["hidden"], layer=1, batch=2))
    ref = model(corrupt, model.replace("hidden", src["hidden"], layer=1, batch=2))
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(out[:2], model(corrupt)[:2], **TOL)


def test_results_plot_and_save(setup, tmp_path):
    from jaxpatch import plots, results_io

    model, _, clean, corrupt = setup
    res = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", by=("layer", "pos"), metrics=(logit_diff,))
    df = res.to_dataframe()
    assert len(df) == L * T
    fig = plots.plot_result(res, normalized=False)
    assert fig is not None
    paths = results_io.save_result(res, tmp_path / "toy")
    assert results_io.results_equal(results_io.load_result(paths["npz"]), res)
    assert paths["table"].exists()
    # several sites (a "site" axis): 3-D results, and exact vs attribution on one figure
    kw = dict(site=["resid_pre", "hidden"], by=("site", "layer", "pos"), metrics=(logit_diff,))
    exact = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    kw["metric"] = kw.pop("metrics")[0]
    atp = jaxpatch.attribution_patch(model, clean, corrupt, **kw)
    assert exact.labels["site"] == ["resid_pre", "hidden"] and exact.shape == atp.shape == (2, L, T)
    assert plots.plot_result(exact) is not None
    assert plots.plot_exact_vs_attribution(exact, atp) is not None
    paths = results_io.save_result(atp, tmp_path / "atp")
    assert results_io.results_equal(results_io.load_result(paths["npz"]), atp)


def test_core_needs_neither_flax_nor_equinox():
    """flax and equinox are an optional extra: importing jaxpatch and patching a plain-JAX model
    never imports them (a subprocess where importing them fails)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['flax'] = sys.modules['equinox'] = None\n"
            "import jax.numpy as jnp, jaxpatch\n"
            "m = jaxpatch.patchable(lambda p, x: jaxpatch.site('h', x * p), jnp.float32(2.0))\n"
            "assert m.sites(jnp.ones((2, 3))) == {'h': (('batch', 'dim1'), (2, 3))}\n"
            "assert 'flax' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_edit_indices_are_checked(setup):
    """An out-of-range index would wrap to another position: it is an error, as is an axis the
    site does not have."""
    model, _, clean, _ = setup
    v = jnp.zeros((B, T, D))
    with pytest.raises(jaxpatch.InputError, match=r"pos index \[5\] out of range for site 'embed': valid 0..4"):
        model(clean, model.replace("embed", v, pos=5))
    with pytest.raises(jaxpatch.InputError, match=r"layer index \[3\] out of range"):
        model(clean, model.replace("hidden", v, layer=3))
    with pytest.raises(jaxpatch.InputError, match="cannot index axis 'head'"):
        model(clean, model.replace("hidden", v, head=0))
    with pytest.raises(jaxpatch.InputError, match="not broadcastable"):
        model(clean, model.replace("hidden", jnp.zeros((B, T, D + 1))))
    np.testing.assert_allclose(model(clean, model.replace("embed", v, pos=-1)),
                               model(clean, model.replace("embed", v, pos=T - 1)), **TOL)


def test_atp_noise_direction_equals_finite_differences(setup, x64):
    """Noising: the clean run, corrupted activations patched in."""
    _, params, clean, corrupt = setup
    model = byo.patchable(apply, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params))
    est = jaxpatch.attribution_patch(model, clean, corrupt, site="resid_pre", by=("layer", "pos"), direction="noise",
                                     metric=logit_diff)
    _, run = model.run_with_cache(clean, ["resid_pre"])
    _, src = model.run_with_cache(corrupt, ["resid_pre"])
    d, h = src["resid_pre"] - run["resid_pre"], 1e-5
    for l, p in [(0, 0), (2, 4)]:
        up = np.asarray(logit_diff(model(clean, model.add("resid_pre", h * d, layer=l, pos=p))))
        down = np.asarray(logit_diff(model(clean, model.add("resid_pre", -h * d, layer=l, pos=p))))
        np.testing.assert_allclose(est.per_prompt[l, p, 0] - est.clean[0], (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_non_finite_patched_runs_are_reported(setup):
    """A patch that makes the output NaN is an error naming the patch, never a NaN in a table."""
    _, params, clean, _ = setup

    def fragile(params, toks):  # log of the hidden state: NaN where a patch makes it negative
        x = jaxpatch.site("h", params["emb"][toks] ** 2 + 1.0, axes=AX)
        return jnp.einsum("btd,dv->btv", jnp.log(x), params["out"])

    m = byo.patchable(fragile, params)
    with pytest.raises(jaxpatch.NonFiniteError, match=r"1 patched run\(s\) gave NaN or inf.*\{'pos': 4\}"):
        jaxpatch.activation_patch(m, clean, None, site="h", direction="noise", baseline="zero",
                                  patches=[{"pos": 1}, {"pos": 4}], metrics=(logit_diff,))  # zero at the read position


def test_pytree_outputs_need_a_selector(setup):
    _, params, clean, corrupt = setup

    def with_aux(params, toks):
        return {"logits": apply(params, toks), "aux": jnp.zeros(())}

    with pytest.raises(jaxpatch.InputError, match="Pass output= to the adapter"):
        jaxpatch.activation_patch(byo.patchable(with_aux, params), clean, corrupt, site="embed", metrics=(logit_diff,))
    sel = byo.patchable(with_aux, params, output=lambda o: o["logits"])
    plain = byo.patchable(apply, params)
    a = jaxpatch.activation_patch(sel, clean, corrupt, site="embed", by=("pos",), metrics=(logit_diff,))
    b = jaxpatch.activation_patch(plain, clean, corrupt, site="embed", by=("pos",), metrics=(logit_diff,))
    np.testing.assert_allclose(a.per_prompt, b.per_prompt, **TOL)


def test_several_sites_without_a_site_axis_are_patched_jointly(setup):
    """site=[a, b] with by= not naming "site": each patch covers both sites at its indices."""
    model, _, clean, corrupt = setup
    res = jaxpatch.activation_patch(model, clean, corrupt, site=["resid_pre", "hidden"], by=("layer",),
                                    metrics=(logit_diff,))
    _, src = model.run_with_cache(clean, ["resid_pre", "hidden"])
    for l in range(L):
        out = model(corrupt, byo.combine(model.replace("resid_pre", src["resid_pre"], layer=l),
                                         model.replace("hidden", src["hidden"], layer=l)))
        np.testing.assert_allclose(res.values()[l], np.mean(logit_diff(out)), **TOL)
    joint = jaxpatch.attribution_patch(model, clean, corrupt, site=["resid_pre", "hidden"], by=("layer",),
                                       metric=logit_diff)
    parts = jaxpatch.attribution_patch(model, clean, corrupt, site=["resid_pre", "hidden"], by=("site", "layer"),
                                       metric=logit_diff)
    np.testing.assert_allclose(joint.effects(), parts.effects().sum(axis=0), **TOL)
