"""Skipped patches are exact: a sweep that does not run its no-op and dead patches equals the
same sweep run whole (``skip=False``) and a Python loop of single full-forward patches, for every
granularity, direction and baseline, per-prompt answer positions, padding and several corrupted
sets; and the skips actually happen (counted)."""

import jax
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch._errors import InputError
from jaxpatch.compat import transformer_lens as jp_tl
from tests.test_sweep import loop_twin

TOL = 2e-5  # float32, relative to max(1, |value|): a skipped patch gets the value of another skipped
#             patch (the cheapest one run), computed from a different layer and position offset

L, T, B = 3, 10, 3
DIFF = 6  # the clean and corrupted prompts first differ here (and at 8)


@pytest.fixture(scope="module")
def model():
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=L, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)
    m = jaxpatch.HookedModel.from_config(cfg, seed=1)
    m.params = jax.tree_util.tree_map(lambda a: a * 5.0 if a.ndim >= 2 else a, m.params)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, DIFF] = (corrupt[:, DIFF] + 7) % 61
    corrupt[1, 8] = (corrupt[1, 8] + 3) % 61
    return clean, corrupt, np.array([3, 4, 5]), np.array([6, 7, 8])


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) <= TOL * max(1.0, float(np.max(np.abs(b))))


GRANULARITIES = [
    ("resid_pre", ("layer", "pos")),
    ("resid_mid", ("layer", "pos")),
    ("attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")),
    ("z", ("layer", "pos", "head")),
    ("z", ("layer", "head")),
    ("k", ("layer", "pos", "head")),
    ("pattern", ("layer", "head", "dest_pos")),
    ("post", ("layer", "neuron")),
]


@pytest.mark.parametrize("site,by", GRANULARITIES)
def test_skips_equal_the_whole_sweep_every_granularity(model, prompts, site, by):
    clean, corrupt, ans, wrong = prompts
    direction = "denoise" if len(by) != 2 or by[1] != "head" else "noise"
    kw = dict(site=site, by=by, direction=direction, answer=ans, wrong=wrong, metrics=("logit_diff", "logprob", "kl"))
    fast = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    slow = jaxpatch.activation_patch(model, clean, corrupt, skip=False, **kw)
    assert slow.info["skipped_noop"] == slow.info["skipped_dead"] == 0
    assert close(fast.per_prompt, slow.per_prompt), (site, by)  # every metric, every prompt
    if "pos" in by or "dest_pos" in by:  # every patch before position DIFF is a no-op
        n_heads = model.config.n_heads if "head" in by else 1
        assert fast.info["same_before"] == DIFF
        # resid_pre of layer 0 at positions 7 and 9 holds the shared tokens' embeddings in both runs
        # (sweep.unchanged); position 8 differs in prompt 1
        extra = 2 if site == "resid_pre" else 0
        assert fast.info["skipped_noop"] == L * DIFF * n_heads + extra
        assert fast.info["executed_rows"] < slow.info["executed_rows"]


@pytest.mark.parametrize("direction,baseline", [("denoise", "resample"), ("noise", "resample"), ("noise", "mean"),
                                                ("noise", "zero"), ("denoise", "noise"), ("noise", "noise")])
def test_skips_equal_the_whole_sweep_every_baseline(model, prompts, direction, baseline):
    clean, corrupt, ans, wrong = prompts
    kw = dict(site="z", by=("layer", "pos", "head"), direction=direction, baseline=baseline, answer=ans, wrong=wrong,
              answer_pos=[7, 9, 8], metrics=("logit_diff", "prob"))
    if baseline == "noise":
        kw.update(noise_positions=[4, 5], n_noise=2)
    fast = jaxpatch.activation_patch(model, clean, None if baseline in ("mean", "zero", "noise") else corrupt, **kw)
    slow = jaxpatch.activation_patch(model, clean, None if baseline in ("mean", "zero", "noise") else corrupt, skip=False, **kw)
    assert close(fast.per_prompt, slow.per_prompt), (direction, baseline)
    H = model.config.n_heads
    dead_last_layer = (T - 3) * H  # last layer, positions other than 7, 8, 9 (answers)
    if baseline in ("mean", "zero"):  # not a run of the model: positions are never claimed equal
        assert fast.info["skipped_noop"] == 0 and fast.info["same_before"] == 0
        assert fast.info["skipped_dead"] == dead_last_layer
    else:
        first = 4 if baseline == "noise" else DIFF
        assert fast.info["same_before"] == first
        assert fast.info["skipped_noop"] == L * first * H
        assert fast.info["skipped_dead"] == dead_last_layer - first * H  # the no-op ones count once


