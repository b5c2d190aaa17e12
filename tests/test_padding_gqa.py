"""Family-agnostic engine: padding (left and right), grouped-query attention, rotary embeddings and
sliding windows through every fast path, each against its slow twin."""

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import edges
from jaxpatch.config import ModelConfig

ATOL = 3e-5  # float32 fast path vs float32 reference


def _scaled(cfg, seed=1, scale=4.0):
    m = jaxpatch.HookedModel.from_config(cfg, seed=seed)
    m.params = jax.tree_util.tree_map(lambda a: a * scale if a.ndim >= 2 else a, m.params)
    return m


CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16),
    "neox": ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, architecture="gpt_neox",
                        positional="rotary", rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu", tied_embeddings=False,
                        unembed_bias=False),
    "llama": ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, architecture="llama",
                         n_kv_heads=2, positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu", qkv_bias=False,
                         o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False),
    "mistral": ModelConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, architecture="mistral",
                           n_kv_heads=1, positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu", qkv_bias=False,
                           o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False, sliding_window=3,
                           layer_types=("sliding_attention", "full_attention", "sliding_attention")),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    return request.param, _scaled(CONFIGS[request.param])


def _prompts(lens=(7, 4, 6), seed=0):
    rng = np.random.default_rng(seed)
    clean = [rng.integers(1, 50, n) for n in lens]
    corrupt = [r.copy() for r in clean]
    for r in corrupt:
        r[1] = (r[1] + 7) % 50
    return clean, corrupt


def _pad(rows, side):
    T = max(len(r) for r in rows)
    tokens, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        tokens[i, sl], mask[i, sl] = r, 1
    return tokens, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(family, side):
    name, m = family
    rows, _ = _prompts()
    tokens, mask = _pad(rows, side)
    logits = np.asarray(m(tokens, attention_mask=mask))
    T = tokens.shape[1]
    for i, r in enumerate(rows):
        alone = np.asarray(m(r[None]))[0]
        off = T - len(r) if side == "left" else 0
        np.testing.assert_allclose(logits[i, off:off + len(r)], alone, atol=ATOL, rtol=1e-5)


SWEEPS = [("gpt2", "resid_pre", ("layer", "pos")), ("neox", "resid_pre", ("layer", "pos")),
          ("llama", "z", ("layer", "pos", "head")), ("llama", "k", ("layer", "head")), ("mistral", "resid_pre", ("layer", "pos"))]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name,site,by", SWEEPS, ids=[f"{n}-{s}" for n, s, _ in SWEEPS])
def test_padded_sweep_equals_prompt_by_prompt(side, name, site, by):
    m = _scaled(CONFIGS[name])
    clean, corrupt = _prompts(lens=(7, 5))
    c, mask = _pad(clean, side)
    k, _ = _pad(corrupt, side)
    ans, wrong = np.array([3, 4]), np.array([6, 7])
    res = jaxpatch.activation_patch(m, c, k, site=site, by=by, answer=ans, wrong=wrong, attention_mask=mask, mesh=None,
                                    position_buckets=2)
    T = c.shape[1]
    for i, n in enumerate(len(r) for r in clean):
        alone = jaxpatch.activation_patch(m, clean[i][None], corrupt[i][None], site=site, by=by, answer=ans[i:i + 1],
                                          wrong=wrong[i:i + 1], mesh=None)
        got = res.per_prompt[..., 0, i]
        if "pos" in by:
            off = T - n if side == "left" else 0
            p = by.index("pos")
            # padded positions change nothing: the unpatched metric
            pads = np.delete(np.moveaxis(got, p, 0), np.arange(off, off + n), axis=0)
            np.testing.assert_allclose(pads, res.corrupt[0, i], atol=ATOL)
            got = np.take(got, np.arange(off, off + n), axis=p)
        np.testing.assert_allclose(got, alone.per_prompt[..., 0, 0], atol=ATOL, rtol=1e-5)


