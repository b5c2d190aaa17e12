"""The paper's exploratory workflow as one budgeted plan: coarse first, both directions, then zoom in.

Costs are counted in *forward-pass equivalents* of the prompt batch: an exact sweep of P patches
costs P + 2 (each patch one forward pass, plus the clean and corrupted reference runs); attention
patterns cost 1; AtP costs 4 (two forward passes and one backward pass, counted as two); AtP*
costs 2 + 2(L + 1) (GradDrop's L backward variants and the QK fix). These are counts, not
timings: the same inputs give the same plan. jaxpatch's sweeps skip work below the patched layer
and position, so the real cost is usually lower.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from .. import metrics as _metrics
from .._errors import InputError, JaxpatchError
from ..attribution import attribution_patch
from ..model import HookedModel, check_tokens
from ..patching import activation_patch, answer_arrays
from ..results import PatchResult
from . import findings as F

ALL_METRICS = ("logit_diff", "logprob", "prob", "kl", "accuracy", "rank")
COARSE_SITES = ("resid_pre", "attn_out", "mlp_out")
DIRECTIONS = ("denoise", "noise")


def attribution_method(n_layers: int) -> str:
    """AtP*; a one-layer model has no layer to drop, so GradDrop is undefined: AtP+QK (the QK fix only)."""
    return "atp*" if n_layers >= 2 else "atp+qk"


def atp_star_cost(n_layers: int) -> int:
    """AtP*: clean and corrupted forward passes, plus GradDrop's L backward variants and the plain
    gradient (each backward pass counted as two forward passes); AtP+QK: one backward pass."""
    return 2 + 2 * (n_layers + 1) if n_layers >= 2 else 4


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the plan: ``cost`` in forward-pass equivalents (an upper bound for zoom steps,
    whose targets depend on earlier results)."""

    name: str
    description: str
    cost: int
    required: bool = False
    included: bool = True


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps the report will run, in order, with their costs and the budget."""

    steps: tuple[Step, ...]
    budget: int | None
    n_prompts: int
    n_pos: int

    @property
    def total(self) -> int:
        return sum(s.cost for s in self.steps if s.included)

    def cost_of(self, prefix: str) -> int:
        return sum(s.cost for s in self.steps if s.name.startswith(prefix))

    def included(self, name: str) -> bool:
        return any(s.name == name and s.included for s in self.steps)

    def __str__(self) -> str:
        b = "unlimited" if self.budget is None else str(self.budget)
        lines = [f"jaxpatch report plan: {self.n_prompts} prompt pair(s) of {self.n_pos} tokens; costs in forward-pass "
                 f"equivalents of the batch (budget: {b})"]
        w = max(len(s.description) for s in self.steps)
        for i, s in enumerate(self.steps, 1):
            status = "" if s.included else "   SKIPPED (over budget)"
            lines.append(f"  {i:2d}. {s.description:<{w}s} {s.cost:7d}{status}")
        lines.append(f"  total {self.total}" + ("" if self.budget is None else f" of {self.budget}"))
        return "\n".join(lines)


def make_plan(cfg, n_prompts: int, n_pos: int, budget: int | None, *, zoom_heads: int = 3, zoom_mlp_layers: int = 1,
              attribution: bool = True, max_verify: int = 8) -> Plan:
    """The plan for a model config and prompt shape. Raises :class:`InputError` if ``budget`` cannot
    cover the coarse pass (saying how much it needs)."""
    L, H, T = cfg.n_layers, cfg.n_heads, n_pos
    sweep = lambda p: 2 * (p + 2)  # noqa: E731  (both directions)
    steps = [Step("baselines", "baselines: clean and corrupted runs, every metric", 2, required=True)]
    for site in COARSE_SITES:
        steps.append(Step(f"coarse.{site}", f"coarse: {site} by layer x pos ({L}x{T}), denoise + noise", sweep(L * T),
                          required=True))
    steps.append(Step("heads", f"zoom: heads (z) by layer x head ({L}x{H}), denoise + noise", sweep(L * H)))
    steps.append(Step("roles", "zoom: attention patterns of every head (head roles)", 1))
    steps.append(Step("head_pos", f"zoom: top {zoom_heads} heads by position ({zoom_heads}x{T}), denoise + noise",
                      sweep(zoom_heads * T)))
    steps.append(Step("qkv", f"zoom: q, k, v of the top {zoom_heads} heads, denoise + noise", 3 * sweep(zoom_heads)))
    if attribution:
        name = {"atp*": "AtP*", "atp+qk": "AtP+QK"}[attribution_method(L)]
        steps.append(Step("attribution", f"attribution: {name} of heads and coarse sites (denoise)", atp_star_cost(L)))
        steps.append(Step("verify", f"attribution: exact re-check of up to {max_verify} misranked components per site",
                          4 * (max_verify + 2)))
    if cfg.d_mlp:
        steps.append(Step("neurons", f"zoom: MLP neurons of the top {zoom_mlp_layers} MLP layer(s) "
                                     f"({zoom_mlp_layers}x{cfg.d_mlp}), denoise + noise", sweep(zoom_mlp_layers * cfg.d_mlp)))
    required = sum(s.cost for s in steps if s.required)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise InputError(f"budget= must be an int number of forward-pass equivalents (or None for no limit); got {budget!r}.")
        if budget < required:
            parts = ", ".join(f"{s.name} {s.cost}" for s in steps if s.required)
            raise InputError(
                f"budget={budget} forward-pass equivalents is too small for the coarse pass, which needs {required} "
                f"({parts}) for {n_prompts} prompt(s) of {n_pos} tokens on {L} layers. Give budget>={required} (the full "
                f"plan needs {sum(s.cost for s in steps)}), or budget=None for no limit.")
        left = budget
        out = []
        for s in steps:
            ok = s.cost <= left
            if ok:
                left -= s.cost
            out.append(dataclasses.replace(s, included=ok))
        steps = out
    return Plan(tuple(steps), None if budget is None else int(budget), n_prompts, n_pos)


# --------------------------------------------------------------------------------- naming
def _pos_label(res: PatchResult, p: int) -> str:
    return res.labels.get("pos", [str(i) for i in range(p + 1)])[p] if "pos" in res.labels else str(p)


def grid_names(res: PatchResult, site: str) -> list[str]:
    """Component names of a full grid result, in flat (row-major) order."""
    if res.axes == ("layer", "head"):
        return [f"L{l}H{h}" for l in range(res.shape[0]) for h in range(res.shape[1])]
    if res.axes == ("layer", "pos"):
        return [f"{site} L{l} @{res.labels['pos'][p]}" for l in range(res.shape[0]) for p in range(res.shape[1])]
    raise JaxpatchError(f"internal: no component names for axes {res.axes}")


def _rows_of_flat(res: PatchResult, flat: Sequence[int]) -> list[dict]:
    return [{a: int(i) for a, i in zip(res.axes, np.unravel_index(int(f), res.shape))} for f in flat]


def check_out(out) -> Path:
    """The report folder, created and checked writable before any work is done."""
    p = Path(out)
    try:
        if p.exists() and not p.is_dir():
            raise InputError(f"Cannot write the report to {str(p)!r}: it is an existing file, not a folder. Give a folder "
                             "path for out= (it is created if missing).")
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".jaxpatch-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"Cannot write the report to {str(p)!r}: {e.strerror or e} ({type(e).__name__}). Give a writable "
                         "folder for out= (it is created if missing).") from None
    return p


# ------------------------------------------------------------------------------- the workflow
def run(model: HookedModel, clean, corrupt, *, answer, wrong=None, answer_pos=-1, token_labels=None, metrics=None,
        budget=None, threshold: float = 0.2, zoom_heads: int = 3, zoom_mlp_layers: int = 1, attribution: bool = True,
        min_gap: float = 1e-3, verbose: bool = True, chunk_size: int | None = None):
    """Run the workflow; returns ``(plan, results, extras, findings, info)`` (see :func:`report`)."""
    t_start = time.perf_counter()
    if not isinstance(model, HookedModel):
        raise InputError(f"report() needs a jaxpatch.HookedModel, got {type(model).__name__}.")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise InputError(f"threshold= must be a number in (0, 1) (a fraction of the clean-corrupt gap); got {threshold!r}.")
    for name, val in (("zoom_heads", zoom_heads), ("zoom_mlp_layers", zoom_mlp_layers)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise InputError(f"{name}= must be an int >= 1; got {val!r}.")
    cfg = model.config
    clean_t = check_tokens(cfg, clean)
    corrupt_t = check_tokens(cfg, corrupt)
    if clean_t.shape != corrupt_t.shape:
        raise InputError(f"clean {tuple(clean_t.shape)} and corrupt {tuple(corrupt_t.shape)} prompts must have the same shape.")
    B, T = clean_t.shape
    if metrics is None:
        metrics = ALL_METRICS if wrong is not None else tuple(m for m in ALL_METRICS if m != "logit_diff")
    metrics = tuple(_metrics.check_names(metrics))
    if any(callable(m) for m in metrics):
        raise InputError("report() takes metric names (its pitfall checks need to know what each metric is); "
                         f"valid: {list(ALL_METRICS)} or 'top<k>_accuracy'.")
    primary = metrics[0]
    if primary in F.DISCRETE_METRICS or primary.startswith("top"):
        raise InputError(f"The first metric is the report's primary one and must be continuous; got {primary!r}. "
                         "Put 'logit_diff' (or 'logprob') first.")
    ans, wr, apos = answer_arrays(cfg, metrics, answer, wrong, answer_pos, B, T)
    plan = make_plan(cfg, B, T, budget, zoom_heads=int(zoom_heads), zoom_mlp_layers=int(zoom_mlp_layers),
                     attribution=attribution)
    say = print if verbose else (lambda *a, **k: None)
    say(str(plan))

    # --- baselines: refuse prompts without a gap before spending anything --------------------
    rows = lambda lg: np.asarray(lg)[np.arange(B), apos]  # noqa: E731
    lc, lk = rows(model(clean_t)), rows(model(corrupt_t))
    static, consts = _metrics.prepare(metrics, B, cfg.d_vocab, model.dtype)
    clean_lp = jax.nn.log_softmax(np.asarray(lc, np.float32), -1)
    mc = np.asarray(_metrics.compute(static, lc, ans, wr, clean_lp, consts))
    mk = np.asarray(_metrics.compute(static, lk, ans, wr, clean_lp, consts))
    floor = max(_metrics.gap_floor([lc, lk], lc.dtype), float(min_gap))
    gap = float(mc[0].mean() - mk[0].mean())
    if not np.isfinite(gap):
        raise InputError(f"The {primary} baselines are not finite (clean {mc[0].mean()}, corrupt {mk[0].mean()}); check the "
                         "model's weights and the prompts.")
    if abs(gap) <= floor:
        raise InputError(
            f"The prompts show no clean-corrupt gap on {primary}: clean {mc[0].mean():.6g}, corrupt {mk[0].mean():.6g} "
            f"(gap {gap:.3g}; the smallest usable gap is {floor:.3g}). Patching measures how much of this gap a component "
            "restores or destroys, so there is nothing to localise. Use corrupted prompts that change the model's answer "
            "(replace the tokens the answer depends on) and check answer=/wrong= (the contrast token).")
    baselines = {m: {"clean": float(mc[i].mean()), "corrupt": float(mk[i].mean())} for i, m in enumerate(metrics)}

    kw = dict(answer=ans, wrong=wr if wrong is not None else None, answer_pos=apos, token_labels=token_labels,
              progress=False, chunk_size=chunk_size)
    results: dict[str, PatchResult] = {}
    names: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    used = 2

    def exact(key, site, direction, by=None, patches=None, mets=metrics):
        t0 = time.perf_counter()
        r = activation_patch(model, clean_t, corrupt_t, site=site, by=by, patches=patches, direction=direction,
                             metrics=mets, **kw)
        timings[key] = time.perf_counter() - t0
        results[key] = r
        return r

    # --- 1. coarse, both directions --------------------------------------------------------
    say("running: coarse pass")
    for site in COARSE_SITES:
        for d in DIRECTIONS:
            r = exact(f"coarse.{site}.{d}", site, d, by=("layer", "pos"))
            names[f"coarse.{site}.{d}"] = grid_names(r, site)
        used += plan.cost_of(f"coarse.{site}")

    # --- 2. zoom: heads -------------------------------------------------------------------
    head_eff: dict[tuple[int, int], tuple[float, float]] = {}
    top_heads: list[tuple[int, int]] = []
    if plan.included("heads"):
        say("running: heads")
        for d in DIRECTIONS:
            r = exact(f"heads.{d}", "z", d, by=("layer", "head"))
            names[f"heads.{d}"] = grid_names(r, "z")
        used += plan.cost_of("heads")
        nd = F.normalized_or_none(results["heads.denoise"], primary)
        nn = F.normalized_or_none(results["heads.noise"], primary)
        if nd is not None and nn is not None:
            head_eff = {(l, h): (float(nd[l, h]), float(nn[l, h])) for l in range(cfg.n_layers) for h in range(cfg.n_heads)}
            imp = {lh: max(abs(a), abs(b)) for lh, (a, b) in head_eff.items()}
            top_heads = [lh for lh in sorted(imp, key=lambda lh: (-imp[lh], lh)) if imp[lh] >= threshold][: int(zoom_heads)]
    roles = {}
    extras: dict = {"baselines": baselines, "primary": primary, "metrics": metrics, "top_heads": top_heads}
    if plan.included("roles"):
        try:
            _, caps = model.run(clean_t, capture=("blocks.attn.hook_pattern",))
        except JaxpatchError as e:  # a family without the pattern site: no roles, said in the info
            extras["head_scores_error"] = str(e)
        else:
            pattern = np.asarray(caps["blocks.attn.hook_pattern"], np.float32)
            scores = F.head_scores(pattern, np.asarray(clean_t))
            roles = F.head_roles(scores)
            extras["head_scores"] = scores
        used += 1
    if plan.included("head_pos") and top_heads:
        say("running: top heads by position")
        rows_hp = [{"layer": l, "head": h, "pos": p} for (l, h) in top_heads for p in range(T)]
        for d in DIRECTIONS:
            r = exact(f"head_pos.{d}", "z", d, patches=rows_hp)
            names[f"head_pos.{d}"] = [f"L{l}H{h} @{_pos_label(results['coarse.resid_pre.denoise'], p)}"
                                      for (l, h) in top_heads for p in range(T)]
        used += 2 * (len(rows_hp) + 2)
    qkv_eff: dict = {}
    if plan.included("qkv") and top_heads:
        say("running: q/k/v of top heads")
        rows_h = [{"layer": l, "head": h} for (l, h) in top_heads]
        for s in ("q", "k", "v"):
            for d in DIRECTIONS:
                r = exact(f"qkv.{s}.{d}", s, d, patches=rows_h)
                names[f"qkv.{s}.{d}"] = [f"L{l}H{h}.{s}" for (l, h) in top_heads]
            nd = F.normalized_or_none(results[f"qkv.{s}.denoise"], primary)
            nn = F.normalized_or_none(results[f"qkv.{s}.noise"], primary)
            if nd is not None and nn is not None:
                for j, (l, h) in enumerate(top_heads):
                    qkv_eff[(l, h, s)] = (float(nd[j]), float(nn[j]))
        used += 3 * 2 * (len(rows_h) + 2)

    # --- attribution beside exact -----------------------------------------------------------
    att: dict[str, PatchResult] = {}
    verify: dict[str, dict] = {}
    fs_att: list[F.Finding] = []
    if attribution and plan.included("attribution"):
        method = attribution_method(cfg.n_layers)
        say(f"running: attribution ({method})")
        targets = [(s, ("layer", "pos")) for s in COARSE_SITES]
        keys = [f"coarse.{s}.denoise" for s in COARSE_SITES]
        if "heads.denoise" in results:
            targets.append(("z", ("layer", "head")))
            keys.append("heads.denoise")
        att_metric = primary
        t0 = time.perf_counter()
        out = attribution_patch(model, clean_t, corrupt_t, targets=targets, method=method, metric=att_metric,
                                answer=ans, wrong=kw["wrong"], answer_pos=apos, token_labels=token_labels)
        timings[f"attribution.{method}"] = time.perf_counter() - t0
        for (site, by), key in zip(targets, keys):
            att[key] = next(v for (s, b), v in out.items() if b == tuple(by) and s.endswith(_canon_tail(site)))
        used += atp_star_cost(cfg.n_layers)
        for key in keys:
            what = _what_of(key)
            est = att[key]
            fa, wrong_idx = F.attribution_findings(results[key], est, names[key], att_metric, threshold, what)
            fs_att += fa
            if wrong_idx and plan.included("verify"):
                vkey = f"verify.{key}"
                r = exact(vkey, results[key].site, "denoise", patches=_rows_of_flat(results[key], wrong_idx),
                          mets=(att_metric,))
                used += len(wrong_idx) + 2
                ver = np.asarray(r.normalized(att_metric), np.float64).reshape(-1)
                grid = F.normalized_or_none(results[key], att_metric).reshape(-1)[wrong_idx]
                if not np.allclose(ver, grid, rtol=1e-3, atol=1e-3):
                    raise JaxpatchError(
                        f"internal inconsistency: re-patching {[names[key][i] for i in wrong_idx]} gave normalised "
                        f"effects {np.round(ver, 4).tolist()} but the sweep gave {np.round(grid, 4).tolist()}. Please "
                        "report this with the model and prompts.")
                verify[vkey] = {"indices": wrong_idx, "verified": ver}
                fs_att.append(F.misranked_finding(results[key], est, names[key], att_metric, threshold, what,
                                                  wrong_idx, ver))

    # --- zoom: neurons of the top MLP layers ------------------------------------------------
    if plan.included("neurons") and cfg.d_mlp:
        per_layer = []
        for d in DIRECTIONS:
            v = F.normalized_or_none(results[f"coarse.mlp_out.{d}"], primary)
            per_layer.append(np.zeros(cfg.n_layers) if v is None else np.max(np.abs(v), axis=1))
        score = np.maximum(*per_layer)
        layers = [int(l) for l in np.argsort(-score, kind="stable") if score[l] >= threshold][: int(zoom_mlp_layers)]
        extras["top_mlp_layers"] = layers
        if layers:
            say("running: MLP neurons")
            rows_n = [{"layer": l, "neuron": n} for l in layers for n in range(cfg.d_mlp)]
            for d in DIRECTIONS:
                exact(f"neurons.{d}", "post", d, patches=rows_n)
                names[f"neurons.{d}"] = [f"L{l}N{n}" for l in layers for n in range(cfg.d_mlp)]
            used += 2 * (len(rows_n) + 2)

    # --- findings -----------------------------------------------------------------------------
    fs: list[F.Finding] = []
    fs += F.circuit_findings(roles, head_eff, qkv_eff, primary, threshold)
    imp = {lh: max(abs(a), abs(b)) for lh, (a, b) in head_eff.items()}
    fs += F.role_findings(roles, imp, threshold)
    for key in sorted(k for k in results if k.startswith("coarse.")) + [k for k in ("heads.denoise", "heads.noise") if k in results]:
        fs += F.localised(results[key], names[key], primary, threshold, "coarse" if key.startswith("coarse") else "zoom",
                          _what_of(key))
    metric_keys = ["coarse.resid_pre.denoise", "coarse.resid_pre.noise"] + [k for k in ("heads.denoise", "heads.noise") if k in results]
    fs += F.gap_findings(results["coarse.resid_pre.denoise"], metrics)
    for key in metric_keys:
        fs += F.saturation_findings(results[key], names[key], primary) if key == "coarse.resid_pre.denoise" else []
        fs += F.discrete_findings(results[key], names[key], primary, threshold)
        fs += F.disagreement_findings(results[key], names[key], primary, threshold)
    pairs = [k[: -len(".denoise")] for k in results if k.endswith(".denoise") and not k.startswith("verify")
             and k[: -len(".denoise")] + ".noise" in results]
    for base in pairs:
        fs += F.direction_findings(results[base + ".denoise"], results[base + ".noise"], names[base + ".denoise"],
                                   primary, threshold, _what_of(base + ".denoise"))
    for key in results:
        if key.startswith("verify"):
            continue
        fs += F.sign_findings(results[key], names[key], primary, threshold, _what_of(key))
        fs += F.spread_findings(results[key], names[key], primary, threshold, _what_of(key))
    fs += fs_att
    for s in plan.steps:
        if not s.included:
            fs.append(F.Finding("skipped", "plan", (), (), (("cost", float(s.cost)),),
                                f"Skipped over budget: {s.description} (needs {s.cost} forward-pass equivalents).",
                                f"Raise budget= by {s.cost} to include it.", "caution"))
    if "heads.denoise" in results and not top_heads and (plan.included("head_pos") or plan.included("qkv")):
        fs.append(F.Finding("skipped", "plan", (), (), (("threshold", float(threshold)),),
                            f"Not run: no head reaches {threshold:.2f} of the gap in either direction, so there is no top head "
                            "to patch by position or by q/k/v.",
                            "Lower threshold=, or look for the effect in MLPs or spread over many heads (patch heads jointly).",
                            "caution"))
    if plan.included("neurons") and cfg.d_mlp and not extras.get("top_mlp_layers"):
        fs.append(F.Finding("skipped", "plan", (), (), (("threshold", float(threshold)),),
                            f"Not run: no MLP layer reaches {threshold:.2f} of the gap at any position, so no neurons were "
                            "patched.", "Lower threshold= to zoom into the largest MLP layer anyway.", "caution"))
    fs = sorted(fs, key=lambda f: F.KINDS.index(f.kind))  # stable: detector order within a kind
    info = {"budget": plan.budget, "used": used, "planned": plan.total, "timings": timings,
            "wall_s": time.perf_counter() - t_start, "threshold": threshold}
    extras.update(names=names, roles=roles, head_effects=head_eff, qkv_effects=qkv_eff, attribution=att, verify=verify,
                  tokens=np.asarray(clean_t), corrupt_tokens=np.asarray(corrupt_t), answer=ans)
    return plan, results, extras, fs, info


def _canon_tail(site: str) -> str:
    return {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "z": "hook_z"}[site]


def _what_of(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "coarse":
        return {"resid_pre": "residual stream", "attn_out": "attention output", "mlp_out": "MLP output"}[parts[1]]
    return {"heads": "head", "head_pos": "head at a position", "qkv": "head input", "neurons": "MLP neuron"}.get(parts[0], parts[0])
