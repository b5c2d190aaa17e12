"""Where multi-process results go (``gather=``; jaxpatch/multihost.py): 2 local processes x 2 CPU
devices each, joined by ``jax.distributed.initialize`` (gloo collectives).

* ``gather="all"`` (default): every process returns the whole result;
* ``gather="process0"``: process 0 returns it (bitwise equal to one process on one device), the
  other returns ``None``, and no floating-point array is gathered or broadcast between processes
  (only the per-patch finiteness flags and the input digests), with or without a checkpoint;
* ``attribution_patch`` and ``edge_attribution_patch`` split the prompts over the processes
  (``mesh="auto"``): equal to one process to 1e-5 of the largest value (a prompt's estimate in a
  smaller batch may round differently); ``exact_edge_patch`` splits its edges, and
  ``evaluate_circuit`` / ``path_patch`` with ``mesh="auto"`` their circuits / pairs, over the
  devices of both processes (1e-5); with ``mesh=None`` each process computes the whole call: bitwise equal
  to one process. Under ``"process0"`` the others get ``None``;
* a bad ``gather`` (every entry point) or ``mesh`` (attribution, EAP) is an :class:`InputError`.

The same two processes first run tests/test_multihost.py's checks (the plain sharded sweep,
bitwise equal to one process on one device; the progress bar on process 0 only; a checkpoint
written by process 0 and resumed by both; different prompts refused; plain AtP split over the
processes): one 2-process job for both modules' checks, so the processes start, join and compile
the shared sweep once (:func:`two_processes`, asserted by
``test_two_processes_equal_one_process_bitwise`` below).
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxpatch
from tests.helpers import CHILD_PREAMBLE as PREAMBLE
from tests.helpers import CHILD_SWEEP_SETUP, child_env, rel_err, run_two

EDGES = [("embed", "L1H0.q"), ("L0H1", "logits"), ("MLP0", "MLP1.in"), ("L0H2", "L1H3.v")]

# tests/test_multihost.py's checks, run first (before the spies below are installed): its own
# checkpoint folder ("ckpt_mh") and result file ("mh{pid}.npz").
MULTIHOST = """
from jaxpatch import resume, sweep
assert sweep.default_mesh().size == 4
plain = jaxpatch.activation_patch(model, clean, corrupt, progress=False, **KW)
ckpt = os.path.join(out, "ckpt_mh")
first = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, progress=True, **KW)  # bar: process 0
runs = [resume.last_run["computed"], resume.last_run["groups"]]
again = jaxpatch.activation_patch(model, clean, corrupt, checkpoint_dir=ckpt, progress=False, **KW)
runs += [resume.last_run["computed"], resume.last_run["loaded"]]
atp = jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp", answer=KW["answer"], wrong=KW["wrong"])
other = corrupt.copy()
other[0, 0] = (other[0, 0] + pid) % 50  # process 1 is given different prompts
try:
    jaxpatch.activation_patch(model, clean, other, progress=False, **KW)
    refused = ""
except jaxpatch.InputError as e:
    refused = str(e)
np.savez(os.path.join(out, f"mh{pid}.npz"), atp=atp.per_prompt, plain=plain.per_prompt, first=first.per_prompt,
         again=again.per_prompt, runs=np.asarray(runs), refused=np.asarray(refused))
print("MULTIHOST PART DONE", flush=True)
"""

CHILD = PREAMBLE + MULTIHOST + """
from jax.experimental import multihost_utils
from jaxpatch import multihost, resume, sweep

moved = []  # "function:dtype kind" of every array gathered or broadcast between the processes


def spy(name, f):
    def wrapped(tree, *a, **k):
        moved.extend(f"{name}:{np.dtype(x.dtype).kind}" for x in jax.tree.leaves(tree))
        return f(tree, *a, **k)
    return wrapped


multihost_utils.process_allgather = spy("allgather", multihost_utils.process_allgather)
from jaxpatch import attribution, edges as edges_mod
batches = []  # prompts per attribution / EAP program call on this process


def count_prompts(f):
    def wrapped(config, params, run_tokens, *a, **k):
        batches.append(int(run_tokens.shape[0]))
        return f(config, params, run_tokens, *a, **k)
    return wrapped


