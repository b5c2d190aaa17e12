"""Path patching on a post-norm family (Gemma 2 style: ``ln1_post``/``ln2_post``, grouped-query
rotary attention, soft-capping, a sliding window) against a hand-built computation made only of
the model's own sites and ordinary hook interventions, not of jaxpatch's edge program.

Path patching's definition (``jaxpatch.circuits.path_patch``): a sender's write is its exactly
additive contribution to the residual stream; with post-norms a head's write is its result passed
through the post-attention norm at the scale its own run computed. By hand:

* the writes: a head's from ``attn.hook_result``, ``ln1_post.hook_scale`` and ``ln1_post_w``
  (RMSNorm: ``result / scale * w``); an MLP's is its ``hook_mlp_out`` (after ``ln2_post``); the
  embedding's is the stream entering block 0;
* forward 1 (the run's prompt): every layer's ``hook_attn_out`` and ``hook_mlp_out`` frozen to the
  run's values plus the senders' write differences (source - run), the embedding's difference
  added to the stream entering block 0; the receivers' activations recorded;
* forward 2 (the run's prompt): only the receiver's activation (its query or value projection, the
  MLP's pre-activations, or the final residual stream) replaced by its forward-1 value; everything
  else recomputed. Its logit difference is the pair's value.
"""

import numpy as np
import pytest

from jaxpatch import circuits
from tests.test_edges_post_norm import _cfg, _model

# float32 jaxpatch vs a float32 hand-built twin (different op order, a softcapped head and final
# logits): absolute, relative to the largest |logit difference| (at least 1)
TOL = 1e-5  # observed: 1.5e-7 (both directions); a 1% error in one head's write moves a value by 3e-4

SENDERS = ["embed", "L0H1", "MLP0", ("L0H2", "L0H3")]
RECEIVERS = ["L1H1.q", "L2KV0.v", "MLP1.in", "logits"]


def _prompts():
    """Two prompts of 6 tokens differing at position 4: inside every sliding window (3) that the
    answer position 5 reads, so every path can carry the difference."""
    rng = np.random.default_rng(5)
    clean = rng.integers(1, 30, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 4] = (corrupt[:, 4] + 11) % 30
    return clean, corrupt, np.array([3, 4]), np.array([7, 9])


def _writes(m, tokens):
    """Per-layer hand-built writes: heads ``[L, B, T, N, D]``, MLPs ``[L, B, T, D]``, the embedding
    ``[B, T, D]``, and the run's attention/MLP outputs."""
    cfg = m.config
    assert cfg.post_norms and cfg.norm == "rmsnorm" and not cfg.o_bias
    _, c = m.run(tokens, capture={"blocks.attn.hook_result", "blocks.ln1_post.hook_scale", "blocks.hook_attn_out",
                                  "blocks.hook_mlp_out", "blocks.hook_resid_pre"})
    r = np.asarray(c["blocks.attn.hook_result"], np.float32)  # [L, B, T, N, D]
    s = np.asarray(c["blocks.ln1_post.hook_scale"], np.float32)  # [L, B, T, 1]
    w = np.asarray(m.params["blocks"]["ln1_post_w"], np.float32)  # [L, D]
    heads = r / s[:, :, :, :, None] * w[:, None, None, None, :]
    return {"heads": heads, "mlp": np.asarray(c["blocks.hook_mlp_out"]), "embed": np.asarray(c["blocks.hook_resid_pre"][0]),
            "attn_out": np.asarray(c["blocks.hook_attn_out"])}


def _parse(name):
    if name == "embed":
        return ("embed",)
    if name.startswith("MLP"):
        return ("mlp", int(name[3:]))
    layer, head = name[1:].split("H")
    return ("head", int(layer), int(head))


def _logit_diff(logits, ans, wrong):
    lg = np.asarray(logits)[:, -1]
    b = np.arange(len(ans))
    return lg[b, ans] - lg[b, wrong]


