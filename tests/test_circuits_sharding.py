"""Circuit methods split their circuits / pairs over several devices (8 simulated CPU devices in
the tests): results equal one device; counts that do not divide the devices are padded."""

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits, edges
from tests.test_attribution import prompts
from tests.test_circuits_path import GPT2, _model

pytestmark = pytest.mark.skipif(len(jax.local_devices()) < 2, reason="needs several devices (conftest simulates 8 CPUs)")


def test_sharded_circuits_and_paths_equal_one_device():
    m = _model(GPT2)
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    g = edges.EdgeGraph.of(m.config)
    rng = np.random.default_rng(0)
    masks = np.stack([g.valid & (rng.random(g.valid.shape) < p) for p in (0.1, 0.3, 0.5, 0.7, 0.9)])  # 5: padded
    kw = {"answer": ans, "wrong": wrong}
    one = circuits.evaluate_circuit(m, clean, corrupt, masks, **kw)
    many = circuits.evaluate_circuit(m, clean, corrupt, masks, mesh="auto", **kw)
    np.testing.assert_allclose(many.per_prompt, one.per_prompt, atol=1e-5, rtol=0)  # float32
    assert np.ptp(one.values()) > 1e-2
    pp = {"senders": ["L0H1", "MLP0", "embed"], "receivers": ["L1H0.q", "L2H1.k", "MLP1.in"], **kw}
    p1 = circuits.path_patch(m, clean, corrupt, **pp)
    p8 = circuits.path_patch(m, clean, corrupt, mesh="auto", **pp)
    np.testing.assert_allclose(p8.per_prompt, p1.per_prompt, atol=1e-5, rtol=0)
    with pytest.raises(jaxpatch.InputError, match="mesh"):
        circuits.evaluate_circuit(m, clean, corrupt, masks, mesh="all", **kw)
    bad = jax.sharding.Mesh(np.array(jax.local_devices()[:2]), ("data",))
    with pytest.raises(jaxpatch.InputError, match="axis 'sweep'"):
        circuits.path_patch(m, clean, corrupt, mesh=bad, **pp)
