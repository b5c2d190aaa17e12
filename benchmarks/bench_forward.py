"""Forward and forward+backward time of a GPT-2-small-shaped random model: jaxpatch vs
``transformers`` GPT2LMHeadModel vs TransformerLens HookedTransformer, on identical weights.

The three models' logits are checked to agree before anything is timed. The backward pass
differentiates the same scalar everywhere, the mean over positions of ``logsumexp(logits)``,
with respect to all parameters. JAX compile time is measured ahead of time and reported apart.

Usage (from the repository root)::

    python benchmarks/bench_forward.py            # full GPT-2-small shape, batch 8 x 16 tokens
    python benchmarks/bench_forward.py --smoke    # tiny model, a few seconds, records nothing
    python benchmarks/bench_forward.py --family llama   # (or gpt_neox, gemma2): ~100M model vs transformers,
                                                        # with float32 / float64 / padded logit errors

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
import numpy as np  # noqa: E402

import jaxpatch  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jaxpatch.interventions import NONE  # noqa: E402
from jaxpatch.model import _forward  # noqa: E402
from jaxpatch import models  # noqa: E402
from tests.helpers import random_tokens, rel_err  # noqa: E402

FULL_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024)
SMOKE_SHAPE = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=257, n_ctx=32)
PARITY_TOL = 1e-3
CONTENDED = 0.05  # share of CPU time used by other processes above which timings are flagged


@partial(jax.jit, static_argnums=0)
def _grad(config, params, tokens):
    """Gradient of the benchmark scalar w.r.t. all parameters."""

    def loss(p):
        logits, _ = models.forward(config, p, tokens)
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

    toks = H.torch_tokens(tokens)

    def fwd():
        with torch.no_grad():
            logits_of(model, toks)
        H.torch_sync()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        torch.logsumexp(logits_of(model, toks), dim=-1).mean().backward()
        H.torch_sync()

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

    toks = H.torch_tokens(tokens)
    with torch.no_grad():
        ref = hf_logits(trio.hf, toks).cpu().numpy()
        tl = tl_logits(trio.tl, toks).cpu().numpy()
    errs = {"jaxpatch": rel_err(trio.jp(tokens), ref), "TransformerLens": rel_err(tl, ref)}
    for impl, err in errs.items():
        assert err < PARITY_TOL, f"{impl} logits differ from transformers: rel err {err:.2e}"
    return errs


# ~100M-parameter models of the other families (random weights), and tiny ones for --smoke.
FAMILY_SHAPES = {
    "llama": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
    "gpt_neox": dict(vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False),
    "gemma2": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=64, sliding_window=8, query_pre_attn_scalar=64,
                   max_position_embeddings=2048),
}
FAMILY_SMOKE = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def hf_family_model(family: str, smoke: bool, dtype=None):
    """A random-init ``transformers`` model of ``family`` (parameters perturbed so that norms and
    biases are not 0/1)."""
    import torch
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
           "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}[family]
    shape = dict(FAMILY_SHAPES[family])
    if smoke:
        shape.update(FAMILY_SMOKE)
        if "num_key_value_heads" in shape:
            shape["num_key_value_heads"] = 2
        if "head_dim" in shape:
            shape["head_dim"] = 16
            shape["query_pre_attn_scalar"] = 16
    torch.manual_seed(0)
    model = getattr(transformers, cls[1])(getattr(transformers, cls[0])(**shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def family_errors(family: str, hf, path, tokens) -> dict:
    """Relative logit errors vs transformers: float32, float64 (both sides), and a left-padded
    batch vs each prompt alone (jaxpatch)."""
    import torch

    toks = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        ref32 = hf_logits(hf, toks).numpy()
    m32 = jaxpatch.load_pretrained(path, dtype="float32")
    errs = {"f32": rel_err(m32(tokens), ref32)}
    with jax.enable_x64(True):
        m64 = jaxpatch.load_pretrained(path, dtype="float64")
        with torch.no_grad():
            ref64 = hf_logits(hf.double(), toks).numpy()
        hf.float()
        errs["f64"] = rel_err(m64(tokens), ref64)
    padded, mask = tokens.copy(), np.ones_like(tokens)
    short = tokens.shape[1] // 2
    padded[0, :short], mask[0, :short] = 0, 0  # prompt 0 left-padded to half its length
    padded[1, tokens.shape[1] - short:], mask[1, tokens.shape[1] - short:] = 0, 0  # prompt 1 right-padded
    lg = np.asarray(m32(padded, attention_mask=mask))
    alone0 = np.asarray(m32(tokens[:1, short:]))[0]
    alone1 = np.asarray(m32(tokens[1:2, : tokens.shape[1] - short]))[0]
    errs["padded"] = max(rel_err(lg[0, short:], alone0), rel_err(lg[1, : tokens.shape[1] - short], alone1))
    return errs, m32


def family_main(args) -> None:
    """``--family``: jaxpatch vs ``transformers`` on a ~100M model of another family."""
    import tempfile

    smoke, family = args.smoke, args.family
    runs = args.runs or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    batch, pos = args.batch or (2 if smoke else 8), args.pos or (8 if smoke else 16)
    hf = hf_family_model(family, smoke)
    n_params = sum(p.numel() for p in hf.parameters())
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, pos)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        errs, model = family_errors(family, hf, d, tokens)
    print(f"{family}: {n_params / 1e6:.1f}M parameters; tokens {batch} x {pos}; float32; {runs} timed runs after {warmup} warm-up")
    print(f"jax {jax.__version__}; {os.cpu_count()} CPUs, 1-min load average before timing {os.getloadavg()[0]:.2f}")
    print("logits rel err vs transformers: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + "\n")
    cpu_start = H.cpu_snapshot()
    results = {"jaxpatch": jax_timings(model, tokens, runs, warmup),
               "transformers": torch_timings(hf, hf_logits, tokens, runs, warmup)}
    foreign = H.foreign_cpu_share(cpu_start)
    ref = results["transformers"]
    rows = [{"impl": impl, "fwd median ms": f"{1e3 * r['fwd']['median']:.1f}",
             "fwd+bwd median ms": f"{1e3 * r['fwd_bwd']['median']:.1f}",
             "compile s (jax only)": f"{r['compile_fwd_s']:.2f} / {r['compile_fwd_bwd_s']:.2f}" if "compile_fwd_s" in r else "-",
             "fwd speedup vs transformers": f"{ref['fwd']['median'] / r['fwd']['median']:.2f}x",
             "fwd+bwd speedup vs transformers": f"{ref['fwd_bwd']['median'] / r['fwd_bwd']['median']:.2f}x"}
            for impl, r in results.items()]
    H.print_table(rows, list(rows[0]))
    if foreign is not None:
        print(f"other processes used {100 * foreign:.0f}% of the CPUs while timing", end="")
        print(": WARNING, timings are contended and unreliable." if foreign > CONTENDED else ".")
    # f64 is against transformers' own float64 model, which keeps float32 RMSNorm, rotary tables
    # and softmax (tests/test_families.py removes those islands and asserts 1e-12): reported only.
    for k in ("f32", "padded"):
        assert errs[k] < PARITY_TOL, f"{family} {k} error {errs[k]:.1e}"
    if smoke:
        return
    path = H.record("bench_forward", {
        "family": family, "dtype": "float32", "n_params": n_params, "batch": batch, "pos": pos, "runs": runs,
        "errors": errs, "foreign_cpu_share": foreign,
        "results": {impl: {"fwd_median_ms": 1e3 * r["fwd"]["median"], "fwd_bwd_median_ms": 1e3 * r["fwd_bwd"]["median"],
                           **({k: r[k] for k in ("compile_fwd_s", "compile_fwd_bwd_s")} if "compile_fwd_s" in r else {})}
                    for impl, r in results.items()},
    })
    print(f"recorded in {path.relative_to(H.REPO_ROOT)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and few runs; records nothing")
    ap.add_argument("--family", choices=["gpt2", *FAMILY_SHAPES], default="gpt2",
                    help="model family (default gpt2: the GPT-2-small comparison with TransformerLens too)")
    ap.add_argument("--runs", type=int, help="timed runs per measurement (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed runs first (default 2; smoke 1)")
    ap.add_argument("--batch", type=int, help="batch size (default 8; smoke 2)")
    ap.add_argument("--pos", type=int, help="tokens per sequence (default 16; smoke 8)")
    ap.add_argument("--no-torch", action="store_true", help="time jaxpatch only")
    args = ap.parse_args(argv)
    if args.family != "gpt2":
        if not H.torch_available():
            ap.error("--family needs torch and transformers (the [test] extra)")
        return family_main(args)

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

    peak = H.peak_matmul_gflops(runs=2 if smoke else 5)
    print(
        f"model-FLOP utilisation against this run's float32 matmul peak ({peak:.0f} GFLOP/s, one square jitted "
        "matmul; forward+backward counted as 3x the forward's FLOPs): "
        + ", ".join(f"{impl} {flops / r['fwd']['median'] / 1e9 / peak:.1%} / {3 * flops / r['fwd_bwd']['median'] / 1e9 / peak:.1%}"
                    for impl, r in results.items())
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
        "peak_matmul_gflops": peak,
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
