"""The report's figures, drawn with matplotlib and returned as PNG bytes (embedded in the HTML).

PNG rather than SVG: an SVG carries ``xmlns="http://www.w3.org/2000/svg"`` and font references,
and the report must reference nothing outside itself.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from ..plots import _pyplot, plot_exact_vs_attribution, plot_layer_head, plot_layer_pos
from ..results import PatchResult
from . import findings as F

CMAP = "RdBu_r"


@dataclasses.dataclass(frozen=True)
class Figure:
    """One embedded figure: ``name`` (anchor), ``section``, ``caption`` and the PNG bytes."""

    name: str
    section: str
    caption: str
    png: bytes


def _png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def coarse(results, primary) -> Figure:
    plt = _pyplot()
    sites = ("resid_pre", "attn_out", "mlp_out")
    L, T = results["coarse.resid_pre.denoise"].shape
    fig, axs = plt.subplots(3, 2, figsize=(2 * min(8.5, 3.5 + 0.3 * T), 3 * (2.6 + 0.3 * min(L, 24))),
                            constrained_layout=True, squeeze=False)
    for r, site in enumerate(sites):
        for c, d in enumerate(("denoise", "noise")):
            plot_layer_pos(results[f"coarse.{site}.{d}"], primary, ax=axs[r, c], annotate=False)
    return Figure("coarse", "coarse", f"Coarse pass: residual stream, attention and MLP outputs by layer × position, "
                  f"denoising (left: 1 = the clean behaviour restored) and noising (right: 1 = destroyed), normalised "
                  f"{primary}.", _png(fig))


def heads(results, primary) -> Figure:
    plt = _pyplot()
    L, H = results["heads.denoise"].shape
    fig, axs = plt.subplots(1, 2, figsize=(2 * max(4.2, 1.0 * H + 2.5), max(2.6, 0.5 * L + 1.8)), constrained_layout=True)
    for a, d in zip(axs, ("denoise", "noise")):
        plot_layer_head(results[f"heads.{d}"], primary, ax=a)
    return Figure("heads", "zoom", f"Every head (its output z at all positions), denoising and noising, normalised {primary}.",
                  _png(fig))


def metrics_side_by_side(res: PatchResult, metrics, key: str) -> Figure:
    """The paper's Figure 2: one sweep under every metric."""
    plt = _pyplot()
    n = len(metrics)
    cols = 2 if n > 1 else 1
    rows = int(np.ceil(n / cols))
    L, T = res.shape
    fig, axs = plt.subplots(rows, cols, figsize=(cols * min(8.5, 3.5 + 0.3 * T), rows * (2.4 + 0.3 * min(L, 24))),
                            constrained_layout=True, squeeze=False)
    for a, m in zip(axs.reshape(-1), metrics):
        plot_layer_pos(res, m, ax=a, annotate=False)
        a.set_title(m, fontsize=10)
    for a in axs.reshape(-1)[n:]:
        a.set_visible(False)
    return Figure("metrics", "metrics", f"One sweep ({key.replace('.', ' ')}) under every metric, normalised where the "
                  "gap allows (as in the paper's Figure 2): the same patches, different pictures.", _png(fig))


