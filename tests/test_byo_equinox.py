"""An Equinox transformer patched without editing it: submodule outputs addressed by pytree path,
jaxpatch vmapping the one-sequence model over the batch; against hand-written patched forwards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import byo
from jaxpatch.byo import _sweep as byo_sweep
from tests import byo_models as bm

eqx = pytest.importorskip("equinox", reason="equinox is in the [test] and [byo] extras")

TOL = dict(rtol=1e-5, atol=1e-5)  # float32, whole model


def logit_diff(logits):
    return logits[:, -1, 0] - logits[:, -1, 1]


def last_logit_diff(logits):
    return logits[:, -1, 0] - logits[:, -1, 1]


@pytest.fixture(scope="module")
def setup():
    clean, corrupt = bm.tokens()
    return bm.eqx_transformer(), clean, corrupt


def manual(net, toks, patch=None):
    """The transformer by hand for one sequence; ``patch = (layer, part, pos, src)`` replaces the
    output of block ``layer`` (part ``None``) or of its ``"attn"``/``"mlp"``/``"mlp.fc1"`` at
    ``pos`` by ``src[pos]``. Returns logits and, per block, ``(attn, mlp, block, fc1)`` outputs."""
    n = toks.shape[0]
    x = jax.vmap(net.embed)(toks) + net.pos[:n]
    outs = []

    def maybe(layer, part, a):
        if patch is not None and patch[0] == layer and patch[1] == part:
            a = a.at[patch[2]].set(patch[3][patch[2]])
        return a

    for i, b in enumerate(net.blocks):
        h = jax.vmap(b.ln1)(x)
        a = maybe(i, "attn", b.attn(h, h, h, mask=jnp.tril(jnp.ones((n, n), bool))))
        x = x + a
        f1 = maybe(i, "mlp.fc1", jax.vmap(b.mlp.fc1)(jax.vmap(b.ln2)(x)))  # mapped over positions
        m = maybe(i, "mlp", jax.vmap(b.mlp.fc2)(jax.nn.gelu(f1)))
        x = maybe(i, None, x + m)
        outs.append((a, m, x, f1))
    return jax.vmap(net.unembed)(jax.vmap(net.ln_f)(x)), outs


def test_pytree_paths_are_sites(setup):
    """Every submodule, including those the model maps over positions with its own jax.vmap
    (linears, layer norms, the embedding) and the attention weights (eqx's dropout output)."""
    net, clean, _ = setup
    model = byo.from_equinox(net)
    sites = model.sites(clean)
    for n in ("embed", "blocks.0.ln1", "blocks.0.attn.query_proj", "blocks.0.attn", "blocks.0.mlp.fc1", "blocks.0.mlp",
              "blocks.0", "blocks.1", "ln_f", "unembed"):
        assert n in sites, n
    assert sites["blocks.0.attn"] == (("batch", "dim1", "dim2"), (bm.B, bm.T, bm.D))
    assert sites["blocks.0.mlp.fc1"] == (("batch", "dim1", "dim2"), (bm.B, bm.T, 4 * bm.D))
    assert sites["blocks.1.attn.dropout"] == (("batch", "dim1", "dim2", "dim3"), (bm.B, bm.H, bm.T, bm.T))


def test_patch_any_site_equals_hand_written_forward(setup):
    net, clean, corrupt = setup
    model = byo.from_equinox(net)
    patches = [(0, "attn", 0), (1, None, 2)]  # (layer, part, index into manual's outputs); and fc1 below

    @jax.jit
    def reference(clean, corrupt):  # clean outputs and activations, and each patched run, by hand
        logits, outs = jax.vmap(lambda t: manual(net, t))(clean)
        patched = [jax.vmap(lambda t, s, l=l, part=part: manual(net, t, (l, part, 3, s))[0])(corrupt, outs[l][k])
                   for l, part, k in patches]
        fc1 = jax.vmap(lambda t, s: manual(net, t, (1, "mlp.fc1", 3, s))[0])(corrupt, outs[1][3])
        return logits, outs, patched, fc1

    logits, outs, patched, patched_fc1 = reference(clean, corrupt)
    names = [f"blocks.{l}" + (f".{part}" if part else "") for l, part, _ in patches]
    out, caps = model.run_with_cache(clean, names + ["blocks.1.mlp.fc1"])
    np.testing.assert_allclose(out, logits, **TOL)
    for (l, _, k), name in zip(patches, names):
        np.testing.assert_allclose(caps[name], outs[l][k], **TOL)
    # a linear the model maps over positions with its own jax.vmap
    np.testing.assert_allclose(caps["blocks.1.mlp.fc1"], outs[1][3], **TOL)
    fc1 = model(corrupt, model.replace("blocks.1.mlp.fc1", caps["blocks.1.mlp.fc1"], dim1=3))
    np.testing.assert_allclose(fc1, patched_fc1, **TOL)
    proj = jax.random.normal(jax.random.PRNGKey(5), (bm.T, bm.V))

    def projection(o):  # a random projection of the whole output: any difference shows
        return jnp.sum(o * proj[None], axis=(1, 2))

    res = jaxpatch.activation_patch(model, clean, corrupt, site=names, metrics=(projection,),
                                    patches=[{"site": i, "dim1": 3} for i in range(len(names))])
    for i, ref in enumerate(patched):
        np.testing.assert_allclose(res.per_prompt[i, 0], projection(ref), **TOL)


def test_sweep_equals_loop_and_compiles_once(setup, monkeypatch):
    net, clean, corrupt = setup
    model = byo.from_equinox(net)
    traced = chex.assert_max_traces(byo_sweep._patched_metrics, n=1)
    count = []
    monkeypatch.setattr(byo_sweep, "_patched_metrics", lambda *a, **k: count.append(1) or traced(*a, **k))
    sites = ["blocks.0", "blocks.1"]
    res = jaxpatch.activation_patch(model, clean, corrupt, site=sites, by=("site", "dim1"),
                                    metrics=("logit_diff", last_logit_diff), answer=0, wrong=1)
    _, src = model.run_with_cache(clean, sites)
    loop = np.array([[float(jnp.mean(logit_diff(model(corrupt, model.replace(s, src[s], dim1=p))))) for p in range(bm.T)]
                     for s in sites])
    np.testing.assert_allclose(res.values("logit_diff"), loop, **TOL)
    np.testing.assert_allclose(res.values("last_logit_diff"), res.values("logit_diff"), **TOL)  # user == built-in
    # patching block 1 at the last position restores the clean run exactly
    np.testing.assert_allclose(res.values("logit_diff")[1, -1], res.baselines("logit_diff")["clean"], **TOL)
    again = jaxpatch.activation_patch(model, corrupt, clean, site=sites, by=("site", "dim1"),
                                      metrics=("logit_diff", last_logit_diff), answer=0, wrong=1)
    assert not np.allclose(again.values(), res.values())
    assert len(count) == 1


def test_atp_equals_finite_differences(setup, x64):
    net, clean, corrupt = setup
    model = byo.from_equinox(bm.to64(net))
    sites = ["blocks.0.attn", "blocks.1.mlp.fc2"]  # fc2: mapped over positions by the model's own vmap
    est = jaxpatch.attribution_patch(model, clean, corrupt, site=sites, by=("dim1", "site"), metric=logit_diff)
    assert est.axes == ("dim1", "site")
    _, run = model.run_with_cache(corrupt, sites)
    _, src = model.run_with_cache(clean, sites)
    m0 = est.corrupt[0]  # the run's metric per prompt
    h = 1e-5
    both = lambda s, sign, p: byo.combine(*(model.add(t, (sign * h if t == s else 0.0) * (src[t] - run[t]), dim1=p)  # noqa: E731
                                            for t in sites))  # one edit structure for every patch: one compilation
    for k, s in enumerate(sites):
        for p in (2, 5):
            up = np.asarray(logit_diff(model(corrupt, both(s, 1, p))))
            down = np.asarray(logit_diff(model(corrupt, both(s, -1, p))))
            np.testing.assert_allclose(est.per_prompt[p, k, 0] - m0, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)
    assert np.abs(est.effects()).max() > 1e-3


def test_misspelt_path_lists_valid_paths_closest_first(setup):
    net, clean, corrupt = setup
    model = byo.from_equinox(net)
    with pytest.raises(jaxpatch.UnknownSiteError) as e:
        jaxpatch.activation_patch(model, clean, corrupt, site="blocks.0.atn", answer=0, wrong=1)
    assert "Valid sites, closest first: ['blocks.0.attn', " in str(e.value)


def test_module_called_twice_is_an_error():
    class Twice(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):
            return self.lin(jnp.tanh(self.lin(x)))

    model = byo.from_equinox(Twice(eqx.nn.Linear(3, 3, key=jax.random.PRNGKey(0))))
    with pytest.raises(byo.SiteError, match="'lin' cannot be a site: called more than once"):
        model(jnp.ones((2, 3)), model.zero("lin"))
    assert model.sites(jnp.ones((2, 3))) == {}
