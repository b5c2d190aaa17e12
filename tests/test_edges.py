"""Edge attribution (EAP, EAP-IG) against exact edge patching and integrated-gradients completeness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import edges
from tests.test_attribution import prompts, scaled_model, to64


def test_edge_forward_with_zero_deltas_is_the_model():
    m = scaled_model()
    clean, *_ = prompts()
    B, T = clean.shape
    logits, _ = edges.edge_forward(m.config, m.params, jnp.asarray(clean), edges.zero_deltas(m.config, B, T, jnp.float32))
    np.testing.assert_allclose(logits, m(clean), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_ig_completeness_over_embedding_edges(x64, direction):
    # The embedding feeds every downstream input directly, so Σ_d EAP-IG(embed -> d) is integrated
    # gradients over the embedding: it tends to m(source) - m(run) as the steps grow; EAP does not.
    m = to64(scaled_model(scale=3.0))
    clean, corrupt, ans, wrong = prompts()
    kw = dict(direction=direction, answer=ans, wrong=wrong)
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    b = np.arange(3)

    def metric(t):
        lg = np.asarray(m(t))[:, -1]
        return lg[b, ans] - lg[b, wrong]

    total = metric(src) - metric(run)
    errs = {}
    for steps in (None, 4, 64):
        r = edges.edge_attribution_patch(m, clean, corrupt, ig_steps=steps, **kw)
        errs[steps] = np.abs(r.per_prompt[0].sum(0) - total).max()
    assert errs[64] < 1e-3 * np.abs(total).max()
    assert errs[64] < errs[4] < errs[None]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_ig_approaches_the_exact_edge_effect(x64, direction):
    # Zero every head's and MLP's output weights: the embedding -> logits edge is then the only
    # edge that carries an effect, and its exact effect is a single path integral.
    m = to64(scaled_model(scale=3.0))
    m.params["blocks"]["W_O"] = m.params["blocks"]["W_O"] * 0
    m.params["blocks"]["W_out"] = m.params["blocks"]["W_out"] * 0
    clean, corrupt, ans, wrong = prompts(positions=(7,))  # nothing moves across positions now
    kw = dict(direction=direction, answer=ans, wrong=wrong)
    exact = edges.exact_edge_patch(m, clean, corrupt, [("embed", "logits"), ("embed", "L1H2.q")], **kw)
    assert np.abs(exact[0]).max() > 1e-2 and np.abs(exact[1]).max() < 1e-12
    g = edges.EdgeGraph.of(m.config)
    j = g.down.index("logits")
    eap = edges.edge_attribution_patch(m, clean, corrupt, **kw).per_prompt[0, j]
    ig = edges.edge_attribution_patch(m, clean, corrupt, ig_steps=64, **kw).per_prompt[0, j]
    assert np.abs(ig - exact[0]).max() < 1e-3 * np.abs(exact[0]).max()
    assert np.abs(eap - exact[0]).max() > 10 * np.abs(ig - exact[0]).max()


def test_eap_is_exact_for_direct_edges_when_the_readout_is_linear(x64):
    from tests.test_attribution import linear_layer_norms

    m = linear_layer_norms(to64(scaled_model(eps=1e12, scale=3.0)))
    clean, corrupt, ans, wrong = prompts()
    g = edges.EdgeGraph.of(m.config)
    ups = ["embed", "L0H1", "L2H3", "MLP1", "MLP2"]
    exact = edges.exact_edge_patch(m, clean, corrupt, [(u, "logits") for u in ups], answer=ans, wrong=wrong)
    est = edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong)
    got = np.stack([est.per_prompt[g.up.index(u), g.down.index("logits")] for u in ups])
    np.testing.assert_allclose(got, exact, rtol=1e-7, atol=1e-10)
    assert np.abs(exact).max() > 1e-3  # the edges carry an effect


def test_exact_edge_patch_of_all_edges_into_the_logits_from_every_node_is_the_whole_patch(x64):
    # Patching every upstream node's edge into the logits at once = replacing the final residual
    # stream with the source's (up to the b_O terms, which are equal in both runs).
    m = to64(scaled_model())
    clean, corrupt, ans, wrong = prompts()
    g = edges.EdgeGraph.of(m.config)
    single = edges.exact_edge_patch(m, clean, corrupt, [(u, "logits") for u in g.up], answer=ans, wrong=wrong)
    assert single.shape == (len(g.up), 3)
    r = edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong)
    assert r.scores().shape == (len(g.up), len(g.down))
    assert np.all(r.scores()[~g.valid] == 0)
    assert len(r.top(5)) == 5


def test_edge_errors():
    m = scaled_model()
    clean, corrupt, ans, wrong = prompts()
    with pytest.raises(jaxpatch.InputError, match="must go forward"):
        edges.exact_edge_patch(m, clean, corrupt, [("L2H0", "L1H0.q")], answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match="Unknown edge endpoint"):
        edges.exact_edge_patch(m, clean, corrupt, [("L9H0", "logits")], answer=ans, wrong=wrong)
    with pytest.raises(jaxpatch.InputError, match="ig_steps"):
        edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong, ig_steps=0)
    with pytest.raises(jaxpatch.InputError, match="piecewise constant"):
        edges.edge_attribution_patch(m, clean, corrupt, answer=ans, metric="rank")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("steps", [None, 3])
def test_edge_estimates_float32_agree_with_float64(direction, steps):
    m = scaled_model(scale=2.0)
    clean, corrupt, ans, wrong = prompts()
    kw = dict(direction=direction, answer=ans, wrong=wrong, ig_steps=steps)
    r32 = edges.edge_attribution_patch(m, clean, corrupt, **kw).scores()
    with jax.enable_x64(True):
        r64 = edges.edge_attribution_patch(to64(m), clean, corrupt, **kw).scores()
    assert np.abs(r64).max() > 1e-4
    np.testing.assert_allclose(r32, r64, atol=1e-4 * np.abs(r64).max(), rtol=0)