attribution._atp_core = count_prompts(attribution._atp_core)
edges_mod._eap_core = count_prompts(edges_mod._eap_core)
multihost_utils.broadcast_one_to_all = spy("broadcast", multihost_utils.broadcast_one_to_all)
res, comm = {}, {}


def call(key, f, **kw):
    moved.clear()
    r = f(**kw)
    comm[key] = sorted(set(moved))
    r = getattr(r, "per_prompt", r)
    res[key] = np.asarray("None") if r is None else np.asarray(r)


ap = lambda **kw: jaxpatch.activation_patch(model, clean, corrupt, progress=False, **KW, **kw)  # noqa: E731
call("all", ap)
call("first", ap, gather="process0")
ckpt = os.path.join(out, "ckpt")
call("ckpt_first", ap, gather="process0", checkpoint_dir=ckpt)
runs = [resume.last_run["computed"], resume.last_run["loaded"]]
call("ckpt_again", ap, gather="process0", checkpoint_dir=ckpt)
runs += [resume.last_run["computed"], resume.last_run["loaded"]]

ans = dict(answer=KW["answer"], wrong=KW["wrong"])
call("atp", lambda **kw: jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp*", **ans, **kw))
call("atp_first", lambda **kw: jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp*", **ans, **kw),
     gather="process0")
call("atp_local", lambda **kw: jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp*", **ans, **kw),
     mesh=None)
call("eap", lambda **kw: jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, ig_steps=3, **ans, **kw))
call("eap_first", lambda **kw: jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, ig_steps=3, **ans, **kw),
     gather="process0")
call("eap_local", lambda **kw: jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, ig_steps=3, **ans, **kw),
     mesh=None)
other = corrupt.copy()
other[0, 0] = (other[0, 0] + pid) % 50  # process 1 is given different prompts
try:
    jaxpatch.attribution_patch(model, clean, other, **ans)
    refused = ""
except jaxpatch.InputError as e:
    refused = str(e)
edges = """ + repr(EDGES) + """
call("exact", lambda **kw: jaxpatch.edges.exact_edge_patch(model, clean, corrupt, edges, **ans, **kw))
call("exact_first", lambda **kw: jaxpatch.edges.exact_edge_patch(model, clean, corrupt, edges, **ans, **kw), gather="process0")
call("exact_local", lambda **kw: jaxpatch.edges.exact_edge_patch(model, clean, corrupt, edges, **ans, **kw), mesh=None)
call("circuit", lambda **kw: jaxpatch.evaluate_circuit(model, clean, corrupt, [edges, edges[:2]], **ans, **kw), mesh="auto")
call("path", lambda **kw: jaxpatch.circuits.path_patch(model, clean, corrupt, senders=["L0H1", "MLP0"],
                                                       receivers=["L1H0.q", "logits"], **ans, **kw), mesh="auto")

# The mechanism on a hand-made dispatch group: a NaN value in row 5, a non-finite run in row 2.
put = multihost.putter(sweep.default_mesh())
v = np.arange(24, dtype=np.float32).reshape(8, 3)
v[5, 1] = np.nan
f = np.ones(8, bool)
f[2] = False
hv, hf = multihost.fetch_to_process0(put(v, True), put(f, True))
np.savez(os.path.join(out, f"p{pid}.npz"), runs=np.asarray(runs), hv=hv, hf=hf, batches=np.asarray(batches), refused=np.asarray(refused), **res,
         **{"comm_" + k: np.asarray(v) for k, v in comm.items()})
print("CHILD DONE", flush=True)
"""


@pytest.fixture(scope="module")
def ns():
    d: dict = {}
    exec(CHILD_SWEEP_SETUP, d)  # noqa: S102 (the sweep the children run)
    return d


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, ns):
    """The 2-process job (:data:`CHILD`), run once for the module: its folder and each process's
    ``(returncode, stdout, stderr)``."""
    out = tmp_path_factory.mktemp("two_processes")
    # 240 s each for tests/test_multihost.py's run and this module's run when they were separate jobs
    logs = run_two(CHILD, out, env=child_env(out, ns["model"]), timeout=540)
    return out, logs


@pytest.fixture(scope="module")
def ref_sweep(ns):
    """The children's sweep in this process, on one device."""
    return jaxpatch.activation_patch(ns["model"], ns["clean"], ns["corrupt"], mesh=None, **ns["KW"]).per_prompt


