"""The vectorised sweep engine against its slow twins: a Python loop of single patches,
one device vs eight, chunked vs unchunked, with and without prefix reuse; and one compilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch.patching import DEFAULT_AXES

ATOL = 2e-5  # float32 sweep vs float32 loop (different fusion, same math)


@pytest.fixture(scope="module")
def model():
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=3, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)
    m = jaxpatch.HookedModel.from_config(cfg, seed=0)
    # Larger weights than the 0.02 default so patches have clearly different effects.
    m.params = jax.tree_util.tree_map(lambda a: a * 5.0 if a.ndim >= 2 else a, m.params)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 61, (3, 8))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 7) % 61
    corrupt[:, 5] = (corrupt[:, 5] + 3) % 61
    return clean, corrupt, np.array([3, 4, 5]), np.array([6, 7, 8])


def loop_twin(model, run_tokens, source_tokens, site, spec, ans, wrong, source=None):
    """The slow reference: one full forward per patch, metric from the full logits."""
    if source is None:
        _, caps = model.run(source_tokens, capture={site})
        source = caps[site]
    vals = []
    for i in range(spec.size):
        ix = {a: np.asarray(v[i]) for a, v in spec.index.items()}
        if spec.joint:
            iv = jaxpatch.combine(*[
                model.edit(site, value=source, stacked=np.ndim(source) > 0, layer=int(ix["layer"][k]),
                           **{a: int(v[k]) for a, v in ix.items() if a != "layer"})
                for k in range(ix["layer"].shape[0])])
        else:
            layer = int(ix.pop("layer"))
            iv = model.edit(site, value=source, stacked=np.ndim(source) > 0, layer=layer, **{a: int(v) for a, v in ix.items()})
        lg = np.asarray(model(run_tokens, iv))[:, -1]
        b = np.arange(len(ans))
        vals.append(lg[b, ans] - lg[b, wrong])
    return np.array(vals)  # [P, B]


CASES = [
    ("resid_pre", ("layer", "pos")),
    ("resid_mid", ("layer", "pos")),
    ("attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")),
    ("resid_post", ("layer", "pos")),
    ("z", ("layer", "head")),
    ("z", ("layer", "pos", "head")),
    ("q", ("layer", "pos", "head")),
    ("k", ("layer", "head")),
    ("v", ("layer", "pos", "head")),
    ("pattern", ("layer", "head")),
    ("pattern", ("layer", "head", "dest_pos")),
    ("pattern", ("layer", "head", "dest_pos", "src_pos")),
    ("post", ("layer", "neuron")),
    ("post", ("layer", "pos", "neuron")),
]


@pytest.mark.parametrize("site,by", CASES, ids=[f"{s}-{'x'.join(b)}" for s, b in CASES])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_equals_python_loop(model, prompts, site, by, direction):
    clean, corrupt, ans, wrong = prompts
    if site == "post" and "pos" in by:  # keep the loop short: 4 neurons x all positions
        spec = sw.from_rows(model.config, "blocks.mlp.hook_post",
                            [{"layer": l, "pos": p, "neuron": n} for l in range(3) for p in range(8) for n in (0, 5, 77, 127)], 8)
        r = jaxpatch.activation_patch(model, clean, corrupt, site=site, patches=[
            {"layer": l, "pos": p, "neuron": n} for l in range(3) for p in range(8) for n in (0, 5, 77, 127)],
            direction=direction, answer=ans, wrong=wrong, mesh=None)
    else:
        r = jaxpatch.activation_patch(model, clean, corrupt, site=site, by=by, direction=direction,
                                      answer=ans, wrong=wrong, mesh=None, position_buckets=3)
        spec = sw.grid(model.config, r.site, by, 8)
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    expected = loop_twin(model, run, src, r.site, spec, ans, wrong)
    got = r.per_prompt[..., 0, :].reshape(spec.size, -1)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-5)
    assert np.ptp(expected.mean(-1)) > 0.05  # effects differ between patches: the test can fail


def test_joint_patches_equal_loop(model, prompts):
    clean, corrupt, ans, wrong = prompts
    rows = [[{"layer": 0, "head": 1}, {"layer": 2, "head": 3}], [{"layer": 1, "head": 0}, {"layer": 1, "head": 2}],
            [{"layer": 2, "head": 0}, {"layer": 0, "head": 0}]]
    r = jaxpatch.activation_patch(model, clean, corrupt, site="z", patches=rows, answer=ans, wrong=wrong, mesh=None)
    spec = sw.from_rows(model.config, "blocks.attn.hook_z", rows, 8)
    expected = loop_twin(model, corrupt, clean, "blocks.attn.hook_z", spec, ans, wrong)
    np.testing.assert_allclose(r.per_prompt[:, 0], expected, atol=ATOL, rtol=1e-5)
    # A joint patch is not the sum of its parts in general, but patching every head jointly in
    # every layer restores the clean run exactly.
    everything = [[{"layer": l, "head": h} for l in range(3) for h in range(4)]]
    full = jaxpatch.activation_patch(model, clean, corrupt, site="z", patches=everything, answer=ans, wrong=wrong, mesh=None)
    np.testing.assert_allclose(full.values()[0], full.baselines()["clean"], atol=ATOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 24])
@pytest.mark.parametrize("buckets", [1, 3])
def test_chunked_and_prefix_reuse_equal_plain(model, prompts, chunk_size, buckets):
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="z", by=("layer", "pos", "head"), answer=ans, wrong=wrong, mesh=None, metrics=("logit_diff", "kl"))
    ref = jaxpatch.activation_patch(model, clean, corrupt, chunk_size=96, position_buckets=1, **kw)
    r = jaxpatch.activation_patch(model, clean, corrupt, chunk_size=chunk_size, position_buckets=buckets, **kw)
    np.testing.assert_allclose(r.per_prompt, ref.per_prompt, atol=ATOL, rtol=1e-5)
    assert ref.info["executed_rows"] >= r.info["executed_rows"] >= r.info["minimal_rows"]


def test_sharded_equals_single_device(model, prompts):
    assert len(jax.local_devices()) == 8, "conftest forces 8 CPU devices"
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong, chunk_size=2, metrics=("logit_diff", "prob"))
    single = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **kw)
    sharded = jaxpatch.activation_patch(model, clean, corrupt, mesh="auto", **kw)
    np.testing.assert_allclose(sharded.per_prompt, single.per_prompt, atol=1e-6, rtol=1e-6)


def test_sweep_compiles_once_for_any_targets(model, prompts):
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _, caps = model.run(corrupt, capture={"blocks.hook_resid_pre", "blocks.attn.hook_k", "blocks.attn.hook_v"})
    _, src = model.run(clean, capture={"blocks.hook_resid_pre"})
    run_cache = sw.run_cache(cfg, caps, corrupt)
    ctx = {"answer_pos": jnp.full((3,), 7), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    traced = chex.assert_max_traces(sw._chunk_fn, n=1)
    orig, sw._chunk_fn = sw._chunk_fn, traced
    try:
        sw._core.clear_cache() if hasattr(sw._core, "clear_cache") else None
        rng = np.random.default_rng(1)
        outs = []
        for _ in range(3):  # different layers and positions, same number of patches
            rows = [{"layer": int(rng.integers(0, 3)), "pos": int(rng.integers(0, 8))} for _ in range(6)]
            spec = sw.from_rows(cfg, "blocks.hook_resid_pre", rows, 8)
            outs.append(sw.run(cfg, model.params, spec, run_cache, src["blocks.hook_resid_pre"], True, ("logit_diff",),
                               ctx, 8, chunk_size=2, mesh=None, skip=False)[0])  # every patch runs: 6 each time
    finally:
        sw._chunk_fn = orig
    assert not np.allclose(outs[0], outs[1])


def test_several_corrupted_sets_are_an_axis(model, prompts):
    clean, corrupt, ans, wrong = prompts
    other = clean.copy()
    other[:, 0] = (other[:, 0] + 1) % 61
    sets = np.stack([corrupt, other])
    r = jaxpatch.activation_patch(model, clean, sets, site="resid_pre", answer=ans, wrong=wrong, mesh=None)
    assert r.axes == ("corrupt_set", "layer", "pos") and r.shape == (2, 3, 8)
    for s, ct in enumerate([corrupt, other]):
        single = jaxpatch.activation_patch(model, clean, ct, site="resid_pre", answer=ans, wrong=wrong, mesh=None)
        np.testing.assert_allclose(r.values()[s], single.values(), atol=ATOL)
        np.testing.assert_allclose(r.normalized()[s], single.normalized(), atol=1e-4)


def test_mean_and_zero_ablation_equal_loop(model, prompts):
    clean, corrupt, ans, wrong = prompts
    ref = np.random.default_rng(3).integers(0, 61, (5, 8))
    spec = sw.grid(model.config, "blocks.hook_attn_out", ("layer", "pos"), 8)
    _, caps = model.run(ref, capture={"blocks.hook_attn_out"})
    mean_src = jnp.mean(caps["blocks.hook_attn_out"], axis=1, keepdims=True)
    for baseline, source in [("mean", mean_src), ("zero", jnp.zeros(()))]:
        r = jaxpatch.activation_patch(model, clean, corrupt, site="attn_out", direction="noise", baseline=baseline,
                                      reference_tokens=ref, answer=ans, wrong=wrong, mesh=None)
        expected = loop_twin(model, clean, None, "blocks.hook_attn_out", spec, ans, wrong, source=source)
        np.testing.assert_allclose(r.per_prompt[..., 0, :].reshape(spec.size, -1), expected, atol=ATOL, rtol=1e-5)


def test_gaussian_noise_causal_tracing(model, prompts):
    clean, _, ans, wrong = prompts
    kw = dict(site="resid_pre", baseline="noise", noise_positions=[1, 2], n_noise=4, answer=ans, wrong=wrong, mesh=None,
              metrics=("prob", "logit_diff"))
    r = jaxpatch.activation_patch(model, clean, None, **kw)
    assert r.per_prompt.shape == (3, 8, 2, 12)  # 4 noise samples x 3 prompts
    # Restoring the clean residual stream at layer 0 at every noised position restores the clean run.
    full = jaxpatch.activation_patch(model, clean, None, patches=[[{"layer": 0, "pos": 1}, {"layer": 0, "pos": 2}]], **kw)
    np.testing.assert_allclose(full.per_prompt[0, 1], np.tile(full.clean[1], 1), atol=1e-4)
    # Twin: the noised run built by hand, one patch in a loop.
    noise = jaxpatch.patching.embedding_noise(model, 3, 8, [1, 2], 3.0, 4, 0)
    noisy = np.tile(clean, (4, 1))
    _, src = model.run(noisy, capture={"blocks.hook_resid_pre"})
    _, clean_src = model.run(clean, capture={"blocks.hook_resid_pre"})
    stacked = jnp.tile(clean_src["blocks.hook_resid_pre"], (1, 4, 1, 1))
    for layer, pos in [(0, 1), (1, 2), (2, 5)]:
        iv = noise + model.replace("blocks.hook_resid_pre", stacked, layer=layer, pos=pos)
        lg = np.asarray(model(noisy, iv))[:, -1]
        b = np.arange(12)
        np.testing.assert_allclose(r.per_prompt[layer, pos, 1], lg[b, np.tile(ans, 4)] - lg[b, np.tile(wrong, 4)], atol=ATOL, rtol=1e-5)
    # Noising direction: the clean run with noised states patched in.
    rn = jaxpatch.activation_patch(model, clean, None, direction="noise", **kw)
    assert np.all(np.isfinite(rn.normalized("logit_diff")))


def test_metrics_and_normalisation(model, prompts):
    clean, corrupt, ans, wrong = prompts
    names = ("logit_diff", "logprob", "prob", "kl", "accuracy", "top5_accuracy", "rank")
    for direction in ("denoise", "noise"):
        r = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", direction=direction, metrics=names,
                                      answer=ans, wrong=wrong, mesh=None)
        # Patching the whole residual stream at layer 0 at every position reproduces the source run.
        assert r.values("kl").min() >= -1e-6
        ld, base = r.values("logit_diff"), r.baselines("logit_diff")
        norm = r.normalized("logit_diff")
        gap = base["clean"] - base["corrupt"]
        expected = (ld - base["corrupt"]) / gap if direction == "denoise" else (base["clean"] - ld) / gap
        np.testing.assert_allclose(norm, expected, rtol=1e-6)
        assert np.all(r.values("rank") >= 0) and np.all(r.values("accuracy") <= r.values("top5_accuracy") + 1e-9)
        np.testing.assert_allclose(r.values("prob"), np.exp(r.per_prompt[..., 1, :]).mean(-1), rtol=1e-5)
        df = r.to_dataframe()
        assert len(df) == 24 and {"layer", "pos", "pos_label", "logit_diff", "logit_diff_normalized", "kl"} <= set(df.columns)
        assert (df["logit_diff_normalized"] < 0).any() or (df["logit_diff_normalized"] > 0).any()


def test_custom_per_prompt_metric(model, prompts):
    clean, corrupt, ans, wrong = prompts

    def top_logit(logits):
        return logits.max(axis=-1)

    r = jaxpatch.activation_patch(model, clean, corrupt, metrics=("logit_diff", top_logit), answer=ans, wrong=wrong, mesh=None)
    assert r.metrics == ("logit_diff", "top_logit")
    with pytest.raises(jaxpatch.InputError, match="one value per prompt"):
        jaxpatch.activation_patch(model, clean, corrupt, metrics=(lambda lg: lg.sum(),), answer=ans, mesh=None)


def test_zero_gap_is_reported_not_divided(model, prompts):
    clean, _, ans, wrong = prompts
    r = jaxpatch.activation_patch(model, clean, clean.copy(), answer=ans, wrong=wrong, mesh=None)
    with pytest.raises(jaxpatch.JaxpatchError, match="baselines are equal"):
        r.normalized()
    assert r.to_dataframe()["logit_diff_normalized"].isna().all()


def test_bad_sweep_input(model, prompts):
    clean, corrupt, ans, wrong = prompts
    kw = dict(answer=ans, wrong=wrong, mesh=None)
    with pytest.raises(jaxpatch.InputError, match="same shape"):
        jaxpatch.activation_patch(model, clean, corrupt[:, :7], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"head index \[4\] out of range: valid 0..3"):
        jaxpatch.activation_patch(model, clean, corrupt, site="z", patches=[{"layer": 0, "head": 4}], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"pos index \[8\] out of range"):
        jaxpatch.activation_patch(model, clean, corrupt, patches=[{"layer": 0, "pos": 8}], **kw)
    with pytest.raises(jaxpatch.InputError, match=r"neuron index \[128\]"):
        jaxpatch.activation_patch(model, clean, corrupt, site="post", patches=[{"layer": 0, "neuron": 128}], **kw)
    with pytest.raises(jaxpatch.UnknownSiteError, match="Did you mean"):
        jaxpatch.activation_patch(model, clean, corrupt, site="blocks.attn.hook_zz", **kw)
    with pytest.raises(jaxpatch.InputError, match="cannot sweep over 'head'"):
        jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", by=("layer", "head"), **kw)
    with pytest.raises(jaxpatch.InputError, match="wrong="):
        jaxpatch.activation_patch(model, clean, corrupt, answer=ans, mesh=None)
    with pytest.raises(jaxpatch.InputError, match="Unknown metric 'logitdiff'"):
        jaxpatch.activation_patch(model, clean, corrupt, metrics="logitdiff", **kw)
    with pytest.raises(jaxpatch.InputError, match="direction='noise'"):
        jaxpatch.activation_patch(model, clean, corrupt, baseline="zero", **kw)


def test_default_axes_cover_every_sweepable_site():
    for c in DEFAULT_AXES:
        assert jaxpatch.SITES[c].per_layer


def test_grid_frame_keeps_index_order(model, prompts):
    clean, corrupt, ans, wrong = prompts
    r = jaxpatch.activation_patch(model, clean, corrupt, answer=ans, wrong=wrong, mesh=None, token_labels=[f"t{i}" for i in range(61)])
    df = r.grid_frame(normalized=True)
    assert list(df.columns) == r.labels["pos"] and list(df.index) == ["L0", "L1", "L2"]
    np.testing.assert_array_equal(df.to_numpy(), r.normalized())
    assert df.columns[0].startswith("0:t") and df.columns[-1].startswith("7:t")


@pytest.mark.parametrize("mesh", [None, "auto"])
def test_progress_bar_ticks_once_per_chunk(model, prompts, mesh):
    pytest.importorskip("tqdm")
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="resid_pre", answer=ans, wrong=wrong, chunk_size=3, mesh=mesh)
    quiet = jaxpatch.activation_patch(model, clean, corrupt, progress=False, **kw)
    shown = jaxpatch.activation_patch(model, clean, corrupt, progress=True, **kw)
    # 24 patches, the 6 before the first corrupted position (2) skipped as no-ops: 18 in chunks of 3
    assert sw.last_progress["done"] == sw.last_progress["total"] >= 6
    np.testing.assert_array_equal(shown.per_prompt, quiet.per_prompt)
