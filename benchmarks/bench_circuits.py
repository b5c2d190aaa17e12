"""Circuits: path patching of every head pair and a 100-point Pareto curve, jaxpatch vs the
equivalent Python loop of forwards (and auto-circuit for the Pareto curve, when it is installed).

1. Path patching: every head as a sender into every later head's query, key and value input
   (GPT-2-small shape: 144 senders x 432 receivers, 28,512 valid pairs), ``path_patch`` vs a loop
   calling one jitted single-pair forward per pair (the same program jaxpatch vmaps).
2. A 100-point Pareto curve: nested top-k circuits of an EAP ranking, one ``evaluate_circuit``
   call, vs a loop calling one jitted single-circuit forward per circuit, and vs auto-circuit's
   ``run_circuits`` on the same weights, prompts and circuits (``bench_circuits_autocircuit.py``,
   run with ``--autocircuit-python`` or ``$AUTO_CIRCUIT_PYTHON``: auto-circuit needs its own
   virtualenv; without one the column says so).

What is measured and what is extrapolated (the table says which, per cell):

* The whole path grid is ~28.5k forwards from the receiver's layer on: about an hour on a 2-core
  CPU. By default (``--receivers-per-layer 1``) jaxpatch runs a *stratified* part of it: all 144
  senders into one seeded random receiver (q, k or v of a random head) in each layer 1..11, 792
  pairs. Every layer has 36 receivers in the full grid, so the part's mix of pairs by receiver
  layer (what a pair costs) is exactly the full grid's, and the full-grid time is the measured
  time x 36/k. ``--receivers-per-layer 36`` runs the whole grid (nothing extrapolated).
* The loops run ``--loop-sample`` seeded random items of what jaxpatch ran; their per-item time is
  measured and multiplied out.
* Before anything is timed, the loop's values on its sampled items are checked against jaxpatch's
  (and auto-circuit's against jaxpatch's on every circuit).
* Compile time is the first call less the median warm call; warm times are medians of ``--runs``.

Run:  python benchmarks/bench_circuits.py            (GPT-2-small shape; ~10 min on 2 CPU cores)
      python benchmarks/bench_circuits.py --smoke    (tiny, for CI: seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAXPATCH_NO_COMPILE_CACHE", "1")  # measure real compilation

import jax
import jax.numpy as jnp
import numpy as np

import jaxpatch
from benchmarks import _harness as H
from jaxpatch import circuits, edges
from jaxpatch.circuits import _engine

_pp = __import__("importlib").import_module("jaxpatch.circuits.path_patch")  # the module (the package exports the function)

GPT2_SMALL, TINY = H.GPT2_SMALL, H.TINY


def _data(config, batch, pos, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, config.d_vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, pos // 2] = (corrupt[:, pos // 2] + 1 + rng.integers(0, config.d_vocab - 1, batch)) % config.d_vocab
    return clean, corrupt, rng.integers(0, config.d_vocab, batch), rng.integers(0, config.d_vocab, batch)


def _stratified_receivers(graph, cfg, per_layer, seed=0):
    """``per_layer`` seeded random q/k/v receivers of each layer 1..L-1 (all of them at 3·N)."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(1, cfg.n_layers):
        mine = [d for d in graph.down if d.split(".")[-1] in ("q", "k", "v") and d.startswith(f"L{layer}H")]
        out += [mine[i] for i in sorted(rng.choice(len(mine), size=min(per_layer, len(mine)), replace=False))]
    return out, 3 * cfg.n_heads


