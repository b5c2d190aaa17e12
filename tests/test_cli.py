"""The ``jaxpatch`` command line: every subcommand, its help, and one-line errors for user mistakes.

Commands run in-process through ``jaxpatch.cli.main`` (one subprocess test checks the installed
entry point). Sweeps use a small random checkpoint written with ``save_pretrained`` plus a
word-level ``tokenizer.json``; the demo runs once on the embedded induction model.
"""

import contextlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest

import jaxpatch
from jaxpatch import data
from jaxpatch.cli import main, top_restoring_head
from jaxpatch.results_io import load_result

WORDS = ["<bos>"] + [f"w{i}" for i in range(1, 30)]
HAS_DEFAULT = (data.default_model_path() / "config.json").is_file()
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="embedded model jaxpatch/data/induction not present")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random 2-layer checkpoint with a word-level tokenizer.json (``w1 w2 ...``)."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=2, d_vocab=len(WORDS), n_ctx=16)
    jaxpatch.save_pretrained(jaxpatch.HookedModel.from_config(cfg, seed=3), d)
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<bos>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def ids_only_ckpt(ckpt, tmp_path_factory):
    """The same checkpoint without a tokenizer."""
    d = tmp_path_factory.mktemp("ids_only")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / f, d / f)
    return d


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = [
    {"clean": "<bos> w1 w2 w3 w1 w2", "corrupt": "<bos> w4 w5 w6 w1 w2", "answer": "w3", "wrong": "w6"},
    {"clean": [0, 7, 8, 9, 7, 8], "corrupt": [0, 10, 11, 12, 7, 8], "answer": 9, "wrong": 12},
    {"clean": "<bos> w13 w14 w15 w13 w14", "corrupt": "<bos> w16 w17 w18 w13 w14", "answer": "w15", "wrong": [18]},
]