def test_kv_head_sweep_on_gqa_equals_loop():
    m = _scaled(CONFIGS["llama"])
    clean, corrupt = _prompts(lens=(6, 6))
    clean, corrupt = np.stack(clean), np.stack(corrupt)
    ans, wrong = np.array([3, 4]), np.array([6, 7])
    for site in ("k", "v"):
        r = jaxpatch.activation_patch(m, clean, corrupt, site=site, by=("layer", "head"), answer=ans, wrong=wrong, mesh=None)
        assert r.shape == (2, 2) and r.labels["head"] == ["KV0", "KV1"]
        canon = f"blocks.attn.hook_{site}"
        src = m.run(clean, capture={canon})[1][canon]
        assert src.shape == (2, 2, 6, 2, 8)  # [L, B, T, n_kv_heads, d_head]
        b = np.arange(2)
        for layer in range(2):
            for h in range(2):
                lg = np.asarray(m(corrupt, m.replace(canon, src, layer=layer, head=h)))[:, -1]
                np.testing.assert_allclose(r.per_prompt[layer, h, 0], lg[b, ans] - lg[b, wrong], atol=ATOL)
        with pytest.raises(jaxpatch.InputError, match="out of range"):
            jaxpatch.activation_patch(m, clean, corrupt, site=site, patches=[{"layer": 0, "head": 3}], answer=ans,
                                      wrong=wrong, mesh=None)


def test_prefix_reuse_exact_under_rotary_and_sliding_windows():
    m = _scaled(CONFIGS["mistral"])
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 50, (2, 9))
    corrupt = clean.copy()
    corrupt[:, 5] = (corrupt[:, 5] + 3) % 50
    kw = dict(site="resid_pre", by=("layer", "pos"), answer=np.array([1, 2]), wrong=np.array([3, 4]), mesh=None)
    plain = jaxpatch.activation_patch(m, clean, corrupt, position_buckets=1, chunk_size=27, **kw)
    reuse = jaxpatch.activation_patch(m, clean, corrupt, position_buckets=4, chunk_size=2, **kw)
    np.testing.assert_allclose(reuse.per_prompt, plain.per_prompt, atol=ATOL)
    assert reuse.info["executed_rows"] < plain.info["executed_rows"]
    assert np.ptp(plain.values()) > 0.05


def test_attribution_and_edges_on_padded_batches_equal_prompt_by_prompt():
    m = _scaled(CONFIGS["llama"], scale=2.0)
    clean, corrupt = _prompts(lens=(6, 4))
    c, mask = _pad(clean, "left")
    k, _ = _pad(corrupt, "left")
    ans, wrong = np.array([3, 4]), np.array([6, 7])
    atp = jaxpatch.attribution_patch(m, c, k, site="z", answer=ans, wrong=wrong, attention_mask=mask)
    eap = edges.edge_attribution_patch(m, c, k, answer=ans, wrong=wrong, attention_mask=mask)
    for i in range(2):
        a1 = jaxpatch.attribution_patch(m, clean[i][None], corrupt[i][None], site="z", answer=ans[i:i + 1], wrong=wrong[i:i + 1])
        np.testing.assert_allclose(atp.per_prompt[..., 0, i], a1.per_prompt[..., 0, 0], atol=ATOL, rtol=1e-4)
        e1 = edges.edge_attribution_patch(m, clean[i][None], corrupt[i][None], answer=ans[i:i + 1], wrong=wrong[i:i + 1])
        np.testing.assert_allclose(eap.per_prompt[..., i], e1.per_prompt[..., 0], atol=ATOL, rtol=1e-4)


def test_gqa_edges_graph_and_exact_edge():
    m = _scaled(CONFIGS["llama"], scale=2.0)
    clean, corrupt = (np.stack(x) for x in _prompts(lens=(5, 5)))
    ans, wrong = np.array([3, 4]), np.array([6, 7])
    g = edges.EdgeGraph.of(m.config)
    assert "L1KV1.k" in g.down and "L1H3.q" in g.down and "L1H2.k" not in g.down
    assert len(g.down) == 2 * (4 + 2 * 2 + 1) + 1
    # The embedding's edge into the logits alone: add its clean-minus-corrupt difference to the
    # final residual stream only.
    got = edges.exact_edge_patch(m, clean, corrupt, [("embed", "logits")], answer=ans, wrong=wrong)
    e_c = m.run(clean, capture={"blocks.hook_resid_pre"})[1]["blocks.hook_resid_pre"][0]
    e_k = m.run(corrupt, capture={"blocks.hook_resid_pre"})[1]["blocks.hook_resid_pre"][0]
    b = np.arange(2)
    base = np.asarray(m(corrupt))[:, -1]
    lg = np.asarray(m(corrupt, m.add("blocks.1.hook_resid_post", e_c - e_k)))[:, -1]
    np.testing.assert_allclose(got[0], (lg[b, ans] - lg[b, wrong]) - (base[b, ans] - base[b, wrong]), atol=ATOL)
    # EAP of every edge is finite and has the graph's shape
    r = edges.edge_attribution_patch(m, clean, corrupt, answer=ans, wrong=wrong)
    assert r.per_prompt.shape == (len(g.up), len(g.down), 2) and np.isfinite(r.per_prompt).all()


