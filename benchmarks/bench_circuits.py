"""Circuits: path patching of every head pair and a 100-point Pareto curve, jaxpatch vs the
equivalent Python loop of forwards.

1. Path patching: every head as a sender into every later head's query, key and value input
   (GPT-2-small shape: 144 senders x 432 receivers, 28,512 valid pairs), one ``path_patch`` call,
   vs a loop calling one jitted single-pair forward per pair (the same program jaxpatch vmaps).
2. A 100-point Pareto curve: nested top-k circuits of an EAP ranking, one ``evaluate_circuit``
   call, vs a loop calling one jitted single-circuit forward per circuit.

The loops run on ``--loop-sample`` items (a full loop over 28,512 forwards is hours on a CPU);
their per-item time is measured, and the total is extrapolated (marked as such). Loop results
are checked against jaxpatch's before anything is printed. jaxpatch's compile time is the first
call less the median warm call. auto-circuit (the PyTorch tool with edge masks) is timed only if
it imports here; it is not a dependency.

Run:  python benchmarks/bench_circuits.py            (GPT-2-small shape; long on a CPU)
      python benchmarks/bench_circuits.py --smoke    (tiny, for CI: seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
__import__("os").environ.setdefault("JAXPATCH_NO_COMPILE_CACHE", "1")  # measure real compilation

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jaxpatch import circuits, edges  # noqa: E402
from jaxpatch.circuits import _engine  # noqa: E402

_pp = __import__("importlib").import_module("jaxpatch.circuits.path_patch")  # the module (the package exports the function)

GPT2_SMALL = jaxpatch.ModelConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)
TINY = jaxpatch.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=257, n_ctx=32)


def _data(config, batch, pos, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, config.d_vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, pos // 2] = (corrupt[:, pos // 2] + 1 + rng.integers(0, config.d_vocab - 1, batch)) % config.d_vocab
    return clean, corrupt, rng.integers(0, config.d_vocab, batch), rng.integers(0, config.d_vocab, batch)


def _timed_api(fn, runs):
    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    warm = H.time_fn(fn, runs=runs, warmup=0)
    return first, first_s, warm


def bench_paths(name, model, clean, corrupt, ans, wrong, runs, loop_sample, rows):
    cfg = model.config
    heads = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    g = edges.EdgeGraph.of(cfg)
    receivers = [d for d in g.down if d.split(".")[-1] in ("q", "k", "v")]
    kw = dict(senders=heads, receivers=receivers, answer=ans, wrong=wrong, invalid="nan")
    jax.clear_caches()
    res, first_s, warm = _timed_api(lambda: circuits.path_patch(model, clean, corrupt, **kw), runs)
    n = res.info["n_pairs"]

    # The loop: the same single-pair program, jitted once, called per pair (pair masks are data).
    names, c, k, ctx = _engine.setup(model, clean, corrupt, ("logit_diff",), ans, wrong, -1, None)
    delta, resid, mlp_in = _pp._runs(cfg, model.params, k, c, None)
    rmasks, first = _pp._receiver_masks(cfg, g, [(r,) for r in receivers])
    one = jax.jit(partial(_pp._one_pair, cfg, model.params, names, k, ctx, delta, resid, mlp_in))
    si, ri = np.nonzero(res.info["valid"])
    pick = np.random.default_rng(0).choice(len(si), size=min(loop_sample, len(si)), replace=False)
    U = len(g.up)

    def pair(i):
        s = np.zeros(U, bool)
        s[g.up.index(heads[si[i]])] = True
        r = ri[i]
        return (jnp.asarray(s), *(jnp.asarray(rmasks[x][r]) for x in ("q", "k", "v", "mlp", "logits")), jnp.asarray(first[r]))

    args = [pair(i) for i in pick]
    t0 = time.perf_counter()
    jax.block_until_ready(one(*args[0]))
    loop_compile = time.perf_counter() - t0

    def loop():
        return jax.block_until_ready(jnp.stack([one(*a) for a in args]))

    loop_t = H.time_fn(loop, runs=1, warmup=0)
    got = np.asarray(loop())[:, 0]
    want = res.per_prompt[si[pick], ri[pick], 0]
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), f"path loop differs from jaxpatch by {err}"
    per = loop_t["median"] / len(args)
    row = {"model": name, "task": "path patching, head x head q/k/v", "items": n}
    rows.append({**row, "impl": f"loop of forwards ({len(args)} sampled)", "compile s": f"{loop_compile:.2f}",
                 "run s": f"{per * n:.2f} (extrapolated)", "items/s": f"{1 / per:.1f}", "max |Δ|": f"{err:.1e}"})
    rows.append({**row, "impl": "jaxpatch path_patch", "compile s": f"{first_s - warm['median']:.2f}",
                 "run s": f"{warm['median']:.2f}", "p10-p90": f"{warm['p10']:.2f}-{warm['p90']:.2f}",
                 "items/s": f"{n / warm['median']:.1f}", "speedup": f"{per * n / warm['median']:.1f}x",
                 "chunk": str(res.info["chunk_size"])})
    return {"task": "path", "model": name, "pairs": n, "jaxpatch_s": warm["median"], "jaxpatch_first_s": first_s,
            "loop_per_item_s": per, "loop_sample": len(args), "max_abs_diff": err}


def bench_pareto(name, model, clean, corrupt, ans, wrong, runs, n_points, loop_sample, chunk, rows):
    cfg = model.config
    eap = edges.edge_attribution_patch(model, clean, corrupt, direction="noise", answer=ans, wrong=wrong)
    masks, _ = circuits.nested_circuits(cfg, eap, n_points=n_points)
    C = len(masks)
    kw = dict(answer=ans, wrong=wrong, chunk_size=chunk)
    jax.clear_caches()
    res, first_s, warm = _timed_api(lambda: circuits.evaluate_circuit(model, clean, corrupt, masks, **kw), runs)

    names, c, k, ctx = _engine.setup(model, clean, corrupt, ("logit_diff",), ans, wrong, -1, None)
    other = _engine.up_outputs(cfg, model.params, k)
    g = edges.EdgeGraph.of(cfg)
    one = jax.jit(lambda w: _engine.masked_metrics(cfg, model.params, names, c, w, other, ctx))
    pick = np.linspace(0, C - 1, min(loop_sample, C)).round().astype(int)
    ws = [jnp.asarray(~masks[i] & g.valid) for i in pick]
    t0 = time.perf_counter()
    jax.block_until_ready(one(ws[0]))
    loop_compile = time.perf_counter() - t0

    def loop():
        return jax.block_until_ready(jnp.stack([one(w) for w in ws]))

    loop_t = H.time_fn(loop, runs=1, warmup=0)
    got = np.asarray(loop())[:, 0]
    want = res.per_prompt[pick, 0]
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), f"circuit loop differs from jaxpatch by {err}"
    per = loop_t["median"] / len(ws)
    row = {"model": name, "task": f"Pareto curve, {C} circuits", "items": C}
    rows.append({**row, "impl": f"loop of forwards ({len(ws)} sampled)", "compile s": f"{loop_compile:.2f}",
                 "run s": f"{per * C:.2f}" + (" (extrapolated)" if len(ws) < C else ""), "items/s": f"{1 / per:.1f}",
                 "max |Δ|": f"{err:.1e}"})
    rows.append({**row, "impl": "jaxpatch evaluate_circuit", "compile s": f"{first_s - warm['median']:.2f}",
                 "run s": f"{warm['median']:.2f}", "p10-p90": f"{warm['p10']:.2f}-{warm['p90']:.2f}",
                 "items/s": f"{C / warm['median']:.1f}", "speedup": f"{per * C / warm['median']:.1f}x",
                 "chunk": str(res.info["chunk_size"])})
    try:
        import auto_circuit  # noqa: F401
        print("note: auto-circuit imports here, but no side-by-side run is implemented in this script yet")
    except ImportError:
        print("note: auto-circuit is not installed (it is not a jaxpatch dependency): no auto-circuit column")
    return {"task": "pareto", "model": name, "circuits": C, "jaxpatch_s": warm["median"], "jaxpatch_first_s": first_s,
            "loop_per_item_s": per, "loop_sample": len(ws), "max_abs_diff": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (CI)")
    ap.add_argument("--runs", type=int, default=3, help="timed warm runs of jaxpatch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--points", type=int, default=100, help="Pareto curve points")
    ap.add_argument("--loop-sample", type=int, default=64, help="items the loops run (per-item time extrapolated)")
    ap.add_argument("--chunk", type=int, default=None, help="circuits per vectorised chunk (default: by memory)")
    args = ap.parse_args()
    if args.smoke:
        name, cfg, args.batch, args.pos, args.runs, args.points, args.loop_sample = "tiny", TINY, 2, 8, 1, 10, 8
    else:
        name, cfg = "gpt2-small", GPT2_SMALL
    model = jaxpatch.HookedModel.from_config(cfg, seed=0)
    clean, corrupt, ans, wrong = _data(cfg, args.batch, args.pos)
    print(f"== {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads; batch {args.batch} x "
          f"{args.pos} tokens; {jax.devices()[0].device_kind}", flush=True)
    rows, records = [], []
    snap = H.cpu_snapshot()
    records.append(bench_paths(name, model, clean, corrupt, ans, wrong, args.runs, args.loop_sample, rows))
    records.append(bench_pareto(name, model, clean, corrupt, ans, wrong, args.runs, args.points, args.loop_sample,
                                args.chunk, rows))
    H.print_table(rows, ["model", "task", "items", "impl", "compile s", "run s", "p10-p90", "items/s", "speedup",
                         "max |Δ|", "chunk"])
    share = H.foreign_cpu_share(snap)
    if share is not None:
        print(f"other processes used {share:.0%} of the machine's CPU time during the run")
    if not args.smoke:
        path = H.record("bench_circuits", {"results": records, "batch": args.batch, "pos": args.pos})
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
