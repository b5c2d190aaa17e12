"""Test configuration: 8 simulated CPU devices, strict rank promotion, shared fixtures."""

import os

# XLA's CPU backend compiles the tests' programs with LLVM optimisation level 0: the tests' time is
# mostly compiling hundreds of small programs, and level 0 compiles them in about half the CPU time
# (measured, loaded 2-core machine: the fuzz child 213 -> 122 s CPU, tests/test_report.py 88 -> 63 s);
# the programs are the same (XLA's HLO passes, fusion, sharding and buffer assignment do not
# depend on it), only LLVM's machine-code optimisation is off, and with it the contraction of a
# multiply and an add into one fused multiply-add: float results can differ in the last bit from
# a default build (as they do between CPU and GPU), so every comparison keeps its own tolerance.
# Child processes the tests start keep the level (tests/helpers.py two_process_env), except those
# that run as a user does (examples, training: they drop XLA_FLAGS). An XLA_FLAGS already set in
# the environment is used as it is.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache inside the test process: twice, a full run here (8 simulated
# devices, hundreds of programs) died with a segmentation fault inside JAX 0.10.2's executable
# (de)serialisation for its cache. The cache itself is tested in subprocesses
# (tests/test_compile_cache.py), each with its own directory; subprocesses started by other
# tests (the CLI, the examples) inherit "no cache", and a temporary directory if they enable it.
os.environ.setdefault("JAXPATCH_NO_COMPILE_CACHE", "1")
if "JAXPATCH_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAXPATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpatch-test-cache-")
# Random weights drawn once per test run (see _init_params_once below); set here, before xdist
# starts its workers, so that every worker (and tests/test_fuzz.py's child run) shares one folder.
if "JAXPATCH_TEST_INIT_DIR" not in os.environ:
    import tempfile

    os.environ["JAXPATCH_TEST_INIT_DIR"] = tempfile.mkdtemp(prefix="jaxpatch-test-init-")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_ignore_collect(collection_path, config):
    """tests/test_fuzz.py runs in its own process (tests/test_fuzz_process.py; the note at the top of
    that module says why): a run collects it only when named on the command line, or in that child."""
    if collection_path.name != "test_fuzz.py" or os.environ.get("JAXPATCH_FUZZ_CHILD") == "1":
        return None
    from pathlib import Path

    named = any(Path(str(a).split("::")[0]).name == "test_fuzz.py" for a in config.args)
    return None if named else True

import jaxpatch  # noqa: E402

#: Test modules, longest first (seconds summed from ``--durations`` of a full ``-n 2`` run on the
#: 2-core machine, loaded: qk_fix_families ~500, skip ~320, ... down to ~20 s); every other module
#: runs after them, in collection order. xdist (``--dist loadfile --no-loadscope-reorder``,
#: pyproject.toml) hands the modules to its workers in this order, so the long ones start first and
#: the run ends on short ones. xdist's default order (most tests per module first) started the
#: one-test modules last, the child-process ones among them (the fuzz child ~230 s, the 2-process
#: runs ~100-250 s), with the other worker idle meanwhile. Only the order changes.
SLOW_MODULES_FIRST = (
    "test_qk_fix_families.py", "test_skip.py", "test_sweep_packed.py", "test_multihost_gather.py", "test_report.py",
    "test_fuzz_process.py",
    "test_attribution_fixes.py", "test_padding_gqa.py", "test_partitioning.py", "test_trust.py", "test_init_draw.py",
    "test_attribution.py", "test_multihost_2d.py", "test_matmul_major.py", "test_sweep.py", "test_planner.py",
    "test_sharded_loading.py", "test_edges_post_norm.py", "test_report_ioi.py", "test_attribution_unembed.py",
    "test_compat_tl.py", "test_report_lessons.py", "test_forward.py", "test_attribution_remat.py",
    "test_circuits_path.py", "test_circuits_padding.py", "test_circuits_example.py", "test_edges.py",
    "test_compile_cache.py", "test_circuits_eval.py", "test_cli.py", "test_circuits_probes.py",
    "test_circuits_sharding.py", "test_resume.py", "test_compare.py", "test_custom_metric_rows.py",
    "test_multihost_resume.py", "test_circuits_pareto.py", "test_attribution_plan_cache.py",
)


def pytest_collection_modifyitems(config, items):
    """Order the modules by :data:`SLOW_MODULES_FIRST` (a stable sort: tests keep their order
    within a module; unlisted modules keep theirs, after the listed ones)."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _init_params_once():
    """``HookedModel.from_config`` draws its random weights with one compiled program per config
    (``jaxpatch.models.init_params``), and compiling it costs several times a forward pass's
    compile (measured: ~31 s vs ~3.5 s for a 2-layer GPT-2 on a loaded 2-core machine; with the
    batched sampler of ``jaxpatch.models.init_draw``, ~1.5 s vs ~8 s CPU at load ~6); since the
    compiled programs are dropped after every module (below), each module compiled each of its
    configs' init again. Here the weights of each (config, key, dtype) are drawn by that same
    program once per test run and kept in $JAXPATCH_TEST_INIT_DIR (shared by the xdist workers):
    later calls get the same values, bit for bit, as fresh arrays. No test asserts anything about
    how the init is compiled; traced calls (``jax.eval_shape``, ``jax.jit`` of the init) and
    new-style keys go to the real function. ``JAXPATCH_TEST_FRESH_INIT=1`` turns this off."""
    if os.environ.get("JAXPATCH_TEST_FRESH_INIT") == "1":
        return
    import hashlib
    import pickle
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np

    from jaxpatch import models

    real = models.init_params
    folder = Path(os.environ["JAXPATCH_TEST_INIT_DIR"])
    memo: dict = {}

    def init_params(config, key, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer) or not isinstance(key, (jax.Array, np.ndarray)) or key.dtype != np.uint32:
            return real(config, key, dtype)
        h = hashlib.sha256(repr((config, np.asarray(key).tobytes(), str(jnp.dtype(dtype)),
                                 bool(jax.config.jax_enable_x64))).encode()).hexdigest()
        if h not in memo:
            path = folder / f"{h}.pkl"
            try:
                memo[h] = pickle.loads(path.read_bytes())
            except (OSError, EOFError, pickle.UnpicklingError):
                memo[h] = jax.tree_util.tree_map(np.asarray, real(config, key, dtype))
                tmp = folder / f"{h}.{os.getpid()}.tmp"
                tmp.write_bytes(pickle.dumps(memo[h]))
                os.replace(tmp, path)  # atomic: another worker reads all of it or nothing
        return jax.tree_util.tree_map(jnp.asarray, memo[h])

    models.init_params = init_params


_init_params_once()


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def tiny_config():
    return jaxpatch.ModelConfig.gpt2(n_layers=3, d_model=32, n_heads=4, d_vocab=61, n_ctx=16)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return jaxpatch.HookedModel.from_config(tiny_config, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_state_per_module():
    """Drop every compiled program after each test module. Three full runs here (one process,
    8 simulated devices, ~300 tests) died with a segmentation fault inside XLA while compiling in
    the last modules, while each module passed alone: keep the process's compiled state small."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
