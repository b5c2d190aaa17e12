"""Forward and forward+backward time of a GPT-2-small-shaped random model: jaxpatch vs
``transformers`` GPT2LMHeadModel vs TransformerLens HookedTransformer, on identical weights.

The three models' logits are checked to agree before anything is timed. The backward pass
differentiates the same scalar everywhere, the mean over positions of ``logsumexp(logits)``,
with respect to all parameters. JAX compile time is measured ahead of time and reported apart.

Usage (from the repository root)::

    python benchmarks/bench_forward.py            # full GPT-2-small shape, batch 8 x 16 tokens
    python benchmarks/bench_forward.py --smoke    # tiny model, a few seconds, records nothing

Full runs append one JSON line to ``benchmarks/results/bench_forward.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Compile times are reported: measure real compilation, not loads from jaxpatch's persistent cache.
__import__("os").environ.setdefault("JAXPATCH_NO_COMPILE_CACHE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jaxpatch.interventions import NONE  # noqa: E402
from jaxpatch.model import _forward  # noqa: E402
from jaxpatch.models import gpt2  # noqa: E402
from tests.helpers import random_tokens, rel_err  # noqa: E402

FULL_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024)
SMOKE_SHAPE = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=257, n_ctx=32)
PARITY_TOL = 1e-3
CONTENDED = 0.05  # share of CPU time used by other processes above which timings are flagged


@partial(jax.jit, static_argnums=0)
def _grad(config, params, tokens):
    """Gradient of the benchmark scalar w.r.t. all parameters."""

    def loss(p):
        logits, _ = gpt2.forward(config, p, tokens)
        return jax.nn.logsumexp(logits, axis=-1).mean()

    return jax.grad(loss)(params)


def jax_timings(model: jaxpatch.HookedModel, tokens, runs: int, warmup: int) -> dict:
    """Time jaxpatch's jitted forward (``jaxpatch.model._forward``) and a jitted gradient."""
    cfg, params, toks = model.config, model.params, jnp.asarray(tokens)
    fwd, fwd_compile = H.jax_compile_time(_forward, cfg, params, toks, NONE, frozenset())
    grad, grad_compile = H.jax_compile_time(_grad, cfg, params, toks)
    return {
        "fwd": H.time_fn(lambda: jax.block_until_ready(fwd(params, toks, NONE)), runs, warmup),
        "fwd_bwd": H.time_fn(lambda: jax.block_until_ready(grad(params, toks)), runs, warmup),
        "compile_fwd_s": fwd_compile,
        "compile_fwd_bwd_s": grad_compile,
    }


def torch_timings(model, logits_of, tokens, runs: int, warmup: int) -> dict:
    """Time a torch model's forward (under ``no_grad``) and forward+backward of the same scalar."""
    import torch

    toks = torch.tensor(tokens, dtype=torch.long)

    def fwd():
        with torch.no_grad():
            logits_of(model, toks)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        torch.logsumexp(logits_of(model, toks), dim=-1).mean().backward()

    out = {"fwd": H.time_fn(fwd, runs, warmup), "fwd_bwd": H.time_fn(fwd_bwd, runs, warmup)}
    model.zero_grad(set_to_none=True)
    return out


def hf_logits(model, toks):
    return model(toks, use_cache=False).logits


def tl_logits(model, toks):
    return model(toks)