@pytest.mark.slow
def test_two_processes_equal_one_process_bitwise(two_processes, ns, ref_sweep):
    """2 processes x 2 devices run the same sweep sharded over all 4 devices; every process gets
    the whole result, bitwise equal to one process on one device. The progress bar is drawn by
    process 0 only; a checkpoint is written by process 0 and resumed by both; processes given
    different prompts are refused; attribution (its prompts split over the processes) gives every
    process the single-process numbers to float rounding. (Formerly tests/test_multihost.py's own
    2-process run.)"""
    tmp_path, logs = two_processes
    ref = ref_sweep
    atp = jaxpatch.attribution_patch(ns["model"], ns["clean"], ns["corrupt"], site="z", method="atp",
                                     answer=ns["KW"]["answer"], wrong=ns["KW"]["wrong"])
    for i in range(2):
        z = np.load(tmp_path / f"mh{i}.npz")
        for key in ("plain", "first", "again"):  # every process holds the whole result, bitwise
            assert z[key].tobytes() == ref.tobytes(), (i, key, np.abs(z[key] - ref).max())
        # attribution splits the prompts over the processes: the single-process numbers to rounding
        assert z["atp"].shape == atp.per_prompt.shape and rel_err(z["atp"], atp.per_prompt) <= 1e-5
        # 16 chunks on 4 devices: 4 groups computed, then all 4 loaded from process 0's checkpoint
        assert z["runs"].tolist() == [4, 4, 0, 4]
        assert "different inputs" in str(z["refused"]) and "process(es) [1]" in str(z["refused"])
    bar = "sweep blocks.hook_resid_pre"
    assert bar in logs[0][2] and "/16 " in logs[0][2]  # one bar (16 chunks), on process 0
    assert bar not in logs[1][2]
    assert sorted(f.name for f in (tmp_path / "ckpt_mh").iterdir()) == [
        "chunks_000000_000004.npz", "chunks_000004_000008.npz", "chunks_000008_000012.npz", "chunks_000012_000016.npz",
        "manifest.json"]


@pytest.mark.slow
def test_gather_to_process0_and_everywhere_across_two_processes(two_processes, ns, ref_sweep):
    tmp_path, _ = two_processes
    model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]
    ans = {"answer": KW["answer"], "wrong": KW["wrong"]}
    ref = {"sweep": ref_sweep,
           "atp": jaxpatch.attribution_patch(model, clean, corrupt, site="z", method="atp*", **ans).per_prompt,
           "eap": jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, ig_steps=3, **ans).per_prompt,
           "exact": jaxpatch.edges.exact_edge_patch(model, clean, corrupt, EDGES, mesh=None, **ans)}
    ref["circuit"] = jaxpatch.evaluate_circuit(model, clean, corrupt, [EDGES, EDGES[:2]], **ans).per_prompt
    ref["path"] = jaxpatch.circuits.path_patch(model, clean, corrupt, senders=["L0H1", "MLP0"],
                                               receivers=["L1H0.q", "logits"], **ans).per_prompt
    z = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    for i in range(2):  # gather="all": every process holds the whole result
        for key, want in (("all", "sweep"), ("atp_local", "atp"), ("eap_local", "eap"), ("exact_local", "exact")):
            assert z[i][key].tobytes() == ref[want].tobytes(), (i, key)  # one program on the same inputs: bitwise
        for key in ("atp", "eap"):  # prompts split over the processes: to float rounding
            assert z[i][key].shape == ref[key].shape and rel_err(z[i][key], ref[key]) <= 1e-5, (i, key)
        # edges split over the 4 devices of both processes: each device vectorises fewer edges at once
        for key in ("exact", "circuit", "path"):
            assert z[i][key].shape == ref[key].shape and rel_err(z[i][key], ref[key]) <= 1e-5, (i, key)
    # gather="process0": process 0 holds the result; process 1 got None
    for key, want in (("first", "sweep"), ("ckpt_first", "sweep"), ("ckpt_again", "sweep"), ("atp_first", "atp"),
                      ("eap_first", "eap"), ("exact_first", "exact")):
        if key in ("atp_first", "eap_first", "exact_first"):
            assert z[0][key].tobytes() == z[0][key.split("_")[0]].tobytes(), key  # the same split, gathered to process 0
        else:
            assert z[0][key].tobytes() == ref[want].tobytes(), key
        assert str(z[1][key]) == "None", key
    assert z[0]["runs"].tolist() == z[1]["runs"].tolist() == [4, 0, 0, 4]
    # 3 prompts split over 2 processes: 2 each (process 1's second is a repeat); mesh=None: all 3.
    # Calls: atp, atp_first, atp_local, eap, eap_first, eap_local.
    assert z[0]["batches"].tolist() == z[1]["batches"].tolist() == [2, 2, 3, 2, 2, 3]
    for i in range(2):  # a split call given different prompts on process 1 is refused on both
        assert "different inputs" in str(z[i]["refused"]) and "process(es) [1]" in str(z[i]["refused"])  # 4 groups computed, then all 4 loaded
    # Nothing floating-point moved between processes under "process0" (values go by ppermute to
    # process 0's devices only): only input digests (u), finiteness flags (b) and done-groups (b).
    for i in range(2):
        assert any(c.endswith(":f") for c in z[i]["comm_all"]), z[i]["comm_all"]
        for key in ("first", "ckpt_first", "ckpt_again", "atp_first", "eap_first", "exact_first"):
            assert not any(c.endswith(":f") for c in z[i]["comm_" + key]), (i, key, z[i]["comm_" + key])
    # fetch_to_process0 on a hand-made group: process 0 gets the values and the run flags; process 1
    # zeros, and flags saying which patches' runs or values were not finite (rows 2 and 5).
    v = np.arange(24, dtype=np.float32).reshape(8, 3)
    v[5, 1] = np.nan
    np.testing.assert_array_equal(z[0]["hv"], v)
    assert z[0]["hf"].tolist() == [True, True, False, True, True, True, True, True]
    assert not z[1]["hv"].any() and z[1]["hv"].shape == (8, 3) and z[1]["hv"].dtype == np.float32
    assert z[1]["hf"].tolist() == [True, True, False, True, True, False, True, True]


