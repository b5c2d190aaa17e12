"""Text prompts: a checkpoint's tokenizer.json (via `tokenizers`) or word-level vocab.json."""

import json

import numpy as np
import pytest

import jaxpatch


def test_tokenizer_json_checkpoint(tiny_model, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the [test] extra installs tokenizers (via transformers)")
    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "dog"] + [f"w{i}" for i in range(tiny_model.config.d_vocab - 7)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    d = jaxpatch.save_pretrained(tiny_model, tmp_path / "ckpt")
    tok.save(str(d / "tokenizer.json"))
    model = jaxpatch.load_pretrained(d)
    assert "tokenizer.json" in model.tokenizer.describe
    ids = model.to_tokens(["the cat sat on", "the dog sat on"])
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4], [1, 6, 3, 4]])
    assert model.to_single_token("mat") == 5
    assert model.to_str_tokens(ids[1]) == ["the", "dog", "sat", "on"]
    with pytest.raises(jaxpatch.InputError, match="not a single token"):
        model.to_single_token("the mat")
    with pytest.raises(jaxpatch.InputError, match="different lengths"):
        model.to_tokens(["the cat", "the cat sat"])
    r = jaxpatch.activation_patch(model, ids, model.to_tokens(["the dog sat on", "the cat sat on"]), answer=model.to_single_token("mat"),
                                  wrong=model.to_single_token("cat"), token_labels=model.to_str_tokens, mesh=None)
    assert r.labels["pos"] == ["0:the", "1:cat", "2:sat", "3:on"]


def test_vocab_json_and_no_tokenizer(tiny_model, tmp_path):
    d = jaxpatch.save_pretrained(tiny_model, tmp_path / "ckpt")
    assert jaxpatch.load_pretrained(d).tokenizer is None
    with pytest.raises(jaxpatch.InputError, match="has no tokenizer"):
        jaxpatch.load_pretrained(d).to_tokens("a b")
    (d / "vocab.json").write_text(json.dumps([f"v{i}" for i in range(tiny_model.config.d_vocab)]))
    model = jaxpatch.load_pretrained(d)
    np.testing.assert_array_equal(model.to_tokens("v3 v4"), [[3, 4]])
    with pytest.raises(jaxpatch.InputError, match="Unknown word 'zz'"):
        model.to_tokens("v3 zz")
