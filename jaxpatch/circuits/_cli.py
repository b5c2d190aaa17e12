"""``jaxpatch pareto``: Pareto curves of several rankings on one figure, from the command line."""

from __future__ import annotations

import time
from pathlib import Path

RANKINGS = ("exact", "eap", "eap-ig", "atp*")


def add_parser(sub) -> None:
    q = sub.add_parser(
        "pareto", help="Pareto curves of circuits: circuit size vs recovered fraction for several rankings",
        description="Rank the edges of MODEL's residual graph (exact edge patching, EAP, EAP-IG; AtP* ranks heads), "
                    "evaluate the nested top-k circuits of every ranking in one vectorised call (every edge outside "
                    "a circuit ablated), and print each curve's area under the curve. Prompts as for 'sweep'; with "
                    "MODEL 'default' and no prompts, --n-prompts induction prompts are made.",
        epilog="Example: jaxpatch pareto default --rankings exact,eap,eap-ig,atp* --points 20 --out out/pareto")
    q.add_argument("model", metavar="MODEL", help="checkpoint directory, cached hub name, or 'default'")
    q.add_argument("--prompts", metavar="FILE.jsonl", help="prompt file (JSON lines), as for 'sweep'")
    q.add_argument("--clean", help="one clean prompt (instead of --prompts)")
    q.add_argument("--corrupt", help="its corrupted prompt")
    q.add_argument("--answer", help="the correct next token (string or id)")
    q.add_argument("--wrong", help="the contrast token for logit_diff (string or id)")
    q.add_argument("--n-prompts", type=int, default=16, help="induction prompts for MODEL 'default' (default 16)")
    q.add_argument("--rankings", default="eap,eap-ig", help=f"comma-separated, from {','.join(RANKINGS)} (default eap,eap-ig)")
    q.add_argument("--ig-steps", type=int, default=8, help="EAP-IG steps (default 8)")
    q.add_argument("--points", type=int, default=20, help="circuit sizes per ranking (default 20)")
    q.add_argument("--ablation", choices=("resample", "mean"), default="resample",
                   help="what edges outside a circuit carry (default resample: the corrupted run)")
    q.add_argument("--answer-pos", type=int, default=-1, help="position whose logits are read (default -1)")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    q.add_argument("--out", metavar="PREFIX", help="write PREFIX.csv (the curves) and PREFIX.png (the figure)")
    q.set_defaults(func=cmd_pareto)


def cmd_pareto(args) -> int:
    import numpy as np

    from .. import cli, data, edges
    from ..attribution import attribution_patch
    from .pareto import exact_edge_scores, pareto_curve, plot_pareto

    names = cli._csv(args.rankings, "--rankings")
    bad = [r for r in names if r not in RANKINGS]
    if bad:
        raise cli.CLIError(f"unknown ranking(s) {bad}; valid: {', '.join(RANKINGS)}")
    if args.points < 2:
        raise cli.CLIError("--points must be at least 2")
    model = cli._load_model(args.model, args.dtype)
    if args.model == "default" and args.prompts is None and args.clean is None:
        clean, corrupt, answer, wrong = data.induction_prompts(args.n_prompts, seed=0)
    else:
        clean, corrupt, answer, wrong = cli._read_prompts(args, cli._tokenizer_for(args.model, model))
    if wrong is None:
        raise cli.CLIError("Pareto curves use logit_diff: give 'wrong' on every prompt line (or --wrong)")
    kw = {"answer": answer, "wrong": wrong, "answer_pos": args.answer_pos}
    t0 = time.perf_counter()
    rankings = {}
    for r in names:
        if r == "exact":
            rankings[r] = exact_edge_scores(model, clean, corrupt, direction="noise", **kw)
        elif r in ("eap", "eap-ig"):
            rankings[r] = edges.edge_attribution_patch(model, clean, corrupt, direction="noise",
                                                       ig_steps=args.ig_steps if r == "eap-ig" else None, **kw)
        else:
            rankings[r] = attribution_patch(model, clean, corrupt, site="z", method="atp*", direction="noise", **kw)
    rank_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = pareto_curve(model, clean, corrupt, rankings, n_points=args.points, ablation=args.ablation, **kw)
    print(f"{len(clean)} prompt(s) of {clean.shape[1]} tokens, {res.circuits.n_valid} edges; rankings in {rank_s:.2f}s, "
          f"{len(res.circuits.labels)} circuits evaluated in {time.perf_counter() - t0:.2f}s")
    print(f"{'ranking':<8s} {'kind':<6s} {'AUC':>6s}  recovered fraction at 10% / 50% of the edges")
    for c in res.curves.values():
        at = [float(np.interp(x, c.fraction, c.faithfulness)) for x in (0.1, 0.5)]
        print(f"{c.name:<8s} {c.kind:<6s} {c.auc:6.3f}  {at[0]:+.3f} / {at[1]:+.3f}")
    if args.out:
        from ..plots import save_figure

        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        csv = Path(str(prefix) + ".csv")
        res.to_dataframe().to_csv(csv, index=False)
        png = save_figure(plot_pareto(res), Path(str(prefix) + ".png"), close=True)
        print(f"wrote {csv}, {png}")
    return 0