def _error(capsys, argv, match):
    """Run argv; it must fail with status 2 and ONE stderr line ``jaxpatch: error: ...``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxpatch: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["sweep", "--help"], ["info", "--help"]])
def test_help_everywhere(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxpatch")
    if argv[0] == "sweep":
        assert "--prompts" in out and "--site" in out and "--plot" in out


def test_installed_entry_point():
    exe = shutil.which("jaxpatch")
    if exe is None:
        pytest.skip("the jaxpatch console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "{demo,sweep,info," in proc.stdout  # and the later subcommands (report, pareto)
    proc = subprocess.run([exe, "info", "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("jaxpatch: error: ") and "Traceback" not in proc.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: jaxpatch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- info
def test_info(capsys, ckpt):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "n_layers      2" in out and "d_vocab       30" in out and "tokenizer.json (30 tokens)" in out
    assert "[batch=1, pos=8]" in out
    assert "blocks.1.attn.hook_z" in out and "(1, 8, 2, 16)" in out
    assert "blocks.0.attn.hook_pattern" in out and "(1, 2, 8, 8)" in out
    assert main(["info", str(ckpt), "--pos", "3", "--batch", "2"]) == 0
    assert "(2, 3, 32)" in capsys.readouterr().out


@needs_default
def test_info_default(capsys):
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    assert "embedded induction model" in out and "word-level vocab.json" in out


def test_info_errors(capsys, tmp_path, ckpt):
    _error(capsys, ["info", str(tmp_path / "missing")], "No checkpoint directory")
    _error(capsys, ["info", str(ckpt), "--pos", "99"], "exceeds the model's context")


# ------------------------------------------------------------------------------------ sweep
def test_sweep_jsonl_saves_and_plots(capsys, tmp_path, ckpt):
    prompts = _jsonl(tmp_path / "p.jsonl", GOOD[:1] + [""] + GOOD[1:])  # blank lines are skipped
    prefix = tmp_path / "out" / "heads"
    argv = ["sweep", str(ckpt), "--prompts", prompts, "--site", "z", "--by", "layer,head",
            "--metrics", "logit_diff,prob", "--out", str(prefix), "--plot", "--top", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 prompt(s) of 6 tokens" in out and "top 3 components" in out
    for suffix in (".npz", ".parquet", ".png"):
        assert (tmp_path / "out" / f"heads{suffix}").is_file(), suffix
    res = load_result(prefix)
    assert res.axes == ("layer", "head") and res.metrics == ("logit_diff", "prob")
    # the same sweep through the Python API
    model = jaxpatch.load_pretrained(ckpt)
    clean = np.array([[0, 1, 2, 3, 1, 2], [0, 7, 8, 9, 7, 8], [0, 13, 14, 15, 13, 14]])
    corrupt = np.array([[0, 4, 5, 6, 1, 2], [0, 10, 11, 12, 7, 8], [0, 16, 17, 18, 13, 14]])
    ref = jaxpatch.activation_patch(model, clean, corrupt, site="z", by=("layer", "head"),
                                    metrics=("logit_diff", "prob"), answer=[3, 9, 15], wrong=[6, 12, 18])
    np.testing.assert_allclose(res.per_prompt, ref.per_prompt, rtol=1e-5, atol=1e-6)


def test_sweep_inline_noise(capsys, ckpt):
    argv = ["sweep", str(ckpt), "--clean", "<bos> w1 w2 w3 w1 w2", "--corrupt", "<bos> w4 w5 w6 w1 w2",
            "--answer", "w3", "--wrong", "w6", "--direction", "noise"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "noise resample patching of blocks.hook_resid_pre: [layer=2, pos=6]" in out
    assert "L1/5:w2" in out or "L0/5:w2" in out  # positions labelled with their tokens


@needs_default
def test_sweep_default_model(capsys, tmp_path):
    clean, corrupt, answers, wrong = data.induction_prompts(4, seed=1, n=4)
    rows = [{"clean": " ".join(data.decode(c)), "corrupt": [int(i) for i in k], "answer": data.decode([a])[0],
             "wrong": int(w)} for c, k, a, w in zip(clean, corrupt, answers, wrong)]
    argv = ["sweep", "default", "--prompts", _jsonl(tmp_path / "p.jsonl", rows), "--site", "z", "--out",
            str(tmp_path / "r")]
    assert main(argv) == 0
    res = load_result(tmp_path / "r")
    assert res.axes == ("layer", "head") and res.per_prompt.shape[-1] == 4


BAD_CASES = {
    "unknown_site": (None, ["--site", "resid_pree"], "Unknown site 'resid_pree'"),
    "bad_axis": (None, ["--by", "layer,hed"], "Unknown sweep axis 'hed'"),
    "bad_metric": (None, ["--metrics", "logit_diff,logit_dif"], "Unknown metric 'logit_dif'"),
    "malformed_json": ([GOOD[0], GOOD[1], '{"clean": "<bos> w1", oops}'], [], "p.jsonl line 3: malformed JSON"),
    "not_an_object": ([GOOD[0], "[1, 2]"], [], "p.jsonl line 2: expected a JSON object"),
    "multi_token_answer": ([GOOD[0], dict(GOOD[0], answer="w3 w4")], [],
                           "p.jsonl line 2: answer 'w3 w4' is not a single token: it encodes to 2 tokens"),
    "multi_token_wrong": ([dict(GOOD[0], wrong=[5, 6])], [], "p.jsonl line 1: wrong must be a token id"),
    "missing_key": ([{"clean": "<bos> w1", "answer": "w2"}], [], "p.jsonl line 1: missing 'corrupt'"),
    "unknown_key": ([dict(GOOD[0], answr="w3")], [], "p.jsonl line 1: unknown key(s) ['answr']"),
    "length_mismatch": ([GOOD[0], dict(GOOD[0], clean="<bos> w1 w2", corrupt="<bos> w4 w5")], [],
                        "p.jsonl line 2: prompt has 3 tokens but the first prompt has 6"),
    "clean_corrupt_lengths": ([dict(GOOD[0], corrupt="<bos> w4")], [], "clean has 6 tokens but corrupt has 2"),
    "mixed_wrong": ([GOOD[0], {k: v for k, v in GOOD[1].items() if k != "wrong"}], [],
                    "p.jsonl line 2: missing 'wrong'"),
    "token_out_of_range": ([dict(GOOD[1], clean=[0, 7, 8, 9, 7, 99])], [], "Token ids must lie in [0, 30)"),
    "plot_without_out": ([GOOD[0]], ["--plot"], "--plot needs --out"),
    "bad_direction": ([GOOD[0]], ["--direction", "sideways"], "invalid choice: 'sideways'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_sweep_user_errors(capsys, tmp_path, ckpt, case):
    rows, extra, match = BAD_CASES[case]
    prompts = _jsonl(tmp_path / "p.jsonl", rows if rows is not None else GOOD)
    _error(capsys, ["sweep", str(ckpt), "--prompts", prompts] + extra, match)


def test_sweep_errors_without_prompt_file_or_model(capsys, tmp_path, ckpt, ids_only_ckpt):
    _error(capsys, ["sweep", str(tmp_path / "no_model"), "--prompts", _jsonl(tmp_path / "p.jsonl", GOOD)],
           "No checkpoint directory")
    _error(capsys, ["sweep", str(ckpt), "--prompts", str(tmp_path / "missing.jsonl")], "does not exist")
    _error(capsys, ["sweep", str(ckpt), "--clean", "<bos> w1"], "give --prompts FILE.jsonl, or --clean")
    _error(capsys, ["sweep", str(ckpt), "--clean", "<bos> w1 w2", "--corrupt", "<bos> w3 w2", "--answer", "w3"],
           "metric 'logit_diff' needs a contrast token")
    _error(capsys, ["sweep", str(ids_only_ckpt), "--prompts", _jsonl(tmp_path / "q.jsonl", GOOD[:1])],
           "p.jsonl line 1: clean is a string but the model has no tokenizer".replace("p.jsonl", "q.jsonl"))
    _error(capsys, ["sweep", str(ckpt), "--prompts", _jsonl(tmp_path / "e.jsonl", [])], "has no prompts")


# ------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["demo", "--out", str(out), "--n-prompts", "32", "--no-progress"])
    return rc, out, stdout.getvalue(), stderr.getvalue()


@needs_default
def test_demo_end_to_end(demo_run):
    rc, out, stdout, stderr = demo_run
    assert rc == 0, stderr
    assert stderr == ""  # --no-progress: no bar
    pngs = {"denoise_resid_pre_layer_pos.png", "noise_resid_pre_layer_pos.png", "denoise_z_layer_head.png",
            "noise_z_layer_head.png", "exact_vs_attribution.png"}
    results = {"denoise_z_layer_head", "noise_z_layer_head", "denoise_resid_pre_layer_pos",
               "noise_resid_pre_layer_pos", "atp_z_layer_head", "atpstar_z_layer_head", "atp_resid_pre_layer_pos",
               "atpstar_resid_pre_layer_pos"}
    names = {p.name for p in out.iterdir()}
    assert pngs <= names
    for r in results:
        assert f"{r}.npz" in names and (f"{r}.parquet" in names or f"{r}.csv" in names), r
    for p in pngs:
        assert (out / p).read_bytes()[:4] == b"\x89PNG"
    res = load_result(out / "denoise_z_layer_head")
    assert res.metrics == ("logit_diff", "logprob", "prob", "kl", "accuracy")
    assert res.axes == ("layer", "head") and res.per_prompt.shape[-1] == 32
    assert load_result(out / "atpstar_z_layer_head").info["method"] == "atp*"
    assert f"Wrote {len(names)} files to {out}" in stdout


@needs_default
def test_demo_recovers_the_induction_head(demo_run):
    rc, out, stdout, _ = demo_run
    assert rc == 0
    task = data.load_task()
    expected = "L{}H{}".format(*task["induction_head"])
    den = load_result(out / "denoise_z_layer_head")
    best, value = top_restoring_head(den)
    assert best == expected and value > 0.2
    assert f"restores the most is {expected}" in stdout and "the induction head of task.json" in stdout
    # the behaviour is there to be patched: clean >> corrupt
    b = den.baselines("logit_diff")
    assert b["clean"] - b["corrupt"] > 2.0
    # noising the induction head hurts
    noi = load_result(out / "noise_z_layer_head")
    li, hi = task["induction_head"]
    assert noi.normalized("logit_diff")[li, hi] > 0.2
