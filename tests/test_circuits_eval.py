"""Circuit evaluation: the full circuit is the clean run and the empty one the corrupted run;
vmapped circuits equal one-at-a-time runs; ablating every edge leaving some nodes equals patching
those nodes' outputs with ordinary hooks; exact edge patching is a special case; errors."""


import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits, edges
from tests.test_attribution import prompts
from tests.test_circuits_path import GPT2, LLAMA, _model

NEOX = jaxpatch.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, n_ctx=16,
                            architecture="gpt_neox", positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                            act_fn="gelu", tied_embeddings=False, unembed_bias=False)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "neox": NEOX}


def _logit_diff(m, t, ans, wrong, ivs=None):
    lg = np.asarray(m(t, ivs))[:, -1]
    b = np.arange(len(ans))
    return lg[b, ans] - lg[b, wrong]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_circuits_full_empty_nodes_and_loop(family):
    # One vectorised call (chunks of 2) of: the full circuit (= the clean run), the empty circuit
    # (= the corrupted run), every edge but those leaving L0H1 and MLP1 (= the clean run with
    # L0H1's z and MLP1's output patched from the corrupted run by ordinary hooks), and random
    # circuits, each also run alone. Float32: tolerances are 1e-5 of the logits' scale.
    m = _model(CONFIGS[family])
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    g = edges.EdgeGraph.of(m.config)
    keep = g.valid.copy()
    for u in ("L0H1", "MLP1"):
        keep[g.up.index(u)] = False
    rng = np.random.default_rng(0)
    rand = [g.valid & (rng.random(g.valid.shape) < p) for p in (0.5, 0.9)]
    masks = np.stack([g.valid, np.zeros_like(g.valid), keep] + rand)
    r = circuits.evaluate_circuit(m, clean, corrupt, masks, answer=ans, wrong=wrong, chunk_size=2,
                                  labels=["full", "empty", "keep", "r0", "r1"])
    assert r.info["chunk_size"] == 2
    c, k = _logit_diff(m, clean, ans, wrong), _logit_diff(m, corrupt, ans, wrong)
    assert np.abs(c - k).max() > 0.05  # the corruption matters
    tol = 1e-5 * max(1.0, np.abs(c).max())
    np.testing.assert_allclose(r.per_prompt[0, 0], c, atol=tol, rtol=0)
    np.testing.assert_allclose(r.per_prompt[1, 0], k, atol=tol, rtol=0)
    np.testing.assert_allclose(r.faithfulness()[:2], [1.0, 0.0], atol=1e-4)
    _, cc = m.run(corrupt, capture={"blocks.attn.hook_z", "blocks.hook_mlp_out"})
    ivs = (m.replace("blocks.0.attn.hook_z", cc["blocks.attn.hook_z"][0], head=1)
           + m.replace("blocks.1.hook_mlp_out", cc["blocks.hook_mlp_out"][1]))
    want = _logit_diff(m, clean, ans, wrong, ivs)
    assert np.abs(want - c).max() > 1e-3
    np.testing.assert_allclose(r.per_prompt[2, 0], want, atol=tol, rtol=0)
    if family == "gpt2":  # the slow twin (one more compile per family; GQA and parallel share the code)
        from jaxpatch.circuits import _engine

        n = _engine.masked_sweep._cache_size()
        again = circuits.evaluate_circuit(m, clean, corrupt, masks[::-1], answer=ans, wrong=wrong, chunk_size=2)
        assert _engine.masked_sweep._cache_size() == n  # other circuits are data: no recompilation
        np.testing.assert_allclose(again.per_prompt[::-1], r.per_prompt, atol=tol, rtol=0)
        for i in (3, 4):
            one = circuits.evaluate_circuit(m, clean, corrupt, masks[i], answer=ans, wrong=wrong)
            np.testing.assert_allclose(r.per_prompt[i], one.per_prompt[0], atol=tol, rtol=0)
    assert np.ptp(r.values()) > 1e-2  # different circuits give different answers
    assert list(r.n_edges[:2]) == [g.valid.sum(), 0] and r.n_valid == g.valid.sum()
    assert list(r.to_dataframe()["circuit"]) == ["full", "empty", "keep", "r0", "r1"]


def test_node_circuits_and_mean_ablation():
    m = _model(GPT2)
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    c = circuits.circuit_from_nodes(m.config, ["embed", "L0H1", "MLP1", "L2H3"])
    g = edges.EdgeGraph.of(m.config)
    assert c[g.up.index("embed"), g.down.index("L2H3.k")] and c[g.up.index("L0H1"), g.down.index("MLP1.in")]
    assert c[g.up.index("MLP1"), g.down.index("logits")] and not c[g.up.index("L0H1"), g.down.index("L2H2.q")]
    assert not c[g.up.index("L0H2")].any()
    kw = {"answer": ans, "wrong": wrong}
    r = circuits.evaluate_circuit(m, clean, corrupt, [g.valid, c, np.zeros_like(c)], ablation="mean", **kw)
    assert r.ablation == "mean"
    np.testing.assert_allclose(r.per_prompt[0, 0], _logit_diff(m, clean, ans, wrong), atol=1e-4)
    np.testing.assert_allclose(r.per_prompt[2], r.ablated, atol=1e-5)  # the empty circuit is the baseline
    np.testing.assert_allclose(r.faithfulness()[[0, 2]], [1.0, 0.0], atol=1e-4)
    # GQA: a key/value head belongs to every query head of its group
    cl = circuits.circuit_from_nodes(LLAMA, ["embed", "L1H3"])
    gl = edges.EdgeGraph.of(LLAMA)
    assert cl[0, gl.down.index("L1KV1.k")] and not cl[0, gl.down.index("L1KV0.k")] and cl[0, gl.down.index("L1H3.q")]