def check_parity(trio: H.Trio, tokens) -> dict:
    """Assert that the three models' logits agree; return the relative errors (vs transformers)."""
    import torch

    toks = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        ref = hf_logits(trio.hf, toks).numpy()
        tl = tl_logits(trio.tl, toks).numpy()
    errs = {"jaxpatch": rel_err(trio.jp(tokens), ref), "TransformerLens": rel_err(tl, ref)}
    for impl, err in errs.items():
        assert err < PARITY_TOL, f"{impl} logits differ from transformers: rel err {err:.2e}"
    return errs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and few runs; records nothing")
    ap.add_argument("--runs", type=int, help="timed runs per measurement (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed runs first (default 2; smoke 1)")
    ap.add_argument("--batch", type=int, help="batch size (default 8; smoke 2)")
    ap.add_argument("--pos", type=int, help="tokens per sequence (default 16; smoke 8)")
    ap.add_argument("--no-torch", action="store_true", help="time jaxpatch only")
    args = ap.parse_args(argv)

    smoke = args.smoke
    runs = args.runs or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    batch = args.batch or (2 if smoke else 8)
    pos = args.pos or (8 if smoke else 16)
    config = jaxpatch.ModelConfig.gpt2(**(SMOKE_SHAPE if smoke else FULL_SHAPE))
    if pos > config.n_ctx:
        ap.error(f"--pos {pos} exceeds n_ctx {config.n_ctx}")
    use_torch = not args.no_torch
    if use_torch and not H.torch_available():
        print("note: torch / transformers / transformer_lens not importable; timing jaxpatch only.")
        use_torch = False

    tokens = random_tokens(config, batch=batch, pos=pos, seed=0)
    if use_torch:
        trio = H.build_trio(config)
        errs = check_parity(trio, tokens)
        print("logits rel err vs transformers: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        model = trio.jp
    else:
        model = jaxpatch.HookedModel.from_config(config, seed=0)

    shape = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k in FULL_SHAPE)
    print(f"model: {shape}; tokens {batch} x {pos}; float32; {runs} timed runs after {warmup} warm-up")
    print(
        f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"{os.cpu_count()} CPUs, 1-min load average before timing {os.getloadavg()[0]:.2f}\n"
    )

    cpu_start = H.cpu_snapshot()
    results = {"jaxpatch": jax_timings(model, tokens, runs, warmup)}
    if use_torch:
        results["transformers"] = torch_timings(trio.hf, hf_logits, tokens, runs, warmup)
        results["TransformerLens"] = torch_timings(trio.tl, tl_logits, tokens, runs, warmup)
    foreign = H.foreign_cpu_share(cpu_start)

    tl = results.get("TransformerLens")
    rows = []
    for impl, r in results.items():
        fwd, bwd = r["fwd"], r["fwd_bwd"]
        rows.append({
            "impl": impl,
            "fwd median ms": f"{1e3 * fwd['median']:.2f}",
            "fwd p10-p90": f"{1e3 * fwd['p10']:.2f}-{1e3 * fwd['p90']:.2f}",
            "fwd+bwd median ms": f"{1e3 * bwd['median']:.2f}",
            "compile s (jax only)": (
                f"{r['compile_fwd_s']:.2f} / {r['compile_fwd_bwd_s']:.2f}" if "compile_fwd_s" in r else "-"
            ),
            "speedup vs TL (fwd)": f"{tl['fwd']['median'] / fwd['median']:.2f}x" if tl else "n/a",
            "speedup vs TL (fwd+bwd)": f"{tl['fwd_bwd']['median'] / bwd['median']:.2f}x" if tl else "n/a",
        })
    H.print_table(rows, list(rows[0]))
    flops = H.forward_flops(config, batch, pos)
    print("\ncompile s: forward / forward+backward, ahead of time, excluded from the timings.")
    print(
        f"forward: {flops / 1e9:.3f} GFLOP per call (analytic matmul count); achieved GFLOP/s: "
        + ", ".join(f"{impl} {flops / r['fwd']['median'] / 1e9:.1f}" for impl, r in results.items())
    )

    if foreign is not None:
        print(f"other processes used {100 * foreign:.0f}% of the CPUs while timing", end="")
        print(": WARNING, timings are contended and unreliable." if foreign > CONTENDED else ".")

    if smoke:
        return
    path = H.record("bench_forward", {
        "dtype": "float32",
        "config": config.to_dict(),
        "batch": batch,
        "pos": pos,
        "runs": runs,
        "warmup": warmup,
        "forward_gflop": flops / 1e9,
        "foreign_cpu_share": foreign,
        "results": {
            impl: {
                "fwd_median_ms": 1e3 * r["fwd"]["median"],
                "fwd_p10_ms": 1e3 * r["fwd"]["p10"],
                "fwd_p90_ms": 1e3 * r["fwd"]["p90"],
                "fwd_bwd_median_ms": 1e3 * r["fwd_bwd"]["median"],
                **({k: r[k] for k in ("compile_fwd_s", "compile_fwd_bwd_s")} if "compile_fwd_s" in r else {}),
            }
            for impl, r in results.items()
        },
    })
    print(f"recorded in {path.relative_to(H.REPO_ROOT)}")


if __name__ == "__main__":
    main()
