"""Sharded weights across processes (jaxpatch/multihost.py, jaxpatch/partitioning.py): 2 local
processes x 2 CPU devices each (gloo), a ("sweep", "model") mesh over all 4 devices.

* A Llama-style GQA checkpoint is loaded by both processes with ``load_pretrained(path, mesh=)``:
  each process streams only its shards, no process holds any weight whole. A z sweep (layer x
  head x position), AtP, EAP, exact edge patching, a circuit evaluation and path patching on it
  equal one process on one device (float32: sharded matmuls sum in another order, 1e-5 relative
  to the largest value, as tests/test_partitioning.py), and the sweep is bitwise equal to one
  process on the same 2x2 mesh (the "model" collectives stay inside each process).
* ``gather="process0"`` returns the result on process 0 only, for the sweep and the gradient calls.
* A checkpointed sweep, rerun, loads every group (the weights' fingerprint, computed over the
  processes, is stable); processes given different prompts are refused.
* A GPT-2 model held whole by each process, swept on a 1x4 mesh (the "model" axis across the two
  processes), is sharded by the sweep itself and equals one device.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxpatch
from jaxpatch import circuits, edges, multihost
from jaxpatch import partitioning as pt
from jaxpatch.config import ModelConfig
from tests.helpers import run_two, two_process_env

TOL = 1e-5  # float32: sharded matmuls sum in another order (relative to the largest value)

LLAMA = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=48, n_ctx=16,
                    architecture="llama", positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu",
                    qkv_bias=False, o_bias=False, mlp_bias=False, unembed_bias=False, tied_embeddings=False)
GPT2 = ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=48, n_ctx=16)

SETUP = """
import numpy as np, jaxpatch
from jaxpatch import circuits, edges
rng = np.random.default_rng(0)
clean = rng.integers(1, 48, (4, 7)).astype(np.int32)
corrupt = clean.copy()
corrupt[:, 2] = (corrupt[:, 2] + 5) % 48
KW = dict(answer=np.array([1, 2, 3, 4]), wrong=np.array([5, 6, 7, 8]))
EDGES = [("embed", "logits"), ("L0H1", "MLP1.in"), ("MLP0", "L1H2.q")]
CIRCUITS = [EDGES, EDGES[:1]]
PATH = dict(senders=["L0H1", "MLP0"], receivers=["L1H0.q", "L1KV1.k", "logits"])


def calls(m, mesh, **extra):
    return {
        "z": jaxpatch.activation_patch(m, clean, corrupt, site="z", by=("layer", "head", "pos"), mesh=mesh,
                                       chunk_size=4, progress=False, **KW, **extra),
        "atp": jaxpatch.attribution_patch(m, clean, corrupt, site="z", method="atp", **KW, **extra),
        "eap": edges.edge_attribution_patch(m, clean, corrupt, **KW, **extra),
        "edge": edges.exact_edge_patch(m, clean, corrupt, EDGES, **KW, **extra),
    }


def values(out):
    return {k: (None if v is None else np.asarray(getattr(v, "per_prompt", v))) for k, v in out.items()}
"""

CHILD = """
import os, sys
pid, port, out, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import jax
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
from jax.sharding import Mesh
""" + SETUP + """
from jaxpatch import multihost, resume
assert (jax.device_count(), jax.process_count()) == (4, 2)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("sweep", "model"))  # "model" within each process
m = jaxpatch.load_pretrained(ckpt, mesh=mesh)
leaves = jax.tree_util.tree_leaves(m.params)
assert multihost.spread(m.params) and all(not a.is_fully_addressable for a in leaves)
held = sum(s.data.size for a in leaves for s in a.addressable_shards)
res = values(calls(m, mesh))
res["circuit"] = circuits.evaluate_circuit(m, clean, corrupt, CIRCUITS, **KW).per_prompt
res["path"] = circuits.path_patch(m, clean, corrupt, **PATH, **KW).per_prompt
p0 = values(calls(m, mesh, gather="process0"))
res.update({k + "_p0": v for k, v in p0.items() if v is not None})
nones = sorted(k for k, v in p0.items() if v is None)
first = jaxpatch.activation_patch(m, clean, corrupt, site="resid_pre", mesh=mesh, checkpoint_dir=os.path.join(out, "ck"),
                                  chunk_size=2, progress=False, **KW).per_prompt
runs = [resume.last_run["computed"], resume.last_run["loaded"]]
again = jaxpatch.activation_patch(m, clean, corrupt, site="resid_pre", mesh=mesh, checkpoint_dir=os.path.join(out, "ck"),
                                  chunk_size=2, progress=False, **KW).per_prompt
runs += [resume.last_run["computed"], resume.last_run["loaded"]]
other = corrupt.copy()
other[0, 0] = (other[0, 0] + pid) % 48  # process 1 is given different prompts
try:
    jaxpatch.attribution_patch(m, clean, other, site="z", **KW)
    refused = ""
except jaxpatch.InputError as e:
    refused = str(e)
# GPT-2 weights held whole by each process, swept on a 1x4 mesh: the sweep shards them. The
# weights are the parent's HookedModel.from_config(GPT2, seed=2), read from its npz (drawing them
# here would compile the random init in each process: seconds of CPU, twice).
import jax.numpy as jnp
gpt2_params = {}
with np.load(os.path.join(out, "gpt2.npz")) as zf:
    for key in zf.files:
        *outer, leaf = key.split("/")
        d = gpt2_params
        for k in outer:
            d = d.setdefault(k, {})
        d[leaf] = jnp.asarray(zf[key])
