"""PatchResult: a labelled grid of patching effects, many metrics at once, signed, with baselines."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import metrics as _metrics
from ._errors import InputError


@dataclasses.dataclass
class PatchResult:
    """The outcome of one sweep.

    Attributes:
        site: canonical site patched.
        direction: ``"denoise"`` (corrupt run, clean activations patched in) or ``"noise"``.
        baseline: ``"resample"``, ``"mean"``, ``"zero"`` or ``"noise"``.
        metrics: metric names, in order.
        axes: grid axis names, e.g. ``("layer", "pos")`` (``"corrupt_set"`` first when several
            corrupted sets were swept).
        labels: axis name -> list of labels (``pos`` labels carry the prompt's tokens when known).
        per_prompt: raw metric values ``[*grid, n_metrics, batch]``.
        clean: clean-run metric values ``[n_metrics, batch]``.
        corrupt: corrupted-run metric values ``[n_metrics, batch]`` (``[n_sets, n_metrics, batch]``
            with several corrupted sets), or ``None`` for mean/zero ablation without a corrupt run.
        info: extra facts about the run (chunk size, executed vs minimal rows, timings...).
    """

    site: str
    direction: str
    baseline: str
    metrics: tuple[str, ...]
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    per_prompt: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray | None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.per_prompt.shape[: len(self.axes)]

    def _m(self, metric: str | None) -> int:
        if metric is None:
            return 0
        if metric not in self.metrics:
            raise InputError(f"Metric {metric!r} was not computed; this result has {list(self.metrics)}.")
        return self.metrics.index(metric)

    def values(self, metric: str | None = None) -> np.ndarray:
        """Raw metric after patching, averaged over prompts: the grid (first metric by default)."""
        return self.per_prompt[..., self._m(metric), :].mean(axis=-1)

    __getitem__ = values

    def normalized(self, metric: str | None = None) -> np.ndarray:
        """Effect as a signed fraction of the clean-corrupt gap (1 = fully restored for denoising,
        1 = fully destroyed for noising). Raises if the gap is zero or a baseline is not finite."""
        i = self._m(metric)
        name = self.metrics[i]
        if self.corrupt is None:
            raise InputError(f"{self.baseline} ablation has no corrupted run to normalise against; use values().")
        vals = self.values(metric)
        floor = float(self.info.get("gap_floor", 0.0))
        if "corrupt_set" in self.axes:
            return np.stack([
                _metrics.normalise(vals[s], self.clean[i], self.corrupt[s, i], self.direction, name, floor)
                for s in range(vals.shape[0])
            ])
        return _metrics.normalise(vals, self.clean[i], self.corrupt[i], self.direction, name, floor)

    def baselines(self, metric: str | None = None) -> dict[str, Any]:
        """Mean metric of the unpatched runs: ``{"clean": float, "corrupt": float}``. With several
        corrupted sets, ``"corrupt"`` is an array with one baseline per set (never pooled: each
        set's patches are measured against its own corrupted run)."""
        i = self._m(metric)
        out: dict[str, Any] = {"clean": float(self.clean[i].mean())}
        if self.corrupt is not None:
            if "corrupt_set" in self.axes:
                out["corrupt"] = self.corrupt[:, i, :].mean(axis=-1)
            else:
                out["corrupt"] = float(self.corrupt[i].mean())
        return out

    def effects(self, metric: str | None = None) -> np.ndarray:
        """Change of the metric caused by each patch (mean over prompts), relative to the run that
        was patched: the corrupted run for denoising (each corrupted set its own), the clean run
        for noising and ablations. Same shape as :meth:`values`."""
        i = self._m(metric)
        vals = self.values(metric)
        if self.direction == "denoise" and self.corrupt is not None:
            run = self.corrupt[..., i, :].mean(axis=-1)  # [n_sets] or scalar
        else:
            run = self.clean[i].mean()
        if "corrupt_set" in self.axes and np.ndim(run):
            run = np.reshape(run, (-1,) + (1,) * (vals.ndim - 1))
        return vals - run

    def to_dataframe(self):
        """Tidy table: one row per patch, index columns per axis (ints and labels), one column per
        metric (raw) and per metric ``<name>_normalized`` where defined (NaN if the gap is zero)."""
        import pandas as pd

        grid = np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij")
        data: dict[str, Any] = {}
        for a, g in zip(self.axes, grid):
            data[a] = g.reshape(-1)
            if a in self.labels:
                data[f"{a}_label"] = np.asarray(self.labels[a], dtype=object)[g.reshape(-1)]
        for m in self.metrics:
            data[m] = self.values(m).reshape(-1)
            if self.corrupt is not None:
                try:
                    data[f"{m}_normalized"] = self.normalized(m).reshape(-1)
                except Exception:
                    data[f"{m}_normalized"] = np.full(data[m].shape, np.nan)
        df = pd.DataFrame(data)
        df.attrs.update(site=self.site, direction=self.direction, baseline=self.baseline)
        return df

    def grid_frame(self, metric: str | None = None, normalized: bool = False):
        """A 2-D result as a pandas DataFrame: rows = first axis, columns = second, labelled and
        in index order (not sorted as strings)."""
        import pandas as pd

        if len(self.axes) != 2:
            raise InputError(f"grid_frame needs a 2-D result; this one has axes {self.axes} (use to_dataframe()).")
        v = self.normalized(metric) if normalized else self.values(metric)
        rows, cols = (self.labels.get(a, [str(i) for i in range(n)]) for a, n in zip(self.axes, self.shape))
        return pd.DataFrame(v, index=pd.Index(rows, name=self.axes[0]), columns=pd.Index(cols, name=self.axes[1]))

    def top(self, k: int = 10, metric: str | None = None, normalized: bool = False):
        """The k components with the largest absolute effect: list of (labels dict, value), the value
        being :meth:`effects` (raw) or :meth:`normalized`, each relative to its own baselines."""
        v = self.normalized(metric) if normalized else self.effects(metric)
        flat = np.argsort(-np.abs(v).reshape(-1))[:k]
        out = []
        for f in flat:
            ix = np.unravel_index(f, self.shape)
            out.append(({a: (self.labels[a][i] if a in self.labels else int(i)) for a, i in zip(self.axes, ix)}, float(v.reshape(-1)[f])))
        return out

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return f"PatchResult({self.direction} {self.baseline} patching of {self.site}: [{dims}], metrics={list(self.metrics)})"
