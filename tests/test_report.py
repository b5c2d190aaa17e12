"""jaxpatch.report: the founding paper's workflow as a guided report (jaxpatch/reporting).

One full report on the embedded induction model is shared by the module (its programs compile
once); a second run checks that the findings are stable, and the other tests reuse the compiled
programs (same shapes) with small budgets. Expectations come from the model's task.json (which
heads the training found) and from properties that hold by construction (scaling the unembedding
scales the logit difference but saturates the probability), never from recorded numbers.
"""

import base64
import contextlib
import importlib.util
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import jaxpatch
from jaxpatch import data
from jaxpatch.cli import main
from jaxpatch.reporting import KINDS, make_plan
from jaxpatch.reporting.findings import normalized_or_none
from jaxpatch.results_io import load_result, results_equal

N_PROMPTS = 16


@pytest.fixture(scope="module")
def setup():
    model = data.load_default_model()
    clean, corrupt, answer, wrong = data.induction_prompts(N_PROMPTS, seed=0)
    kw = dict(answer=answer, wrong=wrong, token_labels=data.load_vocab(), verbose=False)
    return model, clean, corrupt, kw


def _budget_without_neurons(model, clean):
    plan = make_plan(model.config, clean.shape[0], clean.shape[1], None)
    return plan.total - next(s.cost for s in plan.steps if s.name == "neurons")


@pytest.fixture(scope="module")
def rep(setup, tmp_path_factory):
    model, clean, corrupt, kw = setup
    out = tmp_path_factory.mktemp("report")
    r = jaxpatch.report(model, clean, corrupt, out=out, budget=_budget_without_neurons(model, clean), **kw)
    return r, out


def test_report_states_the_induction_circuit(rep):
    r, _ = rep
    task = data.load_task()
    prev, ind = "L{}H{}".format(*task["prev_token_head"]), "L{}H{}".format(*task["induction_head"])
    circuits = r.by_kind("circuit")
    assert circuits, r.summary()
    found = [f for f in circuits if f.components[-1] == ind]
    assert found, [f.components for f in circuits]
    f = found[0]
    assert prev in f.components[:-1]
    assert "previous-token" in f.message.lower() and "induction" in f.message.lower()
    # the evidence: the previous-token head is necessary, the induction head's keys carry the effect
    assert f.values[f"{prev} noise"] >= 0.2 and f.values[f"{ind}.k noise"] >= 0.2
    roles = {g.components[0]: g.message for g in r.by_kind("head_role")}
    assert "previous-token head" in roles[prev] and "induction head" in roles[ind]


def test_previous_token_head_is_necessary_not_sufficient(rep):
    """Restoring the previous-token head alone in the corrupted run points the induction head at
    the corrupted first copy (it copies the wrong word); corrupting it breaks induction: necessary,
    not sufficient (an AND with the clean tokens), as the report must say."""
    r, _ = rep
    prev = "L{}H{}".format(*data.load_task()["prev_token_head"])
    kinds = {f.kind for f in r.findings if f.section == "directions" and f.components == (prev,)}
    assert kinds == {"necessary_not_sufficient"}
    neg = [f for f in r.by_kind("negative_component") if prev in f.components]
    assert neg and neg[0].values[prev] < 0


def test_findings_are_typed_and_complete(rep):
    r, _ = rep
    assert r.findings
    for f in r.findings:
        assert f.kind in KINDS and f.message and f.next_step and f.severity in ("note", "caution")
        assert all(np.isfinite(v) for _, v in f.numbers)
    json.dumps([f.to_dict() for f in r.findings])
    # every section of the workflow ran and spoke
    for kind in ("localised", "saturated_metric", "attribution_agreement"):
        assert r.by_kind(kind), kind
    assert r.plan.included("qkv") and not r.plan.included("neurons")
    assert [f for f in r.by_kind("skipped") if "neurons" in f.message.lower()]
    assert r.info["used"] <= r.plan.budget


def test_findings_stable_across_runs(rep, setup):
    r, _ = rep
    model, clean, corrupt, kw = setup
    r2 = jaxpatch.report(model, clean, corrupt, budget=_budget_without_neurons(model, clean), figures=False, **kw)
    assert r2.findings == r.findings
    assert json.dumps([f.to_dict() for f in r2.findings]) == json.dumps([f.to_dict() for f in r.findings])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


