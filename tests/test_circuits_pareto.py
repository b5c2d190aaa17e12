"""Pareto curves: nested top-k circuits of edge and node rankings, one vectorised evaluation equal
to evaluating each curve's circuits separately, the area under the curve, the figure, the CLI."""

import dataclasses

import numpy as np
import pytest

import jaxpatch
from jaxpatch import circuits, data, edges


@pytest.fixture(scope="module")
def setup():
    m = data.load_default_model()
    clean, corrupt, ans, wrong = data.induction_prompts(8, seed=1)
    return m, clean, corrupt, {"answer": ans, "wrong": wrong}


def test_nested_circuits_of_edge_and_node_rankings(setup):
    m = setup[0]
    g = edges.EdgeGraph.of(m.config)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=g.valid.shape)
    masks, kind = circuits.nested_circuits(m.config, scores, n_points=7)
    n = masks.sum(axis=(1, 2))
    assert kind == "edges" and n[0] == 0 and n[-1] == g.valid.sum() and np.all(np.diff(n) > 0)
    assert np.all(masks[:-1] <= masks[1:])  # nested
    assert not (masks & ~g.valid).any()
    k = n[2]  # the first k edges are the k largest |scores| among valid edges
    top = np.sort(np.abs(scores[g.valid]))[::-1][:k]
    np.testing.assert_allclose(np.sort(np.abs(scores[masks[2]]))[::-1], top)
    nm, kind = circuits.nested_circuits(m.config, {"L1H1": 2.0, "L0H0": -3.0}, n_points=10)
    assert kind == "nodes" and len(nm) == 7  # 0..6 nodes: L0H0, L1H1, then the unscored L0H1, MLP0, L1H0, MLP1
    np.testing.assert_array_equal(nm[1], circuits.circuit_from_nodes(m.config, ["embed", "L0H0"]))
    np.testing.assert_array_equal(nm[-1], g.valid)


def test_pareto_curve_is_one_call_equal_to_separate_evaluations(setup):
    m, clean, corrupt, kw = setup
    eap = edges.edge_attribution_patch(m, clean, corrupt, direction="noise", **kw)
    nodes = {"L0H0": 0.9, "L1H1": 0.8, "L1H0": 0.3, "L0H1": 0.1, "MLP0": 0.05, "MLP1": 0.01}
    res = circuits.pareto_curve(m, clean, corrupt, {"eap": eap, "nodes": nodes}, n_points=6, **kw)
    assert set(res.aucs()) == {"eap", "nodes"} and "AUC" in repr(res)
    for name, scores in (("eap", eap.scores()), ("nodes", nodes)):
        masks, _ = circuits.nested_circuits(m.config, scores, n_points=6)
        alone = circuits.evaluate_circuit(m, clean, corrupt, masks, **kw).faithfulness()
        c = res.curves[name]
        np.testing.assert_allclose(c.faithfulness, alone, atol=1e-5)  # float32
        np.testing.assert_array_equal(c.n_edges, masks.sum(axis=(1, 2)))
        assert c.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
        x = c.n_edges / res.circuits.n_valid
        assert c.auc == pytest.approx(float(np.trapezoid(c.faithfulness, x)), rel=1e-12)
    assert res.curves["eap"].faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    df = res.to_dataframe()
    assert set(df["ranking"]) == {"eap", "nodes"} and len(df) == len(res.circuits.labels)
    fig = jaxpatch.plots.plot_pareto(res)
    assert len(fig.axes[0].lines) == 2 + 2  # two curves, two reference lines
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_pareto_errors(setup):
    m, clean, corrupt, kw = setup
    g = edges.EdgeGraph.of(m.config)
    with pytest.raises(jaxpatch.InputError, match="n_points"):
        circuits.nested_circuits(m.config, np.zeros(g.valid.shape), n_points=1)
    with pytest.raises(jaxpatch.InputError, match="shape"):
        circuits.nested_circuits(m.config, np.zeros((2, 2)))
    bad = np.zeros(g.valid.shape)
    bad[g.valid] = np.nan
    with pytest.raises(jaxpatch.InputError, match="NaN"):
        circuits.nested_circuits(m.config, bad)
    with pytest.raises(jaxpatch.InputError, match="Did you mean 'L1H1'"):
        circuits.nested_circuits(m.config, {"L1H11": 1.0})
    with pytest.raises(jaxpatch.InputError, match="at least one ranking"):
        circuits.pareto_curve(m, clean, corrupt, {}, **kw)
    heads = jaxpatch.activation_patch(m, clean, corrupt, site="z", direction="noise", **kw)
    nm, kind = circuits.nested_circuits(m.config, heads, n_points=10)  # a (layer, head) sweep ranks heads
    first = np.unravel_index(np.argmax(np.abs(heads.normalized())), heads.shape)
    assert kind == "nodes" and len(nm) == 7
    np.testing.assert_array_equal(nm[1], circuits.circuit_from_nodes(m.config, ["embed", "L{}H{}".format(*first)]))
    with pytest.raises(jaxpatch.InputError, match="'layer', 'head'"):
        circuits.nested_circuits(m.config, dataclasses.replace(heads, axes=("layer", "pos")))


def test_cli_pareto(tmp_path, capsys):
    from jaxpatch.cli import main

    out = tmp_path / "p"
    assert main(["pareto", "default", "--rankings", "eap", "--points", "4", "--n-prompts", "8",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "eap" in text and "AUC" in text
    assert (tmp_path / "p.csv").is_file() and (tmp_path / "p.png").is_file()
    assert main(["pareto", "default", "--rankings", "eap,magic"]) == 2
    assert "unknown ranking" in capsys.readouterr().err


def test_exact_edge_scores(setup):
    m, clean, corrupt, kw = setup
    g = edges.EdgeGraph.of(m.config)
    s = circuits.exact_edge_scores(m, clean, corrupt, **kw)
    assert s.shape == g.valid.shape and np.all(s[~g.valid] == 0) and np.abs(s).max() > 0.1
    pairs = [("L0H0", "L1H1.k"), ("embed", "logits")]
    one = edges.exact_edge_patch(m, clean, corrupt, pairs, direction="noise", **kw).mean(-1)
    np.testing.assert_allclose([s[g.up.index(a), g.down.index(b)] for a, b in pairs], one, atol=1e-5)
