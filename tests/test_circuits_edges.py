"""Circuit evaluation errors, and exact edge patching as a special case of the masked forward."""

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits, edges
from tests.test_attribution import prompts
from tests.test_circuits_path import GPT2, _model


def test_circuit_errors():
    m = _model(GPT2)
    clean, corrupt, ans, wrong = prompts()
    g = edges.EdgeGraph.of(m.config)
    kw = {"answer": ans, "wrong": wrong}
    with pytest.raises(jaxpatch.InputError, match="not (edges of|in) the residual graph"):
        circuits.evaluate_circuit(m, clean, corrupt, [[("L2H0", "L1H0.q"), ("L0H0", "logits")]], **kw)
    with pytest.raises(jaxpatch.InputError, match="not (edges of|in) the residual graph"):
        circuits.evaluate_circuit(m, clean, corrupt, np.ones_like(g.valid), **kw)
    with pytest.raises(jaxpatch.InputError, match=r"Unknown downstream node 'L1H0\.z'.*Did you mean .*'L1H0\.q'"):
        circuits.evaluate_circuit(m, clean, corrupt, [[("L0H0", "L1H0.z")]], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"Unknown upstream node 'embd'.*'embed'"):
        circuits.circuit_mask(g, [("embd", "logits")])
    with pytest.raises(jaxpatch.InputError, match="shape"):
        circuits.evaluate_circuit(m, clean, corrupt, np.ones((3, 4), bool), **kw)
    with pytest.raises(jaxpatch.InputError, match="boolean"):
        circuits.evaluate_circuit(m, clean, corrupt, g.valid.astype(int), **kw)
    with pytest.raises(jaxpatch.InputError, match="Unknown node 'L9H0'"):
        circuits.circuit_from_nodes(m.config, ["L9H0"])
    with pytest.raises(jaxpatch.InputError, match="ablation"):
        circuits.evaluate_circuit(m, clean, corrupt, g.valid, ablation="ones", **kw)
    with pytest.raises(jaxpatch.InputError, match="corrupt_tokens"):
        circuits.evaluate_circuit(m, clean, None, g.valid, **kw)
    with pytest.raises(jaxpatch.InputError, match="labels"):
        circuits.evaluate_circuit(m, clean, corrupt, g.valid, labels=["a", "b"], **kw)


def test_exact_edge_patch_is_a_special_case_of_the_masked_forward(x64):
    # edges.exact_edge_patch runs through the circuit engine; its former one-delta-per-edge
    # program (edges._exact_core) is the slow twin.
    from tests.test_attribution import to64

    m = to64(_model(GPT2))
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    pairs = [("embed", "L1H0.q"), ("L0H1", "L2H2.k"), ("MLP0", "MLP2.in"), ("L1H3", "MLP1.in"), ("L2H0", "logits")]
    for direction in ("denoise", "noise"):
        new = edges.exact_edge_patch(m, clean, corrupt, pairs, direction=direction, answer=ans, wrong=wrong)
        names, run, src, ctx = edges._setup(m, clean, corrupt, "logit_diff", ans, wrong, -1, direction)
        g = edges.EdgeGraph.of(m.config)
        u = jax.numpy.asarray([g.up.index(a) for a, _ in pairs])
        v = jax.numpy.asarray([g.down.index(b) for _, b in pairs])
        old = np.asarray(edges._exact_core(m.config, m.params, run, src, ctx, u, v, names=names))
        assert np.abs(old).max() > 1e-3
        np.testing.assert_allclose(new, old, rtol=1e-9, atol=1e-11)


def test_post_norm_family_circuits_and_paths():
    # Gemma 2 style (post-norms, GQA, rotary, soft-caps, sliding windows): heads' writes pass through
    # the post-attention norm at each run's own scale (models.head_writes), so circuits stay exact:
    # the full circuit is the clean run, the empty one the corrupted run; a single path equals the
    # former one-delta-per-edge program (edges._exact_core) on the same edge.
    from tests.test_edges_post_norm import _cfg
    from tests.test_edges_post_norm import _model as _pn_model

    m = _pn_model(_cfg())
    clean, corrupt, ans, wrong = prompts(d_vocab=30, T=8, positions=(2, 5))
    g = edges.EdgeGraph.of(m.config)
    r = circuits.evaluate_circuit(m, clean, corrupt, [g.valid, np.zeros_like(g.valid)], answer=ans, wrong=wrong)
    b = np.arange(3)

    def ld(t):
        lg = np.asarray(m(t))[:, -1]
        return lg[b, ans] - lg[b, wrong]

    c, k = ld(clean), ld(corrupt)
    assert np.abs(c - k).max() > 1e-2
    np.testing.assert_allclose(r.per_prompt[:, 0], np.stack([c, k]), atol=3e-5, rtol=0)  # float32
    pairs = [("L0H1", "L1H2.q"), ("MLP0", "L2KV1.k"), ("L1H3", "logits"), ("embed", "MLP1.in")]
    p = circuits.path_patch(m, clean, corrupt, senders=[a for a, _ in pairs], receivers=[d for _, d in pairs],
                            answer=ans, wrong=wrong, invalid="nan")
    names, run, src, ctx = edges._setup(m, clean, corrupt, "logit_diff", ans, wrong, -1, "denoise")
    u = jax.numpy.asarray([g.up.index(a) for a, _ in pairs])
    v = jax.numpy.asarray([g.down.index(d) for _, d in pairs])
    old = np.asarray(edges._exact_core(m.config, m.params, run, src, ctx, u, v, names=names))
    base = p.corrupt[0]
    got = np.stack([p.per_prompt[i, i, 0] - base for i in range(len(pairs))])
    assert np.abs(old).max() > 1e-3
    np.testing.assert_allclose(got, old, atol=3e-5, rtol=0)