def test_html_is_self_contained(rep):
    r, out = rep
    page = (out / "report.html").read_text(encoding="utf-8")
    p = _Collect()
    p.feed(page)
    p.close()
    assert "html" in p.tags and "main" in p.tags
    assert "http://" not in page and "https://" not in page and "url(" not in page
    assert not {"script", "link", "iframe", "object", "embed"} & set(p.tags)
    for tag, k, v in p.attrs:
        if k in ("src", "href", "action", "srcset", "data"):
            assert v.startswith("data:image/png;base64,"), (tag, k, v[:60])
    imgs = [v for tag, k, v in p.attrs if tag == "img" and k == "src"]
    assert len(imgs) == len(r.figures) >= 6
    for fig in r.figures:  # every figure embedded, as a PNG
        b64 = base64.b64encode(fig.png).decode()
        assert f"data:image/png;base64,{b64}" in imgs
        assert fig.png.startswith(b"\x89PNG\r\n\x1a\n")
    for f in r.findings:  # every finding is on the page
        assert f'id="finding-{r.findings.index(f)}"' in page


def test_tables_and_findings_written(rep):
    r, out = rep
    for key, res in r.results.items():
        assert results_equal(load_result(out / "tables" / key.replace(".", "_")), res), key
    saved = json.loads((out / "findings.json").read_text())
    assert saved == [f.to_dict() for f in r.findings]
    assert (out / "findings.csv").read_text().count("\n") >= len(r.findings)


def test_misranked_components_are_verified_exactly(rep):
    r, _ = rep
    mis = r.by_kind("attribution_misranked")
    assert mis
    names = r.extras["names"]
    for key, v in r.extras["verify"].items():
        grid_key = key[len("verify."):]
        grid = normalized_or_none(r.results[grid_key], "logit_diff").reshape(-1)
        np.testing.assert_allclose(v["verified"], grid[v["indices"]], atol=1e-3)
        comps = [names[grid_key][i] for i in v["indices"]]
        assert any(f.components == tuple(comps) for f in mis)


def test_saturated_metric_flagged_and_logit_diff_not(setup):
    """Scaling the unembedding by c scales every logit difference by c: the normalised logit
    difference cannot change, while the probability saturates at the clean baseline (it is already
    near 1). The report must flag prob there and never logit_diff; on the unscaled model prob is
    not saturated at the clean baseline."""
    model, clean, corrupt, kw = setup
    coarse = make_plan(model.config, clean.shape[0], clean.shape[1], None)
    budget = sum(s.cost for s in coarse.steps if s.required)

    def scaled(c):
        p = dict(model.params)
        p["W_U"] = model.params["W_U"] * c  # (a GPT-2 checkpoint has no unembedding bias to scale)
        return jaxpatch.HookedModel(model.config, p, name=f"induction model, unembedding x{c}")

    base = jaxpatch.report(model, clean, corrupt, budget=budget, attribution=False, figures=False, **kw)
    sharp = jaxpatch.report(scaled(4.0), clean, corrupt, budget=budget, attribution=False, figures=False, **kw)
    sat = sharp.by_kind("saturated_metric")
    assert any(f.metrics[0] == "prob" and "clean_baseline" in f.values for f in sat), [f.message for f in sat]
    assert not [f for f in sat if f.metrics[0] == "logit_diff"]
    assert not [f for f in base.by_kind("saturated_metric") if f.metrics[0] == "prob" and "clean_baseline" in f.values]
    np.testing.assert_allclose(sharp.results["coarse.resid_pre.denoise"].normalized("logit_diff"),
                               base.results["coarse.resid_pre.denoise"].normalized("logit_diff"), atol=2e-3)


def test_budget_plan_printed_first_and_respected(setup, capsys):
    model, clean, corrupt, kw = setup
    plan = make_plan(model.config, clean.shape[0], clean.shape[1], None)
    need = sum(s.cost for s in plan.steps if s.required)
    r = jaxpatch.report(model, clean, corrupt, budget=need, attribution=False, figures=False, **{**kw, "verbose": True})
    assert r.figures == [] and "<img" not in r.to_html()
    printed = capsys.readouterr().out
    assert printed.startswith("jaxpatch report plan") and printed.index("SKIPPED") < printed.index("running:")
    assert set(r.results) == {f"coarse.{s}.{d}" for s in ("resid_pre", "attn_out", "mlp_out") for d in ("denoise", "noise")}
    assert r.info["used"] == need
    assert {f.kind for f in r.findings if f.section == "plan"} == {"skipped"}


