"""No silent wrong answers: regression tests for results that used to be wrong without an error.

Each test compares against an independent computation (one forward per patch through the public
single-forward API) or asserts a clear error, and each failed on the code before its fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch import user_metric as um
from jaxpatch.compat.transformer_lens import patching as tlp

ATOL = 2e-5  # float32 engine vs float32 one-forward reference


@pytest.fixture(scope="module")
def model():
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=23, n_ctx=8)
    m = jaxpatch.HookedModel.from_config(cfg, seed=3)
    m.params = jax.tree_util.tree_map(lambda a: a * 5.0 if a.ndim >= 2 else a, m.params)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 23, (2, 6))
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 5) % 23
    corrupt[:, 3] = (corrupt[:, 3] + 9) % 23
    return clean, corrupt, np.array([4, 7]), np.array([11, 2])


def one_forward(model, run_tokens, ivs):
    return np.asarray(model(run_tokens, ivs), np.float64)


# ---------------------------------------------------------------------------------------------
# 1. User metrics see the values current at call time; an unchanged metric does not recompile.


def test_activation_patch_metric_sees_current_closure(model, prompts):
    clean, corrupt, ans, wrong = prompts
    tokens = np.array([1, 2])

    def picked(logits):  # closes over `tokens`, mutated between calls
        return logits[jnp.arange(2), tokens]

    kw = dict(site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong, mesh=None)
    first = jaxpatch.activation_patch(model, clean, corrupt, metrics=(picked,), **kw)
    tokens[:] = [9, 13]
    second = jaxpatch.activation_patch(model, clean, corrupt, metrics=(picked,), **kw)

    def fresh(logits):  # a new function object reading the new values directly
        return logits[jnp.arange(2), jnp.array([9, 13])]

    ref = jaxpatch.activation_patch(model, clean, corrupt, metrics=(fresh,), **kw)
    np.testing.assert_allclose(second.per_prompt, ref.per_prompt, atol=1e-6)
    np.testing.assert_allclose(second.clean, ref.clean, atol=1e-6)
    np.testing.assert_allclose(second.corrupt, ref.corrupt, atol=1e-6)
    assert np.abs(first.per_prompt - second.per_prompt).max() > 0.1  # the values did change


def test_unchanged_metric_does_not_recompile(model, prompts):
    clean, corrupt, ans, wrong = prompts
    tokens = np.array([1, 2])

    def picked(logits):
        return logits[jnp.arange(2), tokens]

    kw = dict(site="z", by=("layer", "head"), answer=ans, wrong=wrong, mesh=None, metrics=(picked, "logit_diff"))
    jaxpatch.activation_patch(model, clean, corrupt, **kw)
    n = sw._core._cache_size()
    tokens[:] = [5, 6]  # new values, same structure
    jaxpatch.activation_patch(model, clean, corrupt, **kw)
    assert sw._core._cache_size() == n


def test_global_read_by_metric_is_current(model, prompts):
    clean, corrupt, ans, wrong = prompts
    state = {"scale": 1.0}

    def scaled(logits):  # a Python scalar read from outside: part of the program, so it recompiles
        return logits[:, 0] * state["scale"]

    kw = dict(site="resid_pre", by=("layer",), answer=ans, wrong=wrong, mesh=None, metrics=(scaled,))
    a = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    state["scale"] = 3.0
    b = jaxpatch.activation_patch(model, clean, corrupt, **kw)
    np.testing.assert_allclose(b.per_prompt, 3.0 * a.per_prompt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.clean, 3.0 * a.clean, rtol=1e-5, atol=1e-5)


def test_attribution_and_edges_metric_sees_current_closure(model, prompts):
    clean, corrupt, ans, wrong = prompts
    tokens = np.array([1, 2])

    def picked(logits):
        return logits[jnp.arange(2), tokens]

    def fresh(logits):
        return logits[jnp.arange(2), jnp.array([9, 13])]

    kw = dict(answer=ans, wrong=wrong)
    jaxpatch.attribution_patch(model, clean, corrupt, metric=picked, **kw)
    jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, metric=picked, **kw)
    jaxpatch.edges.exact_edge_patch(model, clean, corrupt, [("embed", "logits")], metric=picked, **kw)
    tokens[:] = [9, 13]
    got = jaxpatch.attribution_patch(model, clean, corrupt, metric=picked, **kw)
    ref = jaxpatch.attribution_patch(model, clean, corrupt, metric=fresh, **kw)
    np.testing.assert_allclose(got.per_prompt, ref.per_prompt, atol=1e-5)
    np.testing.assert_allclose(got.clean, ref.clean, atol=1e-6)
    e_got = jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, metric=picked, **kw)
    e_ref = jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, metric=fresh, **kw)
    np.testing.assert_allclose(e_got.per_prompt, e_ref.per_prompt, atol=1e-5)
    x_got = jaxpatch.edges.exact_edge_patch(model, clean, corrupt, [("embed", "logits")], metric=picked, **kw)
    x_ref = jaxpatch.edges.exact_edge_patch(model, clean, corrupt, [("embed", "logits")], metric=fresh, **kw)
    np.testing.assert_allclose(x_got, x_ref, atol=1e-5)


def test_compat_metric_sees_current_closure(model, prompts):
    clean, corrupt, ans, wrong = prompts
    _, cache = model.run_with_cache(clean)
    answer = np.array([1, 2])

    def metric(logits):
        return logits[jnp.arange(2), -1, answer].mean()

    tlp.get_act_patch_resid_pre(model, corrupt, cache, metric)
    answer[:] = [9, 13]
    got = tlp.get_act_patch_resid_pre(model, corrupt, cache, metric)
    ref = tlp.get_act_patch_resid_pre(model, corrupt, cache, lambda lg: lg[jnp.arange(2), -1, jnp.array([9, 13])].mean())
    np.testing.assert_allclose(got, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. The compat layer's position shortcut is proved from the metric's program, never guessed.


def compat_reference(model, corrupt, cache, metric):
    """resid_pre layer x pos, one full forward per patch, metric on the full logits."""
    T = corrupt.shape[1]
    out = np.zeros((model.config.n_layers, T))
    for layer in range(model.config.n_layers):
        for p in range(T):
            iv = model.replace(f"blocks.{layer}.hook_resid_pre", cache[f"blocks.{layer}.hook_resid_pre"], pos=p)
            out[layer, p] = float(metric(model(corrupt, iv)))
    return out


METRICS_READING_MIDDLE = {
    # Each reads position 2 in a way the old NaN probe could not see.
    "argmax": lambda lg: jnp.mean((jnp.argmax(lg[:, 2], -1) == 3).astype(jnp.float32)) + lg[:, -1, 0].mean(),
    "comparison": lambda lg: jnp.mean(jnp.where(lg[:, 2, 5] > lg[:, 2, 6], 1.0, -1.0)) + lg[:, -1, 1].mean(),
    "nan_to_num": lambda lg: jnp.nan_to_num(lg[:, 2, 4]).mean() + lg[:, -1, 0].mean(),
    "integer": lambda lg: jnp.sum(lg[:, 2] > 0),
    "nan_safe_max": lambda lg: jnp.nanmax(lg[:, 2]) + lg[:, -1, 2].mean(),
}


@pytest.mark.parametrize("name", list(METRICS_READING_MIDDLE))
def test_compat_metric_reading_a_middle_position(model, prompts, name):
    clean, corrupt, _, _ = prompts
    metric = METRICS_READING_MIDDLE[name]
    _, cache = model.run_with_cache(clean)
    got = np.asarray(tlp.get_act_patch_resid_pre(model, corrupt, cache, metric))
    ref = compat_reference(model, corrupt, cache, metric)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_first_position_read_is_sound_and_useful():
    ex = jax.ShapeDtypeStruct((2, 6, 10), jnp.float32)
    ans = np.array([1, 2])
    cases = {
        lambda lg: (lg[:, -1, 3] - lg[:, -1, 4]).mean(): 5,
        lambda lg: lg[jnp.arange(2), -1, ans].mean(): 5,
        jax.jit(lambda lg: jax.nn.log_softmax(lg[:, -1])[:, 3].mean()): 5,
        lambda lg: jax.lax.dynamic_index_in_dim(lg, -2, 1)[:, 0, 3].mean(): 4,
        lambda lg: lg[:, 2, 3].mean(): 2,
        lambda lg: lg[jnp.arange(2), np.array([3, 4]), ans].mean(): 3,
        lambda lg: lg.mean(): 0,
        lambda lg: jnp.nan_to_num(lg).sum(): 0,
        lambda lg: jax.nn.log_softmax(lg)[:, -1, 0].mean(): 0,  # softmax over vocab of every position first
        lambda lg: jnp.float32(1.0): 5,
    }
    for fn, expected in cases.items():
        tm, consts = um.trace(fn, ex)
        assert um.first_position_read(tm, consts) == expected


# ---------------------------------------------------------------------------------------------
# 3. patches= honours every component's keys; unknown keys are errors wherever they appear.


def test_rows_with_different_keys(model, prompts):
    clean, corrupt, ans, wrong = prompts
    rows = [{"layer": 0, "pos": 2}, {"layer": 1}, {"layer": 1, "pos": 4}]
    r = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", patches=rows, answer=ans, wrong=wrong,
                                  mesh=None, position_buckets=2)
    _, caps = model.run(clean, capture={"blocks.hook_resid_pre"})
    src = caps["blocks.hook_resid_pre"]
    b = np.arange(2)
    for i, row in enumerate(rows):
        extra = {"pos": row["pos"]} if "pos" in row else {}
        lg = one_forward(model, corrupt, model.replace("blocks.hook_resid_pre", src, layer=row["layer"], **extra))[:, -1]
        np.testing.assert_allclose(r.per_prompt[i, 0], lg[b, ans] - lg[b, wrong], atol=ATOL)
    # Row 1 patches all of layer 1: the clean residual stream, so the clean logits.
    np.testing.assert_allclose(r.per_prompt[1, 0], r.clean[0], atol=ATOL)


def test_joint_row_components_index_different_axes(model, prompts):
    clean, corrupt, ans, wrong = prompts
    rows = [[{"layer": 0, "head": 1}, {"layer": 1, "pos": 3}], [{"layer": 1}, {"layer": 0, "pos": 1, "head": 0}]]
    r = jaxpatch.activation_patch(model, clean, corrupt, site="z", patches=rows, answer=ans, wrong=wrong, mesh=None)
    _, caps = model.run(clean, capture={"blocks.attn.hook_z"})
    src = caps["blocks.attn.hook_z"]
    b = np.arange(2)
    for i, row in enumerate(rows):
        iv = jaxpatch.combine(*[model.replace("blocks.attn.hook_z", src, layer=c["layer"],
                                              **{k: v for k, v in c.items() if k != "layer"}) for c in row])
        lg = one_forward(model, corrupt, iv)[:, -1]
        np.testing.assert_allclose(r.per_prompt[i, 0], lg[b, ans] - lg[b, wrong], atol=ATOL)


@pytest.mark.parametrize("rows,match", [
    ([{"layer": 0, "pos": 1}, {"layer": 1, "postion": 2}], "postion"),
    ([[{"layer": 0}, {"layer": 1, "hed": 0}]], "hed"),
    ([{"layer": 0}, {"pos": 2}], "layer"),
    ([{"layer": 0, "neuron": 5.5}], "5.5"),
    ([{"layer": 0, "pos": True}], "True"),
    ([{"layer": 0, "pos": 2}, [{"layer": 1}, {"layer": 0}]], "same"),
])
def test_bad_rows_are_errors(model, prompts, rows, match):
    clean, corrupt, ans, wrong = prompts
    site = "post" if "neuron" in str(rows) else "z" if "hed" in str(rows) else "resid_pre"
    with pytest.raises(jaxpatch.InputError, match=match):
        jaxpatch.activation_patch(model, clean, corrupt, site=site, patches=rows, answer=ans, wrong=wrong, mesh=None)


# ---------------------------------------------------------------------------------------------
# 4. Several corrupted sets: each set uses its own baseline everywhere.


def test_each_corrupted_set_uses_its_own_baseline(model, prompts):
    clean, corrupt, ans, wrong = prompts
    other = clean.copy()
    other[:, 3] = (other[:, 3] + 4) % 23
    sets = np.stack([corrupt, other])  # both differ from clean only at positions >= 1
    r = jaxpatch.activation_patch(model, clean, sets, site="resid_pre", by=("layer", "pos"), answer=ans, wrong=wrong,
                                  mesh=None)
    base = r.baselines()
    assert np.shape(base["corrupt"]) == (2,)
    np.testing.assert_allclose(base["corrupt"], r.corrupt[:, 0].mean(-1))
    assert abs(base["corrupt"][0] - base["corrupt"][1]) > 0.1  # the sets' baselines really differ
    # Patching position 0 (identical in every prompt) changes nothing: zero effect in every set.
    eff = r.effects()
    np.testing.assert_allclose(eff[:, :, 0], 0.0, atol=ATOL)
    for comp, value in r.top(4 * 6):
        if comp["pos"].startswith("0"):
            assert abs(value) < ATOL
    np.testing.assert_allclose(jaxpatch.compare.effects(r), eff)
    # Each set's effects equal a sweep run on that set alone.
    for s, toks in enumerate((corrupt, other)):
        alone = jaxpatch.activation_patch(model, clean, toks, site="resid_pre", by=("layer", "pos"), answer=ans,
                                          wrong=wrong, mesh=None)
        np.testing.assert_allclose(eff[s], alone.effects(), atol=ATOL)
        np.testing.assert_allclose(r.normalized()[s], alone.normalized(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 6. noise_positions as a boolean mask is a mask.


def test_noise_positions_mask_equals_indices(model, prompts):
    clean, _, ans, wrong = prompts
    kw = dict(site="resid_pre", by=("layer", "pos"), baseline="noise", direction="denoise", answer=ans, wrong=wrong,
              n_noise=2, mesh=None)
    mask = np.array([False, True, True, False, False, False])
    a = jaxpatch.activation_patch(model, clean, None, noise_positions=mask, **kw)
    b = jaxpatch.activation_patch(model, clean, None, noise_positions=[1, 2], **kw)
    np.testing.assert_array_equal(a.per_prompt, b.per_prompt)
    # Position 0 is not noised: patching it cannot restore anything.
    np.testing.assert_allclose(a.effects()[:, 0], 0.0, atol=ATOL)
    with pytest.raises(jaxpatch.InputError, match="mask"):
        jaxpatch.activation_patch(model, clean, None, noise_positions=np.array([True, False]), **kw)
    with pytest.raises(jaxpatch.InputError, match="no position"):
        jaxpatch.activation_patch(model, clean, None, noise_positions=np.zeros(6, bool), **kw)


# ---------------------------------------------------------------------------------------------
# Non-finite values are reported with the patch that produced them.


def test_nonfinite_patch_is_reported_with_its_indices(model, prompts):
    clean, corrupt, ans, wrong = prompts
    cfg = model.config
    _, caps = model.run(corrupt, capture={"blocks.hook_resid_pre", "blocks.attn.hook_k", "blocks.attn.hook_v"})
    _, src = model.run(clean, capture={"blocks.hook_resid_pre"})
    source = src["blocks.hook_resid_pre"].at[1, :, 3].set(jnp.nan)  # layer 1, position 3
    run_cache = sw.run_cache(cfg, caps, corrupt)
    ctx = {"answer_pos": jnp.full((2,), 5), "answer": jnp.asarray(ans), "wrong": jnp.asarray(wrong), "metric_consts": ((),)}
    spec = sw.grid(cfg, "blocks.hook_resid_pre", ("layer", "pos"), 6)
    with pytest.raises(jaxpatch.NonFiniteError, match=r"1 of 12 patches.*layer=1, pos=3"):
        sw.run(cfg, model.params, spec, run_cache, source, True, ("logit_diff",), ctx, 6, mesh=None)
    # accuracy alone would hide a NaN (comparisons with NaN are False): still reported
    with pytest.raises(jaxpatch.NonFiniteError, match="layer=1, pos=3"):
        sw.run(cfg, model.params, spec, run_cache, source, True, ("accuracy",), ctx, 6, mesh=None)


def test_nonfinite_metric_values_are_reported(model, prompts):
    clean, corrupt, ans, wrong = prompts

    def log_of_negative(logits):
        return jnp.log(logits[:, 0] - 1e6)

    with pytest.raises(jaxpatch.NonFiniteError, match="log_of_negative"):
        jaxpatch.activation_patch(model, clean, corrupt, metrics=(log_of_negative,), answer=ans, wrong=wrong, mesh=None)


# ---------------------------------------------------------------------------------------------
# Clear errors for bad arguments.


@pytest.mark.parametrize("kw,match", [
    (dict(answer_pos=2.7), "answer_pos"),
    (dict(answer=np.array([2.9, 3.0])), "answer"),
    (dict(wrong=1.0), "wrong"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(by=("layer", "pos", "pos")), "more than once"),
    (dict(metrics=("top0_accuracy",)), "top0_accuracy"),
    (dict(baseline="noise", noise_positions=[1], n_noise=0), "n_noise"),
    (dict(baseline="noise", noise_positions=[1.5]), "noise_positions"),
    (dict(baseline="noise", noise_positions=[9]), "noise_positions"),
    (dict(metrics=(lambda lg: lg[:, 0], lambda lg: lg[:, 1])), "distinct names"),
])
def test_bad_arguments_get_clear_errors(model, prompts, kw, match):
    clean, corrupt, ans, wrong = prompts
    args = dict(site="resid_pre", answer=ans, wrong=wrong, mesh=None)
    args.update(kw)
    with pytest.raises(jaxpatch.InputError, match=match):
        jaxpatch.activation_patch(model, clean, corrupt, **args)


# ---------------------------------------------------------------------------------------------
# Results keep the model's precision.


def test_float64_model_keeps_float64(x64, prompts):
    clean, corrupt, ans, wrong = prompts
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=16, n_heads=2, d_vocab=23, n_ctx=8)
    m64 = jaxpatch.HookedModel.from_config(cfg, seed=3, dtype=jnp.float64)
    r = jaxpatch.activation_patch(m64, clean, corrupt, site="resid_pre", metrics=("kl", "logprob"), answer=ans,
                                  wrong=wrong, mesh=None)
    assert r.per_prompt.dtype == np.float64
    # KL of the clean run against itself is exactly 0 in float64 (float32 log-probs left ~1e-8).
    lg = np.asarray(m64(clean), np.float64)[:, -1]
    b = np.arange(2)
    for layer in range(2):
        iv = m64.replace("blocks.hook_resid_pre", m64.run(clean, capture={"blocks.hook_resid_pre"})[1]["blocks.hook_resid_pre"],
                         layer=layer, pos=0)
        patched = np.asarray(m64(corrupt, iv), np.float64)[:, -1]
        lp_c = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        lp_p = patched - np.log(np.exp(patched - patched.max(-1, keepdims=True)).sum(-1, keepdims=True)) - patched.max(-1, keepdims=True)
        kl = (np.exp(lp_c) * (lp_c - lp_p)).sum(-1)
        np.testing.assert_allclose(r.per_prompt[layer, 0, 0], kl, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.per_prompt[layer, 0, 1], lp_p[b, ans], rtol=1e-10, atol=1e-12)
    _, cache = m64.run_with_cache(clean)
    out = tlp.get_act_patch_resid_pre(m64, corrupt, cache, lambda lg: lg[:, -1, 3].mean())
    assert out.dtype == jnp.float64


def test_rounding_noise_gap_is_not_normalised():
    # The corrupted runs (9 noised copies) differ from the clean run only after the answer
    # position: the true gap is 0, the computed one float32 rounding of a different batch size.
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=1, d_model=8, n_heads=2, d_mlp=8, d_vocab=20, n_ctx=8)
    m = jaxpatch.HookedModel.from_config(cfg, seed=0)
    m.params = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 else a, m.params)
    clean = np.array([[17, 12, 10, 5, 6, 0, 1], [0, 3, 16, 12, 18, 10, 12], [19, 14, 12, 10, 11, 18, 5]])
    r = jaxpatch.activation_patch(m, clean, None, site="resid_pre", by=("layer",), baseline="noise", noise_positions=[4, 6],
                                  n_noise=3, metrics=("kl", "logit_diff"), answer=1, wrong=2, answer_pos=2, mesh=None)
    for metric in ("kl", "logit_diff"):
        with pytest.raises(jaxpatch.JaxpatchError, match="rounding"):
            r.normalized(metric)
    assert np.isnan(r.to_dataframe()["kl_normalized"]).all()
