"""The pure forward pass: shapes, float64 reference, intervention semantics, no recompilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sites
from jaxpatch.loading import read_checkpoint
from jaxpatch.models import gpt2
from tests.helpers import random_tokens, rel_err
from tests.reference import numpy_gpt2


def test_every_site_has_its_declared_shape(tiny_model):
    tokens = random_tokens(tiny_model.config, batch=3, pos=7)
    _, cache = tiny_model.run_with_cache(tokens)
    shapes = tiny_model.site_shapes(batch=3, pos=7)
    assert set(cache) == set(shapes) == set(sites.all_full_names(tiny_model.config))
    for name, shape in shapes.items():
        assert cache[name].shape == shape, name


def test_float64_matches_numpy_reference(tmp_path, x64):
    config = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=24, n_heads=3, d_vocab=29, n_ctx=10)
    model64 = jaxpatch.HookedModel.from_config(config, seed=5, dtype=jnp.float64)
    jaxpatch.save_pretrained(model64, tmp_path / "m")  # float32 on disk
    hf_config, tensors = read_checkpoint(tmp_path / "m")
    loaded = jaxpatch.load_pretrained(tmp_path / "m", dtype="float64")
    tokens = random_tokens(config, batch=2, pos=10, seed=4)
    expected, acts = numpy_gpt2.forward(tensors, hf_config, tokens)
    logits, cache = loaded.run_with_cache(tokens)
    assert logits.dtype == jnp.float64
    assert rel_err(logits, expected) < 1e-10
    for name, ref in acts.items():
        assert rel_err(cache[name], ref) < 1e-10, name


def test_float32_close_to_float64(tiny_config):
    tokens = random_tokens(tiny_config, seed=1)
    m32 = jaxpatch.HookedModel.from_config(tiny_config, seed=3)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), m32.params)
        l64 = np.asarray(jaxpatch.HookedModel(tiny_config, p64)(tokens))
    assert rel_err(m32(tokens), l64) < 1e-5


def test_bfloat16_runs_and_tracks_float32(tiny_model):
    tokens = random_tokens(tiny_model.config, seed=2)
    pbf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny_model.params)
    logits = jaxpatch.HookedModel(tiny_model.config, pbf)(tokens)
    assert logits.dtype == jnp.bfloat16
    assert rel_err(logits.astype(jnp.float32), tiny_model(tokens)) < 5e-2  # bf16 has 8 mantissa bits


def test_one_dimensional_tokens_are_one_prompt(tiny_model):
    tokens = random_tokens(tiny_model.config, batch=1, pos=6)
    assert tiny_model(tokens[0]).shape == (1, 6, tiny_model.config.d_vocab)
    np.testing.assert_array_equal(tiny_model(tokens[0]), tiny_model(tokens))


def test_empty_intervention_is_bit_identical(tiny_model):
    tokens = random_tokens(tiny_model.config, seed=3)
    plain = np.asarray(tiny_model(tokens))
    np.testing.assert_array_equal(tiny_model(tokens, jaxpatch.combine()), plain)
    # An edit with an empty selection (no layers) is also a no-op, bit for bit.
    _, cache = tiny_model.run_with_cache(tokens, names="blocks.1.hook_resid_pre")
    off = tiny_model.replace("blocks.hook_resid_pre", jnp.zeros_like(cache["blocks.1.hook_resid_pre"]),
                             layer=jnp.zeros((0,), jnp.int32))
    np.testing.assert_array_equal(tiny_model(tokens, off), plain)


@pytest.mark.parametrize("seed", [0, 1])
def test_patching_every_site_from_clean_cache_restores_clean_logits(tiny_config, seed):
    model = jaxpatch.HookedModel.from_config(tiny_config, seed=seed)
    clean = random_tokens(tiny_config, seed=10 + seed)
    corrupt = random_tokens(tiny_config, seed=20 + seed)
    clean_logits, cache = model.run_with_cache(clean)
    ivs = jaxpatch.combine(*[model.replace(c, cache.stacked(c) if sites.SITES[c].per_layer else cache[c])
                             for c in sites.SITES if sites.SITES[c].available(tiny_config) and c not in sites.ON_DEMAND])
    patched = model(corrupt, ivs)
    np.testing.assert_allclose(patched, clean_logits, atol=1e-5, rtol=1e-5)
    assert rel_err(model(corrupt), clean_logits) > 1e-2  # the prompts really differ
    # Patching only the final residual stream also suffices: everything downstream recomputes.
    iv = model.replace(f"blocks.{tiny_config.n_layers - 1}.hook_resid_post",
                       cache[f"blocks.{tiny_config.n_layers - 1}.hook_resid_post"])
    np.testing.assert_allclose(model(corrupt, iv), clean_logits, atol=1e-5, rtol=1e-5)


def test_forward_compiles_once_across_intervention_targets(tiny_model):
    config, params = tiny_model.config, tiny_model.params
    tokens = jnp.asarray(random_tokens(config, seed=4))
    _, cache = tiny_model.run_with_cache(tokens)
    value = cache.stacked("blocks.attn.hook_z")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(ivs):
        return gpt2.forward(config, params, tokens, ivs)[0]

    outs = []
    for layer, pos, head in [(0, 0, 0), (2, 5, 3), (1, 3, 1), (-1, -1, -1)]:
        outs.append(run(tiny_model.replace("blocks.attn.hook_z", value * 0.0, layer=layer, pos=pos, head=head)))
    assert not np.allclose(outs[0], outs[1])  # different targets really changed the output


def test_edit_selects_exactly_the_indexed_slice(tiny_model):
    tokens = random_tokens(tiny_model.config, seed=5)
    _, base = tiny_model.run_with_cache(tokens, names=lambda n: n.startswith("blocks.1.attn.hook_z"))
    iv = tiny_model.zero("blocks.1.attn.hook_z", pos=[2, 4], head=3)
    _, cache = tiny_model.run_with_cache(tokens, names=["blocks.1.attn.hook_z"], interventions=iv)
    z, z0 = np.asarray(cache["blocks.1.attn.hook_z"]), np.asarray(base["blocks.1.attn.hook_z"])
    selected = np.zeros(z.shape, bool)
    selected[:, [2, 4], 3, :] = True
    assert np.all(z[selected] == 0)
    np.testing.assert_array_equal(z[~selected], z0[~selected])


def test_add_and_replace_compose_in_order(tiny_model):
    tokens = random_tokens(tiny_model.config, seed=6)
    name = "blocks.0.hook_resid_post"
    _, base = tiny_model.run_with_cache(tokens, names=[name])
    d = tiny_model.config.d_model
    iv = tiny_model.zero(name) + tiny_model.add(name, jnp.ones((d,)), pos=1)
    _, cache = tiny_model.run_with_cache(tokens, names=[name], interventions=iv)
    out = np.asarray(cache[name])
    assert np.all(out[:, 1] == 1.0) and np.all(out[:, [0, 2, 3]] == 0.0)
    assert not np.allclose(base[name], out)


def test_neuron_and_pattern_edits(tiny_model):
    tokens = random_tokens(tiny_model.config, seed=7)
    iv = tiny_model.zero("blocks.2.mlp.hook_post", neuron=[0, 5]) + tiny_model.zero(
        "blocks.1.attn.hook_pattern", head=0, q_pos=3, k_pos=1)
    _, cache = tiny_model.run_with_cache(tokens, names=["blocks.2.mlp.hook_post", "blocks.1.attn.hook_pattern"],
                                         interventions=iv)
    assert np.all(np.asarray(cache["blocks.2.mlp.hook_post"])[..., [0, 5]] == 0)
    pat = np.asarray(cache["blocks.1.attn.hook_pattern"])
    assert np.all(pat[:, 0, 3, 1] == 0) and np.all(pat[:, 0, 3, 0] > 0)


def test_run_with_cache_names_filter(tiny_model):
    tokens = random_tokens(tiny_model.config)
    _, cache = tiny_model.run_with_cache(tokens, names=["blocks.0.attn.hook_z", "hook_embed"])
    assert list(cache) == ["blocks.0.attn.hook_z", "hook_embed"]
    assert cache["z", 0].shape == (2, 8, 4, 8)
    with pytest.raises(KeyError, match="was not cached"):
        cache["blocks.1.attn.hook_z"]
    _, cache = tiny_model.run_with_cache(tokens, names=lambda n: n.endswith("hook_pattern"))
    assert len(cache) == tiny_model.config.n_layers
    assert cache["pattern", -1].shape == (2, 4, 8, 8)
