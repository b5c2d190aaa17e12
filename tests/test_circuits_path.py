"""Path patching against a hand-built two-step computation (Wang et al. 2022) made only of ordinary
hooks: (1) run with every head's z and every MLP's output frozen to the run's values except the
senders' (source values), record each receiver's q/k/v or MLP pre-activations or the final
residual stream; (2) run again with those replaced. Both directions, q/k/v/MLP/logit receivers,
GPT-2 and a Llama-style grouped-query rotary model; the embedded induction model's
previous-token -> induction-key path; errors."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits, data, models
from tests.test_attribution import prompts, to64

LLAMA = jaxpatch.ModelConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=61, n_ctx=16,
                             architecture="llama", n_kv_heads=2, positional="rotary", norm="rmsnorm", gated_mlp=True,
                             act_fn="silu", qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False,
                             tied_embeddings=False)
GPT2 = jaxpatch.ModelConfig.gpt2(n_layers=3, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)


@functools.cache
def _params(cfg, scale):
    # built once per process, as float32 NumPy arrays (eager initialisation is slow, and it
    # recompiles under x64)
    params = jax.jit(models.init_params, static_argnums=(0, 2))(cfg, jax.random.PRNGKey(1), jnp.float32)
    return jax.tree_util.tree_map(lambda a: np.asarray(a * scale if a.ndim >= 2 else a, np.float32), params)


def _model(cfg, scale=3.0):
    return jaxpatch.HookedModel(cfg, jax.tree_util.tree_map(jnp.asarray, _params(cfg, scale)))


def _parse_sender(name):
    if name == "embed":
        return ("embed",)
    if name.startswith("MLP"):
        return ("mlp", int(name[3:]))
    layer, head = name[1:].split("H")
    return ("head", int(layer), int(head))


def reference(m, run, src, senders, receivers, ans, wrong):
    """The hand-built path-patching value (logit_diff per prompt) of one (senders, receivers) pair.
    Every call has the same intervention structure (selections are masks), so it compiles once."""
    cfg = m.config
    L, N, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    cap = {"blocks.attn.hook_z", "blocks.hook_mlp_out", "hook_embed"}
    _, rc = m.run(run, capture=cap)
    _, sc = m.run(src, capture=cap)
    zmask, mmask, emb = np.zeros((L, N), bool), np.zeros(L, bool), False
    for s in senders:
        p = _parse_sender(s)
        if p[0] == "head":
            zmask[p[1], p[2]] = True
        elif p[0] == "mlp":
            mmask[p[1]] = True
        else:
            emb = True
    # step 1: every head's z and MLP's output frozen to the run's, the senders' to the source's
    z = jnp.where(jnp.asarray(zmask)[:, None, None, :, None], sc["blocks.attn.hook_z"], rc["blocks.attn.hook_z"])
    mo = jnp.where(jnp.asarray(mmask)[:, None, None, None], sc["blocks.hook_mlp_out"], rc["blocks.hook_mlp_out"])
    ivs = (m.replace("blocks.attn.hook_z", z) + m.replace("blocks.hook_mlp_out", mo)
           + m.replace("hook_embed", sc["hook_embed"] if emb else rc["hook_embed"]))
    pre = ("blocks.mlp.hook_pre", "blocks.mlp.hook_pre_linear") if cfg.gated_mlp else ("blocks.mlp.hook_pre",)
    _, step1 = m.run(run, ivs, capture={"blocks.attn.hook_q", "blocks.attn.hook_k", "blocks.attn.hook_v",
                                        "blocks.hook_resid_post", *pre})
    # step 2: each receiver's activation replaced by its step-1 value
    sel = {"q": np.zeros((L, N), bool), "k": np.zeros((L, K), bool), "v": np.zeros((L, K), bool)}
    mlp, final = np.zeros(L, bool), np.zeros(L, bool)
    for r in receivers:
        if r == "logits":
            final[L - 1] = True
        elif r.endswith(".in"):
            mlp[int(r[3:-3])] = True
        else:
            node, kind = r.split(".")
            layer, head = (int(x) for x in node[1:].split("KV" if "KV" in node else "H"))
            sel[kind][layer, head] = True
    ivs2 = m.replace("blocks.hook_resid_post", step1["blocks.hook_resid_post"], mask=final[:, None, None, None])
    for kind in "qkv":
        site = f"blocks.attn.hook_{kind}"
        ivs2 = ivs2 + m.replace(site, step1[site], mask=sel[kind][:, None, None, :, None])
    for site in pre:
        ivs2 = ivs2 + m.replace(site, step1[site], mask=mlp[:, None, None, None])
    lg = np.asarray(m(run, ivs2))[:, -1]
    b = np.arange(len(ans))
    return lg[b, ans] - lg[b, wrong]


CASES = {
    "gpt2": (GPT2, ["L0H1", "MLP0", "embed", ("L0H2", "L1H3")],
             ["L1H0.q", "L2H1.k", "L2H3.v", "MLP1.in", "logits", ("L1H3.q", "L2H0.k", "MLP2.in")]),
    "llama": (LLAMA, ["L0H1", "MLP0", "embed", ("L0H2", "L1H3")],
              ["L1H0.q", "L2KV1.k", "L2KV0.v", "MLP1.in", "logits", ("L1H3.q", "L2KV0.k", "MLP2.in")]),
}


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("family", list(CASES))
def test_path_patch_equals_the_hand_built_two_step_computation(x64, family, direction):
    cfg, senders, receivers = CASES[family]
    m = to64(_model(cfg))
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    res = circuits.path_patch(m, clean, corrupt, senders=senders, receivers=receivers, direction=direction,
                              answer=ans, wrong=wrong, invalid="nan")
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    assert res.axes == ("sender", "receiver") and res.shape == (len(senders), len(receivers))
    valid = res.info["valid"]
    # (L0H2+L1H3) -> L1H0.q and -> the set with L1H3.q read at or before layer 1's heads write
    assert valid.sum() == len(senders) * len(receivers) - 2 and not valid[3, 0] and not valid[3, 5]
    base = reference(m, run, src, [], [], ans, wrong)  # nothing patched: the run itself
    effects = []
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            got = res.per_prompt[i, j, 0]
            if not valid[i, j]:
                assert np.all(np.isnan(got))
                continue
            want = reference(m, run, src, [s] if isinstance(s, str) else list(s), [r] if isinstance(r, str) else list(r),
                             ans, wrong)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10, err_msg=f"{s} -> {r}")
            effects.append(np.abs(want - base).max())
    # the paths move the metric (so the comparison can fail); a few are exactly 0, e.g. embed -> logits
    # (the corrupted tokens are not at the answer position)
    assert np.mean(np.asarray(effects) > 1e-6) > 0.8 and max(effects) > 1e-2


def test_chunked_pairs_equal_one_chunk(x64):
    cfg, senders, receivers = CASES["gpt2"]  # as above: the one-chunk program is already compiled
    m = to64(_model(cfg))
    clean, corrupt, ans, wrong = prompts(positions=(2, 5))
    kw = {"senders": senders, "receivers": receivers, "answer": ans, "wrong": wrong, "invalid": "nan"}
    a = circuits.path_patch(m, clean, corrupt, chunk_size=5, **kw)
    b = circuits.path_patch(m, clean, corrupt, **kw)
    assert a.info["chunk_size"] == 5 and b.info["chunk_size"] == a.info["n_pairs"] == 22
    np.testing.assert_allclose(a.per_prompt, b.per_prompt, rtol=1e-12, atol=1e-13)
    # other senders and receivers of the same counts are data: no new compilation
    core = sys.modules["jaxpatch.circuits.path_patch"]._pairs_core
    n = core._cache_size()
    c = circuits.path_patch(m, clean, corrupt, senders=["L0H0", "MLP0", "L0H3", ("L0H1", "L1H2")],
                            receivers=["L1H1.q", "L2H2.k", "L2H0.v", "MLP2.in", "logits", ("L1H0.q", "L2H3.k", "MLP1.in")],
                            answer=ans, wrong=wrong, invalid="nan")
    assert c.info["n_pairs"] == 22 and core._cache_size() == n


def test_previous_token_head_to_induction_key_is_the_strongest_path(tmp_path):
    m = data.load_default_model()
    task = data.load_task()
    clean, corrupt, ans, wrong = data.induction_prompts(16, seed=1)
    prev, ind = "L{}H{}".format(*task["prev_token_head"]), "L{}H{}".format(*task["induction_head"])
    senders = ["embed", "L0H0", "L0H1", "MLP0"]
    receivers = [f"L1H{h}.{k}" for h in range(2) for k in "qkv"] + ["MLP1.in", "logits"]
    for direction in ("denoise", "noise"):
        r = circuits.path_patch(m, clean, corrupt, senders=senders, receivers=receivers, direction=direction,
                                answer=ans, wrong=wrong)
        v = np.abs(r.normalized())
        i, j = np.unravel_index(np.argmax(v), v.shape)
        assert (r.labels["sender"][i], r.labels["receiver"][j]) == (prev, f"{ind}.k"), direction
        assert v[i, j] > 0.3 and v[i, j] > 1.5 * np.sort(v.ravel())[-2]
    # a path grid is an ordinary PatchResult: saved, loaded and plotted like any sweep
    from jaxpatch import plots, results_io

    written = results_io.save_result(r, tmp_path / "paths")
    back = results_io.load_result(written["npz"])
    np.testing.assert_array_equal(back.per_prompt, r.per_prompt)
    assert back.labels == r.labels and back.axes == ("sender", "receiver")
    fig = plots.plot_result(r)
    assert fig.axes[0].get_xlabel() == "receiver"
    plots._pyplot().close(fig)


def test_path_patch_errors():
    m = _model(GPT2)
    clean, corrupt, ans, wrong = prompts()
    kw = {"answer": ans, "wrong": wrong}
    with pytest.raises(jaxpatch.InputError, match="at or before its sender's layer"):
        circuits.path_patch(m, clean, corrupt, senders=["L1H0"], receivers=["L1H2.q"], **kw)
    with pytest.raises(jaxpatch.InputError, match="at or before its sender's layer"):
        circuits.path_patch(m, clean, corrupt, senders=["L2H0"], receivers=["L1H2.k"], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"Unknown sender 'MPL1'.*Did you mean 'MLP1'"):
        circuits.path_patch(m, clean, corrupt, senders=["MPL1"], receivers=["L2H2.q"], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"Unknown receiver 'L1H2\.kk'.*Did you mean 'L1H2\.k'"):
        circuits.path_patch(m, clean, corrupt, senders=["L0H1"], receivers=["L1H2.kk"], **kw)
    with pytest.raises(jaxpatch.InputError, match="Empty sender set"):
        circuits.path_patch(m, clean, corrupt, senders=[], receivers=["L1H2.q"], **kw)
    with pytest.raises(jaxpatch.InputError, match="Empty sender set"):
        circuits.path_patch(m, clean, corrupt, senders=[()], receivers=["L1H2.q"], **kw)
    with pytest.raises(jaxpatch.InputError, match="Empty receiver set"):
        circuits.path_patch(m, clean, corrupt, senders=["L0H1"], receivers=[], **kw)
    with pytest.raises(jaxpatch.InputError, match="direction"):
        circuits.path_patch(m, clean, corrupt, senders=["L0H1"], receivers=["logits"], direction="both", **kw)
    with pytest.raises(jaxpatch.InputError, match="lists"):
        circuits.path_patch(m, clean, corrupt, senders="L0H1", receivers=["logits"], **kw)
    # parallel attention + MLP: a layer's MLP does not read its own heads
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=61, n_ctx=16, parallel_attn_mlp=True)
    mp = jaxpatch.HookedModel(cfg, m.params)  # names are checked before any weight is read
    with pytest.raises(jaxpatch.InputError, match="at or before its sender's layer"):
        circuits.path_patch(mp, clean, corrupt, senders=["L0H1"], receivers=["MLP0.in"], **kw)