def bench_paths(name, model, clean, corrupt, ans, wrong, runs, loop_sample, per_layer, rows):
    cfg = model.config
    heads = [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    g = edges.EdgeGraph.of(cfg)
    receivers, n_per_layer = _stratified_receivers(g, cfg, per_layer)
    scale = n_per_layer / min(per_layer, n_per_layer)  # full grid / part run (exact pair mix per layer)
    n_full = sum(cfg.n_heads * layer for layer in range(1, cfg.n_layers)) * n_per_layer
    kw = {"senders": heads, "receivers": receivers, "answer": ans, "wrong": wrong, "invalid": "nan"}
    jax.clear_caches()
    t0 = time.perf_counter()
    res = circuits.path_patch(model, clean, corrupt, **kw)
    first_s = time.perf_counter() - t0
    n = res.info["n_pairs"]
    assert abs(n * scale - n_full) < 1e-6, (n, scale, n_full)

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

    # correct first: the loop's values on its sampled pairs equal jaxpatch's
    got = np.asarray(loop())[:, 0]
    want = res.per_prompt[si[pick], ri[pick], 0]
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), f"path loop differs from jaxpatch by {err}"
    warm = H.time_fn(lambda: circuits.path_patch(model, clean, corrupt, **kw), runs=runs, warmup=0)
    loop_t = H.time_fn(loop, runs=1, warmup=0)
    per = loop_t["median"] / len(args)
    jp_full = warm["median"] * scale
    ext = scale > 1
    task = f"path patching, head x head q/k/v ({n_full} pairs)"
    part = f"{n} pairs: 144 senders x {len(receivers)} receivers, {min(per_layer, n_per_layer)}/layer" if ext else f"{n} pairs"
    row = {"model": name, "task": task, "items": n_full}
    rows.append({**row, "impl": "loop of forwards", "measured on": f"{len(args)} random pairs of the {n}",
                 "compile s": f"{loop_compile:.2f}", "run s": f"{per * n_full:.2f} (extrap.)",
                 "items/s": f"{1 / per:.1f}", "max |Δ|": f"{err:.1e}"})
    rows.append({**row, "impl": "jaxpatch path_patch", "measured on": part + (f" (x{scale:g})" if ext else ""),
                 "compile s": f"{first_s - warm['median']:.2f}",
                 "run s": f"{jp_full:.2f} (extrap.)" if ext else f"{jp_full:.2f}",
                 "part s (measured)": f"{warm['median']:.2f} [{warm['p10']:.2f}-{warm['p90']:.2f}]",
                 "items/s": f"{n / warm['median']:.1f}", "speedup": f"{per * n / warm['median']:.1f}x",
                 "chunk": str(res.info["chunk_size"])})
    return {"task": "path", "model": name, "pairs_full_grid": n_full, "pairs_measured": n, "receivers": receivers,
            "extrapolation_factor": scale, "jaxpatch_s": warm["median"], "jaxpatch_all_s": warm["all"],
            "jaxpatch_first_s": first_s, "jaxpatch_full_grid_s": jp_full, "jaxpatch_full_grid_extrapolated": ext,
            "loop_compile_s": loop_compile, "loop_per_item_s": per, "loop_sample": len(args),
            "loop_full_grid_s_extrapolated": per * n_full, "max_abs_diff": err}


def _export_for_autocircuit(d, model, clean, corrupt, ans, wrong, masks, want):
    """Weights (TransformerLens names), prompts, circuits and jaxpatch's values for
    ``bench_circuits_autocircuit.py``."""
    cfg, p = model.config, jax.tree_util.tree_map(np.asarray, model.params)
    b = p["blocks"]
    sd = {"embed.W_E": p["W_E"], "pos_embed.W_pos": p["W_pos"], "ln_final.w": p["ln_f_w"], "ln_final.b": p["ln_f_b"],
          "unembed.W_U": p["W_U"], "unembed.b_U": p["b_U"]}
    tl = {"ln1_w": "ln1.w", "ln1_b": "ln1.b", "ln2_w": "ln2.w", "ln2_b": "ln2.b", "W_Q": "attn.W_Q", "b_Q": "attn.b_Q",
          "W_K": "attn.W_K", "b_K": "attn.b_K", "W_V": "attn.W_V", "b_V": "attn.b_V", "W_O": "attn.W_O", "b_O": "attn.b_O",
          "W_in": "mlp.W_in", "b_in": "mlp.b_in", "W_out": "mlp.W_out", "b_out": "mlp.b_out"}
    for k, v in tl.items():
        for layer in range(cfg.n_layers):
            sd[f"blocks.{layer}.{v}"] = b[k][layer]
    np.savez(d / "weights.npz", **{k: np.asarray(v, np.float32) for k, v in sd.items()})
    np.savez(d / "data.npz", clean=clean, corrupt=corrupt, answer=ans, wrong=wrong, masks=masks, want=want)
    g = edges.EdgeGraph.of(cfg)
    conf = {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
                                         "eps")}
    (d / "meta.json").write_text(json.dumps({"config": conf, "up": list(g.up), "down": list(g.down),
                                             "n_graph_edges": int(g.valid.sum())}))


