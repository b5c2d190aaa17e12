"""Shared helpers for the benchmark scripts: timing, compile timing, a CPU-contention check,
tables, result records, analytic FLOP counts, and the identical-weights model trio
(``transformers`` / TransformerLens / jaxpatch).

Every timed function must synchronise itself (``jax.block_until_ready`` for JAX, :func:`torch_sync`
for torch), so that wall time covers the whole computation. Where JAX runs on a GPU the torch peers
run on it too (:func:`torch_device`).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

import jaxpatch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def torch_available() -> bool:
    """Whether the torch peers (torch, transformers, transformer_lens) can be imported."""
    try:
        import torch  # noqa: F401
        import transformer_lens  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """Where the torch peers run: ``"cuda"`` when JAX runs on a GPU and torch sees one (so both sides
    of a comparison use the same kind of device), else ``"cpu"``."""
    if jax.default_backend() != "gpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync() -> None:
    """Wait for torch's queued GPU work (a no-op on CPU, where torch is synchronous)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def torch_tokens(tokens):
    """``tokens`` as a torch ``long`` tensor on :func:`torch_device`."""
    import torch

    return torch.tensor(np.asarray(tokens), dtype=torch.long, device=torch_device())


def matmul_gflops(shapes, runs: int = 5) -> float:
    """GFLOP/s of jitted float32 matmuls ``[m, k] @ [k, n]`` for each ``(m, k, n)`` in ``shapes``
    (the best of ``runs`` for each, summed FLOPs over summed time), at the matmul precision in
    effect (jaxpatch's: float32)."""
    import jax.numpy as jnp

    mm = jax.jit(lambda x, y: x @ y)
    flops = secs = 0.0
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        jax.block_until_ready(mm(a, b))
        secs += time_fn(lambda: jax.block_until_ready(mm(a, b)), runs=runs, warmup=1)["p10"]
        flops += 2 * m * k * n
    return flops / secs / 1e9


def peak_matmul_gflops(n: int | None = None, runs: int = 5) -> float:
    """:func:`matmul_gflops` of one square matmul (``n`` = 8192 on accelerators, 2048 on CPU): the
    machine's practical peak, measured in the same run, against which model-FLOP utilisation is
    reported."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    return matmul_gflops([(n, n, n)], runs)


def time_fn(fn: Callable[[], Any], runs: int = 10, warmup: int = 2) -> dict:
    """Call ``fn()`` ``warmup`` times untimed, then ``runs`` times timed.

    Returns ``dict(median, p10, p90, all)`` in seconds (``all`` lists every timed run).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    arr = np.asarray(times)
    return {
        "median": float(np.median(arr)),
        "p10": float(np.percentile(arr, 10)),
        "p90": float(np.percentile(arr, 90)),
        "all": times,
    }


def cpu_snapshot() -> tuple[float, float, float] | None:
    """``(wall s, machine busy CPU s, this process's CPU s)`` now, for :func:`foreign_cpu_share`;
    ``None`` where ``/proc/stat`` is unavailable (not Linux)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def foreign_cpu_share(start: tuple[float, float, float] | None) -> float | None:
    """Fraction of all CPUs' time since ``start`` (a :func:`cpu_snapshot`) that *other* processes
    used: near 0 on a quiet machine; large values mean the timings are contended."""
    end = cpu_snapshot()
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def jax_compile_time(jitted, *args, **kwargs):
    """Lower and compile ``jitted`` for ``args`` ahead of time: ``(compiled, seconds)``.

    JAX's in-memory caches are cleared first, so the time is that of a cold trace and compile even
    if the function already ran. Static arguments are passed here as for the jitted function; the
    returned executable is called with the dynamic arguments only.
    """
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` (dicts keyed by column name; missing cells blank) as a markdown table."""
    cells = [[str(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    print("| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def git_commit() -> str | None:
    """The repository's ``HEAD`` commit, or ``None`` where git cannot tell."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Metadata recorded with every result: time, git commit, library versions, JAX devices."""
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "jax_version": jax.__version__,
        "jaxpatch_version": jaxpatch.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    if torch_available():
        import torch

        env.update(
            torch_version=torch.__version__,
            torch_num_threads=torch.get_num_threads(),
            transformers_version=importlib.metadata.version("transformers"),
            transformer_lens_version=importlib.metadata.version("transformer-lens"),
        )
    return env


def record(name: str, payload: dict) -> Path:
    """Append ``environment()`` merged with ``payload`` as one JSON line to ``results/<name>.jsonl``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({**environment(), **payload}) + "\n")
    return path


#: GPT-2-small's shape (124M parameters), random weights: the benchmarks' headline model.
GPT2_SMALL = jaxpatch.ModelConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)
#: a 4-layer model for quick non-smoke comparisons
SMALL = jaxpatch.ModelConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=5000, n_ctx=128)
#: the smoke-mode model
TINY = jaxpatch.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=257, n_ctx=32)


def forward_flops(config: jaxpatch.ModelConfig, batch: int, pos: int) -> int:
    """Matmul FLOPs of one forward pass over ``[batch, pos]`` tokens (2 per multiply-add).

    Per token and layer: Q, K, V and O projections ``4 · 2·D·N·H``, the MLP ``2 · 2·D·F``, and the
    attention score and pattern·V products ``2 · 2·N·H·pos`` (the full ``pos × pos`` square, as
    computed, not just the causal half). Plus the unembedding ``2·D·V`` per token. Embedding
    lookups, layer norms, softmax, activations and biases are not counted.
    """
    c = config
    nh = c.n_heads * c.d_head
    per_token_layer = 8 * c.d_model * nh + 4 * c.d_model * c.d_mlp + 4 * nh * pos
    per_token = c.n_layers * per_token_layer + 2 * c.d_model * c.d_vocab
    return batch * pos * per_token


@dataclasses.dataclass
class Trio:
    """The same random GPT-2 weights in three implementations (torch models are in eval mode)."""

    hf: Any  # transformers GPT2LMHeadModel
    tl: Any  # transformer_lens HookedTransformer
    jp: jaxpatch.HookedModel


def build_trio(config: jaxpatch.ModelConfig, seed: int = 0) -> Trio:
    """Random-init a ``transformers`` GPT-2 of ``config``'s shape (LN params and biases randomised
    too), save it, load it with :func:`jaxpatch.load_pretrained`, and copy it into TransformerLens
    without folding or centering, so all three compute the same function.

    Reuses ``tests.helpers``, so the repository root must be on ``sys.path`` (the scripts see to it).
    Silences ``transformers`` warnings and progress bars for the rest of the process.
    """
    from transformers.utils import logging as hf_logging

    from tests.helpers import hf_gpt2, tl_from_hf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    c = config
    hf = hf_gpt2(c.n_layers, c.d_model, c.n_heads, c.d_vocab, c.n_ctx, c.d_mlp, seed=seed, act=c.act_fn)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        jp = jaxpatch.load_pretrained(tmp)
        jax.block_until_ready(jp.params)
    device = torch_device()
    return Trio(hf=hf.to(device), tl=tl_from_hf(hf, device=device), jp=jp)
