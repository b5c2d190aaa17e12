"""Exact activation-patching sweeps: TransformerLens vs a naive jitted loop vs jaxpatch.

Same random weights in all three (see ``_harness.build_trio``); every jaxpatch result is checked
against TransformerLens's before it is timed. For each sweep it prints wall seconds (jaxpatch:
median of warm runs, compile separately), patches/s, speedups over TransformerLens (warm, and first
call including compilation), executed vs minimal FLOPs, and achieved GFLOP/s.

Run:  python benchmarks/bench_sweep.py            (GPT-2-small shape + a small 4-layer model)
      python benchmarks/bench_sweep.py --smoke    (tiny, for CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Compile times are reported: measure real compilation, not loads from jaxpatch's persistent cache.
__import__("os").environ.setdefault("JAXPATCH_NO_COMPILE_CACHE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jaxpatch import sweep as sw  # noqa: E402
from jaxpatch.compat import transformer_lens as jp_tl  # noqa: E402
from jaxpatch.models import gpt2  # noqa: E402

GPT2_SMALL = jaxpatch.ModelConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)
SMALL = jaxpatch.ModelConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=5000, n_ctx=128)
TINY = jaxpatch.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=257, n_ctx=32)

# name -> (compat function, site, grid axes)
SWEEPS = {
    "resid_pre": ("get_act_patch_resid_pre", "blocks.hook_resid_pre", ("layer", "pos")),
    "attn_head_out_all_pos": ("get_act_patch_attn_head_out_all_pos", "blocks.attn.hook_z", ("layer", "head")),
    "mlp_out": ("get_act_patch_mlp_out", "blocks.hook_mlp_out", ("layer", "pos")),
    "attn_head_out_by_pos": ("get_act_patch_attn_head_out_by_pos", "blocks.attn.hook_z", ("layer", "pos", "head")),
}


def layer_row_flops(c: jaxpatch.ModelConfig, keys: int) -> int:
    """FLOPs of one token row through one block (projections, MLP, attention over ``keys``)."""
    nh = c.n_heads * c.d_head
    return 8 * c.d_model * nh + 4 * c.d_model * c.d_mlp + 4 * nh * keys


def sweep_flops(c, spec, batch, pos, chunk, buckets):
    """(executed, minimal) FLOPs of a jaxpatch sweep whose metric reads the last position."""
    pl = sw.plan(spec, c.n_layers, pos, pos - 1, chunk, 1, buckets)
    unembed = 2 * c.d_model * c.d_vocab * batch
    executed = sw.executed_rows(pl, c.n_layers, pos) * batch * layer_row_flops(c, pos) + len(pl.order) * unembed
    minimal = sw.minimal_rows(spec, c.n_layers, pos) * batch * layer_row_flops(c, pos) + spec.size * unembed
    return executed, minimal


def naive_loop(model, corrupt, clean_cache, site, spec, ans, wrong):
    """The obvious JAX baseline: one jitted single-patch forward (indices traced), called per patch."""
    cfg, params = model.config, model.params
    source = clean_cache.stacked(site)
    b = jnp.arange(corrupt.shape[0])

    @jax.jit
    def one(ix):
        iv = jaxpatch.Interventions({site: (jaxpatch.Edit(layers=ix["layer"], index={a: v for a, v in ix.items() if a != "layer"},
                                                           value=source, stacked=True),)})
        lg = gpt2.forward(cfg, params, corrupt, iv)[0][:, -1]
        return jnp.mean(lg[b, ans] - lg[b, wrong])

    def run():
        outs = [one({a: v[i] for a, v in idx.items()}) for i in range(spec.size)]
        return jax.block_until_ready(jnp.stack(outs))

    idx = {a: jnp.asarray(v) for a, v in spec.index.items()}
    t0 = time.perf_counter()
    jax.block_until_ready(one({a: v[0] for a, v in idx.items()}))
    compile_s = time.perf_counter() - t0
    return run, compile_s


def bench_model(name, config, batch, pos, sweeps, runs, tl_runs, with_tl, rows, seed=0):
    import torch

    trio = H.build_trio(config, seed=seed) if with_tl else None
    model = trio.jp if trio else jaxpatch.HookedModel.from_config(config, seed=seed)
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, config.d_vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, pos // 2] = (corrupt[:, pos // 2] + 1 + rng.integers(0, config.d_vocab - 1, batch)) % config.d_vocab
    ans, wrong = rng.integers(0, config.d_vocab, batch), rng.integers(0, config.d_vocab, batch)
    bj = np.arange(batch)

    def jax_metric(logits):
        return jnp.mean(logits[bj, -1, ans] - logits[bj, -1, wrong])

    _, clean_cache = model.run_with_cache(clean)
    if with_tl:
        tl_metric = lambda lg: (lg[bj, -1, ans] - lg[bj, -1, wrong]).mean()  # noqa: E731
        with torch.no_grad():
            _, tl_cache = trio.tl.run_with_cache(torch.tensor(clean, dtype=torch.long))
    fwd_flops = H.forward_flops(config, batch, pos)
    for sweep in sweeps:
        fn_name, site, axes = SWEEPS[sweep]
        spec = sw.grid(config, site, axes, pos)
        P = spec.size
        jp_fn = getattr(jp_tl, fn_name)
        # jaxpatch: first call (trace + compile + run), then warm runs.
        jax.clear_caches()
        t0 = time.perf_counter()
        result = np.asarray(jp_fn(model, corrupt, clean_cache, jax_metric))
        first_s = time.perf_counter() - t0
        warm = H.time_fn(lambda: jax.block_until_ready(jp_fn(model, corrupt, clean_cache, jax_metric)), runs=runs, warmup=1)
        compile_s = first_s - warm["median"]
        buckets = sw.auto_buckets(config, spec, batch, pos, pos - 1)
        chunk = sw.default_chunk_size(spec, batch, pos, buckets)
        executed, minimal = sweep_flops(config, spec, batch, pos, chunk, buckets)
        row = {"model": name, "sweep": sweep, "patches": P}
        tl_s = None
        if with_tl:
            from transformer_lens import patching as tl_patching

            tl_fn = getattr(tl_patching, fn_name)
            tl_times, tl_res = [], None
            for _ in range(tl_runs):
                t0 = time.perf_counter()
                with torch.no_grad():
                    tl_res = tl_fn(trio.tl, torch.tensor(corrupt, dtype=torch.long), tl_cache, tl_metric).numpy()
                tl_times.append(time.perf_counter() - t0)
            tl_s = float(np.median(tl_times))
            err = float(np.max(np.abs(tl_res - result)))
            scale = float(np.max(np.abs(tl_res)))
            assert err <= 1e-3 * max(1.0, scale), f"{sweep}: jaxpatch differs from TransformerLens by {err}"
            rows.append({**row, "impl": "TransformerLens", "compile s": "-", "run s": f"{tl_s:.3f}",
                         "patches/s": f"{P / tl_s:.1f}", "exec/min FLOPs": f"{P * fwd_flops / minimal:.2f}",
                         "GFLOP/s": f"{P * fwd_flops / tl_s / 1e9:.0f}", "max |Δ| vs TL": "-"})
        loop_run, loop_compile = naive_loop(model, jnp.asarray(corrupt), clean_cache, site, spec, ans, wrong)
        loop = H.time_fn(loop_run, runs=max(1, min(runs, 3)), warmup=0)
        rows.append({**row, "impl": "naive jitted loop", "compile s": f"{loop_compile:.2f}", "run s": f"{loop['median']:.3f}",
                     "patches/s": f"{P / loop['median']:.1f}", "speedup vs TL": f"{tl_s / loop['median']:.1f}x" if tl_s else "",
                     "exec/min FLOPs": f"{P * fwd_flops / minimal:.2f}", "GFLOP/s": f"{P * fwd_flops / loop['median'] / 1e9:.0f}"})
        rows.append({**row, "impl": "jaxpatch", "compile s": f"{compile_s:.2f}", "run s": f"{warm['median']:.3f}",
                     "p10-p90": f"{warm['p10']:.3f}-{warm['p90']:.3f}", "patches/s": f"{P / warm['median']:.1f}",
                     "speedup vs TL": f"{tl_s / warm['median']:.1f}x" if tl_s else "",
                     "first-call speedup": f"{tl_s / first_s:.1f}x" if tl_s else "",
                     "exec/min FLOPs": f"{executed / minimal:.2f}", "GFLOP/s": f"{executed / warm['median'] / 1e9:.0f}",
                     "max |Δ| vs TL": f"{err:.1e}" if with_tl else "", "chunk": f"{chunk}/{buckets}b"})
        yield {"model": name, "sweep": sweep, "patches": P, "jaxpatch_s": warm["median"], "jaxpatch_first_s": first_s,
               "compile_s": compile_s, "loop_s": loop["median"], "tl_s": tl_s, "executed_flops": executed,
               "minimal_flops": minimal, "chunk": chunk, "buckets": buckets}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (CI)")
    ap.add_argument("--runs", type=int, default=5, help="timed warm runs of jaxpatch")
    ap.add_argument("--tl-runs", type=int, default=1, help="timed runs of TransformerLens (slow: one forward per patch)")
    ap.add_argument("--only", choices=["gpt2", "small"], help="run one model only")
    ap.add_argument("--no-torch", action="store_true", help="skip TransformerLens")
    args = ap.parse_args()
    with_tl = not args.no_torch and H.torch_available()
    if not with_tl:
        print("note: TransformerLens not available or --no-torch: timing jaxpatch and the naive loop only")
    if args.smoke:
        plans = [("tiny", TINY, 2, 8, list(SWEEPS))]
        args.runs = 1
    else:
        plans = [("gpt2-small", GPT2_SMALL, 8, 16, ["resid_pre", "attn_head_out_all_pos", "mlp_out"]),
                 ("small-4L", SMALL, 8, 16, list(SWEEPS))]
        if args.only:
            plans = [p for p in plans if p[0].startswith(args.only)]
    rows, records = [], []
    for name, cfg, batch, pos, sweeps in plans:
        print(f"== {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, "
              f"vocab {cfg.d_vocab}; batch {batch} x {pos} tokens", flush=True)
        records += list(bench_model(name, cfg, batch, pos, sweeps, args.runs, args.tl_runs, with_tl, rows))
    H.print_table(rows, ["model", "sweep", "patches", "impl", "compile s", "run s", "p10-p90", "patches/s", "speedup vs TL",
                         "first-call speedup", "exec/min FLOPs", "GFLOP/s", "max |Δ| vs TL", "chunk"])
    if not args.smoke:
        path = H.record("bench_sweep", {"results": records})
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
