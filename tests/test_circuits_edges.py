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
        circuits.evaluate_circuit(m, clean, corrupt, g.valid, ablation="zero", **kw)
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