g = jaxpatch.HookedModel(jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=48, n_ctx=16), gpt2_params)
wide = Mesh(np.array(jax.devices()).reshape(1, 4), ("sweep", "model"))
res["gpt2"] = jaxpatch.activation_patch(g, clean, corrupt, site="resid_pre", mesh=wide, chunk_size=2, progress=False,
                                        **KW).per_prompt
np.savez(os.path.join(out, f"p{pid}.npz"), first=first, again=again, runs=np.asarray(runs), held=held,
         nones=np.asarray(nones), refused=np.asarray(refused), **res)
print("CHILD DONE", flush=True)
"""


@pytest.mark.slow
def test_weights_sharded_across_processes_equal_one_device(tmp_path):
    ns: dict = {}
    exec(SETUP, ns)
    model = jaxpatch.HookedModel.from_config(LLAMA, seed=1)
    model.params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim >= 2 else a, model.params)  # larger effects
    ckpt = jaxpatch.save_pretrained(model, tmp_path / "llama")
    g = jaxpatch.HookedModel.from_config(GPT2, seed=2)
    flat = jax.tree_util.tree_flatten_with_path(g.params)[0]
    np.savez(tmp_path / "gpt2.npz", **{"/".join(k.key for k in kp): np.asarray(v) for kp, v in flat})  # the children's
    # ~140 s alone; CI runs other test files beside it
    run_two(CHILD, tmp_path, ckpt, env=two_process_env(), timeout=900)

    loaded = jaxpatch.load_pretrained(ckpt)
    ref = ns["values"](ns["calls"](loaded, None, ))
    ref["circuit"] = circuits.evaluate_circuit(loaded, ns["clean"], ns["corrupt"], ns["CIRCUITS"], mesh=None,
                                               **ns["KW"]).per_prompt
    ref["path"] = circuits.path_patch(loaded, ns["clean"], ns["corrupt"], mesh=None, **ns["PATH"], **ns["KW"]).per_prompt
    ref["gpt2"] = jaxpatch.activation_patch(g, ns["clean"], ns["corrupt"], site="resid_pre", mesh=None,
                                            progress=False, **ns["KW"]).per_prompt
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("sweep", "model"))
    one_proc = jaxpatch.activation_patch(jaxpatch.HookedModel(LLAMA, pt.shard_params(loaded.params, mesh)), ns["clean"],
                                         ns["corrupt"], site="z", by=("layer", "head", "pos"), mesh=mesh, chunk_size=4,
                                         progress=False, **ns["KW"]).per_prompt
    n_weights = sum(a.size for a in jax.tree_util.tree_leaves(loaded.params))
    for i in range(2):
        z = np.load(tmp_path / f"p{i}.npz")
        for key in ("z", "atp", "eap", "edge", "circuit", "path", "gpt2"):
            got, want = z[key], np.asarray(ref[key])
            assert got.shape == want.shape and np.nanmax(np.abs(want)) > 1e-3, (i, key)
            np.testing.assert_allclose(got, want, atol=TOL * np.nanmax(np.abs(want)), rtol=0, err_msg=f"process {i} {key}")
        assert z["z"].tobytes() == one_proc.tobytes()  # same mesh in one process: bitwise
        if i == 0:  # gather="process0": process 0 holds the same values
            for key in ("z", "atp", "eap", "edge"):
                assert z[key + "_p0"].tobytes() == z[key].tobytes(), key
        else:
            assert z["nones"].tolist() == ["atp", "eap", "edge", "z"] and "z_p0" not in z.files
        assert z["first"].tobytes() == z["again"].tobytes()
        computed, loaded_groups, recomputed, reloaded = z["runs"].tolist()
        assert computed > 0 and loaded_groups == 0 and recomputed == 0 and reloaded == computed
        assert "different inputs" in str(z["refused"]) and "process(es) [1]" in str(z["refused"])
        # FSDP x tensor parallel: each process holds about half the weights (norms are replicated)
        assert int(z["held"]) < 0.6 * n_weights, (int(z["held"]), n_weights)


def test_place_params_shards_on_a_two_d_mesh():
    """``place_params``: host weights on a ("sweep", "model") mesh go to their partitioning rule's
    shards; on a 1-D mesh they are replicated."""
    m = jaxpatch.HookedModel.from_config(LLAMA, seed=1)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("sweep", "model"))
    placed = multihost.place_params(m.params, mesh)
    want = pt.param_shardings(m.params, mesh)
    for a, s, orig in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(m.params)):
        assert a.sharding.is_equivalent_to(s, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(orig))
    one_d = Mesh(np.array(jax.devices()[:2]), ("sweep",))
    rep = multihost.place_params(m.params, one_d)
    assert all(a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(rep))
    assert not multihost.spread(m.params) and not multihost.spread(placed)  # one process: nothing spans processes


def test_global_digest_is_the_contents():
    """The weights' fingerprint across processes: equal for equal contents whatever the layout,
    different when one element changes (here on single-process arrays; the 2-process test checks
    that a rerun's checkpoint accepts it)."""
    x = np.arange(48, dtype=np.float32).reshape(6, 8)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("sweep", "model"))
    a = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("sweep", "model")))
    b = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sweep")))
    y = x.copy()
    y[5, 7] += 1
    assert multihost.global_digest(a) == multihost.global_digest(b) == multihost.global_digest(jax.numpy.asarray(x))
    assert multihost.global_digest(jax.numpy.asarray(y)) != multihost.global_digest(a)
    assert multihost.global_digest(jax.numpy.asarray(x[::-1].copy())) != multihost.global_digest(a)  # where each value is