def test_budget_too_small_says_what_it_needs(setup):
    model, clean, corrupt, kw = setup
    L, T = model.config.n_layers, clean.shape[1]
    need = 2 + 3 * 2 * (L * T + 2)  # baselines + three coarse sites, two directions, P patches + 2 runs each
    with pytest.raises(jaxpatch.InputError, match=rf"budget=50 .*too small for the coarse pass, which needs {need}\b"):
        jaxpatch.report(model, clean, corrupt, budget=50, **kw)
    with pytest.raises(jaxpatch.InputError, match="budget= must be an int"):
        jaxpatch.report(model, clean, corrupt, budget=1e9, **kw)


def test_prompts_without_gap_refused(setup):
    model, clean, _, kw = setup
    with pytest.raises(jaxpatch.InputError, match="no clean-corrupt gap on logit_diff"):
        jaxpatch.report(model, clean, clean.copy(), **kw)


def test_unwritable_output_refused_before_running(setup, tmp_path, monkeypatch):
    model, clean, corrupt, kw = setup
    afile = tmp_path / "a_file.txt"
    afile.write_text("x")
    import jaxpatch.reporting.workflow as wf

    monkeypatch.setattr(wf, "activation_patch", lambda *a, **k: pytest.fail("ran a sweep before checking out="))
    with pytest.raises(jaxpatch.InputError, match="Cannot write the report to .*a_file.txt.*existing file"):
        jaxpatch.report(model, clean, corrupt, out=afile, **kw)
    with pytest.raises(jaxpatch.InputError, match="Cannot write the report to .*a_file.txt/sub"):
        jaxpatch.report(model, clean, corrupt, out=afile / "sub", **kw)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_report_default_model(tmp_path):
    model = data.load_default_model()
    plan = make_plan(model.config, N_PROMPTS, data.induction_prompts(1)[0].shape[1], None)
    budget = sum(s.cost for s in plan.steps if s.required) + next(s.cost for s in plan.steps if s.name == "heads") + 1
    code, out, err = _cli(["report", "default", "--n-prompts", str(N_PROMPTS), "--budget", str(budget), "--out",
                           str(tmp_path / "r"), "--no-attribution"])
    assert code == 0, err
    assert out.startswith("jaxpatch report plan")
    assert "[circuit] Previous-token → induction circuit" in out
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "findings.json").is_file()


def test_cli_report_errors(tmp_path):
    code, _, err = _cli(["report", "default", "--n-prompts", "4", "--budget", "10", "--out", str(tmp_path / "r")])
    assert code == 2 and "too small for the coarse pass, which needs" in err
    f = tmp_path / "file"
    f.write_text("")
    code, _, err = _cli(["report", "default", "--out", str(f)])
    assert code == 2 and "Cannot write the report to" in err

# ------------------------------------------------------------------ the paper's lessons (examples)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_metrics_lesson(tmp_path):
    res = _example("paper_metrics").run(tmp_path, n_prompts=N_PROMPTS)
    sat = [f for f in res["findings"] if f.kind == "saturated_metric"]
    assert {f.metrics[0] for f in sat} >= {"prob"} and "logit_diff" not in {f.metrics[0] for f in sat}
    assert [f for f in res["findings"] if f.kind == "metric_disagreement"]
    assert (tmp_path / "paper_metrics.png").read_bytes().startswith(b"\x89PNG")


def test_denoise_vs_noise_and_granularity_lessons(tmp_path):
    r = _example("paper_denoise_vs_noise").run(n_prompts=N_PROMPTS, out_dir=tmp_path)
    assert (tmp_path / "paper_denoise_vs_noise.png").read_bytes().startswith(b"\x89PNG")
    task = data.load_task()
    prev, ind = "L{}H{}".format(*task["prev_token_head"]), "L{}H{}".format(*task["induction_head"])
    assert r["best_resid_cell"] >= 0.9  # one residual cell is a sufficient cross-section
    assert set(r["sufficient_heads"]) < set(r["necessary_heads"])  # noising needs more of the circuit
    assert prev in r["necessary_heads"] and prev not in r["sufficient_heads"] and ind in r["necessary_heads"]
    assert r["layer_attn_out"] >= 0.9 and max(r["single_heads"]) <= r["layer_attn_out"] - 0.2
    assert r["all_heads_jointly"] >= 0.9