def hand_built(m, run, src, senders, receiver, ans, wrong, w_run, w_src):
    cfg = m.config
    L, N, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    attn = w_run["attn_out"].copy()
    mlp = w_run["mlp"].copy()
    emb = np.zeros_like(w_run["embed"])
    for s in senders:
        p = _parse(s)
        if p[0] == "head":
            attn[p[1]] += w_src["heads"][p[1], :, :, p[2]] - w_run["heads"][p[1], :, :, p[2]]
        elif p[0] == "mlp":
            mlp[p[1]] = w_src["mlp"][p[1]]
        else:
            emb = w_src["embed"] - w_run["embed"]
    ivs1 = (m.replace("blocks.hook_attn_out", attn) + m.replace("blocks.hook_mlp_out", mlp)
            + m.add("blocks.0.hook_resid_pre", emb))
    sites = ("blocks.attn.hook_q", "blocks.attn.hook_v", "blocks.mlp.hook_pre", "blocks.mlp.hook_pre_linear",
             "blocks.hook_resid_post")
    _, step1 = m.run(run, ivs1, capture=set(sites))
    # forward 2: the receiver's activation only (selections are masks: one compiled program)
    q, v, mlp_in, final = np.zeros((L, N), bool), np.zeros((L, K), bool), np.zeros(L, bool), np.zeros(L, bool)
    if receiver == "logits":
        final[L - 1] = True
    elif receiver.endswith(".in"):
        mlp_in[int(receiver[3:-3])] = True
    elif receiver.endswith(".q"):
        layer, head = (int(x) for x in receiver[1:-2].split("H"))
        q[layer, head] = True
    else:
        assert receiver.endswith(".v")
        layer, head = (int(x) for x in receiver[1:-2].split("KV"))
        v[layer, head] = True
    ivs2 = (m.replace("blocks.attn.hook_q", step1["blocks.attn.hook_q"], mask=q[:, None, None, :, None])
            + m.replace("blocks.attn.hook_v", step1["blocks.attn.hook_v"], mask=v[:, None, None, :, None])
            + m.replace("blocks.mlp.hook_pre", step1["blocks.mlp.hook_pre"], mask=mlp_in[:, None, None, None])
            + m.replace("blocks.mlp.hook_pre_linear", step1["blocks.mlp.hook_pre_linear"], mask=mlp_in[:, None, None, None])
            + m.replace("blocks.hook_resid_post", step1["blocks.hook_resid_post"], mask=final[:, None, None, None]))
    return _logit_diff(m(run, ivs2), ans, wrong)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_post_norm_path_patch_equals_the_hand_built_computation(direction):
    m = _model(_cfg())
    clean, corrupt, ans, wrong = _prompts()
    res = circuits.path_patch(m, clean, corrupt, senders=SENDERS, receivers=RECEIVERS, direction=direction,
                              answer=ans, wrong=wrong)
    assert res.info["valid"].all() and res.shape == (len(SENDERS), len(RECEIVERS))
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    w_run, w_src = _writes(m, run), _writes(m, src)
    # the hand-built head writes are the post-norm attention output's parts (the definition's premise)
    np.testing.assert_allclose(w_run["heads"].sum(3), w_run["attn_out"], rtol=0,
                               atol=TOL * np.abs(w_run["attn_out"]).max())
    base = _logit_diff(m(run), ans, wrong)
    got = res.per_prompt[:, :, 0]  # [S, R, B]
    want = np.stack([np.stack([hand_built(m, run, src, [s] if isinstance(s, str) else list(s), r, ans, wrong, w_run, w_src)
                               for r in RECEIVERS]) for s in SENDERS])
    atol = TOL * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    # every path but embed -> logits (the corrupted position is not the answer position) moves the
    # metric by more than the tolerance, so the comparison can fail
    effects = np.abs(want - base[None, None]).max(-1)
    assert effects[0, 3] < atol and (np.delete(effects.ravel(), 3) > 2 * atol).all() and effects.max() > 0.05, effects
