"""Exact activation-patching sweeps: TransformerLens vs jaxpatch on identical weights, against this
machine's own matmul ceiling.

Same random weights in both (see ``_harness.build_trio``); every jaxpatch result is checked against
TransformerLens's before it is timed. Two prompt settings: corrupted prompts that differ from the
clean ones at positions 3 and 9 (``pos3+9``), and at one late position (``late``, IOI-like: a
name near the end). For each sweep it prints:

* TransformerLens seconds (one forward per patch; a seeded sample of the patches, extrapolated per
  patch and marked ``~``, where the sweep has more than ``--tl-max`` patches), jaxpatch seconds
  (median of warm runs, and the first call including compilation), the speed-ups;
* the **live minimum**: FLOPs of only the patches and positions that can change the answer (each
  live patch recomputes the layers from its own and the positions from its first, or from the
  first position where the prompts differ; a patch of a site after the layer's keys/values
  (``mlp_out``, heads' ``z``) only its edited row in its own layer, and a patch of all positions
  of such a site no queries, keys, values or attention there; in the last layer only
  keys/values except at the read rows; plus the unembedding the metric needs: its two logits per
  prompt), and executed / live minimum;
* achieved GFLOP/s against the **measured ceiling**: the rate this machine reaches, in the same
  run, on jitted float32 matmuls of the block's shapes at the sweep's rows per matmul.

jaxpatch runs through its TransformerLens-compatible API with the same opaque metric function
(full-vocabulary logits at the last position); ``--native`` also times ``activation_patch`` with
the built-in logit difference (two unembedding columns instead of the vocabulary).

Run:  python benchmarks/bench_sweep.py            (GPT-2-small shape, batch 8 x 16 tokens)
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
from jaxpatch.interventions import ALL  # noqa: E402
from jaxpatch.packed import attention_keys as packed_keys, main_start, runs_last_whole, runs_lead  # noqa: E402
from jaxpatch.sites import LOCAL_SITES  # noqa: E402
from jaxpatch.compat import transformer_lens as jp_tl  # noqa: E402

GPT2_SMALL, TINY = H.GPT2_SMALL, H.TINY

# name -> (TransformerLens / compat function, site, grid axes, native short site)
SWEEPS = {
    "resid_pre": ("get_act_patch_resid_pre", "blocks.hook_resid_pre", ("layer", "pos"), "resid_pre"),
    "mlp_out": ("get_act_patch_mlp_out", "blocks.hook_mlp_out", ("layer", "pos"), "mlp_out"),
    "heads_by_pos": ("get_act_patch_attn_head_out_by_pos", "blocks.attn.hook_z", ("layer", "pos", "head"), "z"),
    "heads_all_pos": ("get_act_patch_attn_head_out_all_pos", "blocks.attn.hook_z", ("layer", "head"), "z"),
}
#: prompt setting -> positions where the corrupted prompts differ (for 16-token prompts)
SETTINGS = {"pos3+9": (3, 9), "late": (13,)}


# ----------------------------------------------------------------------------------------------
# FLOP accounting (2 per multiply-add; matmuls only, as in _harness.forward_flops)


def _row_flops(c, keys: int) -> tuple[int, int]:
    """(a whole block's FLOPs for one token row, its key/value projections' share)."""
    nh, kh = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    mlp = (6 if c.gated_mlp else 4) * c.d_model * c.d_mlp
    kv = 4 * c.d_model * kh
    return 2 * c.d_model * nh + kv + 2 * nh * c.d_model + mlp + 4 * nh * keys, kv


def _patch_flops(c, start: int, first: int, B: int, T: int, R: int, full_last: bool, unembed_cols: int,
                 local: bool = False, at_z: bool = False) -> int:
    """FLOPs of one patched run: layers ``start..`` at positions ``first..``; the last layer whole
    or (keys/values for every row, the rest for the ``R`` read rows); the unembedding. ``local``:
    a one-position patch of a site whose edit changes only its own row in its layer
    (``jaxpatch.sites.LOCAL_SITES``): that layer runs for the edited row alone. ``at_z``: a patch
    of a site at or after the heads' outputs (``sweep.FROM_Z_SITES``): layer ``start`` (unless the
    last) needs no queries, keys, values or attention."""
    if start >= c.n_layers:
        return 0
    row, kv = _row_flops(c, T)
    unembed = B * R * 2 * c.d_model * unembed_cols
    if local:
        if start == c.n_layers - 1:
            return B * row + unembed
        return B * row + _patch_flops(c, start + 1, first, B, T, R, full_last, unembed_cols)
    rows = B * (T - first)
    body = (c.n_layers - 1 - start) * rows * row
    if at_z and start < c.n_layers - 1:
        nh = c.n_heads * c.d_head
        body -= rows * (2 * c.d_model * nh + kv + 4 * nh * T)  # queries, keys/values, attention
    last = rows * row if full_last else rows * kv + B * R * (row - kv)
    return body + last + unembed


def executed_flops(c, pl: sw.Plan, B: int, T: int, R: int, unembed_cols: int) -> int:
    nb = len(pl.offsets)
    total = 0
    if pl.packed:  # a chunk: pl.packed rows per prompt, pl.chunk patches' read rows (jaxpatch.packed)
        row, kv = _row_flops(c, packed_keys(pl.packed, T))
        side_row, _ = _row_flops(c, T + pl.chunk)  # side rows: one per slot, dense over cached + own keys
        for start, bucket in zip(pl.chunk_start, pl.chunk_bucket):
            if start >= c.n_layers:
                continue
            lo = int(main_start(np.asarray(start), c.n_layers, pl.side))
            if lo > start:
                total += pl.chunk * B * side_row
            rows = B * pl.packed
            if pl.lead and runs_lead(bucket):  # its first layer for its first pl.lead rows alone (packed.lead_fits)
                lo = int(start) + 1
                total += B * pl.lead * _row_flops(c, packed_keys(pl.lead, T))[0]
            body = (c.n_layers - 1 - lo) * rows * row
            last = rows * row if runs_last_whole(bucket) else rows * kv + pl.chunk * B * R * (row - kv)
            total += body + last + pl.chunk * B * R * 2 * c.d_model * unembed_cols
        return total
    for start, bucket in zip(pl.chunk_start, pl.chunk_bucket):
        total += pl.chunk * _patch_flops(c, int(start), pl.offsets[bucket % nb], B, T, R, bucket >= nb, unembed_cols,
                                         at_z=pl.from_z)
    return total


def live_minimum_flops(c, spec: sw.Sweep, live, same_before: int, B: int, T: int, R: int, unembed_cols: int) -> int:
    layer = np.asarray(spec.index["layer"])
    first = sw._first_pos(spec, same_before)
    local = spec.site in LOCAL_SITES and not spec.joint and "pos" in spec.index
    pos = np.asarray(spec.index["pos"]) if local else None
    at_z = spec.site in sw.FROM_Z_SITES
    return sum(_patch_flops(c, int(layer[i]), int(first[i]), B, T, R, False, unembed_cols, local and int(pos[i]) != ALL,
                            at_z) for i in live)


def _chunk_cell(pl) -> str:
    """``4/4b``: 4 patches per vectorised chunk, 4 position buckets; ``18/96r``: a packed chunk of at
    most 18 patches in 96 rows per prompt."""
    if pl is None:
        return "-"
    return f"{pl.chunk}/{pl.packed}r" if pl.packed else f"{pl.chunk}/{len(pl.offsets)}b"


def ceiling(c, rows: int, runs: int = 5) -> float:
    """GFLOP/s of jitted float32 matmuls of one block's shapes at ``rows`` rows (the best of
    ``runs`` for each, summed FLOPs over summed time)."""
    nh = c.n_heads * c.d_head
    shapes = [(c.d_model, 3 * nh), (nh, c.d_model), (c.d_model, c.d_mlp), (c.d_mlp, c.d_model)]
    return H.matmul_gflops([(rows, k, n) for k, n in shapes], runs)


# ----------------------------------------------------------------------------------------------


def prompts(config, batch, pos, diff, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, config.d_vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    for p in diff:
        corrupt[:, p] = (corrupt[:, p] + 1 + rng.integers(0, config.d_vocab - 1, batch)) % config.d_vocab
    return clean, corrupt, rng.integers(0, config.d_vocab, batch), rng.integers(0, config.d_vocab, batch)


def tl_time(trio, fn_name, spec, corrupt, tl_cache, tl_metric, max_full, sample, seed=0):
    """TransformerLens seconds for the whole sweep (measured, or extrapolated per patch from a
    seeded sample), its values on the patches it ran, and which patches those were."""
    import pandas as pd
    import torch
    from transformer_lens import patching as tl_patching

    fn = getattr(tl_patching, fn_name)
    tokens = H.torch_tokens(corrupt)
    P = spec.size
    if P <= max_full:
        t0 = time.perf_counter()
        with torch.no_grad():
            res = fn(trio.tl, tokens, tl_cache, tl_metric).cpu().numpy().reshape(-1)
        return time.perf_counter() - t0, res, np.arange(P), False
    ids = np.sort(np.random.default_rng(seed).choice(P, sample, replace=False))
    df = pd.DataFrame({n: np.asarray(spec.index[n])[ids] for n in fn.keywords["index_axis_names"]})
    t0 = time.perf_counter()
    with torch.no_grad():
        res = tl_patching.generic_activation_patch(trio.tl, tokens, tl_cache, tl_metric, fn.keywords["patch_setter"],
                                                   fn.keywords["activation_name"], index_df=df).cpu().numpy().reshape(-1)
    return (time.perf_counter() - t0) * P / sample, res, ids, True


def bench_setting(name, setting, trio, config, batch, pos, sweeps, runs, args, rows, records, ceilings):
    import torch

    model = trio.jp
    clean, corrupt, ans, wrong = prompts(config, batch, pos, SETTINGS[setting])
    bj = np.arange(batch)

    def jax_metric(logits):
        return jnp.mean(logits[bj, -1, ans] - logits[bj, -1, wrong])

    tb, tans, twrong = (torch.as_tensor(x, dtype=torch.long, device=H.torch_device()) for x in (bj, ans, wrong))

    def tl_metric(lg):
        return (lg[tb, -1, tans] - lg[tb, -1, twrong]).mean()

    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        _, tl_cache = trio.tl.run_with_cache(H.torch_tokens(clean))
    fwd_flops = H.forward_flops(config, batch, pos)
    for sweep in sweeps:
        fn_name, site, axes, short = SWEEPS[sweep]
        spec = sw.grid(config, site, axes, pos)
        P = spec.size
        jp_fn = getattr(jp_tl, fn_name)
        jax.clear_caches()
        t0 = time.perf_counter()
        result = np.asarray(jp_fn(model, corrupt, clean_cache, jax_metric)).reshape(-1)
        first_s = time.perf_counter() - t0
        pl = sw.last_plan
        warm = H.time_fn(lambda: jax.block_until_ready(jp_fn(model, corrupt, clean_cache, jax_metric)), runs=runs, warmup=1)
        tl_s, tl_res, ids, extrapolated = tl_time(trio, fn_name, spec, corrupt, tl_cache, tl_metric, args.tl_max, args.tl_sample)
        err = float(np.max(np.abs(tl_res - result[ids])))
        assert err <= 1e-3 * max(1.0, float(np.max(np.abs(tl_res)))), f"{sweep}: jaxpatch differs from TransformerLens by {err}"
        live = pl.live if pl is not None and pl.live is not None else np.arange(P)
        same_before = pl.same_before if pl is not None else pos
        # The metric reads two logits per prompt: with lazy logits (jaxpatch.lazy_logits) each is one
        # dot product, two columns' worth; without, the read row's whole vocabulary.
        cols = 2 if sw.LAZY_LOGITS else config.d_vocab
        minimum = live_minimum_flops(config, spec, live, same_before, batch, pos, 1, cols)
        executed = executed_flops(config, pl, batch, pos, 1, cols) if pl is not None else 0
        # token rows per matmul: a vectorised chunk's patches x prompts x positions; a packed chunk's rows x prompts
        rpm = (pl.packed * batch if pl.packed else pl.chunk * batch * pos) if pl is not None else batch * pos
        if rpm not in ceilings:
            ceilings[rpm] = ceiling(config, rpm, runs=3 if args.smoke else 7)
        ceil = ceilings[rpm]
        rate = executed / warm["median"] / 1e9
        tl_cell = f"{'~' if extrapolated else ''}{tl_s:.2f}"
        row = {"model": name, "setting": setting, "sweep": sweep, "patches": P, "live": len(live), "TL s": tl_cell,
               "jaxpatch s": f"{warm['median']:.3f}", "p10-p90": f"{warm['p10']:.3f}-{warm['p90']:.3f}",
               "speed-up": f"{tl_s / warm['median']:.1f}x", "first-call speed-up": f"{tl_s / first_s:.1f}x",
               "compile s": f"{first_s - warm['median']:.2f}", "live-min GFLOP": f"{minimum / 1e9:.1f}",
               "exec/min": f"{executed / max(minimum, 1):.2f}", "GFLOP/s": f"{rate:.0f}", "ceiling GFLOP/s": f"{ceil:.0f}",
               "of ceiling": f"{rate / ceil:.0%}", "MFU": f"{rate / ceilings['peak']:.1%}", "chunk": _chunk_cell(pl),
               "max |Δ| vs TL": f"{err:.1e}"}
        rows.append(row)
        rec = {"model": name, "setting": setting, "sweep": sweep, "patches": P, "live": int(len(live)), "tl_s": tl_s,
               "tl_extrapolated": extrapolated, "tl_sampled": int(len(ids)), "jaxpatch_s": warm["median"],
               "jaxpatch_first_s": first_s, "executed_flops": executed, "live_min_flops": minimum,
               "tl_flops": P * fwd_flops, "ceiling_gflops": ceil, "chunk": pl.chunk if pl else None, "packed_rows": pl.packed if pl else None,
               "max_err_vs_tl": err}
        if args.native:
            kw = dict(site=short, by=axes, answer=ans, wrong=wrong, metrics=("logit_diff",))
            jax.clear_caches()
            t0 = time.perf_counter()
            nat = jaxpatch.activation_patch(model, clean, corrupt, **kw)
            nfirst = time.perf_counter() - t0
            npl = sw.last_plan
            nwarm = H.time_fn(lambda: jaxpatch.activation_patch(model, clean, corrupt, **kw), runs=runs, warmup=1)
            nerr = float(np.max(np.abs(nat.values().reshape(-1) - result)))
            assert nerr <= 1e-3 * max(1.0, float(np.max(np.abs(result)))), f"{sweep}: native differs by {nerr}"
            nexec = executed_flops(config, npl, batch, pos, 1, 2) if npl is not None else 0
            nmin = live_minimum_flops(config, spec, live, same_before, batch, pos, 1, 2)
            nrate = nexec / nwarm["median"] / 1e9
            rows.append({**row, "sweep": f"{sweep} (native logit_diff)", "jaxpatch s": f"{nwarm['median']:.3f}",
                         "p10-p90": f"{nwarm['p10']:.3f}-{nwarm['p90']:.3f}", "speed-up": f"{tl_s / nwarm['median']:.1f}x",
                         "first-call speed-up": f"{tl_s / nfirst:.1f}x", "compile s": f"{nfirst - nwarm['median']:.2f}",
                         "live-min GFLOP": f"{nmin / 1e9:.1f}", "exec/min": f"{nexec / max(nmin, 1):.2f}",
                         "GFLOP/s": f"{nrate:.0f}", "of ceiling": f"{nrate / ceil:.0%}", "MFU": f"{nrate / ceilings['peak']:.1%}", "max |Δ| vs TL": f"{nerr:.1e}"})
            rec.update(native_s=nwarm["median"], native_first_s=nfirst, native_executed_flops=nexec, native_live_min_flops=nmin)
        records.append(rec)
        print(f"  {setting} {sweep}: TL {tl_cell} s, jaxpatch {warm['median']:.3f} s ({tl_s / warm['median']:.1f}x; first call "
              f"{tl_s / first_s:.1f}x), live {len(live)}/{P}, exec/min {executed / max(minimum, 1):.2f}, {rate:.0f} of "
              f"{ceil:.0f} GFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (CI)")
    ap.add_argument("--runs", type=int, default=5, help="timed warm runs of jaxpatch")
    ap.add_argument("--tl-max", type=int, default=200, help="time TransformerLens on the whole sweep up to this many patches")
    ap.add_argument("--tl-sample", type=int, default=96, help="else on this many seeded random patches, extrapolated")
    ap.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--native", action="store_true", help="also time activation_patch with the built-in logit_diff")
    args = ap.parse_args()
    if not H.torch_available():
        print("TransformerLens is not installed: nothing to compare against (pip install -e '.[test]').")
        return
    if args.smoke:
        name, cfg, batch, pos = "tiny", TINY, 2, 16
        args.runs, args.tl_max, args.tl_sample, args.native = 1, 64, 16, True
        args.settings, args.sweeps = ["pos3+9"], ["resid_pre", "heads_by_pos"]
    else:
        name, cfg, batch, pos = "gpt2-small", GPT2_SMALL, 8, 16
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch peers on {H.torch_device()}", flush=True)
    print(f"== {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, "
          f"vocab {cfg.d_vocab}; batch {batch} x {pos} tokens", flush=True)
    trio = H.build_trio(cfg, seed=0)
    # ceilings: rows per matmul -> same-shape rate; "peak": the square-matmul rate MFU is taken against
    rows, records, ceilings = [], [], {"peak": H.peak_matmul_gflops(runs=2 if args.smoke else 5)}
    for setting in args.settings:
        bench_setting(name, setting, trio, cfg, batch, pos, args.sweeps, args.runs, args, rows, records, ceilings)
    H.print_table(rows, ["setting", "sweep", "patches", "live", "TL s", "jaxpatch s", "p10-p90", "speed-up",
                         "first-call speed-up", "compile s", "live-min GFLOP", "exec/min", "GFLOP/s", "ceiling GFLOP/s",
                         "of ceiling", "MFU", "chunk", "max |Δ| vs TL"])
    print(f"MFU: achieved GFLOP/s over this run's float32 matmul peak, {ceilings['peak']:.0f} GFLOP/s (one square jitted "
          f"matmul; the ceiling column is the same-shape rate). Matmul precision: {jax.config.jax_default_matmul_precision}.")
    print("TL s marked ~: timed on a seeded sample of the patches and scaled to the whole sweep (one forward each).")
    if not args.smoke:
        path = H.record("bench_sweep", {"results": records, "ceilings_gflops": {str(k): v for k, v in ceilings.items()}})
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