def test_skipped_patches_equal_single_full_forwards(model, prompts):
    """No-op, dead and live patches of one sweep against one full forward each (the loop twin)."""
    clean, corrupt, ans, wrong = prompts
    rows = [{"layer": 0, "pos": 2}, {"layer": 2, "pos": 5},  # no-ops (before DIFF)
            {"layer": 2, "pos": 7},  # dead: last layer, not the answer position, after attention
            [{"layer": 1, "pos": 1}, {"layer": 2, "pos": 8}],  # joint: a no-op and a dead component
            {"layer": 1, "pos": 7}, {"layer": 2, "pos": 9}, [{"layer": 0, "pos": 3}, {"layer": 1, "pos": 6}]]  # live
    rows = [r if isinstance(r, list) else [r, r] for r in rows]  # one sweep: two components each
    for direction in ("denoise", "noise"):
        res = jaxpatch.activation_patch(model, clean, corrupt, site="attn_out", patches=rows, direction=direction,
                                        answer=ans, wrong=wrong)
        assert (res.info["skipped_noop"], res.info["skipped_dead"]) == (2, 2)
        run, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
        spec = sw.from_rows(model.config, "blocks.hook_attn_out", rows, T)
        ref = loop_twin(model, run, src, "blocks.hook_attn_out", spec, ans, wrong)
        assert close(res.per_prompt[:, 0], ref), direction


def test_per_prompt_answer_positions_padding_and_corrupted_sets(model, prompts):
    clean, corrupt, ans, wrong = prompts
    # Left padding (two pad positions in prompt 0), per-prompt answer positions, two corrupted sets
    # whose first differences are at 6 and 4.
    mask = np.ones((B, T), np.int32)
    mask[0, :2] = 0
    second = clean.copy()
    second[:, 4] = (second[:, 4] + 11) % 61
    sets = np.stack([corrupt, second])
    kw = dict(site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong, answer_pos=[8, 6, 7], attention_mask=mask)
    fast = jaxpatch.activation_patch(model, clean, sets, **kw)
    slow = jaxpatch.activation_patch(model, clean, sets, skip=False, **kw)
    assert close(fast.per_prompt, slow.per_prompt)
    assert fast.info["same_before"] == 4  # the earliest difference over both sets
    # + resid_pre of layer 0 at positions 5 and 7, shared tokens in both sets (sweep.unchanged)
    assert fast.info["skipped_noop"] == L * 4 + 2
    assert fast.info["skipped_dead"] == L * 1  # position 9: after every answer position


def test_every_patch_skipped_runs_only_the_cheapest_one(model, prompts):
    """The unpatched metric comes from one skipped patch run by the sweep program: the cheapest
    (here the layer-2 one: its layers and positions only)."""
    clean, corrupt, ans, wrong = prompts
    res = jaxpatch.activation_patch(model, clean, corrupt, patches=[{"layer": 0, "pos": 1}, {"layer": 2, "pos": 3}],
                                    answer=ans, wrong=wrong)
    assert res.info["skipped_noop"] == 2 and res.info["minimal_rows"] == 0
    assert 0 < res.info["executed_rows"] <= (L - 2) * T
    # Denoising a no-op leaves the corrupted run: its metric, per prompt.
    assert close(res.per_prompt[:, 0], np.broadcast_to(res.corrupt[0], (2, B)))


