"""``load_pretrained(path, mesh=)``: parameters streamed one tensor at a time into their shards
equal the unsharded load, and the host never holds the whole checkpoint (measured in a child
process)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxpatch
from jaxpatch import partitioning as pt
from jaxpatch.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = {
    "llama": ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                         architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu",
                         qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False),
    "gpt_neox": ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                            architecture="gpt_neox", positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                            act_fn="gelu", tied_embeddings=False, unembed_bias=False),
    "gemma2": ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                          architecture="gemma2", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="gelu_new",
                          qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, post_norms=True,
                          scale_embed=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4,
                          layer_types=("sliding_attention", "full_attention")),
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=48, n_ctx=16),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_load_equals_the_plain_load(family, tmp_path):
    m = jaxpatch.HookedModel.from_config(FAMILIES[family], seed=2)
    path = jaxpatch.save_pretrained(m, tmp_path / "ckpt")
    plain = jaxpatch.load_pretrained(path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("sweep", "model"))
    sharded = jaxpatch.load_pretrained(path, mesh=mesh)
    specs = pt.param_specs(plain.params, mesh)
    for (kp, a), b, spec in zip(jax.tree_util.tree_leaves_with_path(plain.params), jax.tree_util.tree_leaves(sharded.params),
                                jax.tree_util.tree_leaves(specs, is_leaf=lambda x: hasattr(x, "index"))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(kp))
        assert b.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), b.ndim), jax.tree_util.keystr(kp)
    toks = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(sharded(toks)), np.asarray(plain(toks)), rtol=0, atol=1e-5)


def test_sharded_load_reports_nonfinite_tensors_by_name(tmp_path):
    m = jaxpatch.HookedModel.from_config(FAMILIES["llama"], seed=2)
    m.params["blocks"]["W_in"] = m.params["blocks"]["W_in"].at[1, 0, 0].set(np.nan)
    path = jaxpatch.save_pretrained(m, tmp_path / "ckpt")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("sweep", "model"))
    with pytest.raises(jaxpatch.NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxpatch.load_pretrained(path, mesh=mesh)


_CHILD = textwrap.dedent("""
    import ctypes, gc, json, sys
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import jaxpatch
    import jaxpatch.partitioning

    libc = ctypes.CDLL("libc.so.6")

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("sweep", "model"))
    streamed = sys.argv[2] == "stream"
    for rep in range(2):  # the first load compiles the placement programs; the second is measured
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident size (VmHWM)
            f.write("5")
        before = status("VmRSS")
        m = jaxpatch.load_pretrained(sys.argv[1], mesh=mesh if streamed else None)
        if not streamed:
            m.params = jaxpatch.partitioning.shard_params(m.params, mesh)
        jax.block_until_ready(m.params)
        peak = status("VmHWM")
        gc.collect()
        libc.malloc_trim(0)
        after = status("VmRSS")
        if rep == 0:
            del m
    print(json.dumps({"before": before, "peak": peak, "after": after}))
""")


def _measure(path, how):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), how], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_load_never_holds_the_whole_checkpoint_in_host_memory(tmp_path):
    """A 124M-parameter Llama-shaped bfloat16 checkpoint (248 MB), loaded twice in a child process
    (the second load is measured: the first compiles). On CPU the devices' buffers are host memory
    too, so the parameters themselves appear once; what must stay small is the peak beyond them.
    Measured here: streamed 77-124 MiB beyond the parameters, converting the whole checkpoint
    first ~700 MiB."""
    cfg = ModelConfig(n_layers=8, d_model=1024, n_heads=8, n_kv_heads=4, d_head=128, d_mlp=4096, d_vocab=2000,
                      n_ctx=64, architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True,
                      act_fn="silu", qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False,
                      tied_embeddings=False)
    m = jaxpatch.HookedModel.from_config(cfg, seed=0, dtype="bfloat16")
    path = jaxpatch.save_pretrained(m, tmp_path / "ckpt")
    del m
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    streamed, whole = _measure(path, "stream"), _measure(path, "whole")
    beyond = {k: r["peak"] - r["after"] for k, r in (("streamed", streamed), ("whole", whole))}
    print(f"checkpoint {size / 2**20:.0f} MiB; peak beyond the loaded parameters: streamed "
          f"{beyond['streamed'] / 2**20:.0f} MiB, whole {beyond['whole'] / 2**20:.0f} MiB")
    # measured 77-124 MiB streamed (it varies with the load on the machine) vs ~700 MiB whole
    assert beyond["streamed"] < 0.6 * size, (beyond, size)
    assert beyond["streamed"] < 0.25 * beyond["whole"], beyond
    assert beyond["whole"] > 1.5 * size  # the measurement tells the two apart
    # The parameters, once (twice would be >= 2x). The second load reuses some of the memory the
    # first one freed and the allocator kept, so the resident growth reads below the size: measured
    # 0.89x-0.99x of it in three runs (the bound was 0.9x-1.1x and failed once at 0.89x).
    assert 0.75 * size < streamed["after"] - streamed["before"] < 1.25 * size, (streamed, size)
