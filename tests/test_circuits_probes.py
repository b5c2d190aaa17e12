"""AND/OR probes and backup behaviour on hand-built models whose logic is known exactly.

Every prompt repeats one token, so all positions agree and uniform attention (zero W_Q, W_K)
makes each head a linear map of its own position's stream; RMSNorms are identities (epsilon
1e12, weight 1e6). Token 1 turns features on (clean), token 0 leaves them off (corrupted); the
metric reads one residual dimension through the unembedding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits

T_A, T_B, A, B, ONE, OUT = range(6)  # residual dimensions


def _blank(n_layers, n_heads):
    cfg = jaxpatch.ModelConfig(n_layers=n_layers, d_model=8, n_heads=n_heads, d_head=4, d_mlp=4, d_vocab=4, n_ctx=8,
                               act_fn="relu", norm="rmsnorm", eps=1e12, qkv_bias=False, o_bias=False, mlp_bias=False,
                               unembed_bias=False, tied_embeddings=False)
    m = jaxpatch.HookedModel.from_config(cfg)
    p = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32), m.params)
    p["blocks"]["ln1_w"][:] = 1e6
    p["blocks"]["ln2_w"][:] = 1e6
    p["ln_f_w"][:] = 1e6
    p["W_E"][1, [T_A, T_B]] = 1.0  # token 1: both features on
    p["W_E"][:, ONE] = 1.0  # a constant dimension (an MLP bias)
    p["W_U"][OUT, 2] = 1.0  # metric: logit of token 2 - logit of token 3 = the OUT dimension
    return m, p


def _finish(m, p):
    m.params = jax.tree_util.tree_map(jnp.asarray, p)
    return m


def _prompts():
    clean, corrupt = np.ones((2, 5), np.int32), np.zeros((2, 5), np.int32)
    return clean, corrupt, {"answer": 2, "wrong": 3}


def gate_model(kind):
    """Head L0H0 writes A = [token 1], head L0H1 writes B = [token 1]; MLP0 computes OUT = 4 (A AND B)
    = 4 relu(A + B - 1), or OUT = 4 (A OR B) = 4 (relu(A + B) - relu(A + B - 1)), or OUT = 2 (A + B)."""
    m, p = _blank(1, 2)
    blk = p["blocks"]
    blk["W_V"][0, 0, T_A, 0] = 1.0
    blk["W_O"][0, 0, 0, A] = 1.0
    blk["W_V"][0, 1, T_B, 0] = 1.0
    blk["W_O"][0, 1, 0, B] = 1.0
    if kind == "and":
        blk["W_in"][0, [A, B, ONE], 0] = [1.0, 1.0, -1.0]
        blk["W_out"][0, 0, OUT] = 4.0
    elif kind == "or":
        blk["W_in"][0, [A, B], 0] = 1.0
        blk["W_in"][0, [A, B, ONE], 1] = [1.0, 1.0, -1.0]
        blk["W_out"][0, 0, OUT], blk["W_out"][0, 1, OUT] = 4.0, -4.0
    else:  # additive
        blk["W_in"][0, [A, B], 0] = 1.0
        blk["W_out"][0, 0, OUT] = 2.0
    return _finish(m, p)


def backup_model(beta):
    """L0H0 writes OUT = [token 1]; the backup head L1H0 writes beta ([token 1] - OUT): it is silent
    while L0H0 works and restores a fraction beta of L0H0's write when L0H0 is ablated."""
    m, p = _blank(2, 1)
    blk = p["blocks"]
    blk["W_V"][0, 0, T_A, 0] = 1.0
    blk["W_O"][0, 0, 0, OUT] = 1.0
    blk["W_V"][1, 0, T_A, 0], blk["W_V"][1, 0, OUT, 0] = beta, -beta
    blk["W_O"][1, 0, 0, OUT] = 1.0
    return _finish(m, p)


