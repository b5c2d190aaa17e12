"""The embedded induction model (jaxpatch/data/induction): it solves the task, its circuit is where
task.json says, and the vocabulary/prompt helpers behave."""

import json

import numpy as np
import pytest

import jaxpatch
from jaxpatch import data

N_PROMPTS = 200


@pytest.fixture(scope="module")
def model():
    return data.load_default_model()


@pytest.fixture(scope="module")
def task():
    return data.load_task()


@pytest.fixture(scope="module")
def prompts():
    return data.induction_prompts(N_PROMPTS, seed=2024)


def _logit_diff(logits, answers, wrong):
    last = np.asarray(logits)[:, -1]
    rows = np.arange(last.shape[0])
    return last[rows, answers] - last[rows, wrong]


def test_shipped_files_are_small_and_consistent(model, task):
    path = data.default_model_path()
    for name in ("config.json", "model.safetensors", "vocab.json", "task.json"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 1_000_000
    vocab = data.load_vocab()
    assert len(vocab) == model.config.d_vocab == len(set(vocab))
    assert vocab[data.BOS_ID] == "<bos>" and task["bos_id"] == data.BOS_ID
    assert model.config.n_layers == 2
    assert 1 + 2 * task["n"] <= model.config.n_ctx


def test_clean_prompts_are_solved(model, prompts):
    clean, _, answers, _ = prompts
    acc = np.mean(np.asarray(model(clean))[:, -1].argmax(-1) == answers)
    assert acc > 0.95, acc  # measured 1.0


def test_solved_with_distractor_prefix(model):
    # With distinct words before the first copy, "the word seen once but not twice" no longer
    # singles out the answer: only induction does.
    clean, _, answers, _ = data.induction_prompts(N_PROMPTS, seed=7, prefix=8)
    acc = np.mean(np.asarray(model(clean))[:, -1].argmax(-1) == answers)
    assert acc > 0.95, acc  # measured 1.0


def test_circuit_heads_match_task_json(model, task, prompts):
    clean, _, answers, _ = prompts
    n = task["n"]
    prev, ind = data.head_scores(model, np.concatenate([clean, answers[:, None]], axis=1), n)
    L, H = task["prev_token_head"]
    assert L == 0 and int(prev[0].argmax()) == H
    assert prev[L, H] > 0.5, prev
    li, hi = task["induction_head"]
    assert li == 1 and np.unravel_index(ind.argmax(), ind.shape) == (li, hi)
    assert ind[li, hi] > 0.5, ind
    # The scores recorded in task.json are reproduced on fresh prompts.
    np.testing.assert_allclose(prev, task["scores"]["prev_token"], atol=0.05)
    np.testing.assert_allclose(ind, task["scores"]["induction"], atol=0.05)


def test_logit_difference_clean_vs_corrupt(model, prompts):
    clean, corrupt, answers, wrong = prompts
    ld_clean = _logit_diff(model(clean), answers, wrong).mean()
    ld_corrupt = _logit_diff(model(corrupt), answers, wrong).mean()
    assert ld_clean > 4.0, ld_clean  # measured ~6.8
    assert abs(ld_corrupt) < 1.5, ld_corrupt  # measured ~-0.1
    assert ld_clean - ld_corrupt > 4.0


def test_induction_prompts_layout(task):
    n = task["n"]
    clean, corrupt, answers, wrong = data.induction_prompts(16, seed=3)
    assert clean.shape == corrupt.shape == (16, 2 * n) and clean.dtype == np.int32
    assert answers.shape == wrong.shape == (16,)
    assert (clean[:, 0] == data.BOS_ID).all() and (corrupt[:, 0] == data.BOS_ID).all()
    a, b = clean[:, 1 : n + 1], corrupt[:, 1 : n + 1]
    np.testing.assert_array_equal(clean[:, n + 1 :], a[:, :-1])
    np.testing.assert_array_equal(corrupt[:, n + 1 :], a[:, :-1])
    np.testing.assert_array_equal(answers, a[:, -1])
    np.testing.assert_array_equal(wrong, b[:, -1])
    for i in range(16):
        assert len(set(a[i])) == n and not set(a[i]) & set(b[i])
        assert answers[i] not in corrupt[i] and wrong[i] not in clean[i]
    again = data.induction_prompts(16, seed=3)
    for x, y in zip((clean, corrupt, answers, wrong), again):
        np.testing.assert_array_equal(x, y)
    p_clean, p_corrupt, _, _ = data.induction_prompts(4, seed=3, n=5, prefix=6)
    assert p_clean.shape == (4, 1 + 6 + 2 * 5 - 1)
    np.testing.assert_array_equal(p_clean[:, :7], p_corrupt[:, :7])


def test_encode_decode_round_trip():
    vocab = data.load_vocab()
    words = " ".join(vocab[:6])
    ids = data.encode(words)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.arange(6))
    np.testing.assert_array_equal(data.encode(vocab[:6]), ids)
    assert data.decode(ids) == vocab[:6]
    assert data.decode(np.int32(3)) == [vocab[3]]
    assert data.encode("").shape == (0,)


def test_encode_unknown_word_names_it():
    vocab = data.load_vocab()
    with pytest.raises(jaxpatch.InputError, match="'zebra'") as err:
        data.encode(f"{vocab[1]} zebra {vocab[2]}")
    assert vocab[1] in str(err.value)  # lists valid words
    with pytest.raises(jaxpatch.InputError, match="strings"):
        data.encode([vocab[1], 3])


def test_decode_errors():
    n = len(data.load_vocab())
    with pytest.raises(jaxpatch.InputError, match=rf"\[0, {n}\)"):
        data.decode([0, n])
    with pytest.raises(jaxpatch.InputError, match="1-D"):
        data.decode(np.zeros((2, 3), np.int32))
    with pytest.raises(jaxpatch.InputError, match="integer"):
        data.decode([1.5])


def test_prompt_argument_errors():
    with pytest.raises(jaxpatch.InputError, match="prefix"):
        data.induction_prompts(2, n=30)


def test_task_json_is_plain_json():
    text = (data.default_model_path() / "task.json").read_text()
    assert json.loads(text)["task"] == "induction"


def test_ablating_the_circuit_breaks_induction(model, task, prompts):
    clean, _, answers, _ = prompts
    layer, head = task["prev_token_head"]

    def accuracy(iv):
        return np.mean(np.asarray(model(clean, interventions=iv))[:, -1].argmax(-1) == answers)

    assert accuracy(model.zero(f"blocks.{layer}.attn.hook_z", head=head)) < 0.3  # measured 0.02
    heads = [h for l, h in task["induction_heads"] if l == 1]
    assert accuracy(model.zero("blocks.1.attn.hook_z", head=heads)) < 0.3  # measured 0.02
