"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no
scripts, no links or sources outside the page (it opens from disk, offline)."""

from __future__ import annotations

import base64
import html

SECTIONS = (
    ("circuit", "What was found",
     "The circuit the patching results point to, when they match a known motif."),
    ("coarse", "1. Coarse first: residual stream, attention and MLP outputs",
     "Start at low granularity to see where (layer, position) the behaviour lives before zooming in. Denoising (clean "
     "activations patched into the corrupted run) asks whether a component is sufficient to restore the behaviour; "
     "noising (corrupted activations patched into the clean run) asks whether it is necessary."),
    ("zoom", "2. Zoom in: heads, positions, q/k/v, neurons",
     "Where the coarse maps show effects, patch finer components, within the budget."),
    ("metrics", "3. Several metrics side by side, and their pitfalls",
     "Each metric can mislead: probability and log-probability saturate, accuracy and rank are discrete, KL is "
     "unsigned (any change counts) and flat near the clean run. Logit difference is linear in the logits and is the "
     "primary metric here."),
    ("directions", "4. Denoising vs noising",
     "A component important in only one direction tells you about the circuit's logic: sufficient but not necessary "
     "suggests redundant paths (OR) or backup behaviour; necessary but not sufficient suggests it works only together "
     "with other components (AND)."),
    ("signs", "5. Negative components and overshoot",
     "Effects below 0 (the patch moves the model away from the target) and above 1 (beyond the whole gap)."),
    ("spread", "5b. Per-prompt spread",
     "An average effect can be carried by a few prompts."),
    ("attribution", "6. Attribution (AtP*) beside exact patching",
     "Gradient-based attribution ranks every component from a few backward passes (AtP*: the QK fix and GradDrop; "
     "AtP+QK on one-layer models, where GradDrop is undefined); the components it ranks wrongly are listed and "
     "patched exactly again."),
    ("plan", "Plan and budget", ""),
)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:20px;margin:34px 0 6px;border-bottom:2px solid #ddd;padding-bottom:4px}
.lede{color:#555;margin:0 0 14px;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
.finding{border-left:5px solid #2166ac;background:#fff;padding:8px 12px;margin:8px 0;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.finding.caution{border-left-color:#d6604d}
.finding .kind{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#666}
.finding .msg{margin:3px 0;font-size:14px} .finding .next{font-size:13px;color:#333} .finding .next b{color:#1b7837}
.finding .nums{font-size:12px;color:#666;font-family:ui-monospace,Menlo,Consolas,monospace}
figure{margin:12px 0;background:#fff;padding:8px;border:1px solid #e5e5e5} figure img{max-width:100%;height:auto}
figcaption{font-size:13px;color:#444;margin-top:4px}
.summary{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0} .pill{background:#fff;border:1px solid #ddd;border-radius:12px;padding:2px 10px;font-size:12px}
pre{background:#fff;border:1px solid #e5e5e5;padding:8px;font-size:12px;overflow-x:auto}
td.prompt{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;text-align:left}
"""


def _finding(f, i: int) -> str:
    nums = ", ".join(f"{_e(k)} = {v:.4g}" for k, v in f.numbers)
    return (f'<div class="finding {_e(f.severity)}" id="finding-{i}"><div class="kind">{_e(f.kind.replace("_", " "))}'
            f'{" · " + _e(", ".join(f.components)) if f.components else ""}</div>'
            f'<p class="msg">{_e(f.message)}</p><p class="next"><b>Next:</b> {_e(f.next_step)}</p>'
            + (f'<div class="nums">{nums}</div>' if nums else "") + "</div>")


def _figure(fig) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{_e(fig.name)}"><img alt="{_e(fig.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(fig.caption)}</figcaption></figure>")


def render(report) -> str:
    """The HTML page of a :class:`~jaxpatch.reporting.Report`."""
    ex = report.extras
    primary = ex["primary"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(report.title)}</title>"
             f"<style>{CSS}</style></head><body><main>"]
    parts.append(f"<h1>{_e(report.title)}</h1>")
    parts.append(f'<p class="lede">The exploratory workflow of Heimersheim &amp; Nanda (2024), "How to use and interpret '
                 f"activation patching\", run on {_e(report.model_name)}: {ex['tokens'].shape[0]} clean/corrupted prompt "
                 f"pair(s) of {ex['tokens'].shape[1]} tokens; primary metric {_e(primary)}; importance threshold "
                 f"{report.info['threshold']:.2f} of the gap; {report.info['used']} forward-pass equivalents used"
                 + (f" of a budget of {report.info['budget']}" if report.info['budget'] is not None else "")
                 + ".</p>")
    if report.prompt_text:
        parts.append("<table><tr><th>prompt</th><th>tokens (first pair)</th></tr>"
                     + "".join(f'<tr><td>{_e(k)}</td><td class="prompt">{_e(v)}</td></tr>' for k, v in report.prompt_text)
                     + "</table>")
    rows = "".join(f"<tr><td>{_e(m)}</td><td>{b['clean']:.4g}</td><td>{b['corrupt']:.4g}</td>"
                   f"<td>{b['clean'] - b['corrupt']:.4g}</td></tr>" for m, b in ex["baselines"].items())
    parts.append(f"<table><tr><th>metric</th><th>clean</th><th>corrupt</th><th>gap</th></tr>{rows}</table>")
    counts = {}
    for f in report.findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    parts.append('<div class="summary">' + "".join(f'<span class="pill">{_e(k.replace("_", " "))}: {n}</span>'
                                                 for k, n in counts.items()) + "</div>")
    idx = {id(f): i for i, f in enumerate(report.findings)}
    for sec, title, lede in SECTIONS:
        fs = [f for f in report.findings if f.section == sec]
        figs = [g for g in report.figures if g.section == sec]
        if sec == "plan":
            parts.append(f'<h2 id="sec-plan">{_e(title)}</h2><pre>{_e(str(report.plan))}</pre>')
            parts += [_finding(f, idx[id(f)]) for f in fs]
            continue
        if not fs and not figs:
            if sec == "circuit":
                parts.append(f'<h2 id="sec-circuit">{_e(title)}</h2><p class="lede">No known circuit motif among the important '
                             "heads; see the sections below.</p>")
            continue
        parts.append(f'<h2 id="sec-{_e(sec)}">{_e(title)}</h2>' + (f'<p class="lede">{_e(lede)}</p>' if lede else ""))
        parts += [_figure(g) for g in figs]
        parts += [_finding(f, idx[id(f)]) for f in fs]
    parts.append('<h2 id="sec-files">Files</h2><p class="lede">Tidy tables of every sweep (one row per patch, every '
                 "metric raw and normalised) are in <code>tables/</code> next to this page (load with "
                 "<code>jaxpatch.results_io.load_result</code>); the findings as data in <code>findings.json</code> and "
                 "<code>findings.csv</code>.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
