"""A guided patching report: the founding paper's advice, carried out (``jaxpatch.report``).

:func:`report` runs the exploratory workflow of Heimersheim & Nanda (2024), "How to use and
interpret activation patching", in one call on the existing engine
(:func:`~jaxpatch.activation_patch`, :func:`~jaxpatch.attribution_patch`):

1. coarse first — residual stream, attention and MLP outputs by layer x position, denoising and
   noising;
2. zoom in — heads by layer x head, the top heads by position and their q/k/v, MLP neurons of the
   top MLP layers — within ``budget=`` forward-pass equivalents (the plan is printed first);
3. every result under several metrics (logit difference, logprob, probability, KL, accuracy,
   rank), with the pitfalls detected and stated: saturated metrics, discrete metrics hiding
   partial effects, metrics disagreeing in sign or ranking, gaps too small to normalise by;
4. denoising vs noising per component (sufficient but not necessary: possible OR/backup;
   necessary but not sufficient: possible AND);
5. negative components, overshoot, effects carried by a few prompts;
6. AtP* (AtP+QK on one-layer models) beside exact patching for the same sites, the components
   ranked wrongly listed and patched exactly again.

It returns a :class:`Report`: the typed :class:`Finding` s (the same inputs give the same findings),
the plan, every :class:`~jaxpatch.PatchResult`, and the figures; with ``out=`` it writes a
self-contained ``report.html`` (figures embedded, nothing referenced outside the page), the
findings (``findings.json``, ``findings.csv``) and every sweep's tidy table (``tables/``).

Example::

    from jaxpatch import data
    model = data.load_default_model()
    clean, corrupt, answer, wrong = data.induction_prompts(32, seed=0)
    rep = jaxpatch.report(model, clean, corrupt, answer=answer, wrong=wrong,
                          token_labels=data.load_vocab(), out="report-out")
    for f in rep.by_kind("circuit"):
        print(f.message)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from .findings import KINDS as KINDS, Finding as Finding
from .figures import Figure as Figure
from .workflow import Plan as Plan, Step as Step, check_out, make_plan as make_plan, run as _run


@dataclasses.dataclass
class Report:
    """The outcome of :func:`report`.

    Attributes:
        findings: the typed findings, grouped by kind in :data:`KINDS` order.
        plan: the :class:`Plan` that was run (steps over budget marked skipped).
        results: every exact sweep, keyed like ``"coarse.resid_pre.denoise"``, ``"heads.noise"``,
            ``"head_pos.denoise"``, ``"qkv.k.noise"``, ``"neurons.denoise"``, ``"verify.heads.denoise"`` (the exact re-check of components attribution misranks).
        figures: the embedded figures.
        extras: AtP* results keyed like the exact sweep they estimate (``extras["attribution"]``), head scores and roles, baselines,
            component names per result, the prompts.
        info: budget, forward-pass equivalents used, timings (seconds; not part of the findings).
        title, model_name, prompt_text: shown at the top of the page.
        files: what :meth:`save` wrote (name -> path).
    """

    findings: list[Finding]
    plan: Plan
    results: dict
    figures: list[Figure]
    extras: dict
    info: dict
    title: str = "jaxpatch report"
    model_name: str = "a model"
    prompt_text: tuple = ()
    files: dict = dataclasses.field(default_factory=dict)

    def by_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind (see :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"Unknown finding kind {kind!r}; valid: {list(KINDS)}.")
        return [f for f in self.findings if f.kind == kind]

    def to_html(self) -> str:
        """The self-contained HTML page."""
        from .html import render

        return render(self)

    def summary(self) -> str:
        """The findings as plain text, one paragraph each."""
        lines = []
        for f in self.findings:
            comps = f" [{', '.join(f.components)}]" if f.components else ""
            lines.append(f"- {f.kind}{comps}: {f.message}\n  next: {f.next_step}")
        return "\n".join(lines)

    def findings_frame(self):
        """The findings as a pandas DataFrame (numbers as a JSON column)."""
        import pandas as pd

        return pd.DataFrame([{**f.to_dict(), "components": "; ".join(f.components), "metrics": "; ".join(f.metrics),
                              "numbers": json.dumps(dict(f.numbers))} for f in self.findings])

    def save(self, out) -> dict[str, Path]:
        """Write ``report.html``, ``findings.json``, ``findings.csv`` and ``tables/<result>.npz`` +
        ``.parquet`` (or ``.csv``) into the folder ``out`` (created if missing)."""
        from ..results_io import save_result

        folder = check_out(out)
        files: dict[str, Path] = {}
        page = folder / "report.html"
        page.write_text(self.to_html(), encoding="utf-8")
        files["html"] = page
        fj = folder / "findings.json"
        fj.write_text(json.dumps([f.to_dict() for f in self.findings], indent=1), encoding="utf-8")
        files["findings_json"] = fj
        fc = folder / "findings.csv"
        self.findings_frame().to_csv(fc, index=False)
        files["findings_csv"] = fc
        for key, res in self.results.items():
            for kind, path in save_result(res, folder / "tables" / key.replace(".", "_")).items():
                files[f"table:{key}:{kind}"] = path
        for key, res in self.extras.get("attribution", {}).items():
            for kind, path in save_result(res, folder / "tables" / ("atpstar_" + key.replace(".", "_"))).items():
                files[f"table:{key}:{kind}"] = path
        self.files = files
        return files

    def __repr__(self) -> str:
        return (f"Report({len(self.findings)} findings, {len(self.results)} sweeps, {len(self.figures)} figures, "
                f"{self.info.get('used')} forward-pass equivalents)")


def report(
    model,
    clean_tokens,
    corrupt_tokens,
    *,
    answer,
    wrong=None,
    answer_pos=-1,
    token_labels=None,
    metrics: Sequence[str] | None = None,
    budget: int | None = None,
    out=None,
    threshold: float = 0.2,
    zoom_heads: int = 3,
    zoom_mlp_layers: int = 1,
    attribution: bool = True,
    min_gap: float = 1e-3,
    title: str | None = None,
    verbose: bool = True,
    chunk_size: int | None = None,
    figures: bool = True,
) -> Report:
    """Run the paper's patching workflow and return (and with ``out=``, write) a guided report.

    Args:
        model: a :class:`~jaxpatch.HookedModel`.
        clean_tokens, corrupt_tokens: ``[batch, pos]`` prompt pairs (same shape).
        answer, wrong, answer_pos, token_labels: as for :func:`~jaxpatch.activation_patch`.
            Without ``wrong`` there is no logit difference and logprob is the primary metric.
        metrics: metric names, the first being the primary (continuous) one; default every
            built-in metric, logit difference first.
        budget: forward-pass equivalents of the batch the report may spend (``None``: no limit).
            The coarse pass is required; zoom steps that do not fit are skipped and reported.
        out: a folder to write ``report.html``, the findings and the tables to (checked writable
            before anything runs); ``None`` writes nothing (see :meth:`Report.save`).
        threshold: the fraction of the clean-corrupt gap from which a component counts as important.
        zoom_heads: how many top heads to zoom into (by position and q/k/v).
        zoom_mlp_layers: how many top MLP layers to patch neuron by neuron.
        attribution: put AtP* (AtP+QK on one-layer models) beside exact patching.
        min_gap: the smallest usable clean-corrupt gap on the primary metric.
        title: the page title.
        verbose: print the plan first, and each step as it runs.
        chunk_size: passed to the sweeps.
        figures: draw the figures (``False``: findings and results only, for programmatic use;
            the HTML page then has no figures).

    Returns:
        a :class:`Report`.

    Raises:
        InputError: a budget too small for the coarse pass (saying how much it needs), prompts
            without a clean-corrupt gap, an ``out`` that cannot be written, or a bad argument.
    """
    folder = check_out(out) if out is not None else None
    plan, results, extras, findings, info = _run(
        model, clean_tokens, corrupt_tokens, answer=answer, wrong=wrong, answer_pos=answer_pos, token_labels=token_labels,
        metrics=metrics, budget=budget, threshold=threshold, zoom_heads=zoom_heads, zoom_mlp_layers=zoom_mlp_layers,
        attribution=attribution, min_gap=min_gap, verbose=verbose, chunk_size=chunk_size)
    from . import figures as G

    primary = extras["primary"]
    names = extras["names"]
    figs = [G.coarse(results, primary)] if figures else []
    if figures and "heads.denoise" in results:
        figs.append(G.heads(results, primary))
    if figures:
        for fig in (G.head_pos(results, names, extras["top_heads"], primary), G.qkv(results, extras["top_heads"], primary),
                    G.neurons(results, names, primary)):
            if fig is not None:
                figs.append(fig)
        figs.append(G.metrics_side_by_side(results["coarse.resid_pre.denoise"], extras["metrics"], "coarse.resid_pre.denoise"))
        for fig in (G.directions(results, names, primary, threshold), G.spread(results, names, primary, threshold),
                    G.attribution(results, extras["attribution"], primary)):
            if fig is not None:
                figs.append(fig)
    prompt_text: tuple = ()
    if token_labels is not None:
        def words(ids):
            ids = [int(i) for i in ids]
            return " ".join(token_labels(ids) if callable(token_labels) else [str(token_labels[i]) for i in ids])
        ans0 = int(extras["answer"][0]) if "answer" in extras else None
        prompt_text = (("clean", words(extras["tokens"][0])), ("corrupted", words(extras["corrupt_tokens"][0])))
        if ans0 is not None:
            prompt_text += (("answer", words([ans0])),)
    rep = Report(findings, plan, results, figs, extras, info, title=title or "jaxpatch report",
                 model_name=getattr(model, "name", None) or "a model", prompt_text=prompt_text)
    if folder is not None:
        rep.save(folder)
    return rep


__all__ = ["Report", "Finding", "Figure", "Plan", "Step", "KINDS", "report", "make_plan"]
