"""``jaxpatch.models.init_params`` draws every weight through one batched sampler
(:mod:`jaxpatch.models.init_draw`): the weights must stay those that seeds have always drawn, bit
for bit, for every family, dtype, seed and PRNG setting."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpatch import models
from jaxpatch.config import ModelConfig
from jaxpatch.models import init_draw

_BASE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=51, n_ctx=16)
_LLAMA = dict(_BASE, architecture="llama", n_kv_heads=2, positional="rotary", norm="rmsnorm", gated_mlp=True,
              act_fn="silu", qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)
CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=51, n_ctx=16),
    "llama_gqa": ModelConfig(**_LLAMA),
    "gemma2": ModelConfig(**{**_LLAMA, "architecture": "gemma2", "act_fn": "gelu_pytorch_tanh", "tied_embeddings": True,
                             "post_norms": True, "scale_embed": True, "attn_softcap": 50.0, "final_softcap": 30.0,
                             "sliding_window": 3, "layer_types": ("sliding_attention", "full_attention")}),
    "neox": ModelConfig(**_BASE, architecture="gpt_neox", positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                        act_fn="gelu", tied_embeddings=False, unembed_bias=False),
    "qwen3": ModelConfig(**{**_LLAMA, "architecture": "qwen3", "qk_norm": True, "qkv_bias": True}),
}


def _bits(tree):
    return jax.tree_util.tree_map(lambda a: (a.dtype, a.shape, np.asarray(a).view(np.uint8).tobytes()), tree)


@partial(jax.jit, static_argnums=(0, 2))
def _one_per_draw(config, key, dtype):
    """The init as it was (one ``jax.random.normal`` per weight, compiled with the family's code),
    and each of its draws with its key, in order."""
    draws = []

    def draw(k, shape):
        draws.append((jax.lax.optimization_barrier(jax.random.normal(k, shape, jnp.float32)), k))
        return draws[-1][0]

    with init_draw._drawing_with(draw):
        params = models._family_init(config)(config, key, dtype)
    return params, draws


@partial(jax.jit, static_argnums=1)
def _normal_many(keys, shapes):
    return init_draw.normal_many(list(zip(keys, shapes)))


@pytest.mark.parametrize("family,dtype,x64,typed", [
    ("gpt2", jnp.float32, False, False), ("llama_gqa", jnp.float32, False, False), ("gemma2", jnp.float32, False, False),
    ("neox", jnp.float32, False, False), ("qwen3", jnp.float32, False, False), ("gpt2", jnp.bfloat16, False, False),
    ("qwen3", jnp.float16, False, False), ("llama_gqa", jnp.float32, True, True),
])
def test_init_params_is_the_one_draw_per_weight_program(family, dtype, x64, typed):
    """Each draw equals ``jax.random.normal`` of its key and shape, and the parameters equal those
    of the program that drew each weight on its own, bit for bit; a second seed reuses both
    compiled programs."""
    config = CONFIGS[family]
    with jax.enable_x64(x64):
        for seed in (3, 104):
            key = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
            want, draws = _one_per_draw(config, key, dtype)
            assert len(draws) >= 12
            batched = _normal_many([k for _, k in draws], tuple(d.shape for d, _ in draws))
            for got, (d, _) in zip(batched, draws):
                assert got.shape == d.shape and got.dtype == d.dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(d).view(np.uint32))
            assert _bits(models._init_jit(config, key, jnp.dtype(dtype))) == _bits(want)


@pytest.mark.parametrize("partitionable,x64,typed", [
    (False, False, False), (False, True, True), (True, True, False), (True, False, True),
])
def test_prng_settings_groups_odd_sizes_and_fallbacks(monkeypatch, partitionable, x64, typed):
    """Both threefry counter schemes (``jax_threefry_partitionable``: the original one pads odd
    sizes), 64-bit mode, typed keys; draws split into several groups, a draw larger than a group,
    an empty one and a non-threefry key (the last three drawn by ``jax.random.normal`` itself)."""
    monkeypatch.setattr(init_draw, "GROUP", 40)
    shapes = [(3,), (7, 5), (1,), (2, 3, 5), (41,), (4,), (0, 3), (13,), (3, 3)]
    with jax.threefry_partitionable(partitionable), jax.enable_x64(x64):
        root = jax.random.key(2) if typed else jax.random.PRNGKey(2)
        keys = list(jax.random.split(root, len(shapes)))
        keys[5] = jax.random.key(4, impl="rbg")
        got = _normal_many(keys, tuple(shapes))
        want = jax.jit(lambda ks: [jax.random.normal(k, s, jnp.float32) for k, s in zip(ks, shapes)])(keys)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32))


@pytest.mark.parametrize("option", [dict(qk_norm=True), dict(qkv_bias=False), dict(post_norms=True), {}])
def test_gpt2_shaped_configs_get_every_weight_they_read(option):
    """A GPT-2-shaped config with an option GPT-2's own draw lacks gets the general draw (once a
    KeyError 'q_norm_w' mid-forward); plain GPT-2 keeps its own draw (seeds reproduce)."""
    import jaxpatch
    from jaxpatch.models import gpt2

    config = ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16, **option)
    own = models._family_init(config) is gpt2.init_params
    assert own == (not option or "qkv_bias" in option)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    names = [jax.tree.map(lambda a: a.shape, jax.eval_shape(partial(f, config), key))
             for f in (gpt2.init_params, models.transformer.init_params)]
    missing = {k for k in names[1]["blocks"] if k not in names[0]["blocks"]} | {k for k in names[1] if k not in names[0]}
    assert bool(missing) == (not own)  # GPT-2's draw only where it lacks nothing (extra biases go unread)
    model = jaxpatch.HookedModel.from_config(config, seed=0)
    logits = np.asarray(model(np.arange(5, dtype=np.int32)[None]))
    assert logits.shape == (1, 5, 50) and np.isfinite(logits).all()
    if "qk_norm" in option:
        assert model.params["blocks"]["q_norm_w"].shape == (2, 8)
