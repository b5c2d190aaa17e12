"""save_result / load_result: every kind of PatchResult round-trips exactly; the tidy table is written."""

import sys

import numpy as np
import pytest

import jaxpatch
from jaxpatch.results import PatchResult
from jaxpatch.results_io import load_result, results_equal, save_result
from tests.helpers import random_tokens


def _synthetic(corrupt=True, sets=None, seed=0):
    rng = np.random.default_rng(seed)
    L, T, B, M = 2, 5, 3, 2
    grid = (L, T) if sets is None else (sets, L, T)
    axes = ("layer", "pos") if sets is None else ("corrupt_set", "layer", "pos")
    labels = {"layer": ["L0", "L1"], "pos": [f"{i}:w{i}" for i in range(T)]}
    if sets is not None:
        labels["corrupt_set"] = [f"set{i}" for i in range(sets)]
    k = None
    if corrupt:
        k = rng.normal(size=(M, B)).astype(np.float32) if sets is None else rng.normal(size=(sets, M, B)).astype(np.float32)
    return PatchResult(
        "blocks.hook_resid_pre", "denoise" if corrupt else "noise", "resample" if corrupt else "zero",
        ("logit_diff", "prob"), axes, labels, rng.normal(size=grid + (M, B)).astype(np.float32),
        (rng.normal(size=(M, B)) + 3).astype(np.float32), k,
        info={"setup_s": 0.25, "n_patches": np.int64(10), "chunk_size": 4, "flag": True, "shape": (2, 5)},
    )


@pytest.mark.parametrize("kind", ["plain", "no_corrupt", "corrupt_sets"])
def test_round_trip_synthetic(tmp_path, kind):
    res = _synthetic(corrupt=kind != "no_corrupt", sets=3 if kind == "corrupt_sets" else None)
    written = save_result(res, tmp_path / "sub" / "res")
    assert written["npz"] == tmp_path / "sub" / "res.npz" and written["npz"].is_file()
    assert written["table"].suffix == ".parquet" and written["table"].is_file()
    for path in (tmp_path / "sub" / "res", tmp_path / "sub" / "res.npz", str(written["table"])):
        back = load_result(path)
        assert results_equal(res, back)
        assert back.axes == res.axes and back.metrics == res.metrics and isinstance(back.axes, tuple)
        np.testing.assert_array_equal(back.per_prompt, res.per_prompt)
        assert back.per_prompt.dtype == res.per_prompt.dtype
        assert (back.corrupt is None) == (res.corrupt is None)
        assert back.info["n_patches"] == 10 and back.info["shape"] == [2, 5]  # JSON: tuples come back as lists
    if res.corrupt is not None:
        np.testing.assert_allclose(load_result(written["npz"]).normalized("prob"), res.normalized("prob"))


def test_table_contents(tmp_path):
    import pandas as pd

    res = _synthetic()
    written = save_result(res, tmp_path / "r")
    df = pd.read_parquet(written["table"])
    expected = res.to_dataframe()
    assert list(df.columns) == list(expected.columns)
    assert len(df) == 2 * 5
    np.testing.assert_allclose(df["logit_diff_normalized"], expected["logit_diff_normalized"])
    assert df["pos_label"].tolist()[:5] == res.labels["pos"]


def test_csv_when_pyarrow_missing(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    written = save_result(_synthetic(), tmp_path / "r")
    assert written["table"] == tmp_path / "r.csv"
    monkeypatch.undo()  # pandas 3 reads strings through pyarrow when it is installed
    assert len(pd.read_csv(written["table"])) == 10
    assert results_equal(load_result(tmp_path / "r.csv"), _synthetic())


def test_no_table_when_asked(tmp_path):
    written = save_result(_synthetic(), tmp_path / "r.npz", table=False)
    assert set(written) == {"npz"} and sorted(p.name for p in tmp_path.iterdir()) == ["r.npz"]


def test_round_trip_real_sweeps(tmp_path, tiny_model):
    cfg = tiny_model.config
    clean, corrupt = random_tokens(cfg, 2, 6, seed=1), random_tokens(cfg, 2, 6, seed=2)
    exact = jaxpatch.activation_patch(tiny_model, clean, corrupt, site="z", answer=3, wrong=4,
                                      metrics=("logit_diff", "kl"), token_labels=[f"t{i}" for i in range(cfg.d_vocab)])
    est = jaxpatch.attribution_patch(tiny_model, clean, corrupt, site="z", answer=3, wrong=4)
    for name, res in (("exact", exact), ("est", est)):
        save_result(res, tmp_path / name)
        back = load_result(tmp_path / name)
        assert results_equal(res, back), name
        assert back.top(3) == res.top(3)
    assert load_result(tmp_path / "est").info["estimate"] is True


def test_errors(tmp_path):
    with pytest.raises(jaxpatch.JaxpatchError, match="No saved result"):
        load_result(tmp_path / "missing")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(jaxpatch.JaxpatchError, match="not a jaxpatch result"):
        load_result(tmp_path / "other")
    with pytest.raises(jaxpatch.JaxpatchError, match="expects a PatchResult"):
        save_result({"not": "a result"}, tmp_path / "x")
