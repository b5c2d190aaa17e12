"""Figures: the right kind of plot per result, tokens on the position axis, a diverging colour
scale centred at zero, signed effects kept, correlations computed without scipy."""

import numpy as np

from jaxpatch.compare import _ranks as cmp_ranks
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jaxpatch  # noqa: E402
from jaxpatch import plots  # noqa: E402
from jaxpatch.progress import progress  # noqa: E402
from jaxpatch.results import PatchResult  # noqa: E402

CLEAN, CORRUPT = 4.0, 0.0  # logit_diff baselines: normalised = value / 4 when denoising


def _result(axes, grid, direction="denoise", corrupt=True, estimate=None, site=None, sets=None):
    """A PatchResult whose mean logit_diff grid is ``grid`` (2 prompts, two metrics)."""
    grid = np.asarray(grid, np.float32)
    B = 2
    per = np.stack([grid, grid * 0 + 0.5], axis=-1)[..., None].repeat(B, axis=-1)  # [*grid, M, B]
    labels = {}
    for a, n in zip(axes, grid.shape):
        labels[a] = {"layer": [f"L{i}" for i in range(n)], "head": [f"H{i}" for i in range(n)],
                     "pos": [f"{i}:tok{i}" for i in range(n)], "corrupt_set": [f"set{i}" for i in range(n)]}.get(
            a, [f"{a[0].upper()}{i}" for i in range(n)])
    clean = np.array([[CLEAN] * B, [0.9] * B], np.float32)
    k = np.array([[CORRUPT] * B, [0.1] * B], np.float32)
    if sets:
        k = np.stack([k] * sets)
    info = {}
    if estimate:
        info = {"method": estimate, "estimate": True, "signed": estimate != "atp*"}
    site = site or ("blocks.attn.hook_z" if "head" in axes else "blocks.hook_resid_pre")
    return PatchResult(site, direction, "resample" if corrupt else "zero", ("logit_diff", "prob"), tuple(axes),
                       labels, per, clean, k if corrupt else None, info)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image(fig):
    ims = [im for ax in fig.axes for im in ax.get_images()]
    assert ims, "no heatmap drawn"
    return ims


def test_layer_pos_heatmap_tokens_and_symmetric_scale():
    grid = np.array([[0.0, 1.0, -3.0, 0.5], [4.0, 0.0, 0.0, -1.0]])
    res = _result(("layer", "pos"), grid)
    fig = plots.plot_layer_pos(res)
    assert isinstance(fig, matplotlib.figure.Figure)
    (im,) = _image(fig)
    lo, hi = im.get_clim()
    assert lo == -hi and hi >= 1.0 and hi == pytest.approx(1.0, rel=0.02)  # max |normalised| = 4 / 4
    np.testing.assert_allclose(im.get_array(), grid / 4)  # signed, normalised, rows = layers
    assert im.get_cmap().name.startswith("RdBu")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == res.labels["pos"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    title = ax.get_title()
    assert "resid_pre" in title and "Denoising" in title
    assert "normalized logit_diff" in fig.axes[-1].get_ylabel()  # the colour bar
    assert any(t.get_text() == "-0.75" for t in ax.texts)  # small grids are annotated, sign kept


def test_raw_change_when_not_normalisable_and_other_metric():
    grid = np.array([[1.0, -2.0], [0.0, 3.0]])
    res = _result(("layer", "pos"), grid, direction="noise", corrupt=False)
    fig = plots.plot_layer_pos(res, normalized=True)  # zero ablation: no corrupt run -> change from clean
    (im,) = _image(fig)
    np.testing.assert_allclose(im.get_array(), grid - CLEAN)
    assert "vs clean run" in fig.axes[-1].get_ylabel()
    fig = plots.plot_layer_pos(_result(("layer", "pos"), grid), metric="prob", normalized=False)
    np.testing.assert_allclose(_image(fig)[0].get_array(), np.full((2, 2), 0.5 - 0.1), atol=1e-6)
    with pytest.raises(jaxpatch.JaxpatchError, match="was not computed"):
        plots.plot_layer_pos(res, metric="kl")


def test_layer_head_and_dispatch():
    res = _result(("layer", "head"), [[0.4, -0.2, 0.0], [2.0, 0.1, -0.4]])
    fig = plots.plot_layer_head(res)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["H0", "H1", "H2"]
    assert ax.get_xlabel() == "head" and "z" in ax.get_title()
    np.testing.assert_allclose(_image(plots.plot_result(res))[0].get_array(), _image(fig)[0].get_array())
    with pytest.raises(jaxpatch.JaxpatchError, match="Cannot plot layer × pos"):
        plots.plot_layer_pos(res)
    # into a given Axes
    f, a = plt.subplots()
    assert plots.plot_layer_head(res, ax=a) is f


def test_plot_result_three_axes_one_panel_per_head():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(2, 5, 3))  # layer, pos, head
    res = _result(("layer", "pos", "head"), grid)
    fig = plots.plot_result(res)
    ims = _image(fig)
    assert len(ims) == 3
    assert {im.get_clim() for im in ims} == {ims[0].get_clim()}  # one shared symmetric scale
    for h, im in enumerate(ims):
        np.testing.assert_allclose(im.get_array(), grid[:, :, h] / 4, rtol=1e-5)
    assert [ax.get_title() for ax in fig.axes if ax.get_images()] == ["H0", "H1", "H2"]
    one = plots.plot_layer_pos(res, head=1)
    np.testing.assert_allclose(_image(one)[0].get_array(), grid[:, :, 1] / 4, rtol=1e-5)
    assert "head H1" in one.axes[0].get_title()


