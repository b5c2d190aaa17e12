"""Where a sweep's device time goes, op by op, and the rate its block matmuls reach against this
machine's matmul ceiling measured in the same run.

Runs one of ``bench_sweep.py``'s sweeps (GPT-2-small shape, batch 8 x 16, the TransformerLens-
compatible API with an opaque metric) warm, traces one call with ``jax.profiler``, and joins the
trace's per-op times with the FLOPs of each dot in the compiled program (XLA's optimised HLO,
dumped by this script). Prints the ops taking the most time, then:

* **block matmuls**: every dot of the sweep program without batch dimensions and with at least 64
  rows (the token rows times a weight matrix: the projections and the MLP); their share of device
  time and their rate in GFLOP/s;
* the **ceiling**: ``bench_sweep.ceiling`` at the block matmuls' most common row count, measured
  in this run; and block-matmul rate / ceiling.

Needs ``xprof`` to read the trace (``pip install xprof``; not a dependency of jaxpatch).

Run:  python benchmarks/profile_sweep.py --sweep resid_pre [--setting pos3+9] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from benchmarks import bench_sweep as BS  # noqa: E402
from jaxpatch.compat import transformer_lens as jp_tl  # noqa: E402

_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def _dims(text: str) -> tuple[int, ...]:
    m = _SHAPE.match(text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def dot_flops(hlo: str) -> dict[str, tuple[int, int, bool]]:
    """Fusion (or dot) name -> (FLOPs, output rows, batched) of the dots it computes, from
    optimised HLO text."""
    shapes, comp_dots, calls, single = {}, collections.defaultdict(list), {}, {}
    comp = None
    for line in hlo.splitlines():
        head = re.match(r"^%?(\S+) \((.*)\) -> .* \{$", line)
        if head:
            comp = head.group(1)
            for name, shape in re.findall(r"(\S+): ([a-z0-9]+\[[0-9,]*\])", head.group(2)):
                shapes[(comp, name)] = _dims(shape)
            continue
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\w[\w-]*)\((.*)", line)
        if not m or comp is None:
            continue
        name, shape, op, rest = m.groups()
        shapes[(comp, name)] = _dims(shape)
        if op == "dot":
            lhs = re.match(r"%(\S+?)[,)]", rest).group(1)
            contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
            batched = "lhs_batch_dims" in rest
            k = int(np.prod([shapes.get((comp, lhs), ())[int(d)] for d in contract.group(1).split(",") if d] or [0]))
            out = _dims(shape)
            comp_dots[comp].append((2 * int(np.prod(out)) * k, out[0] if out else 0, batched))
            if not re.match(r"(fused_computation|wrapped_)", comp):  # an unfused dot: an op of its own
                single[name] = comp_dots[comp][-1]
        called = re.search(r"calls=%(\S+?)[,\s]", line)
        if called:
            calls[name] = called.group(1)
    result = dict(single)
    for name, callee in calls.items():
        dots = comp_dots.get(callee)
        if dots:
            result[name] = (sum(d[0] for d in dots), max(d[1] for d in dots), any(d[2] for d in dots))
    return result


def trace_events(trace_dir: str) -> list[dict]:
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        sys.exit("profile_sweep.py reads the trace with xprof: pip install xprof")
    path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.xplane.pb"))[-1]
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
    tr = json.loads(data if isinstance(data, str) else data.decode())
    return [e for e in tr["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", choices=list(BS.SWEEPS), default="resid_pre")
    ap.add_argument("--setting", choices=list(BS.SETTINGS), default="pos3+9")
    ap.add_argument("--top", type=int, default=20, help="ops to list")
    args = ap.parse_args()
    # XLA reads its flags when the first computation starts the backend: nothing has run yet.
    dump = tempfile.mkdtemp(prefix="jaxpatch-profile-hlo-")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    os.environ["JAXPATCH_NO_COMPILE_CACHE"] = "1"  # compile here, so that the HLO is dumped
    cfg, batch, pos = H.GPT2_SMALL, 8, 16
    model = jaxpatch.HookedModel.from_config(cfg, seed=0)
    clean, corrupt, ans, wrong = BS.prompts(cfg, batch, pos, BS.SETTINGS[args.setting])
    bj = np.arange(batch)

    def metric(logits):
        return jnp.mean(logits[bj, -1, ans] - logits[bj, -1, wrong])

    _, cache = model.run_with_cache(clean)
    fn = getattr(jp_tl, BS.SWEEPS[args.sweep][0])
    jax.block_until_ready(fn(model, corrupt, cache, metric))
    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(model, corrupt, cache, metric))
        warm.append(time.perf_counter() - t0)
    trace_dir = tempfile.mkdtemp(prefix="jaxpatch-profile-trace-")
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(fn(model, corrupt, cache, metric))
    jax.profiler.stop_trace()
    dumps = sorted(glob.glob(f"{dump}/*jit__core*after_optimizations.txt"), key=os.path.getsize)
    if not dumps:
        sys.exit("no sweep program was compiled in this process (was it loaded from a compilation cache?)")
    flops = dot_flops(Path(dumps[-1]).read_text())
    events = [e for e in trace_events(trace_dir) if e["args"].get("hlo_module") == "jit__core"]
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        ms[e["args"]["hlo_op"]] += e["dur"] / 1e3
        calls[e["args"]["hlo_op"]] += 1
    # thunks nest (a while loop's time holds its body's ops): device time = the leaf ops' sum
    leaves = {n for n in ms if not re.match(r"^(while|cond|call|conditional)(\.|$)", n)}
    total = sum(ms[n] for n in leaves)
    print(f"== {args.sweep}, {args.setting}: warm calls {', '.join(f'{w:.3f}' for w in warm)} s; "
          f"traced call: {total:.0f} ms in the sweep program's ops")
    print(f"{'op':<40} {'calls':>6} {'ms':>9} {'share':>7} {'GFLOP/s':>8}")
    for n, t in sorted(((n, ms[n]) for n in leaves), key=lambda x: -x[1])[: args.top]:
        f = flops.get(n)
        rate = f"{f[0] * calls[n] / (t / 1e3) / 1e9:8.0f}" if f else ""
        print(f"{n:<40} {calls[n]:>6} {t:>9.1f} {t / total:>7.1%} {rate:>8}")
    block = {n: f for n, f in flops.items() if not f[2] and f[1] >= 64 and n in leaves}
    b_ms = sum(ms[n] for n in block)
    b_flop = sum(block[n][0] * calls[n] for n in block)
    rows = collections.Counter({block[n][1]: calls[n] for n in block}).most_common(1)[0][0]
    ceil = BS.ceiling(cfg, rows)
    rate = b_flop / (b_ms / 1e3) / 1e9
    print(f"block matmuls: {b_ms:.0f} ms of {total:.0f} ms ({b_ms / total:.0%}), {b_flop / 1e9:.1f} GFLOP, "
          f"{rate:.0f} GFLOP/s; ceiling at {rows} rows (this run): {ceil:.0f} GFLOP/s; {rate / ceil:.0%} of it")


if __name__ == "__main__":
    main()
