"""Flax models patched without editing them: a linen transformer (module paths via
nn.intercept_methods) and an nnx MLP classifier, each against hand-written patched forwards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import byo
from jaxpatch.byo import _sweep as byo_sweep
from tests import byo_models as bm

nn = pytest.importorskip("flax.linen", reason="flax is in the [test] and [byo] extras")
nnx = pytest.importorskip("flax.nnx")

TOL = dict(rtol=1e-5, atol=1e-5)  # float32, whole model


def logit_diff(logits):
    return logits[:, -1, 0] - logits[:, -1, 1]


@pytest.fixture(scope="module")
def linen():
    module, variables, classes = bm.linen_transformer()
    clean, corrupt = bm.tokens()
    return module, variables, classes, clean, corrupt


def manual_forward(variables, classes, toks, patch=None):
    """The linen transformer by hand, block by block; ``patch = (layer, pos, src)`` replaces block
    ``layer``'s output at ``pos`` by ``src[layer][:, pos]``. Returns logits and block outputs."""
    p = variables["params"]
    x = nn.Embed(bm.V, bm.D).apply({"params": p["embed"]}, toks) + p["pos"][None, : toks.shape[1]]
    outs = []
    for i in range(bm.L):
        x = classes["Block"]().apply({"params": p[f"blocks_{i}"]}, x)
        if patch is not None and patch[0] == i:
            x = x.at[:, patch[1]].set(patch[2][i][:, patch[1]])
        outs.append(x)
    x = nn.LayerNorm().apply({"params": p["ln_f"]}, x)
    return nn.Dense(bm.V).apply({"params": p["unembed"]}, x), outs


def intercepted(module, variables, toks, path, pos=None, value=None):
    """A test-local interceptor (no jaxpatch): capture the output of module ``path``, or replace
    it at ``pos`` by ``value[:, pos]``."""
    box = {}

    def icpt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and ".".join(context.module.path) == path:
            if value is not None:
                out = out.at[:, pos].set(value[:, pos])
            box["act"] = out
        return out

    with nn.intercept_methods(icpt):
        logits = module.apply(variables, toks)
    return logits, box["act"]