def _autocircuit(python, model, clean, corrupt, ans, wrong, masks, want, runs, timeout):
    """auto-circuit's result dict, or ``(None, why)``."""
    if not python:
        return None, "not run: no auto-circuit interpreter (--autocircuit-python / $AUTO_CIRCUIT_PYTHON)"
    script = Path(__file__).resolve().parent / "bench_circuits_autocircuit.py"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _export_for_autocircuit(d, model, clean, corrupt, ans, wrong, masks, want)
        try:
            proc = subprocess.run([python, str(script), "--inputs", str(d), "--runs", str(runs), "--out", str(d / "out.json")],
                                  check=False, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"did not finish within {timeout:.0f} s (first + {runs} timed runs of every circuit)"
        if proc.returncode != 0 or not (d / "out.json").exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return None, f"failed (rc {proc.returncode}): " + " | ".join(tail)
        out = json.loads((d / "out.json").read_text())
    return out, None


def bench_pareto(name, model, clean, corrupt, ans, wrong, runs, n_points, loop_sample, chunk, ac_python, ac_timeout,
                 rows):
    cfg = model.config
    eap = edges.edge_attribution_patch(model, clean, corrupt, direction="noise", answer=ans, wrong=wrong)
    masks, _ = circuits.nested_circuits(cfg, eap, n_points=n_points)
    C = len(masks)
    kw = {"answer": ans, "wrong": wrong, "chunk_size": chunk}
    jax.clear_caches()
    t0 = time.perf_counter()
    res = circuits.evaluate_circuit(model, clean, corrupt, masks, **kw)
    first_s = time.perf_counter() - t0

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

    got = np.asarray(loop())[:, 0]  # correct first
    want = res.per_prompt[pick, 0]
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), f"circuit loop differs from jaxpatch by {err}"
    warm = H.time_fn(lambda: circuits.evaluate_circuit(model, clean, corrupt, masks, **kw), runs=runs, warmup=0)
    loop_t = H.time_fn(loop, runs=1, warmup=0)
    per = loop_t["median"] / len(ws)
    ext = len(ws) < C
    row = {"model": name, "task": f"Pareto curve, {C} circuits", "items": C}
    rows.append({**row, "impl": "loop of forwards", "measured on": f"{len(ws)} of {C} circuits (evenly spaced)",
                 "compile s": f"{loop_compile:.2f}", "run s": f"{per * C:.2f}" + (" (extrap.)" if ext else ""),
                 "items/s": f"{1 / per:.1f}", "max |Δ|": f"{err:.1e}"})
    rows.append({**row, "impl": "jaxpatch evaluate_circuit", "measured on": f"all {C}",
                 "compile s": f"{first_s - warm['median']:.2f}", "run s": f"{warm['median']:.2f}",
                 "part s (measured)": f"{warm['median']:.2f} [{warm['p10']:.2f}-{warm['p90']:.2f}]",
                 "items/s": f"{C / warm['median']:.1f}", "speedup": f"{per * C / warm['median']:.1f}x",
                 "chunk": str(res.info["chunk_size"])})
    ac, why = _autocircuit(ac_python, model, clean, corrupt, ans, wrong, masks, res.per_prompt[:, 0], runs, ac_timeout)
    rec = {"task": "pareto", "model": name, "circuits": C, "jaxpatch_s": warm["median"], "jaxpatch_all_s": warm["all"],
           "jaxpatch_first_s": first_s, "loop_compile_s": loop_compile, "loop_per_item_s": per, "loop_sample": len(ws),
           "max_abs_diff": err, "auto_circuit": ac if ac is not None else why}
    if ac is None:
        rows.append({**row, "impl": "auto-circuit", "measured on": why})
        print(f"note: auto-circuit {why}")
    else:
        rows.append({**row, "impl": f"auto-circuit {ac['auto_circuit_version']} (torch {ac['torch_threads']} thr)",
                     "measured on": f"all {ac['circuits']}", "compile s": f"(wrap {ac['wrap_s']:.2f})",
                     "run s": f"{ac['median_s']:.2f}", "part s (measured)":
                     f"{ac['median_s']:.2f} [{min(ac['all_s']):.2f}-{max(ac['all_s']):.2f}]",
                     "items/s": f"{C / ac['median_s']:.1f}", "speedup": f"jaxpatch {ac['median_s'] / warm['median']:.1f}x",
                     "max |Δ|": f"{ac['max_abs_diff_vs_jaxpatch']:.1e}"})
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (CI)")
    ap.add_argument("--runs", type=int, default=2, help="timed warm runs (medians reported)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--points", type=int, default=100, help="Pareto curve points")
    ap.add_argument("--loop-sample", type=int, default=24, help="items the loops run (per-item time multiplied out)")
    ap.add_argument("--receivers-per-layer", type=int, default=1,
                    help="path receivers (q/k/v) per layer jaxpatch runs; 3 x n_heads = the whole grid")
    ap.add_argument("--chunk", type=int, default=None, help="circuits per vectorised chunk (default: by memory)")
    ap.add_argument("--autocircuit-python", default=os.environ.get("AUTO_CIRCUIT_PYTHON"),
                    help="a Python with auto-circuit installed (its own virtualenv)")
    ap.add_argument("--autocircuit-timeout", type=float, default=600, help="seconds the auto-circuit run may take")
    args = ap.parse_args()
    if args.smoke:
        name, cfg, args.batch, args.pos, args.runs, args.points, args.loop_sample = "tiny", TINY, 2, 8, 1, 10, 8
        args.receivers_per_layer = 3 * cfg.n_heads
    else:
        name, cfg = "gpt2-small", GPT2_SMALL
    model = jaxpatch.HookedModel.from_config(cfg, seed=0)
    clean, corrupt, ans, wrong = _data(cfg, args.batch, args.pos)
    print(f"== {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads; batch {args.batch} x "
          f"{args.pos} tokens; {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)", flush=True)
    rows, records = [], []
    snap = H.cpu_snapshot()
    t0 = time.perf_counter()
    records.append(bench_paths(name, model, clean, corrupt, ans, wrong, args.runs, args.loop_sample,
                               args.receivers_per_layer, rows))
    records.append(bench_pareto(name, model, clean, corrupt, ans, wrong, args.runs, args.points, args.loop_sample,
                                args.chunk, args.autocircuit_python, args.autocircuit_timeout, rows))
    H.print_table(rows, ["model", "task", "impl", "measured on", "compile s", "run s", "part s (measured)", "items/s",
                         "speedup", "max |Δ|", "chunk"])
    print("run s: the whole task's time (measured, or '(extrap.)': per-item time of the part measured x items); "
          "part s: median [min-max] of the warm runs of what was run; speedup: loop time / jaxpatch time for the same items")
    share = H.foreign_cpu_share(snap)
    if share is not None:
        print(f"other processes used {share:.0%} of the machine's CPU time during the run")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if not args.smoke:
        path = H.record("bench_circuits", {"results": records, "batch": args.batch, "pos": args.pos, "runs": args.runs,
                                           "foreign_cpu_share": share})
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
