"""The ``jaxpatch`` command line.

Subcommands (``jaxpatch <command> --help`` for details):

* ``demo`` — the embedded 2-layer induction model end to end: denoising and noising sweeps of
  every head and of the residual stream, attribution patching (AtP, AtP*) of the heads, results
  saved (``.npz`` + tidy table) and plotted (PNG), and a short summary of the circuit found.
* ``sweep MODEL`` — one patching sweep of any checkpoint on prompts from a JSONL file or the
  command line; saves the result (and a figure with ``--plot``).
* ``info MODEL`` — a model's config and every hook site with its activation shape.
* ``report MODEL`` — the founding paper's workflow as one guided, self-contained HTML report
  (:func:`jaxpatch.report`).

``MODEL`` is a checkpoint directory (``config.json`` + safetensors), a hub name already in the
local Hugging Face cache, or ``default`` for the embedded induction model.

A user mistake (missing model, unknown site or metric, malformed prompts...) prints one line
``jaxpatch: error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ._errors import InputError, JaxpatchError

DEMO_METRICS = ("logit_diff", "logprob", "prob", "kl", "accuracy")
EXIT_USAGE = 2


class CLIError(InputError):
    """A command-line mistake (bad prompt file, bad option value)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jaxpatch: error: <message> (see '<prog> --help')``."""

    def error(self, message):  # noqa: D401  (argparse API)
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------------- helpers
def _load_model(name: str, dtype: str = "float32"):
    from . import data
    from .loading import load_pretrained

    if name == "default":
        if not (data.default_model_path() / "config.json").is_file():
            raise CLIError(
                f"the embedded default model is missing from {str(data.default_model_path())!r} "
                "(reinstall jaxpatch, or recreate it with examples/train_toy_model.py)"
            )
        return data.load_default_model(dtype=dtype)
    return load_pretrained(name, dtype=dtype)


@dataclasses.dataclass
class _Tokenizer:
    """How strings become token ids for one model, and how ids are labelled in plots/tables."""

    describe: str
    encode: Callable[[str], list[int]] | None  # None: the model has no tokenizer
    labels: Any = None  # vocabulary list or ids -> strings


def _tokenizer_for(model_arg: str, model) -> _Tokenizer:
    """The model's own tokenizer (tokenizer.json or vocab.json in its checkpoint), if any."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        if getattr(model, "tokenizer_path", None) is not None:
            return _Tokenizer(f"{model.tokenizer_path} (needs the 'tokenizers' package)", None)
        return _Tokenizer("none (give prompts as token ids)", None)
    return _Tokenizer(tok.describe, tok.encode, tok.decode_each)