@pytest.mark.parametrize("mask,match", [
    (np.ones((3, 6), np.int32), "shape"),
    (np.ones((3, 7)), "0/1 integers"),
    (np.array([[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1] * 7]), "no real token"),
    (np.array([[1, 0, 1, 1, 1, 1, 1], [1] * 7, [1] * 7]), "contiguous"),
    (np.array([[2, 1, 1, 1, 1, 1, 1], [1] * 7, [1] * 7]), "only 0"),
])
def test_bad_attention_masks(mask, match):
    m = _scaled(CONFIGS["gpt2"])
    tokens = np.ones((3, 7), np.int32)
    with pytest.raises(jaxpatch.InputError, match=match):
        m(tokens, attention_mask=mask)


def test_answer_pos_on_padding_is_an_error_and_default_is_last_real_token():
    m = _scaled(CONFIGS["llama"])
    clean, corrupt = _prompts(lens=(6, 4))
    c, mask = _pad(clean, "right")
    k, _ = _pad(corrupt, "right")
    kw = dict(site="resid_pre", by=("layer",), answer=np.array([3, 4]), wrong=np.array([6, 7]), attention_mask=mask, mesh=None)
    with pytest.raises(jaxpatch.InputError, match="padding"):
        jaxpatch.activation_patch(m, c, k, answer_pos=5, **kw)
    r = jaxpatch.activation_patch(m, c, k, **kw)
    lg = np.asarray(m(c, attention_mask=mask))
    np.testing.assert_allclose(r.clean[0], [lg[0, 5, 3] - lg[0, 5, 6], lg[1, 3, 4] - lg[1, 3, 7]], atol=ATOL)


def test_sites_follow_the_family():
    gpt2, llama = _scaled(CONFIGS["gpt2"]), _scaled(CONFIGS["llama"])
    with pytest.raises(jaxpatch.UnknownSiteError, match="rotary"):
        gpt2.run(np.ones((1, 3), np.int32), capture=["blocks.0.attn.hook_rot_q"])
    with pytest.raises(jaxpatch.UnknownSiteError, match="learned position"):
        llama.run(np.ones((1, 3), np.int32), capture=["hook_pos_embed"])
    shapes = llama.site_shapes(batch=2, pos=5)
    assert shapes["blocks.0.attn.hook_k"] == (2, 5, 2, 8) and shapes["blocks.0.attn.hook_q"] == (2, 5, 4, 8)
    assert "blocks.0.mlp.hook_pre_linear" in shapes and "blocks.0.attn.hook_rot_k" in shapes
    assert "blocks.0.mlp.hook_pre_linear" not in gpt2.site_shapes()


@pytest.mark.parametrize("kw,match", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(layer_types=("sliding_attention", "full_attention")), "sliding_window"),
    (dict(architecture="mixtral"), "mixtral"),
])
def test_config_errors(kw, match):
    base = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=30, n_ctx=8, positional="rotary")
    with pytest.raises(jaxpatch.JaxpatchError, match=match):
        ModelConfig(**{**base, **kw})


def test_info_shows_the_family_sites_with_kv_heads(tmp_path, capsys):
    from jaxpatch.cli import main

    m = jaxpatch.HookedModel.from_config(CONFIGS["llama"])
    path = jaxpatch.save_pretrained(m, tmp_path / "llama")
    assert main(["info", str(path), "--pos", "5"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn.hook_k" in out and "(1, 5, 2, 8)" in out and "[batch, pos, kv_head, d_head]" in out
    assert "blocks.1.attn.hook_rot_q" in out and "blocks.0.mlp.hook_pre_linear" in out
    assert "hook_pos_embed" not in out and "architecture  llama" in out