def test_custom_metric_compat_path_skips_exactly(model, prompts):
    """TransformerLens-style calls: a custom metric reading the last position."""
    clean, corrupt, ans, wrong = prompts
    b = np.arange(B)
    metric = lambda lg: (lg[b, -1, ans] - lg[b, -1, wrong]).mean()  # noqa: E731
    _, cache = model.run_with_cache(clean)
    for fn in (jp_tl.get_act_patch_resid_pre, jp_tl.get_act_patch_mlp_out, jp_tl.get_act_patch_attn_head_out_by_pos):
        fast = np.asarray(fn(model, corrupt, cache, metric))
        slow = np.asarray(fn(model, corrupt, cache, metric, skip=False))
        assert close(fast, slow), fn.__name__


def test_skippable_classification():
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=11, n_ctx=8)
    spec = sw.grid(cfg, "blocks.hook_mlp_out", ("layer", "pos"), 6)
    noop, dead = sw.skippable(spec, 2, 6, read_positions=[3], same_before=2)
    grid_noop, grid_dead = noop.reshape(2, 6), dead.reshape(2, 6)
    np.testing.assert_array_equal(grid_noop, [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    # positions 4, 5 are after the read position; in the last layer only position 3 is read
    np.testing.assert_array_equal(grid_dead, [[0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 1, 1]])
    # Keys in the last layer are read by later queries: never dead before the read position.
    kspec = sw.grid(cfg, "blocks.attn.hook_k", ("layer", "pos"), 6)
    _, kdead = sw.skippable(kspec, 2, 6, read_positions=[3], same_before=0)
    np.testing.assert_array_equal(kdead.reshape(2, 6), [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])


def test_bad_skip_arguments(model, prompts):
    clean, corrupt, ans, wrong = prompts
    with pytest.raises(InputError, match="skip must be True or False"):
        jaxpatch.activation_patch(model, clean, corrupt, answer=ans, wrong=wrong, skip="yes")
    cfg = model.config
    spec = sw.grid(cfg, "blocks.hook_resid_pre", ("layer", "pos"), T)
    with pytest.raises(InputError, match="same_before must be an int in 0..10"):
        sw.run(cfg, model.params, spec, {}, 0.0, False, ("logit_diff",), {}, T, same_before=11)


def _families():
    from tests.test_edges_post_norm import _cfg as gemma_cfg
    from tests.test_padding_gqa import CONFIGS

    return {**CONFIGS, "gemma2": gemma_cfg(), "qwen3-qknorm": gemma_cfg(architecture="qwen3", post_norms=False,
                                                                       qk_norm=True, attn_softcap=None, final_softcap=None)}


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "mistral", "gemma2", "qwen3-qknorm"])
def test_last_layer_reads_only_the_answer_rows_every_family(name):
    """The last layer computes keys/values for every row but queries, attention and MLP only for
    the rows the metric reads; per-prompt answer positions; against one full forward per patch."""
    cfg = _families()[name]
    m = jaxpatch.HookedModel.from_config(cfg, seed=2)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, m.params)
    rng = np.random.default_rng(5)
    clean = rng.integers(0, cfg.d_vocab, (2, 8))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % cfg.d_vocab
    ans, wrong, apos = np.array([1, 2]), np.array([3, 4]), np.array([7, 5])
    site = "blocks.hook_resid_pre"
    res = jaxpatch.activation_patch(m, clean, corrupt, site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong,
                                    answer_pos=apos, mesh=None, position_buckets=2, chunk_size=3)
    spec = sw.grid(cfg, site, ("layer", "pos"), 8)
    _, caps = m.run(clean, capture={site})
    b = np.arange(2)
    for i in range(spec.size):
        layer, pos = int(spec.index["layer"][i]), int(spec.index["pos"][i])
        lg = np.asarray(m(corrupt, m.edit(site, value=caps[site], stacked=True, layer=layer, pos=pos)))
        want = lg[b, apos, ans] - lg[b, apos, wrong]
        got = res.per_prompt.reshape(spec.size, 1, 2)[i, 0]
        assert np.max(np.abs(got - want)) <= TOL * max(1.0, float(np.max(np.abs(want)))), (name, layer, pos, got, want)
