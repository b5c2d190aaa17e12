"""Attribution patching (AtP, AtP+QK, AtP*, EAP, EAP-IG) vs exact patching, and vs
TransformerLens-style attribution patching (cache + backward hooks), on identical weights.

For each model: wall time of each estimator as a multiple of one warm forward pass (same batch;
for the gradient estimators, the median ratio over runs that alternate one forward and one
estimator call, since this machine's speed drifts during a benchmark), compile time separately, and agreement with the exact sweep (Pearson, Spearman, top-10 recall)
for heads over all positions, heads by position, and the residual stream.

Run:  python benchmarks/bench_attribution.py           (GPT-2-small shape + a small 4-layer model)
      python benchmarks/bench_attribution.py --smoke   (tiny, for CI)
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
import numpy as np  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jaxpatch import compare as cmp  # noqa: E402
from jaxpatch import edges  # noqa: E402
from jaxpatch.patching import DEFAULT_AXES  # noqa: E402

GPT2_SMALL, SMALL, TINY = H.GPT2_SMALL, H.SMALL, H.TINY

TARGETS = [("z", ("layer", "head"), "heads, all pos"), ("z", ("layer", "pos", "head"), "heads by pos"),
           ("resid_pre", ("layer", "pos"), "resid_pre")]


def _ready(out):
    arrays = out if isinstance(out, jax.Array) else jax.tree_util.tree_leaves(out.__dict__ if hasattr(out, "__dict__") else out)
    jax.block_until_ready(arrays)
    return out


def timed(fn, runs, forward=None):
    """``(output, first call s, median warm s, ratio)``. With ``forward`` (one forward pass), each
    warm run is preceded by one forward and ``ratio`` is the median of run / that forward: both are
    timed under the same machine state (this machine's speed drifts by tens of percent over a
    benchmark), so the ratio is a same-run ratio."""
    t0 = time.perf_counter()
    out = _ready(fn())
    first = time.perf_counter() - t0
    if forward is None:
        return out, first, H.time_fn(fn, runs=runs, warmup=0)["median"], None
    ts, fs = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        _ready(forward())
        fs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _ready(fn())
        ts.append(time.perf_counter() - t0)
    return out, first, float(np.median(ts)), float(np.median(ts) / np.median(fs))


def tl_attribution(tl, clean, corrupt, ans, wrong, names):
    """TransformerLens-style AtP: clean cache, corrupted forward with forward/backward hooks caching
    activations and gradients, then (clean - corrupt) · grad."""
    import torch

    b = torch.arange(len(ans))
    filt = lambda n: n in names  # noqa: E731
    with torch.no_grad():
        _, clean_cache = tl.run_with_cache(clean, names_filter=filt)
    acts, grads = {}, {}

    def fwd(t, hook):
        acts[hook.name] = t.detach()

    def bwd(t, hook):
        grads[hook.name] = t.detach()

    tl.reset_hooks()
    for n in names:
        tl.add_hook(n, fwd, "fwd")
        tl.add_hook(n, bwd, "bwd")
    logits = tl(corrupt)
    (logits[b, -1, ans] - logits[b, -1, wrong]).sum().backward()
    tl.reset_hooks()
    tl.zero_grad(set_to_none=True)
    return {n: ((clean_cache[n] - acts[n]) * grads[n]) for n in names}


def bench_model(name, cfg, batch, pos, runs, with_tl, rows, agree):
    trio = H.build_trio(cfg) if with_tl else None
    model = trio.jp if trio else jaxpatch.HookedModel.from_config(cfg)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (batch, pos)).astype(np.int32)
    corrupt = clean.copy()
    for p in (pos // 4, pos // 2):
        corrupt[:, p] = (corrupt[:, p] + 1 + rng.integers(0, cfg.d_vocab - 1, batch)) % cfg.d_vocab
    ans, wrong = rng.integers(0, cfg.d_vocab, batch), rng.integers(0, cfg.d_vocab, batch)
    kw = dict(answer=ans, wrong=wrong)
    fwd = cmp._forward_time(model, clean, repeats=max(3, runs))
    rows.append({"model": name, "method": "one forward", "run s": f"{fwd:.4f}", "x forward": "1.0"})
    all_targets = [(s, b) for s, b, _ in TARGETS]
    exact = {}
    for site, by, label in TARGETS:
        fn = lambda: jaxpatch.activation_patch(model, clean, corrupt, site=site, by=by, **kw)  # noqa: E731
        exact[label], first, warm, _ = timed(fn, 1)
        rows.append({"model": name, "method": f"exact sweep: {label} ({exact[label].info['n_patches']} patches)",
                     "compile s": f"{first - warm:.2f}", "run s": f"{warm:.4f}", "x forward": f"{warm / fwd:.1f}"})
    forward = lambda: model(clean)  # noqa: E731
    for method in ("atp", "atp+qk", "atp*"):
        fn = lambda: jaxpatch.attribution_patch(model, clean, corrupt, targets=all_targets, method=method, **kw)  # noqa: E731
        out, first, warm, ratio = timed(fn, runs, forward)
        rows.append({"model": name, "method": f"{method} (3 targets, one pass)", "compile s": f"{first - warm:.2f}",
                     "run s": f"{warm:.4f}", "x forward": f"{ratio:.2f}"})
        for site, by, label in TARGETS:
            e, a = cmp.effects(exact[label]), cmp.effects(out[(exact[label].site, by)])
            ref = np.abs(e) if method == "atp*" else e
            agree.append({"model": name, "target": label, "method": method, "pearson": f"{cmp.pearson(ref, a):.3f}",
                          "spearman": f"{cmp.spearman(ref, a):.3f}", "top10 recall": f"{cmp.top_k_recall(e, a, 10):.2f}"})
    every = [(s, None) for s in DEFAULT_AXES]  # every per-layer site, each by its default grid
    _, first, warm, ratio = timed(lambda: jaxpatch.attribution_patch(model, clean, corrupt, targets=every, **kw), runs, forward)
    rows.append({"model": name, "method": f"atp (all {len(every)} sites' default grids, one pass)", "compile s": f"{first - warm:.2f}",
                 "run s": f"{warm:.4f}", "x forward": f"{ratio:.2f}"})
    for steps in (None, 8):
        fn = lambda: edges.edge_attribution_patch(model, clean, corrupt, ig_steps=steps, **kw)  # noqa: E731
        _, first, warm, ratio = timed(fn, runs, forward)
        rows.append({"model": name, "method": "EAP (all edges)" if steps is None else f"EAP-IG {steps} steps (all edges)",
                     "compile s": f"{first - warm:.2f}", "run s": f"{warm:.4f}", "x forward": f"{ratio:.1f}"})
    if with_tl:
        import torch

        names = [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)] + [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
        tc, tk = torch.tensor(clean, dtype=torch.long), torch.tensor(corrupt, dtype=torch.long)
        res = tl_attribution(trio.tl, tc, tk, ans, wrong, names)
        ours = jaxpatch.attribution_patch(model, clean, corrupt, targets=[("z", ("layer", "pos", "head"))], **kw)
        z_tl = np.stack([res[f"blocks.{l}.attn.hook_z"].sum(-1).numpy() for l in range(cfg.n_layers)])  # [L, B, T, N]
        z_ours = list(ours.values())[0].per_prompt[..., 0, :] - list(ours.values())[0].corrupt[0]  # [L, T, N, B]
        err = np.abs(np.moveaxis(z_tl, 1, -1) - z_ours).max()
        with torch.no_grad():
            t0 = time.perf_counter()
            trio.tl(tc)
            tl_fwd = time.perf_counter() - t0
        stats = H.time_fn(lambda: tl_attribution(trio.tl, tc, tk, ans, wrong, names), runs=max(1, runs // 2), warmup=1)
        ours_s = H.time_fn(lambda: jaxpatch.attribution_patch(model, clean, corrupt, targets=[("resid_pre", None), ("z", ("layer", "pos", "head"))], **kw),
                           runs=max(1, runs // 2), warmup=1)
        rows.append({"model": name, "method": "TransformerLens-style AtP (resid_pre + z, hooks)", "run s": f"{stats['median']:.4f}",
                     "x forward": f"{stats['median'] / fwd:.1f} ({stats['median'] / tl_fwd:.1f} TL fwd)",
                     "vs TL": f"jaxpatch {stats['median'] / ours_s['median']:.1f}x faster; max |Δ| {err:.1e}"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["gpt2", "small"])
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    with_tl = not args.no_torch and H.torch_available()
    plans = [("tiny", TINY, 2, 8)] if args.smoke else [("gpt2-small", GPT2_SMALL, 8, 16), ("small-4L", SMALL, 8, 16)]
    if args.only:
        plans = [p for p in plans if p[0].startswith(args.only)]
    if args.smoke:
        args.runs = 1
    rows, agree = [], []
    for name, cfg, b, t in plans:
        print(f"== {name}: batch {b} x {t}", flush=True)
        bench_model(name, cfg, b, t, args.runs, with_tl, rows, agree)
    H.print_table(rows, ["model", "method", "compile s", "run s", "x forward", "vs TL"])
    print()
    H.print_table(agree, ["model", "target", "method", "pearson", "spearman", "top10 recall"])
    if not args.smoke:
        print(f"recorded in {H.record('bench_attribution', {'timings': rows, 'agreement': agree})}")


if __name__ == "__main__":
    main()
