"""Sharded parameters on a ("sweep", "model") mesh: the layout of 7B-70B-shaped models (at the
``jax.eval_shape`` level), and sweeps, AtP and EAP on 2-D meshes of 8 CPU devices equal to one
device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding

import jaxpatch
from jaxpatch import edges, models, partitioning as pt
from jaxpatch.config import ModelConfig

LLAMA_FIELDS = dict(architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu",
                    qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)
BIG = {
    "llama-2-7b": ModelConfig(n_layers=32, d_model=4096, n_heads=32, d_head=128, d_mlp=11008, d_vocab=32000,
                              n_ctx=4096, **LLAMA_FIELDS),
    "llama-3-70b": ModelConfig(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_head=128, d_mlp=28672,
                               d_vocab=128256, n_ctx=8192, rope_base=500000.0, **LLAMA_FIELDS),
    "gemma-2-27b": ModelConfig(n_layers=46, d_model=4608, n_heads=32, n_kv_heads=16, d_head=128, d_mlp=36864,
                               d_vocab=256000, n_ctx=8192, architecture="gemma2", positional="rotary", norm="rmsnorm",
                               gated_mlp=True, act_fn="gelu_new", qkv_bias=False, o_bias=False, mlp_bias=False,
                               unembed_bias=False, post_norms=True, scale_embed=True, sliding_window=4096,
                               attn_softcap=50.0, final_softcap=30.0,
                               layer_types=("sliding_attention", "full_attention") * 23),
}
OVERHEAD = 1e-3  # replicated norm weights: at most 0.1 % above an even share


@pytest.mark.parametrize("mesh_shape", [(4, 16), (8, 8)])
@pytest.mark.parametrize("name", list(BIG))
def test_big_models_partition_evenly(name, mesh_shape):
    cfg = BIG[name]
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    mesh = AbstractMesh(mesh_shape, ("sweep", "model"))
    lo = pt.layout(shapes, mesh)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes))
    assert lo.total_bytes == 2 * n_params
    assert lo.per_device_bytes <= lo.share_bytes * (1 + OVERHEAD), (lo.per_device_bytes, lo.share_bytes)
    # only 1-D norm weights are left replicated anywhere
    assert all(k.endswith(("_w']", "_b']")) and "W_" not in k for k in lo.replicated), lo.replicated
    specs = pt.param_specs(shapes, mesh)
    if name == "llama-3-70b" and mesh_shape == (4, 16):  # 8 kv heads on 16 devices: head_dim takes "model"
        assert tuple(specs["blocks"]["W_K"]) == (None, None, "sweep", "model")
    assert tuple(specs["blocks"]["W_Q"]) == (None, "model", "sweep", None)


CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=48, n_ctx=16),
    "llama": ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                         **LLAMA_FIELDS),
}


def _model(name):
    m = jaxpatch.HookedModel.from_config(CONFIGS[name], seed=1)
    m.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, m.params)
    return m


def _prompts():
    rng = np.random.default_rng(0)
    clean = rng.integers(1, 48, (4, 7)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % 48
    return clean, corrupt, np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("sweep", "model"))


def test_shards_on_devices_are_the_layout():
    m = _model("llama")
    mesh = _mesh((2, 4))
    sharded = pt.shard_params(m.params, mesh)
    lo = pt.layout(m.params, mesh)
    for leaf, spec in zip(jax.tree_util.tree_leaves(sharded),
                          jax.tree_util.tree_leaves(pt.param_specs(m.params, mesh), is_leaf=lambda x: hasattr(x, "index"))):
        expect = pt.shard_shape(leaf.shape, spec, dict(mesh.shape))
        assert NamedSharding(mesh, spec).shard_shape(leaf.shape) == expect
        assert {s.data.shape for s in leaf.addressable_shards} == {expect}
    per_dev = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(sharded))
    assert per_dev == lo.per_device_bytes
    np.testing.assert_array_equal(np.asarray(sharded["blocks"]["W_Q"]), np.asarray(m.params["blocks"]["W_Q"]))


TOL = 1e-5  # float32: sharded matmuls sum in another order (relative to the largest value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sweep_atp_and_eap_on_2d_meshes_equal_one_device(name):
    m = _model(name)
    clean, corrupt, ans, wrong = _prompts()
    kw = dict(answer=ans, wrong=wrong)
    ref_z = jaxpatch.activation_patch(m, clean, corrupt, site="z", by=("layer", "head", "pos"), mesh=None, **kw).values()
    ref_atp = jaxpatch.attribution_patch(m, clean, corrupt, site="z", **kw).per_prompt
    ref_eap = edges.edge_attribution_patch(m, clean, corrupt, **kw).per_prompt
    for shape in [(2, 4), (4, 2), (1, 8)]:
        mesh = _mesh(shape)
        ms = jaxpatch.HookedModel(m.config, pt.shard_params(m.params, mesh))
        assert len(ms.params["blocks"]["W_Q"].sharding.device_set) == 8
        z = jaxpatch.activation_patch(ms, clean, corrupt, site="z", by=("layer", "head", "pos"), mesh=mesh, **kw).values()
        atp = jaxpatch.attribution_patch(ms, clean, corrupt, site="z", **kw).per_prompt
        eap = edges.edge_attribution_patch(ms, clean, corrupt, **kw).per_prompt
        for got, ref in ((z, ref_z), (atp, ref_atp), (eap, ref_eap)):
            assert np.abs(ref).max() > 1e-3
            np.testing.assert_allclose(got, ref, atol=TOL * np.abs(ref).max(), rtol=0, err_msg=str(shape))


def test_bad_mesh_axes_are_named():
    m = _model("gpt2")
    clean, corrupt, ans, wrong = _prompts()
    bad = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    with pytest.raises(jaxpatch.InputError, match="'sweep', 'model'"):
        pt.shard_params(m.params, bad)
    with pytest.raises(jaxpatch.InputError, match="'sweep', 'model'"):
        jaxpatch.activation_patch(m, clean, corrupt, site="z", answer=ans, wrong=wrong, mesh=bad)
    explicit = jax.make_mesh((2, 4), ("sweep", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(jaxpatch.InputError, match="automatic mesh axes"):
        pt.shard_params(m.params, explicit)