def test_linen_module_paths_are_sites(linen):
    module, variables, _, clean, _ = linen
    sites = byo.from_flax(module, variables).sites(clean)
    for name in ("embed", "blocks_0.ln1", "blocks_0.attn", "blocks_0.attn.query", "blocks_0.mlp.fc1", "blocks_1", "ln_f"):
        assert name in sites
    assert sites["blocks_0.attn.query"] == (("batch", "dim1", "dim2", "dim3"), (bm.B, bm.T, bm.H, bm.D // bm.H))
    assert "" not in sites  # the root module's output is the model's output, not a site


def test_linen_block_patch_equals_hand_written_forward(linen):
    module, variables, classes, clean, corrupt = linen
    model = byo.from_flax(module, variables)
    _, src = jax.jit(lambda t: manual_forward(variables, classes, t))(clean)
    ref_fn = jax.jit(lambda pos: manual_forward(variables, classes, corrupt, (1, pos, src))[0])  # pos is data
    res = jaxpatch.activation_patch(model, clean, corrupt, site="blocks_1", by=("dim1",), metrics=(logit_diff,))
    ref = [np.mean(logit_diff(ref_fn(p))) for p in range(bm.T)]
    np.testing.assert_allclose(res.values(), ref, **TOL)
    assert res.values()[-1] != res.values()[0]


def test_linen_any_site_equals_hand_written_interceptor(linen):
    """A site inside flax's attention ([batch, pos, head, d_head]; block outputs are checked above)."""
    path = "blocks_0.attn.query"
    module, variables, _, clean, corrupt = linen
    model = byo.from_flax(module, variables)
    @jax.jit
    def reference(clean, corrupt):  # the clean activation, and the corrupted run patched with it
        _, src = intercepted(module, variables, clean, path)
        return src, intercepted(module, variables, corrupt, path, pos=2, value=src)[0]

    src, ref = reference(clean, corrupt)
    _, caps = model.run_with_cache(clean, [path])
    np.testing.assert_allclose(caps[path], src, **TOL)
    np.testing.assert_allclose(model(corrupt, model.replace(path, src, dim1=2)), ref, **TOL)


def test_linen_sweep_over_sites_equals_loop_and_compiles_once(linen, monkeypatch):
    module, variables, _, clean, corrupt = linen
    model = byo.from_flax(module, variables)
    traced = chex.assert_max_traces(byo_sweep._patched_metrics, n=1)
    count = []
    monkeypatch.setattr(byo_sweep, "_patched_metrics", lambda *a, **k: count.append(1) or traced(*a, **k))
    sites = ["blocks_0.attn", "blocks_1.mlp"]
    res = jaxpatch.activation_patch(model, clean, corrupt, site=sites, by=("site", "dim1"), metrics=(logit_diff, "kl"),
                                    chunk_size=8)
    _, src = model.run_with_cache(clean, sites)
    loop = np.array([[float(jnp.mean(logit_diff(model(corrupt, model.replace(s, src[s], dim1=p))))) for p in range(bm.T)]
                     for s in sites])
    np.testing.assert_allclose(res.values("logit_diff"), loop, **TOL)
    again = jaxpatch.activation_patch(model, corrupt, clean, site=sites, by=("site", "dim1"), metrics=(logit_diff, "kl"),
                                      chunk_size=8)  # new data, same shapes
    assert not np.allclose(again.values(), res.values())
    assert len(count) == 1
    assert res.labels["site"] == sites and res.axes == ("site", "dim1")


def test_linen_atp_equals_finite_differences(linen, x64):
    module, variables, _, clean, corrupt = linen
    model = byo.from_flax(module, bm.to64(variables))
    s = "blocks_0.attn"
    est = jaxpatch.attribution_patch(model, clean, corrupt, site=s, by=("dim1",), metric=logit_diff)
    _, run = model.run_with_cache(corrupt, [s])
    _, src = model.run_with_cache(clean, [s])
    m0 = est.corrupt[0]  # the run's metric per prompt
    h, d = 1e-5, src[s] - run[s]
    for p in (1, 3, 5):
        up = np.asarray(logit_diff(model(corrupt, model.add(s, h * d, dim1=p))))
        down = np.asarray(logit_diff(model(corrupt, model.add(s, -h * d, dim1=p))))
        np.testing.assert_allclose(est.per_prompt[p, 0] - m0, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)
    assert np.abs(est.effects()).max() > 1e-3


def test_linen_misspelt_path_lists_valid_paths_closest_first(linen):
    module, variables, _, clean, corrupt = linen
    model = byo.from_flax(module, variables)
    with pytest.raises(jaxpatch.UnknownSiteError) as e:
        jaxpatch.activation_patch(model, clean, corrupt, site="blocks_0.atn", metrics=(logit_diff,))
    msg = str(e.value)
    assert "Unknown site 'blocks_0.atn'. Valid sites, closest first: ['blocks_0.attn', " in msg
    assert "'blocks_1.mlp.fc2'" in msg  # every valid path is listed


def test_linen_module_called_twice_is_an_error():
    module, variables = bm.linen_shared()
    model = byo.from_flax(module, variables)
    x = jnp.ones((2, 4))
    assert "dense" not in model.sites(x) and "head" in model.sites(x)
    with pytest.raises(byo.SiteError, match="'dense' cannot be a site: called more than once"):
        model(x, model.zero("dense"))
    with pytest.raises(byo.SiteError, match="called more than once"):
        jaxpatch.activation_patch(model, x, x + 1, site="dense", metrics=(lambda o: o[:, 0],))


# ---------------------------------------------------------------------------------------------
# nnx: an MLP classifier, with a user metric of the outputs


@pytest.fixture(scope="module")
def mlp():
    model = bm.nnx_mlp()
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 6))
    labels = jnp.array([0, 1, 2, 3, 0])
    return model, x, x[::-1] * 1.5, labels


def manual_mlp(model, x, patch=None):
    """The nnx MLP by hand; ``patch = (site, neuron, src)`` replaces that column of the site."""
    def maybe(name, a):
        if patch is not None and patch[0] == name:
            a = a.at[:, patch[1]].set(patch[2][:, patch[1]])
        return a

    h1 = nnx.relu(maybe("linear1", model.linear1(x)))
    h2 = jnp.tanh(maybe("linear2", model.linear2(h1)))
    return maybe("head", model.head(h2)), {"linear1": model.linear1(x)}


