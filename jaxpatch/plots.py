"""Figures of patching results (matplotlib, a core dependency of jaxpatch).

Every plot shows *signed* effects on a diverging colour map centred at zero (``vmin = -vmax``,
``vmax = max |value|``; red = positive, blue = negative, white = no effect), so components that
push the metric the wrong way stay visible. By default a cell is the effect normalised to the
clean-corrupt gap (:meth:`PatchResult.normalized`: 1 = the clean behaviour fully restored when
denoising, fully destroyed when noising); when that is undefined (a mean/zero ablation without a
corrupted run, or a zero gap) the plots fall back to the raw change of the metric from the run
that was patched (the corrupted run when denoising, the clean run when noising), and say so on the
colour bar.

* :func:`plot_layer_pos` — layer x position heatmap; the x tick labels are the position labels,
  which carry the prompt's tokens (``"3:cat"``) when the sweep had ``token_labels``.
* :func:`plot_layer_head` — layer x head heatmap.
* :func:`plot_result` — picks by the result's axes: one axis -> bars; two -> a heatmap; three ->
  a grid of small heatmaps, one per head (``(layer, pos, head)`` sweeps: a layer x position map per
  head) or per layer (``(layer, dest_pos, src_pos)``: a destination x source map per layer), all
  on one shared colour scale. Nothing is summed or maxed over an axis: the effect of patching
  several heads is not the sum of their single-head effects, so every cell shown is one patch.
* :func:`plot_exact_vs_attribution` — estimated (attribution patching) vs exact effects, one
  point per component, with the ``y = x`` line and Pearson/Spearman correlations in the title.

A ``corrupt_set`` axis (several corrupted sets) is averaged over unless ``corrupt_set=i`` picks
one. Every function returns the matplotlib ``Figure`` (the given ``ax``'s figure when one is
passed); :func:`save_figure` writes it. Without a display (and no ``MPLBACKEND``) the
non-interactive Agg backend is selected before pyplot is first imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ._errors import InputError, JaxpatchError
from .results import PatchResult
from .sites import SHORT_NAMES

#: Default diverging colour map (positive red, negative blue, zero white).
CMAP = "RdBu_r"
_SHORT = {v: k for k, v in SHORT_NAMES.items()}
_MAX_PANELS = 32
_MAX_ANNOTATED_CELLS = 80


# ------------------------------------------------------------------------------------ helpers
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise JaxpatchError("Plotting needs matplotlib, a dependency of jaxpatch: reinstall jaxpatch, or pip install matplotlib.") from None
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        if headless:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_site(site: str) -> str:
    """``"blocks.attn.hook_z" -> "z"`` (the short name when there is one)."""
    return _SHORT.get(site, site)


def _metric_name(result: PatchResult, metric: str | None) -> str:
    if metric is None:
        return result.metrics[0]
    result._m(metric)  # raises InputError naming the computed metrics
    return metric


def effect(result: PatchResult, metric: str | None = None, normalized: bool = True,
           corrupt_set: int | None = None) -> tuple[np.ndarray, str, bool]:
    """The grid a plot shows: ``(values, colour-bar label, is_normalized)``.

    ``normalized=True`` gives :meth:`PatchResult.normalized` when defined, else (and with
    ``normalized=False``) the change of the mean metric from the run that was patched. A
    ``corrupt_set`` axis is averaged over, or indexed by ``corrupt_set``.
    """
    name = _metric_name(result, metric)
    vals = None
    is_norm = False
    if normalized and result.corrupt is not None:
        try:
            vals = np.asarray(result.normalized(name), np.float64)
            is_norm = True
        except JaxpatchError:
            vals = None
    if vals is None:
        vals = np.asarray(result.effects(name), np.float64)  # each corrupted set against its own run
    if "corrupt_set" in result.axes:
        if corrupt_set is None:
            vals = vals.mean(axis=0)
        else:
            if not 0 <= corrupt_set < vals.shape[0]:
                raise InputError(f"corrupt_set={corrupt_set} is out of range; the result has {vals.shape[0]} sets.")
            vals = vals[corrupt_set]
    elif corrupt_set is not None:
        raise InputError("corrupt_set= applies only to results with a 'corrupt_set' axis.")
    if result.info.get("estimate") and result.info.get("signed") is False:
        vals = np.abs(vals)
    if is_norm:
        what = "restored" if result.direction == "denoise" else "destroyed"
        label = f"normalized {name} (1 = fully {what})"
    else:
        run = "corrupt" if result.direction == "denoise" and result.corrupt is not None else "clean"
        label = f"Δ {name} vs {run} run"
    if result.info.get("estimate"):
        label = ("|estimated| " if result.info.get("signed") is False else "estimated ") + label
    return vals, label, is_norm


def _grid_axes(result: PatchResult) -> tuple[str, ...]:
    return tuple(a for a in result.axes if a != "corrupt_set")


def _labels_for(result: PatchResult, axis: str, n: int) -> list[str]:
    return [str(s) for s in result.labels.get(axis, range(n))]


_METHOD_NAMES = {"atp": "AtP", "atp*": "AtP*", "atp+qk": "AtP+QK"}


def _method(result: PatchResult) -> str:
    m = str(result.info.get("method", "attribution"))
    return _METHOD_NAMES.get(m, m)


def _wrap(title: str, fig, ax=None) -> str:
    """Wrap each line of a title to the width of the axes it sits over (about 8.5 characters an inch)."""
    import textwrap

    width = fig.get_figwidth() * (ax.get_position().width if ax is not None else 1.0)
    chars = max(24, int(width * 8.5))
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


def _title(result: PatchResult, extra: str = "") -> str:
    how = "denoising" if result.direction == "denoise" else "noising"
    if result.info.get("estimate"):
        head = f"{_method(result)} estimate of {how}"
    else:
        head = f"{how.capitalize()} ({result.baseline})"
    by = " × ".join(_grid_axes(result))
    return f"{head} patching of {short_site(result.site)} by {by}" + (f"\n{extra}" if extra else "")


def _symmetric_limit(*arrays) -> float:
    vals = np.concatenate([np.abs(np.asarray(a, np.float64)).reshape(-1) for a in arrays])
    vals = vals[np.isfinite(vals)]
    vmax = float(vals.max()) if vals.size else 0.0
    if not vmax > 0:
        return 1.0
    step = 10.0 ** (np.floor(np.log10(vmax)) - 1)  # round up to two significant digits: 0.9996 -> 1.0
    return float(np.ceil(vmax / step - 1e-9) * step)


def _thin_ticks(n: int, max_ticks: int = 40) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_ticks)))
    return np.arange(0, n, step)


def _cmap(name):
    import matplotlib

    cmap = matplotlib.colormaps[name] if isinstance(name, str) else name
    return cmap.with_extremes(bad="lightgrey")


def _heatmap(ax, grid, row_labels, col_labels, row_name, col_name, vmax, cmap, annotate):
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=_cmap(cmap), vmin=-vmax, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    rows, cols = grid.shape
    rt, ct = _thin_ticks(rows), _thin_ticks(cols)
    ax.set_yticks(rt, [row_labels[i] for i in rt])
    long = max((len(col_labels[i]) for i in ct), default=0) > 3 or cols > 12
    ax.set_xticks(ct, [col_labels[i] for i in ct], rotation=60 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor")
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.tick_params(labelsize=8 if cols > 16 else 9)
    if annotate is None:
        annotate = rows * cols <= _MAX_ANNOTATED_CELLS
    if annotate:
        for r in range(rows):
            for c in range(cols):
                v = grid[r, c]
                if np.isfinite(v):
                    text = f"{v:.2f}"
                    ax.text(c, r, "0.00" if text == "-0.00" else text, ha="center", va="center", fontsize=7 if cols > 8 else 9,
                            color="white" if abs(v) > 0.6 * vmax else "black")
    return im


def _figure(ax, ncols: int, nrows: int, panels: int = 1):
    plt = _pyplot()
    if ax is not None:
        if panels > 1:
            raise InputError(f"This plot needs {panels} panels; leave ax=None (or select one panel).")
        return ax.figure, [ax]
    cols = min(panels, 4)
    rows = int(np.ceil(panels / cols))
    w = min(max(4.6, 0.42 * ncols + 2.2), 14.0 if panels == 1 else 6.0)
    h = min(max(2.4, 0.45 * nrows + 1.9), 10.0)
    fig, axs = plt.subplots(rows, cols, figsize=(w * cols + (0.8 if panels > 1 else 0), h * rows), squeeze=False,
                            constrained_layout=True)
    axs = list(axs.reshape(-1))
    for extra in axs[panels:]:
        extra.set_visible(False)
    return fig, axs[:panels]


def _plot_grid(result: PatchResult, row_axis: str, col_axis: str, metric, normalized, ax, *, panel_axis=None,
               select=None, corrupt_set=None, cmap=CMAP, annotate=None):
    """Heatmap(s) of ``row_axis`` x ``col_axis``; one panel per index of ``panel_axis``."""
    vals, label, _ = effect(result, metric, normalized, corrupt_set)
    axes = list(_grid_axes(result))
    select = dict(select or {})
    for a, i in select.items():  # fix extra axes to one index
        if a not in axes:
            raise InputError(f"This result has no {a!r} axis (axes: {axes}).")
        n = vals.shape[axes.index(a)]
        if not -n <= i < n:
            raise InputError(f"{a}={i} is out of range; the result has {n}.")
        vals = np.take(vals, i, axis=axes.index(a))
        axes.remove(a)
    needed = [row_axis, col_axis] + ([panel_axis] if panel_axis else [])
    missing = [a for a in needed if a not in axes]
    extra = [a for a in axes if a not in needed]
    if missing or extra:
        raise InputError(
            f"Cannot plot {row_axis} × {col_axis}"
            + (f" per {panel_axis}" if panel_axis else "")
            + f" from a result with axes {tuple(axes)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (select the extra axes, e.g. {extra[0]}=0, or use plot_result)" if extra else "")
            + "."
        )
    vals = np.transpose(vals, [axes.index(a) for a in needed])
    n_panels = vals.shape[2] if panel_axis else 1
    if n_panels > _MAX_PANELS:
        raise InputError(f"{n_panels} {panel_axis} panels are too many to draw; select one with {panel_axis}=i.")
    row_labels = _labels_for(result, row_axis, vals.shape[0])
    col_labels = _labels_for(result, col_axis, vals.shape[1])
    fig, axs = _figure(ax, vals.shape[1], vals.shape[0], n_panels)
    vmax = _symmetric_limit(vals)
    sel = ", ".join(f"{a} {result.labels[a][i] if a in result.labels else i}" for a, i in select.items())
    for p, a in enumerate(axs):
        grid = vals[..., p] if panel_axis else vals
        im = _heatmap(a, grid, row_labels, col_labels, row_axis, col_axis, vmax, cmap,
                      annotate if annotate is not None else (None if n_panels == 1 else False))
        if panel_axis:
            a.set_title(_labels_for(result, panel_axis, n_panels)[p], fontsize=10)
    cbar = fig.colorbar(im, ax=axs, shrink=0.9)
    cbar.set_label(label)
    title = _title(result, sel)
    if n_panels == 1:
        axs[0].set_title(_wrap(title, fig, axs[0] if ax is not None else None), fontsize=10)
    else:
        fig.suptitle(_wrap(title, fig), fontsize=11)
    return fig


# --------------------------------------------------------------------------------- public API
def plot_layer_pos(result: PatchResult, metric: str | None = None, normalized: bool = True, ax=None, *,
                   head: int | None = None, corrupt_set: int | None = None, cmap=CMAP, annotate: bool | None = None):
    """Layer x position heatmap of a ``(layer, pos)`` sweep (rows = layers, columns = positions).

    Args:
        result: a :class:`PatchResult` with ``layer`` and ``pos`` axes (and optionally ``head``:
            then one panel per head, or the one ``head=`` selects).
        metric: which metric (default the first computed).
        normalized: show the normalised effect when defined (else the change from the run baseline).
        ax: draw into this matplotlib Axes (one panel only).
        corrupt_set: pick one corrupted set (default: average over sets).
        cmap: a diverging colour map, centred at zero.
        annotate: write each cell's value (default: small single grids only).

    Returns:
        the matplotlib Figure.
    """
    axes = _grid_axes(result)
    if "head" in axes and head is None:
        return _plot_grid(result, "layer", "pos", metric, normalized, ax, panel_axis="head", corrupt_set=corrupt_set,
                          cmap=cmap, annotate=annotate)
    select = {"head": head} if head is not None else None
    return _plot_grid(result, "layer", "pos", metric, normalized, ax, select=select, corrupt_set=corrupt_set,
                      cmap=cmap, annotate=annotate)


def plot_layer_head(result: PatchResult, metric: str | None = None, normalized: bool = True, ax=None, *,
                    pos: int | None = None, corrupt_set: int | None = None, cmap=CMAP, annotate: bool | None = None):
    """Layer x head heatmap of a ``(layer, head)`` sweep (rows = layers, columns = heads).

    For a ``(layer, pos, head)`` sweep, ``pos=`` picks one position (or use :func:`plot_result` for
    one layer x position panel per head). Other arguments as :func:`plot_layer_pos`.
    """
    select = {"pos": pos} if pos is not None else None
    return _plot_grid(result, "layer", "head", metric, normalized, ax, select=select, corrupt_set=corrupt_set,
                      cmap=cmap, annotate=annotate)


def plot_result(result: PatchResult, metric: str | None = None, normalized: bool = True, ax=None, *,
                corrupt_set: int | None = None, cmap=CMAP, annotate: bool | None = None):
    """The natural figure for a result, by its axes (see the module docstring).

    One axis: bars. Two: a heatmap (first axis as rows). ``(layer, pos)`` and ``(layer, head)``
    use :func:`plot_layer_pos` / :func:`plot_layer_head`. Three: small heatmaps on one colour
    scale, one per head (``head`` present) or per layer (``dest_pos``/``src_pos`` present), else
    one per index of the last axis.
    """
    axes = _grid_axes(result)
    kw = dict(corrupt_set=corrupt_set, cmap=cmap, annotate=annotate)
    if len(axes) == 1:
        return _plot_bars(result, metric, normalized, ax, corrupt_set=corrupt_set)
    if len(axes) == 2:
        if set(axes) == {"layer", "pos"}:
            return plot_layer_pos(result, metric, normalized, ax, **kw)
        if set(axes) == {"layer", "head"}:
            return plot_layer_head(result, metric, normalized, ax, **kw)
        return _plot_grid(result, axes[0], axes[1], metric, normalized, ax, **kw)
    if len(axes) == 3:
        if "head" in axes:
            panel = "head"
        elif "layer" in axes and {"dest_pos", "src_pos"} <= set(axes):
            panel = "layer"
        else:
            panel = axes[-1]
        rows, cols = [a for a in axes if a != panel]
        return _plot_grid(result, rows, cols, metric, normalized, ax, panel_axis=panel, **kw)
    raise InputError(f"plot_result draws results with 1 to 3 axes; this one has {axes}. Select a slice first.")


def _plot_bars(result, metric, normalized, ax, corrupt_set=None):
    vals, label, _ = effect(result, metric, normalized, corrupt_set)
    (axis,) = _grid_axes(result)
    labels = _labels_for(result, axis, vals.shape[0])
    fig, (a,) = _figure(ax, len(vals), 4)
    colors = np.where(vals >= 0, "#b2182b", "#2166ac")
    a.bar(np.arange(len(vals)), np.nan_to_num(vals), color=colors)
    a.axhline(0, color="black", lw=0.8)
    t = _thin_ticks(len(vals))
    a.set_xticks(t, [labels[i] for i in t], rotation=60 if len(vals) > 12 else 0, ha="right" if len(vals) > 12 else "center")
    a.set_xlabel(axis)
    a.set_ylabel(label)
    a.set_title(_wrap(_title(result), fig), fontsize=10)
    return fig


def correlations(x, y) -> tuple[float, float]:
    """``(Pearson r, Spearman rho)`` of two 1-D samples over their finite pairs (NaN if undefined)."""
    from .compare import pearson, spearman

    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return float("nan"), float("nan")
    return pearson(x, y), spearman(x, y)


def _component_names(result: PatchResult) -> list[str]:
    axes = result.axes
    grids = np.meshgrid(*[np.arange(n) for n in result.shape], indexing="ij")
    names = []
    for flat in range(int(np.prod(result.shape))):
        parts = []
        for a, g in zip(axes, grids):
            i = int(g.reshape(-1)[flat])
            lab = result.labels.get(a)
            parts.append(str(lab[i]) if lab is not None else f"{a}{i}")
        names.append("".join(parts) if set(axes) <= {"layer", "head"} else " ".join(parts))
    return names


def exact_vs_estimate(exact: PatchResult, estimate: PatchResult, metric: str | None = None,
                      normalized: bool = True) -> tuple[np.ndarray, np.ndarray, str, str]:
    """The points of :func:`plot_exact_vs_attribution`: ``(exact 1-D, estimate 1-D, x label, y label)``
    (normalised when both results allow it; the exact effect's magnitude for unsigned estimates)."""
    if tuple(exact.axes) != tuple(estimate.axes) or exact.shape != estimate.shape:
        raise InputError(
            f"The exact and estimated results must have the same grid; got {dict(zip(exact.axes, exact.shape))} "
            f"and {dict(zip(estimate.axes, estimate.shape))}."
        )
    if exact.site != estimate.site or exact.direction != estimate.direction:
        raise InputError(
            f"Compare like with like: exact is {exact.direction} of {exact.site}, estimate is "
            f"{estimate.direction} of {estimate.site}."
        )
    name = metric or estimate.metrics[0]
    _metric_name(estimate, name)
    _metric_name(exact, name)
    both = normalized and exact.corrupt is not None and estimate.corrupt is not None
    x, xlabel, xn = effect(exact, name, both)
    y, ylabel, yn = effect(estimate, name, both)
    if xn != yn:  # one normalisable, the other not: compare raw changes
        x, xlabel, _ = effect(exact, name, False)
        y, ylabel, _ = effect(estimate, name, False)
    if estimate.info.get("signed") is False:
        x = np.abs(x)
        xlabel = f"|{xlabel}|"
    return x.reshape(-1), y.reshape(-1), xlabel, ylabel


def plot_exact_vs_attribution(exact: PatchResult, estimate: PatchResult, metric: str | None = None, ax=None, *,
                              normalized: bool = True, annotate: int = 5):
    """Scatter of attribution-patching estimates (y) against exact patching effects (x).

    One point per component of the sweep. Both are normalised when both allow it, else both are
    the change from the run baseline. An unsigned estimate (``atp*``'s GradDrop) is compared with
    the exact effect's magnitude. The dashed line is ``y = x``; the title gives Pearson's r and
    Spearman's rho (rank correlation, ties averaged); the ``annotate`` largest exact effects are
    labelled.

    Args:
        exact: an :func:`~jaxpatch.activation_patch` result.
        estimate: an :func:`~jaxpatch.attribution_patch` result of the same site, axes and direction.
        metric: metric to compare (default the estimate's metric); the exact result must have it.
    """
    x, y, xlabel, ylabel = exact_vs_estimate(exact, estimate, metric, normalized)
    r, rho = correlations(x, y)
    fig, (a,) = _figure(ax, 8, 8)
    if ax is None:
        fig.set_size_inches(5.0, 4.6)
    a.scatter(x, y, s=28, color="#b2182b", alpha=0.8, edgecolors="black", linewidths=0.4, zorder=3)
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="grey", lw=1, zorder=1, label="y = x")
    a.axhline(0, color="lightgrey", lw=0.6, zorder=0)
    a.axvline(0, color="lightgrey", lw=0.6, zorder=0)
    if annotate:
        # label the largest exact effects, skipping points in the crowd near the origin
        names = _component_names(exact)
        size = np.nan_to_num(np.maximum(np.abs(x), np.abs(y)), nan=0.0)
        cutoff = 0.1 * (size.max() if size.size else 0.0)
        order = [i for i in np.argsort(-np.nan_to_num(np.abs(x), nan=-1)) if size[i] > cutoff or len(x) <= 8]
        for i in order[:annotate]:
            a.annotate(names[i], (x[i], y[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    method = _method(estimate)
    a.set_xlabel("exact: " + xlabel)
    unsigned = estimate.info.get("signed") is False
    a.set_ylabel(f"{method} estimate" + (" (unsigned magnitude)" if unsigned else "") + " of the same")
    a.set_title(
        f"{method} vs exact {exact.direction} patching of {short_site(exact.site)} by {' × '.join(exact.axes)}\n"
        f"Pearson r = {r:.3f}, Spearman ρ = {rho:.3f} (n = {int(np.sum(np.isfinite(x) & np.isfinite(y)))})",
        fontsize=10,
    )
    a.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


def save_figure(fig, path, dpi: int = 150, close: bool = False) -> Path:
    """Write ``fig`` to ``path`` (format from the extension; parent folders created); returns the path.
    ``close=True`` also releases it from pyplot (for scripts making many figures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if close:
        _pyplot().close(fig)
    return path


def plot_pareto(result, ax=None, *, title=None):
    """Pareto curves (circuit size vs recovered fraction, one line per ranking): see
    :func:`jaxpatch.circuits.plot_pareto`."""
    from .circuits.pareto import plot_pareto as _plot

    return _plot(result, ax, title=title)