@pytest.mark.parametrize("kind,verdict", [("and", "AND"), ("or", "OR"), ("sum", "neither")])
def test_known_gates_are_classified(kind, verdict):
    m = gate_model(kind)
    clean, corrupt, kw = _prompts()
    r = circuits.and_or_probe(m, clean, corrupt, ["L0H0", "L0H1"], **kw)
    assert r.verdict == verdict, r.summary()
    want = {"and": ([1, 1], 1, [0, 0], 1), "or": ([0, 0], 1, [1, 1], 1), "sum": ([0.5, 0.5], 1, [0.5, 0.5], 1)}[kind]
    got = (r.noise_single, r.noise_joint, r.denoise_single, r.denoise_joint)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert r.groups == ["L0H0", "L0H1"] and "noising alone" in r.summary()


def test_probe_groups_may_be_sets_and_errors():
    m = gate_model("and")
    clean, corrupt, kw = _prompts()
    r = circuits.and_or_probe(m, clean, corrupt, [["L0H0", "embed"], "L0H1"], **kw)
    assert r.groups == ["L0H0+embed", "L0H1"]
    with pytest.raises(jaxpatch.InputError, match="at least 2"):
        circuits.and_or_probe(m, clean, corrupt, ["L0H0"], **kw)
    with pytest.raises(jaxpatch.InputError, match="overlap"):
        circuits.and_or_probe(m, clean, corrupt, [["L0H0", "L0H1"], "L0H1"], **kw)
    with pytest.raises(jaxpatch.InputError, match="Did you mean 'L0H1'"):
        circuits.and_or_probe(m, clean, corrupt, ["L0H0", "L0H1x"], **kw)
    with pytest.raises(jaxpatch.InputError, match="Empty component set"):
        circuits.and_or_probe(m, clean, corrupt, ["L0H0", []], **kw)


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_backup_head_shows_itself(beta):
    m = backup_model(beta)
    clean, corrupt, kw = _prompts()
    r = circuits.backup_probe(m, clean, corrupt, "L0H0", "L1H0", **kw)
    np.testing.assert_allclose([r.total_a, r.total_b, r.total_both, r.direct_a, r.direct_b],
                               [1 - beta, 0.0, 1.0, 1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose([r.self_repair_a, r.interaction], [beta, beta], atol=1e-5)
    assert "self-repair" in r.summary()
    with pytest.raises(jaxpatch.InputError, match="ablation"):
        circuits.backup_probe(m, clean, corrupt, "L0H0", "L1H0", ablation="ones", **kw)


def test_trained_paper_gates_and_backup():
    # The models trained by examples/train_paper_models.py (jaxpatch.data.gates): the probes read
    # their known circuits; zero-ablation effects equal zero-ablating each head's z by hooks.
    from jaxpatch.data import gates

    clean, corrupt, ans, wrong = gates.gate_prompts(16)
    kw = {"answer": ans, "wrong": wrong}
    for name, verdict in (("and_gate", "AND"), ("or_gate", "OR")):
        r = circuits.and_or_probe(gates.load_gate(name), clean, corrupt, ["L0H0", "L0H1"], **kw)
        assert r.verdict == verdict, r.summary()
    m = gates.load_gate("backup")
    b = circuits.backup_probe(m, clean, corrupt, "L0H0", "L1H0", ablation="zero", **kw)
    assert abs(b.total_a) < 0.05 and abs(b.total_b) < 0.05 and b.total_both > 0.2 and b.interaction > 0.2, b.summary()
    z = jaxpatch.activation_patch(m, clean, corrupt, site="z", direction="noise", baseline="zero", **kw).normalized()
    np.testing.assert_allclose([b.total_a, b.total_b], [z[0, 0], z[1, 0]], atol=1e-4)
    full = circuits.evaluate_circuit(m, clean, corrupt, circuits.circuit_from_nodes(m.config, ["embed", "L0H0", "L1H0",
                                                                                               "MLP0", "MLP1"]),
                                     ablation="zero", **kw)
    np.testing.assert_allclose(full.faithfulness(), [1.0], atol=1e-4)  # every node kept: the clean run