def test_plot_result_bars_generic_grid_and_corrupt_sets():
    bars = plots.plot_result(_result(("layer",), [1.0, -2.0, 0.5]))
    heights = [p.get_height() for p in bars.axes[0].patches]
    np.testing.assert_allclose(heights, [0.25, -0.5, 0.125])
    neurons = plots.plot_result(_result(("layer", "neuron"), np.ones((2, 100))))
    assert len(neurons.axes[0].get_xticklabels()) <= 40  # thinned ticks
    grid = np.stack([np.full((2, 3), 4.0), np.zeros((2, 3))])  # two corrupted sets
    res = _result(("corrupt_set", "layer", "pos"), grid, sets=2)
    np.testing.assert_allclose(_image(plots.plot_result(res))[0].get_array(), np.full((2, 3), 0.5))
    np.testing.assert_allclose(_image(plots.plot_result(res, corrupt_set=0))[0].get_array(), np.ones((2, 3)))


def test_correlations_match_reference():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 4.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 6.0])
    r, rho = plots.correlations(x, y)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1])
    rx, ry = cmp_ranks(x), cmp_ranks(y)
    np.testing.assert_allclose(rx, [1, 2.5, 2.5, 4, 6, 5])  # ties get their average rank
    assert rho == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert plots.correlations([1, 2, 3], [3, 2, 1]) == pytest.approx((-1.0, -1.0))
    assert np.isnan(plots.correlations([1.0], [2.0])[0])


def test_exact_vs_attribution(tmp_path):
    exact_grid = np.array([[0.0, 4.0], [-2.0, 1.0]])
    est_grid = np.array([[0.4, 3.0], [-1.0, 1.2]])
    exact = _result(("layer", "head"), exact_grid)
    est = _result(("layer", "head"), est_grid, estimate="atp")
    fig = plots.plot_exact_vs_attribution(exact, est)
    ax = fig.axes[0]
    x, y = ax.collections[0].get_offsets().T
    np.testing.assert_allclose(x, exact_grid.reshape(-1) / 4)
    np.testing.assert_allclose(y, est_grid.reshape(-1) / 4)
    r, rho = plots.correlations(x, y)
    assert f"Pearson r = {r:.3f}" in ax.get_title() and f"Spearman ρ = {rho:.3f}" in ax.get_title()
    assert "AtP" in ax.get_title()
    line = [ln for ln in ax.get_lines() if ln.get_label() == "y = x"][0]
    np.testing.assert_allclose(*line.get_data())  # the y = x line
    assert {t.get_text() for t in ax.texts} >= {"L0H1", "L1H0"}
    # unsigned AtP* is compared with |exact|
    star = _result(("layer", "head"), np.abs(est_grid), estimate="atp*")
    x2, _ = plots.plot_exact_vs_attribution(exact, star).axes[0].collections[0].get_offsets().T
    np.testing.assert_allclose(x2, np.abs(exact_grid).reshape(-1) / 4)
    with pytest.raises(jaxpatch.JaxpatchError, match="same grid"):
        plots.plot_exact_vs_attribution(exact, _result(("layer", "pos"), np.zeros((2, 3)), estimate="atp"))
    path = plots.save_figure(fig, tmp_path / "figs" / "scatter.png", close=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_helper(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.delenv("JAXPATCH_NO_PROGRESS", raising=False)
    assert progress(items) is items  # stderr is captured by pytest: not a terminal
    assert progress(items, progress=False) is items
    pytest.importorskip("tqdm")
    bar = progress(items, progress=True, desc="x")
    assert bar is not items and list(bar) == items
    monkeypatch.setenv("JAXPATCH_NO_PROGRESS", "1")
    assert progress(items, progress=True) is items