def test_nnx_patch_equals_hand_written_forward(mlp):
    net, x, xc, _ = mlp
    model = byo.from_nnx(net)
    assert model.sites(x) == {"linear1": (("batch", "dim1"), (5, 8)), "linear2": (("batch", "dim1"), (5, 8)),
                              "head": (("batch", "dim1"), (5, 4))}
    _, src = model.run_with_cache(x)
    for name, k in [("linear1", 3), ("linear2", 0), ("head", 2)]:
        ref, _ = manual_mlp(net, xc, (name, k, src[name]))
        np.testing.assert_allclose(model(xc, model.replace(name, src[name], dim1=k)), ref, **TOL)
    np.testing.assert_allclose(net(x), manual_mlp(net, x)[0], **TOL)  # the user's model is untouched


def test_nnx_user_metric_sweep_equals_loop_and_compiles_once(mlp, monkeypatch):
    net, x, xc, labels = mlp
    model = byo.from_nnx(net)
    traced = chex.assert_max_traces(byo_sweep._patched_metrics, n=1)
    count = []
    monkeypatch.setattr(byo_sweep, "_patched_metrics", lambda *a, **k: count.append(1) or traced(*a, **k))

    def label_logprob(logits):  # closes over labels: passed as data, current on every call
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]

    _, src = model.run_with_cache(x, ["linear2"])
    res = jaxpatch.activation_patch(model, x, xc, site="linear2", by=("dim1",), metrics=(label_logprob, "accuracy"),
                                    answer=labels)
    loop = [float(jnp.mean(label_logprob(model(xc, model.replace("linear2", src["linear2"], dim1=k))))) for k in range(8)]
    np.testing.assert_allclose(res.values("label_logprob"), loop, **TOL)
    labels = labels[::-1]  # the metric's array changes: new values, no recompilation
    res2 = jaxpatch.activation_patch(model, x, xc, site="linear2", by=("dim1",), metrics=(label_logprob, "accuracy"),
                                     answer=labels)
    loop2 = [float(jnp.mean(label_logprob(model(xc, model.replace("linear2", src["linear2"], dim1=k))))) for k in range(8)]
    np.testing.assert_allclose(res2.values("label_logprob"), loop2, **TOL)
    assert not np.allclose(loop, loop2)
    assert len(count) == 1


def test_nnx_atp_exact_where_the_metric_is_linear_in_the_site(mlp):
    """logit_diff is linear in the head's output: AtP there equals exact patching."""
    net, x, xc, labels = mlp
    model = byo.from_nnx(net)
    exact = jaxpatch.activation_patch(model, x, xc, site="head", by=("dim1",), answer=labels, wrong=(labels + 1) % 4)
    est = jaxpatch.attribution_patch(model, x, xc, site="head", by=("dim1",), answer=labels, wrong=(labels + 1) % 4)
    np.testing.assert_allclose(est.per_prompt, exact.per_prompt, **TOL)
    assert np.abs(exact.effects()).max() > 1e-2


def test_nnx_atp_equals_finite_differences(mlp, x64):
    net, x, xc, labels = mlp
    state = bm.to64(nnx.state(net))
    net64 = nnx.merge(nnx.graphdef(net), state)
    model = byo.from_nnx(net64)
    x, xc = x.astype(jnp.float64), xc.astype(jnp.float64)
    est = jaxpatch.attribution_patch(model, x, xc, site="linear2", by=("dim1",), metric="logprob", answer=labels)
    _, run = model.run_with_cache(xc, ["linear2"])
    _, src = model.run_with_cache(x, ["linear2"])
    lp = lambda o: np.asarray(jnp.take_along_axis(jax.nn.log_softmax(o), labels[:, None], axis=-1)[:, 0])  # noqa: E731
    m0, h, d = lp(model(xc)), 1e-5, src["linear2"] - run["linear2"]
    for k in range(8):
        fd = (lp(model(xc, model.add("linear2", h * d, dim1=k))) - lp(model(xc, model.add("linear2", -h * d, dim1=k)))) / (2 * h)
        np.testing.assert_allclose(est.per_prompt[k, 0] - m0, fd, rtol=1e-6, atol=1e-8)


def test_nnx_misspelt_path_lists_valid_paths_closest_first(mlp):
    net, x, xc, labels = mlp
    with pytest.raises(jaxpatch.UnknownSiteError, match=r"closest first: \['linear1', 'linear2', 'head'\]"):
        jaxpatch.activation_patch(byo.from_nnx(net), x, xc, site="linear_1", answer=labels, wrong=labels)