def directions(results, names, primary, threshold) -> Figure | None:
    plt = _pyplot()
    pts = []
    for key in ("heads", "coarse.attn_out", "coarse.mlp_out", "qkv.q", "qkv.k", "qkv.v"):
        if f"{key}.denoise" not in results:
            continue
        d = F.normalized_or_none(results[f"{key}.denoise"], primary)
        n = F.normalized_or_none(results[f"{key}.noise"], primary)
        if d is None or n is None:
            continue
        for nm, a, b in zip(names[f"{key}.denoise"], d.reshape(-1), n.reshape(-1)):
            pts.append((key, nm, float(a), float(b)))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 5.4), constrained_layout=True)
    colours = {"heads": "#b2182b", "coarse.attn_out": "#2166ac", "coarse.mlp_out": "#1b7837", "qkv.q": "#984ea3",
               "qkv.k": "#ff7f00", "qkv.v": "#a65628"}
    for key in colours:
        sel = [p for p in pts if p[0] == key]
        if sel:
            ax.scatter([p[2] for p in sel], [p[3] for p in sel], s=26, color=colours[key], alpha=0.8,
                       edgecolors="black", linewidths=0.3, label=key.replace("coarse.", "") + (" (layer×pos)" if "coarse" in key else ""))
    for p in sorted(pts, key=lambda p: -max(abs(p[2]), abs(p[3])))[:8]:
        ax.annotate(p[1], (p[2], p[3]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(threshold, color="grey", ls=":", lw=1)
    ax.axhline(threshold, color="grey", ls=":", lw=1)
    ax.axhline(0, color="lightgrey", lw=0.6)
    ax.axvline(0, color="lightgrey", lw=0.6)
    ax.set_xlabel(f"denoising: fraction restored (sufficiency), {primary}")
    ax.set_ylabel(f"noising: fraction destroyed (necessity), {primary}")
    ax.set_title("Denoising vs noising per component\nlower right: sufficient only (OR/backup?); upper left: necessary "
                 "only (AND?)", fontsize=9)
    ax.legend(fontsize=7, loc="best", frameon=False)
    return Figure("directions", "directions", "Each component's denoising effect against its noising effect. Dotted "
                  f"lines: the importance threshold ({threshold:.2f}).", _png(fig))


def head_pos(results, names, top_heads, primary) -> Figure | None:
    if "head_pos.denoise" not in results or not top_heads:
        return None
    plt = _pyplot()
    k = len(top_heads)
    T = results["head_pos.denoise"].shape[0] // k
    pos_labels = [n.split(" @", 1)[1] for n in names["head_pos.denoise"][:T]]
    fig, axs = plt.subplots(1, 2, figsize=(2 * min(9, 2.5 + 0.35 * T), 1.4 + 0.45 * k), constrained_layout=True)
    grids = []
    for d in ("denoise", "noise"):
        v = F.normalized_or_none(results[f"head_pos.{d}"], primary)
        grids.append(np.zeros((k, T)) if v is None else v.reshape(k, T))
    vmax = max(1e-9, float(max(np.abs(g).max() for g in grids)))
    for a, g, d in zip(axs, grids, ("denoise", "noise")):
        im = a.imshow(g, cmap=CMAP, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        a.set_yticks(range(k), [f"L{l}H{h}" for l, h in top_heads])
        a.set_xticks(range(T), pos_labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
        a.set_title(f"{d}: top heads by position", fontsize=10)
    fig.colorbar(im, ax=list(axs), shrink=0.9).set_label(f"normalised {primary}")
    return Figure("head_pos", "zoom", "The top heads patched one position at a time (their output z at that position).",
                  _png(fig))


def qkv(results, top_heads, primary) -> Figure | None:
    if "qkv.q.denoise" not in results or not top_heads:
        return None
    plt = _pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True, sharey=True)
    x = np.arange(len(top_heads))
    for a, d in zip(axs, ("denoise", "noise")):
        for j, (s, c) in enumerate(zip("qkv", ("#984ea3", "#ff7f00", "#a65628"))):
            v = F.normalized_or_none(results[f"qkv.{s}.{d}"], primary)
            v = np.zeros(len(top_heads)) if v is None else v
            a.bar(x + (j - 1) * 0.27, v, width=0.27, color=c, label=s)
        a.set_xticks(x, [f"L{l}H{h}" for l, h in top_heads])
        a.axhline(0, color="black", lw=0.6)
        a.set_title(f"{d}: queries, keys, values of the top heads", fontsize=10)
    axs[0].set_ylabel(f"normalised {primary}")
    axs[0].legend(fontsize=8, frameon=False)
    return Figure("qkv", "zoom", "Which input of each top head carries its effect: its queries, keys or values patched alone.",
                  _png(fig))


def neurons(results, names, primary, k: int = 20) -> Figure | None:
    if "neurons.denoise" not in results:
        return None
    plt = _pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(11, 3.2), constrained_layout=True)
    for a, d in zip(axs, ("denoise", "noise")):
        v = F.normalized_or_none(results[f"neurons.{d}"], primary)
        if v is None:
            continue
        order = np.argsort(-np.abs(v), kind="stable")[:k]
        a.bar(range(len(order)), v[order], color=["#b2182b" if v[i] > 0 else "#2166ac" for i in order])
        a.set_xticks(range(len(order)), [names[f"neurons.{d}"][i] for i in order], rotation=60, ha="right",
                     rotation_mode="anchor", fontsize=7)
        a.axhline(0, color="black", lw=0.6)
        a.set_title(f"{d}: top {len(order)} neurons", fontsize=10)
    axs[0].set_ylabel(f"normalised {primary}")
    return Figure("neurons", "zoom", "MLP neurons (hook_post) of the top MLP layer(s), patched one at a time.", _png(fig))


def spread(results, names, primary, threshold, k: int = 8) -> Figure | None:
    plt = _pyplot()
    items = []
    for key in results:
        if key.startswith("verify") or key.startswith("neurons"):
            continue
        v = F.normalized_or_none(results[key], primary)
        if v is None:
            continue
        per = F.per_prompt_normalized(results[key], primary).reshape(-1, results[key].per_prompt.shape[-1])
        for i in np.argsort(-np.abs(v.reshape(-1)), kind="stable")[:3]:
            if abs(v.reshape(-1)[i]) >= threshold:
                items.append((abs(float(v.reshape(-1)[i])), f"{names[key][i]} ({key.split('.')[-1]})", per[i]))
    if not items:
        return None
    items = sorted(items, key=lambda t: (-t[0], t[1]))[:k]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(items) + 1.4), constrained_layout=True)
    rng = np.random.default_rng(0)
    for j, (_, label, per) in enumerate(items):
        ax.scatter(per, j + rng.uniform(-0.18, 0.18, per.size), s=9, alpha=0.6, color="#444444")
        ax.plot([per.mean()] * 2, [j - 0.3, j + 0.3], color="#b2182b", lw=2)
    ax.set_yticks(range(len(items)), [t[1] for t in items], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="lightgrey", lw=0.6)
    ax.axvline(1, color="lightgrey", lw=0.6, ls="--")
    ax.set_xlabel(f"per-prompt normalised {primary} (red bar: mean)")
    return Figure("spread", "spread", "Per-prompt effects of the largest components: is the average typical?", _png(fig))


def attribution(results, att, primary) -> Figure | None:
    keys = [k for k in ("heads.denoise", "coarse.resid_pre.denoise", "coarse.attn_out.denoise", "coarse.mlp_out.denoise")
            if k in att]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(2, len(keys))
    rows = int(np.ceil(len(keys) / cols))
    fig, axs = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), constrained_layout=True, squeeze=False)
    for a, key in zip(axs.reshape(-1), keys):
        plot_exact_vs_attribution(results[key], att[key], primary, ax=a, annotate=4)
        a.title.set_fontsize(8)
    for a in axs.reshape(-1)[len(keys):]:
        a.set_visible(False)
    signed = att[keys[0]].info.get("signed", True) is not False
    method = {"atp*": "AtP*", "atp+qk": "AtP+QK", "atp": "AtP"}.get(str(att[keys[0]].info.get("method")), "attribution")
    return Figure("attribution", "attribution", f"{method} estimates "
                  + ("against exact denoising effects" if signed else "(unsigned magnitudes) against the magnitude of exact "
                     "denoising effects") + " of the same components.", _png(fig))
