"""The paper's lessons (examples/paper_*.py) on models with known circuits: each lesson's
qualitative claim, asserted; and the guided report reading the AND and OR gates correctly.

The gate models (jaxpatch/data/paper, trained by examples/train_paper_models.py) compute their
gate exactly on every prompt of their task, so the signatures asserted here follow from the task
itself; the induction claims follow from the circuit task.json records.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import jaxpatch
from jaxpatch.data import gates
from jaxpatch.reporting import make_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gate_models_compute_their_gate():
    for name in ("and_gate", "or_gate", "backup"):
        model = gates.load_gate(name)
        tokens, answers, _ = gates.all_prompts(name)
        pred = np.asarray(model(tokens))[:, -1].argmax(-1)
        assert np.mean(pred == answers) == 1.0, name


def test_and_or_lesson(tmp_path):
    res = _example("paper_and_or").run(tmp_path, n_prompts=16)
    a, o = res["and_gate"], res["or_gate"]
    for f in ("a", "b"):  # AND: each feature necessary, not sufficient; OR: sufficient, not necessary
        assert a["noise"][f] >= 0.8 and a["denoise"][f] <= 0.2, a
        assert o["denoise"][f] >= 0.8 and o["noise"][f] <= 0.2, o
    assert a["denoise"]["both"] >= 0.9 and o["noise"]["both"] >= 0.9  # only jointly
    assert (tmp_path / "paper_and_or.png").read_bytes().startswith(b"\x89PNG")


def test_cli_report_on_a_checkpoint_with_a_prompt_file(tmp_path):
    """``jaxpatch report DIR --prompts FILE.jsonl`` on the one-layer AND gate (no tokenizer: token
    ids), with attribution (AtP+QK: GradDrop needs two layers). Runs before test_report_reads_the_gates,
    which reuses its compiled programs (both gates have the same config and prompt shapes)."""
    import contextlib
    import io
    import json

    from jaxpatch.cli import main

    clean, corrupt, answer, wrong = gates.gate_prompts(16)  # the shapes of test_report_reads_the_gates: programs shared
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"clean": c.tolist(), "corrupt": k.tolist(), "answer": int(a), "wrong": int(w)})
                                 for c, k, a, w in zip(clean, corrupt, answer, wrong)))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", str(gates.model_path("and_gate")), "--prompts", str(prompts), "--out", str(tmp_path / "r")])
    assert code == 0, err.getvalue()
    assert "[necessary_not_sufficient] residual stream resid_pre L0 @1" in out.getvalue()
    saved = json.loads((tmp_path / "r" / "findings.json").read_text())
    agreement = [f for f in saved if f["kind"] == "attribution_agreement"]
    assert agreement and all(f["message"].startswith("AtP+QK vs exact") for f in agreement)


@pytest.mark.parametrize("name,kind", [("and_gate", "necessary_not_sufficient"), ("or_gate", "sufficient_not_necessary")])
def test_report_reads_the_gates(name, kind):
    model = gates.load_gate(name)
    clean, corrupt, answer, wrong = gates.gate_prompts(16)
    plan = make_plan(model.config, 16, clean.shape[1], None)
    budget = sum(s.cost for s in plan.steps if s.required)
    rep = jaxpatch.report(model, clean, corrupt, answer=answer, wrong=wrong, token_labels=gates.VOCAB, budget=budget,
                          attribution=False, verbose=False, figures=False)
    found = {f.components[0] for f in rep.by_kind(kind) if f.components[0].startswith("resid_pre")}
    assert found == {"resid_pre L0 @1:A", "resid_pre L0 @3:B"}, rep.summary()
    other = "sufficient_not_necessary" if kind == "necessary_not_sufficient" else "necessary_not_sufficient"
    assert not [f for f in rep.by_kind(other) if f.components[0].startswith("resid_pre L0")]
    assert ("AND" in rep.by_kind(kind)[0].message) == (name == "and_gate")


def test_backup_lesson(tmp_path):
    res = _example("paper_backup").run(n_prompts=16, out_dir=tmp_path)["zero"]
    assert (tmp_path / "paper_backup.png").read_bytes().startswith(b"\x89PNG")
    clean = res["clean"]
    assert abs(res["primary"]) < 0.1 * clean and abs(res["backup"]) < 0.1 * clean  # each alone: compensated
    assert res["both"] <= -0.5 * clean  # together: the answer is gone
    assert res["backup_given_primary_ablated"] <= -0.5 * clean  # the backup's effect appears once the primary is ablated
