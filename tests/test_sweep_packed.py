"""Packed sweeps (jaxpatch.packed) are exact: a packed sweep equals the same sweep in vectorised
chunks (``pack=False``) and a Python loop of single full-forward patches, for every eligible
granularity, both directions, every baseline, per-prompt answer positions, padding, several
corrupted sets, custom metrics and every family's attention (rotary, grouped-query, sliding
windows, soft-capping, post-norms); packing really happens (counted) and executes fewer rows;
the packed layout is data (one compile for different positions); bad requests raise."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import models
from jaxpatch import packed as pk
from jaxpatch import sweep as sw
from jaxpatch._errors import InputError
from jaxpatch.compat import transformer_lens as jp_tl
from tests.test_skip import B, L, T, _families, close, model  # noqa: F401  (model: a fixture; close: TOL 2e-5 relative)
from tests.test_sweep import loop_twin

DIFF = 4  # the clean and corrupted prompts first differ here (and at 8 in prompt 1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, DIFF] = (corrupt[:, DIFF] + 7) % 61
    corrupt[1, 8] = (corrupt[1, 8] + 3) % 61
    return clean, corrupt, np.array([3, 4, 5]), np.array([6, 7, 8])


ELIGIBLE = [
    ("resid_pre", ("layer", "pos")),
    ("resid_mid", ("layer", "pos")),
    ("attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")),
    ("resid_post", ("layer", "pos")),
    ("z", ("layer", "pos", "head")),
    ("q", ("layer", "pos", "head")),
    ("k", ("layer", "pos", "head")),
    ("v", ("layer", "pos", "head")),
    ("result", ("layer", "pos", "head")),
    ("post", ("layer", "pos", "neuron")),
]


@pytest.mark.parametrize("site,by", ELIGIBLE)
def test_packed_equals_vectorised_every_granularity(model, prompts, site, by):
    clean, corrupt, ans, wrong = prompts
    kw = dict(site=site, by=by, answer=ans, wrong=wrong, metrics=("logit_diff", "logprob", "kl"), mesh=None)
    if site == "post":  # a few neurons keep the grid small
        kw.update(by=("layer", "pos", "neuron"))
        spec = sw.grid(model.config, "blocks.mlp.hook_post", ("layer", "pos", "neuron"), T)
        keep = np.asarray(spec.index["d_mlp"]) < 6
        rows = [{"layer": int(la), "pos": int(p), "neuron": int(n)} for la, p, n, k in
                zip(spec.index["layer"], spec.index["pos"], spec.index["d_mlp"], keep) if k]
        kw.pop("by")
        kw["patches"] = rows
    packed = jaxpatch.activation_patch(model, clean, corrupt, pack=True, **kw)
    vec = jaxpatch.activation_patch(model, clean, corrupt, pack=False, **kw)
    assert packed.info["packed_rows"] > 0 and vec.info["packed_rows"] == 0
    assert close(packed.per_prompt, vec.per_prompt), (site, by)
    assert packed.info["executed_rows"] >= packed.info["minimal_rows"]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_packed_equals_single_full_forwards(model, prompts, direction):
    """Against one full forward per patch (the loop twin), every layer and position, skips off so
    every patch runs packed."""
    clean, corrupt, ans, wrong = prompts
    res = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", by=("layer", "pos"), direction=direction,
                                    answer=ans, wrong=wrong, skip=False, pack=True, mesh=None)
    assert res.info["packed_rows"] > 0
    run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    spec = sw.grid(model.config, "blocks.hook_resid_pre", ("layer", "pos"), T)
    ref = loop_twin(model, run, src, "blocks.hook_resid_pre", spec, ans, wrong)
    assert close(res.per_prompt[..., 0, :].reshape(-1, B), ref)


@pytest.mark.parametrize("direction,baseline", [("denoise", "resample"), ("noise", "resample"), ("noise", "mean"),
                                                ("noise", "zero"), ("denoise", "noise"), ("noise", "noise")])
def test_packed_every_baseline(model, prompts, direction, baseline):
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="z", by=("layer", "pos", "head"), direction=direction, baseline=baseline, answer=ans, wrong=wrong,
              answer_pos=[7, 9, 8], metrics=("logit_diff", "prob"), mesh=None)
    if baseline == "noise":
        kw.update(noise_positions=[4, 5], n_noise=2)
    corr = None if baseline in ("mean", "zero", "noise") else corrupt
    packed = jaxpatch.activation_patch(model, clean, corr, pack=True, **kw)
    vec = jaxpatch.activation_patch(model, clean, corr, pack=False, **kw)
    assert packed.info["packed_rows"] > 0
    assert close(packed.per_prompt, vec.per_prompt), (direction, baseline)


def test_packed_padding_answer_positions_and_corrupted_sets(model, prompts):
    clean, corrupt, ans, wrong = prompts
    mask = np.ones((B, T), np.int32)
    mask[0, :2] = 0  # left padding in prompt 0
    second = clean.copy()
    second[:, 6] = (second[:, 6] + 11) % 61
    sets = np.stack([corrupt, second])
    kw = dict(site="mlp_out", by=("layer", "pos"), answer=ans, wrong=wrong, answer_pos=[8, 6, 7], attention_mask=mask,
              mesh=None)
    packed = jaxpatch.activation_patch(model, clean, sets, pack=True, **kw)
    vec = jaxpatch.activation_patch(model, clean, sets, pack=False, **kw)
    whole = jaxpatch.activation_patch(model, clean, sets, pack=False, skip=False, **kw)
    assert packed.info["packed_rows"] > 0
    assert close(packed.per_prompt, vec.per_prompt) and close(packed.per_prompt, whole.per_prompt)


def test_packed_custom_metric_compat_path(model, prompts):
    """TransformerLens-style calls with a metric reading the last two positions."""
    clean, corrupt, ans, wrong = prompts
    b = np.arange(B)
    metric = lambda lg: (jax.nn.log_softmax(lg[:, -2:], -1)[:, :, 3].sum(1) - lg[b, -1, wrong]).mean()  # noqa: E731
    _, cache = model.run_with_cache(clean)
    for fn in (jp_tl.get_act_patch_resid_pre, jp_tl.get_act_patch_mlp_out, jp_tl.get_act_patch_attn_head_out_by_pos):
        packed = np.asarray(fn(model, corrupt, cache, metric, pack=True, mesh=None))
        assert sw.last_plan.packed > 0
        vec = np.asarray(fn(model, corrupt, cache, metric, pack=False, mesh=None, skip=False))
        assert close(packed, vec), fn.__name__


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "mistral", "gemma2", "qwen3-qknorm"])
def test_packed_every_family_padded(name):
    """Rotary (per-row tables), grouped-query, sliding windows, soft-caps, post-norms, q/k norms;
    left padding and per-prompt answer positions; against one full forward per patch."""
    cfg = _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=2)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, m.params)
    rng = np.random.default_rng(5)
    clean = rng.integers(0, cfg.d_vocab, (2, 8))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % cfg.d_vocab
    ans, wrong = np.array([1, 2]), np.array([3, 4])
    mask = np.ones((2, 8), np.int32)
    mask[1, :1] = 0
    kw = dict(site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong, answer_pos=[7, 6], attention_mask=mask,
              mesh=None)
    packed = jaxpatch.activation_patch(m, clean, corrupt, pack=True, skip=False, **kw)
    vec = jaxpatch.activation_patch(m, clean, corrupt, pack=False, skip=False, **kw)
    assert packed.info["packed_rows"] > 0
    assert close(packed.per_prompt, vec.per_prompt), name
    # one full forward per patch, answer rows per prompt
    _, caps = m.run(clean, capture={"blocks.hook_resid_pre"}, attention_mask=mask)
    src = caps["blocks.hook_resid_pre"]
    for la, p in [(0, 2), (cfg.n_layers - 1, 5), (1, 7)]:
        iv = m.edit("blocks.hook_resid_pre", value=src, stacked=True, layer=la, pos=p)
        lg = np.asarray(m(corrupt, iv, attention_mask=mask))
        ref = np.array([lg[0, 7, 1] - lg[0, 7, 3], lg[1, 6, 2] - lg[1, 6, 4]])
        assert close(packed.per_prompt[la, p, 0], ref), (name, la, p)


def test_packing_executes_less_and_auto_chooses_it(model, prompts):
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong, mesh=None, skip=False)
    auto = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    vec = jaxpatch.activation_patch(model, clean, corrupt, pack=False, **kw)
    assert auto.info["packed_rows"] > 0
    assert auto.info["executed_rows"] < vec.info["executed_rows"]
    # An explicit chunk_size asks for vectorised chunks of that many patches.
    fixed = jaxpatch.activation_patch(model, clean, corrupt, chunk_size=4, **kw)
    assert fixed.info["packed_rows"] == 0 and fixed.info["chunk_size"] == 4
    # A sweep without a position index is not packed.
    heads = jaxpatch.activation_patch(model, clean, corrupt, site="z", by=("layer", "head"), answer=ans, wrong=wrong,
                                      mesh=None)
    assert heads.info["packed_rows"] == 0


def test_packed_layout_is_data_one_compile(model, prompts):
    """Different layers and positions with the same multiset of first positions: one trace."""
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _, caps = model.run(corrupt, capture=sw.run_sites(cfg))
    _, src = model.run(clean, capture={"blocks.hook_resid_pre"})
    run_cache = sw.run_cache(cfg, caps, corrupt)
    ctx = {"answer_pos": jnp.full((B,), T - 1), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    rng = np.random.default_rng(0)
    pos = np.array([5, 6, 7, 8, 9, 9])
    traced = chex.assert_max_traces(pk.chunk_fn, n=1)
    orig, pk.chunk_fn = pk.chunk_fn, traced
    outs = []
    try:
        for _ in range(3):
            rows = [{"layer": int(la), "pos": int(p)} for la, p in zip(rng.integers(0, L, pos.size), rng.permutation(pos))]
            rows.sort(key=lambda r: r["layer"])  # same layer multiset order is irrelevant: only positions vary
            spec = sw.from_rows(cfg, "blocks.hook_resid_pre", rows, T)
            vals, pl = sw.run(cfg, model.params, spec, run_cache, src["blocks.hook_resid_pre"], True, ("logit_diff",),
                              ctx, T, mesh=None, pack=True, skip=False)
            assert pl.packed > 0
            outs.append(vals)
            ref, _ = sw.run(cfg, model.params, spec, run_cache, src["blocks.hook_resid_pre"], True, ("logit_diff",),
                            ctx, T, mesh=None, pack=False, skip=False)
            assert close(vals, ref)
    finally:
        pk.chunk_fn = orig
    assert not np.allclose(outs[0], outs[1])


def test_packed_sharded_equals_single_device(model, prompts):
    clean, corrupt, ans, wrong = prompts
    if len(jax.devices()) < 2:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    kw = dict(site="z", by=("layer", "pos", "head"), answer=ans, wrong=wrong, pack=True)
    one = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **kw)
    many = jaxpatch.activation_patch(model, clean, corrupt, mesh="auto", **kw)
    assert many.info["packed_rows"] > 0
    assert close(many.per_prompt, one.per_prompt)


def test_packed_layout_rows():
    lay = models.packed_layout(jnp.asarray([3, 5, 6, 6]), 6, 8)  # lengths 3, 1, 0, 0
    np.testing.assert_array_equal(lay["slot"], [0, 0, 0, 1, 4, 4, 4, 4])
    np.testing.assert_array_equal(lay["pos"], [3, 4, 5, 5, 0, 0, 0, 0])
    np.testing.assert_array_equal(lay["first"], [3, 3, 3, 5, 1, 1, 1, 1])
    np.testing.assert_array_equal(lay["start"], [0, 3, 4, 4])


def test_pack_bad_requests(model, prompts):
    clean, corrupt, ans, wrong = prompts
    with pytest.raises(InputError, match="pack must be 'auto', True or False"):
        jaxpatch.activation_patch(model, clean, corrupt, answer=ans, wrong=wrong, pack="yes", mesh=None)
    with pytest.raises(InputError, match="cannot run packed"):  # no position index
        jaxpatch.activation_patch(model, clean, corrupt, site="z", by=("layer", "head"), answer=ans, wrong=wrong,
                                  pack=True, mesh=None)
    with pytest.raises(InputError, match="cannot run packed"):  # attention patterns: [batch, head, q_pos, k_pos]
        jaxpatch.activation_patch(model, clean, corrupt, site="pattern", by=("layer", "head", "dest_pos"), answer=ans,
                                  wrong=wrong, pack=True, mesh=None)


def test_packed_nonfinite_stays_in_its_patch(model, prompts):
    """A NaN in one patch's source is reported for that patch only: packed neighbours attend to
    its rows with zero weight, and 0 x NaN must not leak into them."""
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _, caps = model.run(corrupt, capture=sw.run_sites(cfg))
    _, src = model.run(clean, capture={"blocks.hook_resid_pre"})
    source = src["blocks.hook_resid_pre"].at[1, :, 6].set(jnp.nan)  # layer 1, position 6
    ctx = {"answer_pos": jnp.full((B,), T - 1), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong)}
    spec = sw.grid(cfg, "blocks.hook_resid_pre", ("layer", "pos"), T)
    with pytest.raises(jaxpatch.NonFiniteError, match=r"^1 of 30 patches.*layer=1, pos=6"):
        sw.run(cfg, model.params, spec, sw.run_cache(cfg, caps, corrupt), source, True, ("logit_diff",), ctx, T,
               mesh=None, pack=True, skip=False)
    assert sw.last_plan.packed > 0