def test_gather_process0_in_one_process_returns_the_result(ns):
    """In one process, process 0 is this one: "process0" returns what "all" returns."""
    model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]
    a = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, **KW)
    b = jaxpatch.activation_patch(model, clean, corrupt, mesh=None, gather="process0", **KW)
    assert a.per_prompt.tobytes() == b.per_prompt.tobytes()
    e = jaxpatch.edges.exact_edge_patch(model, clean, corrupt, EDGES[:1], answer=KW["answer"], wrong=KW["wrong"],
                                  gather="process0")
    assert e.shape == (1, 3)


@pytest.mark.parametrize("bad", ["first", "ALL", 0, None, ("all",)])
def test_a_bad_gather_is_refused_by_every_entry_point(ns, bad):
    model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]
    ans = {"answer": KW["answer"], "wrong": KW["wrong"]}
    calls = [lambda: jaxpatch.activation_patch(model, clean, corrupt, gather=bad, **KW),
             lambda: jaxpatch.attribution_patch(model, clean, corrupt, gather=bad, **ans),
             lambda: jaxpatch.edges.edge_attribution_patch(model, clean, corrupt, gather=bad, **ans),
             lambda: jaxpatch.edges.exact_edge_patch(model, clean, corrupt, EDGES, gather=bad, **ans)]
    for f in calls:
        with pytest.raises(jaxpatch.InputError, match=r"gather must be 'all' .* or 'process0'"):
            f()


@pytest.mark.parametrize("bad", ["all", "sweep", 0])
def test_a_bad_mesh_is_refused_by_the_attribution_calls(ns, bad):
    model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]
    ans = {"answer": KW["answer"], "wrong": KW["wrong"]}
    for f in (jaxpatch.attribution_patch, jaxpatch.edges.edge_attribution_patch):
        with pytest.raises(jaxpatch.InputError, match=r"mesh must be 'auto' .* or None"):
            f(model, clean, corrupt, mesh=bad, **ans)


def test_attribution_mesh_auto_in_one_process_is_the_whole_call(ns):
    model, clean, corrupt, KW = ns["model"], ns["clean"], ns["corrupt"], ns["KW"]
    ans = {"answer": KW["answer"], "wrong": KW["wrong"]}
    a = jaxpatch.attribution_patch(model, clean, corrupt, **ans)
    b = jaxpatch.attribution_patch(model, clean, corrupt, mesh=None, gather="process0", **ans)
    assert a.per_prompt.tobytes() == b.per_prompt.tobytes()