def _csv(text: str, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise CLIError(f"{what} is empty; give a comma-separated list")
    return items


# ------------------------------------------------------------------------------------ prompts
def _as_ids(value, tok: _Tokenizer, where: str, what: str) -> list[int]:
    """Token ids of one prompt: a list of ints, or a string tokenized by the model's tokenizer."""
    if isinstance(value, str):
        if tok.encode is None:
            raise CLIError(f"{where}: {what} is a string but the model has no tokenizer ({tok.describe}); give token ids")
        try:
            ids = tok.encode(value)
        except JaxpatchError as e:
            raise CLIError(f"{where}: {what}: {e}") from None
        if not ids:
            raise CLIError(f"{where}: {what} {value!r} encodes to no tokens")
        return ids
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return value
    raise CLIError(f"{where}: {what} must be a string or a non-empty list of token ids, got {json.dumps(value)[:60]}")


def _as_token(value, tok: _Tokenizer, where: str, what: str) -> int:
    """One token id: an int, or a string that must encode to exactly one token."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], int):
        return value[0]
    if isinstance(value, str):
        ids = _as_ids(value, tok, where, what)
        if len(ids) != 1:
            labels = tok.labels(ids) if callable(tok.labels) else ids
            raise CLIError(
                f"{where}: {what} {value!r} is not a single token: it encodes to {len(ids)} tokens {labels}"
                " (answers must be one token; with a BPE tokenizer mind the leading space, e.g. ' Paris')"
            )
        return ids[0]
    raise CLIError(f"{where}: {what} must be a token id or a one-token string, got {json.dumps(value)[:60]}")


def _read_prompts(args, tok: _Tokenizer):
    """``(clean [B,T], corrupt [B,T], answer [B], wrong [B] | None)`` from --prompts or --clean/..."""
    import numpy as np

    rows = []  # (where, dict)
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise CLIError(f"prompt file {str(path)!r} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise CLIError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CLIError(f"{where}: expected a JSON object with keys clean, corrupt, answer, wrong")
            rows.append((where, obj))
        if not rows:
            raise CLIError(f"prompt file {str(path)!r} has no prompts")
    else:
        if args.clean is None or args.corrupt is None or args.answer is None:
            raise CLIError("give --prompts FILE.jsonl, or --clean, --corrupt and --answer (and --wrong for logit_diff)")
        obj = {"clean": args.clean, "corrupt": args.corrupt, "answer": _maybe_int(args.answer)}
        if args.wrong is not None:
            obj["wrong"] = _maybe_int(args.wrong)
        rows.append(("command line", obj))

    clean, corrupt, answer, wrong = [], [], [], []
    for where, obj in rows:
        for key in ("clean", "corrupt", "answer"):
            if key not in obj:
                raise CLIError(f"{where}: missing {key!r} (each line needs clean, corrupt, answer and optionally wrong)")
        unknown = sorted(set(obj) - {"clean", "corrupt", "answer", "wrong"})
        if unknown:
            raise CLIError(f"{where}: unknown key(s) {unknown}; valid: clean, corrupt, answer, wrong")
        c = _as_ids(obj["clean"], tok, where, "clean")
        k = _as_ids(obj["corrupt"], tok, where, "corrupt")
        if len(c) != len(k):
            raise CLIError(f"{where}: clean has {len(c)} tokens but corrupt has {len(k)}; they must be the same length")
        if clean and len(c) != len(clean[0]):
            raise CLIError(
                f"{where}: prompt has {len(c)} tokens but the first prompt has {len(clean[0])}; "
                "all prompts must tokenize to the same length (jaxpatch does not pad)"
            )
        clean.append(c)
        corrupt.append(k)
        answer.append(_as_token(obj["answer"], tok, where, "answer"))
        wrong.append(_as_token(obj["wrong"], tok, where, "wrong") if "wrong" in obj else None)
    has_wrong = [w is not None for w in wrong]
    if any(has_wrong) and not all(has_wrong):
        first = rows[has_wrong.index(False)][0]
        raise CLIError(f"{first}: missing 'wrong' (give it on every line or on none)")
    w = np.asarray(wrong, np.int32) if all(has_wrong) else None
    return np.asarray(clean, np.int32), np.asarray(corrupt, np.int32), np.asarray(answer, np.int32), w


def _maybe_int(s: str):
    try:
        return int(s)
    except ValueError:
        return s


# ----------------------------------------------------------------------------------- printing
def _fmt_top(result, k: int, metric: str | None = None) -> list[str]:
    try:
        top = result.top(k, metric, normalized=True)
        kind = "normalized"
    except JaxpatchError:
        top = result.top(k, metric)
        kind = "change"
    return [f"{'/'.join(str(v) for v in comp.values()):>16s}  {val:+.3f} ({kind})" for comp, val in top]


def _component(comp: dict) -> str:
    return "".join(str(v) for v in comp.values()) if set(comp) <= {"layer", "head"} else " ".join(str(v) for v in comp.values())


def top_restoring_head(result) -> tuple[str, float]:
    """``("L1H0", value)``: the head with the largest *positive* normalised logit_diff effect of a
    denoising (layer, head) sweep, i.e. the one whose clean output alone restores the most."""
    import numpy as np

    v = result.normalized("logit_diff")
    li, hi = np.unravel_index(int(np.argmax(v)), v.shape)
    return f"{result.labels['layer'][li]}{result.labels['head'][hi]}", float(v[li, hi])


# ---------------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    import numpy as np

    if args.pos < 1 or args.batch < 1:
        raise CLIError("--pos and --batch must be positive")
    model = _load_model(args.model, args.dtype)
    cfg = model.config
    if args.pos > cfg.n_ctx:
        raise CLIError(f"--pos {args.pos} exceeds the model's context n_ctx={cfg.n_ctx}")
    import jax

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model.params))
    tok = _tokenizer_for(args.model, model)
    print(f"model: {model.name if args.model != 'default' else 'default (embedded induction model)'}")
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<13s} {v}")
    print(f"  {'dtype':<13s} {jax.numpy.dtype(model.dtype).name}")
    print(f"  {'parameters':<13s} {n_params:,}")
    print(f"  {'tokenizer':<13s} {tok.describe}")
    shapes = model.site_shapes(batch=args.batch, pos=args.pos)
    print(f"sites ({len(shapes)}) and activation shapes for tokens [batch={args.batch}, pos={args.pos}]:")
    width = max(len(n) for n in shapes)
    from .sites import SITES, parse

    for name, shape in shapes.items():
        site = SITES[parse(name)[0]]
        axes = ", ".join("kv_head" if a == "head" and site.kv else a for a in site.axes)
        print(f"  {name:<{width}s}  {str(tuple(shape)):<22s} [{axes}]")
    return 0


def cmd_sweep(args) -> int:
    from . import metrics as _metrics
    from .patching import activation_patch

    metrics = _csv(args.metrics, "--metrics")
    _metrics.check_names(metrics)  # bad names fail before the model loads
    by = _csv(args.by, "--by") if args.by else None
    if args.plot and not args.out:
        raise CLIError("--plot needs --out PREFIX (the figure is written to PREFIX.png)")
    model = _load_model(args.model, args.dtype)
    tok = _tokenizer_for(args.model, model)
    clean, corrupt, answer, wrong = _read_prompts(args, tok)
    if wrong is None and _metrics.needs_wrong(metrics):
        raise CLIError("metric 'logit_diff' needs a contrast token: give 'wrong' on every prompt line (or --wrong)")
    ckpt = _checkpoint_dir(args)
    t0 = time.perf_counter()
    res = activation_patch(
        model, clean, corrupt, site=args.site, by=by, direction=args.direction, baseline=args.baseline,
        metrics=metrics, answer=answer, wrong=wrong, answer_pos=args.answer_pos, token_labels=tok.labels,
        checkpoint_dir=ckpt, memory_budget=args.memory_budget,
    )
    elapsed = time.perf_counter() - t0
    print(f"{res!r}: {len(clean)} prompt(s) of {clean.shape[1]} tokens, {res.info.get('n_patches')} patches in {elapsed:.2f}s")
    if ckpt is not None:
        from .resume import last_run

        print(f"checkpoint {ckpt}: {last_run.get('loaded', 0)} of {last_run.get('groups', 0)} chunk groups loaded, "
              f"{last_run.get('computed', 0)} computed")
    for m in res.metrics:
        b = res.baselines(m)
        print(f"  {m:<12s} clean {b['clean']:+.4f}" + (f"  corrupt {b['corrupt']:+.4f}" if "corrupt" in b else ""))
    print(f"top {args.top} components by |effect| on {res.metrics[0]}:")
    for line in _fmt_top(res, args.top):
        print("  " + line)
    if args.out:
        from .results_io import save_result

        written = save_result(res, args.out)
        files = list(written.values())
        if args.plot:
            from .plots import plot_result, save_figure

            files.append(save_figure(plot_result(res), Path(str(written["npz"])[: -len(".npz")] + ".png"), close=True))
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _checkpoint_dir(args) -> Path | None:
    """``--checkpoint-dir`` (default with ``--resume``: ``PREFIX.checkpoint`` beside ``--out``).
    An existing checkpoint is continued only with ``--resume``."""
    from .resume import MANIFEST

    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.resume and ckpt is None:
        if not args.out:
            raise CLIError("--resume needs --checkpoint-dir DIR or --out PREFIX (then the checkpoint is PREFIX.checkpoint)")
        ckpt = Path(args.out + ".checkpoint")
    if ckpt is not None and not args.resume and (ckpt / MANIFEST).exists():
        raise CLIError(f"{str(ckpt)!r} already holds a sweep checkpoint: pass --resume to continue it, or remove it to start over")
    return ckpt


def cmd_report(args) -> int:
    """The guided report (jaxpatch.reporting): plan printed first, findings summarised, HTML written."""
    from . import metrics as _metrics
    from .reporting import report

    metrics = _csv(args.metrics, "--metrics") if args.metrics else None
    if metrics is not None:
        _metrics.check_names(metrics)
    if args.n_prompts < 1:
        raise CLIError("--n-prompts must be at least 1")
    if not 0 < args.threshold < 1:
        raise CLIError(f"--threshold must lie in (0, 1) (a fraction of the clean-corrupt gap); got {args.threshold}")
    t0 = time.perf_counter()
    from .reporting.workflow import check_out

    check_out(args.out)  # fail before loading anything
    model = _load_model(args.model, args.dtype)
    tok = _tokenizer_for(args.model, model)
    if args.model == "default" and args.prompts is None and args.clean is None:
        from . import data

        clean, corrupt, answer, wrong = data.induction_prompts(args.n_prompts, seed=args.seed)
        labels = data.load_vocab()
    else:
        clean, corrupt, answer, wrong = _read_prompts(args, tok)
        labels = tok.labels
    rep = report(model, clean, corrupt, answer=answer, wrong=wrong, answer_pos=args.answer_pos, token_labels=labels,
                 metrics=metrics, budget=args.budget, out=args.out, threshold=args.threshold, zoom_heads=args.zoom_heads,
                 attribution=not args.no_attribution, title=args.title)
    order = ("circuit", "localised", "saturated_metric", "discrete_metric", "sufficient_not_necessary",
             "necessary_not_sufficient", "attribution_misranked", "skipped")
    print(f"\n{len(rep.findings)} findings; the main ones:")
    for kind in order:
        for f in rep.by_kind(kind)[:3]:
            print(f"  [{kind}] {f.message}")
    print(f"\nwrote {rep.files['html']} ({len(rep.figures)} figures), findings.json/.csv and {len(rep.results)} tables "
          f"in {time.perf_counter() - t0:.1f}s ({rep.info['used']} forward-pass equivalents)")
    return 0


def cmd_demo(args) -> int:
    from . import data
    from .attribution import attribution_patch
    from .patching import activation_patch
    from .plots import (_pyplot, correlations, exact_vs_estimate, plot_exact_vs_attribution, plot_layer_head,
                        plot_layer_pos, save_figure)
    from .progress import describe, progress
    from .results_io import save_result

    if args.n_prompts < 1:
        raise CLIError("--n-prompts must be at least 1")
    t_start = time.perf_counter()
    out = Path(args.out)
    model = _load_model("default")
    vocab = data.load_vocab()
    try:
        task = data.load_task()
    except (OSError, ValueError):
        task = {}
    clean, corrupt, answers, wrong = data.induction_prompts(args.n_prompts, seed=args.seed)
    common = dict(answer=answers, wrong=wrong, token_labels=vocab)

    def exact(site, direction):
        return lambda: activation_patch(model, clean, corrupt, site=site, direction=direction, metrics=DEMO_METRICS, **common)

    def atp(method):
        return lambda: attribution_patch(model, clean, corrupt, targets=[("z", None), ("resid_pre", None)], method=method,
                                         metric="logit_diff", **common)

    jobs = [
        ("denoise_z_layer_head", "heads, denoising", exact("z", "denoise")),
        ("noise_z_layer_head", "heads, noising", exact("z", "noise")),
        ("denoise_resid_pre_layer_pos", "residual stream, denoising", exact("resid_pre", "denoise")),
        ("noise_resid_pre_layer_pos", "residual stream, noising", exact("resid_pre", "noise")),
        ("atp", "attribution (AtP)", atp("atp")),
        ("atpstar", "attribution (AtP*)", atp("atp*")),
    ]
    results, timings, files = {}, {}, []
    bar = progress(jobs, desc="jaxpatch demo", progress=False if args.no_progress else None, unit="sweep")
    for name, desc, run in bar:
        describe(bar, desc)
        t0 = time.perf_counter()
        r = run()
        timings[name] = time.perf_counter() - t0
        if isinstance(r, dict):  # attribution: one result per target
            for (site, _), res in r.items():
                key = f"{name}_{'z_layer_head' if site.endswith('hook_z') else 'resid_pre_layer_pos'}"
                results[key] = res
        else:
            results[name] = r
    for key, res in results.items():
        files += save_result(res, out / key).values()

    plt = _pyplot()
    figs = {
        "denoise_resid_pre_layer_pos.png": plot_layer_pos(results["denoise_resid_pre_layer_pos"], "logit_diff"),
        "noise_resid_pre_layer_pos.png": plot_layer_pos(results["noise_resid_pre_layer_pos"], "logit_diff"),
        "denoise_z_layer_head.png": plot_layer_head(results["denoise_z_layer_head"], "logit_diff"),
        "noise_z_layer_head.png": plot_layer_head(results["noise_z_layer_head"], "logit_diff"),
    }
    fig, axs = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    pairs = [("denoise_z_layer_head", "atp_z_layer_head"), ("denoise_z_layer_head", "atpstar_z_layer_head"),
             ("denoise_resid_pre_layer_pos", "atp_resid_pre_layer_pos")]
    corr = {}
    for a, (ex, est) in zip(axs, pairs):
        plot_exact_vs_attribution(results[ex], results[est], "logit_diff", ax=a)
        corr[est] = correlations(*exact_vs_estimate(results[ex], results[est], "logit_diff")[:2])
    figs["exact_vs_attribution.png"] = fig
    for fname, f in figs.items():
        files.append(save_figure(f, out / fname, close=True))

    # ------------------------------------------------------------------------- the summary
    P, T = clean.shape
    den, noi = results["denoise_z_layer_head"], results["noise_z_layer_head"]
    base = den.baselines("logit_diff")
    acc = den.baselines("accuracy")
    lines = [
        f"jaxpatch demo: the embedded {model.config.n_layers}-layer induction model "
        f"({model.config.n_heads} heads per layer), {P} clean/corrupt prompt pairs of {T} tokens",
        f"  clean   {' '.join(data.decode(clean[0]))} -> {data.decode([answers[0]])[0]}",
        f"  corrupt {' '.join(data.decode(corrupt[0]))} -> ?",
        f"  logit_diff clean {base['clean']:+.2f}, corrupt {base['corrupt']:+.2f}; "
        f"accuracy clean {acc['clean']:.2f}, corrupt {acc['corrupt']:.2f}",
        "",
        "Heads (z, by layer x head), normalized logit_diff (1 = whole clean-corrupt gap):",
    ]
    for label, res, what in (("denoise", den, "restores"), ("noise", noi, "destroys")):
        top = res.top(res.shape[0] * res.shape[1], "logit_diff", normalized=True)
        lines.append(f"  {label:<8s}({what}) " + "  ".join(f"{_component(c)} {v:+.2f}" for c, v in top[:4]))
    rd, rn = results["denoise_resid_pre_layer_pos"], results["noise_resid_pre_layer_pos"]
    for label, res in (("denoise", rd), ("noise", rn)):
        top = res.top(3, "logit_diff", normalized=True)
        lines.append(f"Residual stream ({label}), top 3: " + "  ".join(f"{_component(c)} {v:+.2f}" for c, v in top))
    best, best_val = top_restoring_head(den)
    circuit = f"Circuit: the head whose clean output restores the most is {best} ({best_val:+.2f})"
    if task.get("induction_head"):
        li, hi = task["induction_head"]
        expected = f"L{li}H{hi}"
        circuit += (", the induction head of task.json" if expected == best
                    else f"; task.json's induction head is {expected}")
        prev = task.get("prev_token_head")
        if prev:
            circuit += f" (previous-token head L{prev[0]}H{prev[1]})"
    lines.append(circuit)
    names = {"atp_z_layer_head": "AtP heads", "atpstar_z_layer_head": "AtP* heads (|exact|)",
             "atp_resid_pre_layer_pos": "AtP resid_pre"}
    lines.append("Attribution vs exact (denoising logit_diff), Pearson / Spearman: "
                 + "; ".join(f"{names[k]} {r:+.2f} / {rho:+.2f}" for k, (r, rho) in corr.items()))
    total = time.perf_counter() - t_start
    lines += [
        "",
        "Sweep times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        f"Wrote {len(files)} files to {out}/ in {total:.1f}s:",
    ]
    pngs = sorted(f.name for f in files if f.suffix == ".png")
    tables = sorted({f.suffix for f in files if f.suffix != ".png"})
    lines.append(f"  figures: {', '.join(pngs)}")
    lines.append(f"  results: {len(results)} x ({' + '.join(tables)}), e.g. {sorted(results)[0]}.npz "
                 "(load with jaxpatch.results_io.load_result)")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxpatch", description="Activation patching as compiled JAX programs.",
                epilog="Run 'jaxpatch <command> --help' for a command's options.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"jaxpatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,sweep,info,report,pareto}")

    d = sub.add_parser("demo", help="patch the embedded induction model end to end; save results and figures",
                       description="Run denoising and noising sweeps of every head and of the residual stream of the "
                                   "embedded 2-layer induction model, plus attribution patching (AtP, AtP*), save the "
                                   "results (.npz + table) and figures (.png), and print the circuit found.")
    d.add_argument("--out", default="jaxpatch-out", help="output folder (default: ./jaxpatch-out)")
    d.add_argument("--n-prompts", type=int, default=64, help="number of clean/corrupt prompt pairs (default 64)")
    d.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar (also: JAXPATCH_NO_PROGRESS=1)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "sweep", help="run one patching sweep on a checkpoint",
        description="Patch every component of one site of MODEL and measure metrics. Prompts come from a JSONL file "
                    "(one {\"clean\": ..., \"corrupt\": ..., \"answer\": ..., \"wrong\": ...} object per line; clean/"
                    "corrupt are strings or lists of token ids, answer/wrong are token ids or strings of exactly one "
                    "token) or from --clean/--corrupt/--answer/--wrong. All prompts must have the same length.",
        epilog="Example: jaxpatch sweep default --clean '<bos> cat dog sun cat dog' --corrupt "
               "'<bos> red big run cat dog' --answer sun --wrong run --site z --out out/heads --plot",
    )
    s.add_argument("model", metavar="MODEL", help="checkpoint directory, cached hub name, or 'default'")
    s.add_argument("--prompts", metavar="FILE.jsonl", help="prompt file (JSON lines)")
    s.add_argument("--clean", help="one clean prompt (instead of --prompts)")
    s.add_argument("--corrupt", help="its corrupted prompt")
    s.add_argument("--answer", help="the correct next token (string or id)")
    s.add_argument("--wrong", help="the contrast token for logit_diff (string or id)")
    s.add_argument("--site", default="resid_pre", help="site to patch, short or canonical name (default resid_pre)")
    s.add_argument("--by", help="grid axes, comma-separated, e.g. layer,pos or layer,head (default: per site)")
    s.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    s.add_argument("--baseline", choices=("resample", "mean", "zero"), default="resample",
                   help="what is patched in when noising (default resample: the corrupted run)")
    s.add_argument("--metrics", default="logit_diff", help="comma-separated metric names (default logit_diff)")
    s.add_argument("--answer-pos", type=int, default=-1, help="position whose logits are read (default -1)")
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    s.add_argument("--top", type=int, default=10, help="components to print (default 10)")
    s.add_argument("--out", metavar="PREFIX", help="write PREFIX.npz and PREFIX.parquet (or .csv)")
    s.add_argument("--plot", action="store_true", help="also write PREFIX.png")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write each completed group of chunks to DIR, so an interrupted sweep can be resumed")
    s.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --checkpoint-dir (default PREFIX.checkpoint of --out), computing "
                        "only the missing chunks; a checkpoint of a different sweep is refused")
    s.add_argument("--memory-budget", metavar="SIZE",
                   help="memory per device the sweep may use (e.g. 2GiB, 512MB, or bytes): the chunk size is chosen "
                        "from the compiled program's memory analysis (default: what the device reports; CPUs report "
                        "nothing)")
    s.set_defaults(func=cmd_sweep)

    i = sub.add_parser("info", help="print a model's config and hook sites with shapes",
                       description="Print MODEL's config and every hook site with its activation shape for tokens "
                                   "[batch, pos].")
    i.add_argument("model", metavar="MODEL", help="checkpoint directory, cached hub name, or 'default'")
    i.add_argument("--pos", type=int, default=8, help="sequence length for the shapes (default 8)")
    i.add_argument("--batch", type=int, default=1, help="batch size for the shapes (default 1)")
    i.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    i.set_defaults(func=cmd_info)

    r = sub.add_parser(
        "report", help="the paper's patching workflow as one guided HTML report",
        description="Run the exploratory workflow of Heimersheim & Nanda (2024) on MODEL: coarse sweeps (residual stream, "
                    "attention and MLP outputs by layer x position, denoising and noising), then heads, top heads by "
                    "position and q/k/v, MLP neurons within --budget, several metrics with their pitfalls stated, "
                    "denoising vs noising per component, negative components and per-prompt spread, AtP* beside exact "
                    "patching. Writes OUT/report.html (self-contained), findings.json/.csv and tables/. Prompts as for "
                    "'sweep'; with MODEL 'default' and no prompts, --n-prompts induction prompts are made.",
        epilog="Example: jaxpatch report default --out report-out --budget 800")
    r.add_argument("model", metavar="MODEL", help="checkpoint directory, cached hub name, or 'default'")
    r.add_argument("--prompts", metavar="FILE.jsonl", help="prompt file (JSON lines), as for 'sweep'")
    r.add_argument("--clean", help="one clean prompt (instead of --prompts)")
    r.add_argument("--corrupt", help="its corrupted prompt")
    r.add_argument("--answer", help="the correct next token (string or id)")
    r.add_argument("--wrong", help="the contrast token for logit_diff (string or id)")
    r.add_argument("--n-prompts", type=int, default=32, help="induction prompts for MODEL 'default' (default 32)")
    r.add_argument("--seed", type=int, default=0, help="prompt seed for MODEL 'default' (default 0)")
    r.add_argument("--budget", type=int, default=None,
                   help="forward-pass equivalents the report may spend (default: no limit); the plan is printed first")
    r.add_argument("--metrics", help="comma-separated metric names, the primary first (default: all built-in)")
    r.add_argument("--threshold", type=float, default=0.2, help="importance threshold, fraction of the gap (default 0.2)")
    r.add_argument("--zoom-heads", type=int, default=3, help="top heads to zoom into (default 3)")
    r.add_argument("--no-attribution", action="store_true", help="leave out AtP* beside exact patching")
    r.add_argument("--answer-pos", type=int, default=-1, help="position whose logits are read (default -1)")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--title", help="page title")
    r.add_argument("--out", default="jaxpatch-report", help="output folder (default ./jaxpatch-report)")
    r.set_defaults(func=cmd_report)
    from .circuits._cli import add_parser as _add_pareto  # jaxpatch pareto (circuits)

    _add_pareto(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except (JaxpatchError, OSError) as e:
        msg = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"jaxpatch: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jaxpatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m jaxpatch.cli
    sys.exit(main())
