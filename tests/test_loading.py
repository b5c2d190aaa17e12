"""Checkpoint loading (single/sharded safetensors, hub cache, dtypes) and its errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxpatch
from tests.helpers import random_tokens


@pytest.fixture
def ckpt(tiny_model, tmp_path):
    return jaxpatch.save_pretrained(tiny_model, tmp_path / "ckpt")


def test_save_load_round_trip(tiny_model, ckpt):
    loaded = jaxpatch.load_pretrained(ckpt)
    assert loaded.config == tiny_model.config
    tokens = random_tokens(tiny_model.config)
    np.testing.assert_array_equal(loaded(tokens), tiny_model(tokens))


def test_sharded_checkpoint(tiny_model, ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    weight_map = {}
    for i, chunk in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(out / fname))
        weight_map.update({n: fname for n in chunk})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = random_tokens(tiny_model.config)
    np.testing.assert_array_equal(jaxpatch.load_pretrained(out)(tokens), tiny_model(tokens))


def test_bfloat16_checkpoint_and_dtype(tiny_model, ckpt, tmp_path):
    import ml_dtypes

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    out = tmp_path / "bf16"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    model = jaxpatch.load_pretrained(out, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    assert model(random_tokens(model.config)).dtype == jnp.bfloat16
    # dtype=None (the default) keeps a bfloat16 checkpoint's dtype; dtype= still overrides it
    assert jaxpatch.load_pretrained(out).dtype == jnp.bfloat16
    assert jaxpatch.load_pretrained(out, dtype="float32").dtype == jnp.float32


def test_hub_name_resolves_from_local_cache_only(ckpt, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--someorg--tiny-gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (hub / "models--someorg--tiny-gpt2" / "refs").mkdir()
    (hub / "models--someorg--tiny-gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert jaxpatch.load_pretrained("someorg/tiny-gpt2").config.n_layers == 3
    with pytest.raises(jaxpatch.CheckpointError, match="never downloads"):
        jaxpatch.load_pretrained("gpt2")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(jaxpatch.CheckpointError, match="no-such-dir"):
        jaxpatch.load_pretrained(tmp_path / "no-such-dir")


def test_missing_and_unexpected_tensors_are_named(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(jaxpatch.CheckpointError) as e:
        jaxpatch.load_pretrained(ckpt)
    assert "transformer.h.1.mlp.c_fc.bias" in str(e.value) and "missing" in str(e.value)
    assert "transformer.h.0.attn.rotary.weight" in str(e.value) and "unexpected" in str(e.value)


def test_wrong_tensor_shape_is_named(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["transformer.h.2.ln_2.weight"] = np.ones(5, np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(jaxpatch.CheckpointError, match=r"transformer.h.2.ln_2.weight.*\(5,\)"):
        jaxpatch.load_pretrained(ckpt)


def test_unsupported_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]  # (Llama was the example until jaxpatch supported it)
    cfg["model_type"] = "falcon"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(jaxpatch.UnsupportedArchitectureError, match="FalconForCausalLM.*GPT2LMHeadModel"):
        jaxpatch.load_pretrained(ckpt)


def test_no_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(jaxpatch.CheckpointError, match="no model.safetensors"):
        jaxpatch.load_pretrained(ckpt)


def test_bad_dtype(ckpt):
    with pytest.raises(jaxpatch.CheckpointError, match="Unsupported dtype 'int8'"):
        jaxpatch.load_pretrained(ckpt, dtype="int8")
    with pytest.raises(jaxpatch.CheckpointError, match="jax_enable_x64"):
        jaxpatch.load_pretrained(ckpt, dtype="float64")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights_are_reported_by_name(ckpt, tmp_path, bad):
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("h.1.mlp.c_fc.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][3, 4] = bad
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(jaxpatch.NonFiniteError, match=r"h\.1\.mlp\.c_fc\.weight \(\d NaN, \d inf of \d+\)"):
        jaxpatch.load_pretrained(out)


def test_float16_overflow_on_load_is_reported(ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("h.0.attn.c_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = 1e6  # finite in float32, inf in float16
    out = tmp_path / "big"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, str(out / "model.safetensors"))
    assert jaxpatch.load_pretrained(out).dtype == jnp.float32  # fine in float32
    with pytest.raises(jaxpatch.NonFiniteError, match="W_O"):
        jaxpatch.load_pretrained(out, dtype="float16")
