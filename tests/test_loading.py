"""Checkpoint loading (single/sharded safetensors, hub cache, dtypes) and its errors."""

import dataclasses
import json
import re

import jax
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
    # The random GPT-2 has its own unembedding and a zero unembedding bias; a GPT-2 checkpoint
    # stores the first (lm_head, untied) and has no place for the second, so neither flag survives.
    assert loaded.config == dataclasses.replace(tiny_model.config, unembed_bias=False, tied_embeddings=False)
    assert "W_U" in loaded.params and "b_U" not in loaded.params
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


# ----------------------------------------------------------------------------------------------
# Every family (no torch needed: checkpoints written by jaxpatch, config.json dicts by hand)

from jaxpatch.models import convert  # noqa: E402

_ROTARY = dict(positional="rotary", norm="rmsnorm", gated_mlp=True, act_fn="silu", qkv_bias=False, o_bias=False,
               mlp_bias=False, unembed_bias=False, tied_embeddings=False, eps=1e-6)
FAMILY_CONFIGS = {
    "gpt_neox": dict(d_model=32, n_heads=4, d_head=8, architecture="gpt_neox", positional="rotary", rotary_dim=4,
                     parallel_attn_mlp=True, unembed_bias=False, tied_embeddings=False, act_fn="gelu"),
    "llama": dict(_ROTARY, d_model=48, n_heads=4, d_head=12, n_kv_heads=2, architecture="llama", qkv_bias=True,
                  o_bias=True, mlp_bias=True, rope_base=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}),
    "mistral": dict(_ROTARY, d_model=32, n_heads=4, d_head=8, n_kv_heads=1, architecture="mistral", sliding_window=4),
    "qwen2": dict(_ROTARY, d_model=32, n_heads=4, d_head=8, n_kv_heads=2, architecture="qwen2", qkv_bias=True,
                  sliding_window=4, layer_types=("full_attention", "sliding_attention")),
    "qwen3": dict(_ROTARY, d_model=32, n_heads=4, d_head=16, n_kv_heads=2, architecture="qwen3", qk_norm=True,
                  tied_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gemma": dict(_ROTARY, d_model=32, n_heads=4, d_head=16, n_kv_heads=1, architecture="gemma", act_fn="gelu_new",
                  scale_embed=True, tied_embeddings=True),
    "gemma2": dict(_ROTARY, d_model=32, n_heads=4, d_head=16, n_kv_heads=2, architecture="gemma2", act_fn="gelu_new",
                   scale_embed=True, tied_embeddings=True, post_norms=True, attn_scale=24 ** -0.5, attn_softcap=50.0,
                   final_softcap=30.0, sliding_window=4, layer_types=("sliding_attention", "full_attention")),
    "gemma3_text": dict(_ROTARY, d_model=32, n_heads=4, d_head=16, n_kv_heads=2, architecture="gemma3_text",
                        act_fn="gelu_new", scale_embed=True, tied_embeddings=True, post_norms=True, qk_norm=True,
                        attn_scale=16 ** -0.5, rope_base=1e6, rope_local_base=1e4, sliding_window=4,
                        rope_scaling={"rope_type": "linear", "factor": 8.0},
                        layer_types=("sliding_attention", "full_attention")),
}


def family_model(family, seed=0, dtype=jnp.float32):
    config = jaxpatch.ModelConfig(n_layers=2, d_mlp=40, d_vocab=53, n_ctx=16, **FAMILY_CONFIGS[family])
    return jaxpatch.HookedModel.from_config(config, seed=seed, dtype=dtype)


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_ckpt(request, tmp_path_factory):
    model = family_model(request.param)
    return model, jaxpatch.save_pretrained(model, tmp_path_factory.mktemp(request.param) / "ckpt")


def test_every_family_round_trips(family_ckpt):
    model, ckpt = family_ckpt
    cfg = json.loads((ckpt / "config.json").read_text())
    assert len(cfg["architectures"]) == 1 and convert.ARCHITECTURES[cfg["architectures"][0]] == model.config.architecture
    loaded = jaxpatch.load_pretrained(ckpt)
    assert loaded.config == model.config
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(model.params)
    tokens = random_tokens(model.config, pos=10)
    np.testing.assert_allclose(loaded(tokens), model(tokens), rtol=0, atol=1e-5)  # Gemma: 1 + (w - 1) rounds


def test_every_family_reports_missing_unexpected_and_misshapen_tensors(family_ckpt, tmp_path):
    model, ckpt = family_ckpt
    tensors = load_file(str(ckpt / "model.safetensors"))
    out = tmp_path / "broken"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    victim = sorted(n for n in tensors if ".1." in n and n.endswith("weight"))[0]
    missing = dict(tensors)
    del missing[victim]
    missing["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    save_file(missing, str(out / "model.safetensors"))
    with pytest.raises(jaxpatch.CheckpointError) as e:
        jaxpatch.load_pretrained(out)
    msg = str(e.value)
    assert f"missing tensors: ['{victim}']" in msg and "unexpected tensors" in msg and "rotary.weight" in msg
    misshapen = dict(tensors)
    misshapen[victim] = np.ones((5, 3), np.float32)
    save_file(misshapen, str(out / "model.safetensors"))
    expected = tensors[victim].shape
    with pytest.raises(jaxpatch.CheckpointError,
                       match=rf"Tensor '{re.escape(victim)}' has shape \(5, 3\); "
                             rf"config.json implies {re.escape(str(expected))}"):
        jaxpatch.load_pretrained(out)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bfloat16_checkpoints_load_as_bfloat16_by_default(family, tmp_path):
    # float32 weights (the init program compiled for family_ckpt) rounded to bfloat16: a bfloat16
    # model without compiling a second init program for the bfloat16 dtype.
    m32 = family_model(family)
    model = jaxpatch.HookedModel(m32.config, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), m32.params))
    assert model.dtype == jnp.bfloat16
    ckpt = jaxpatch.save_pretrained(model, tmp_path / "bf16")
    assert {str(v.dtype) for v in load_file(str(ckpt / "model.safetensors")).values()} == {"bfloat16"}
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = jaxpatch.load_pretrained(ckpt)
    assert loaded.dtype == jnp.bfloat16 and loaded.config == model.config
    assert jaxpatch.load_pretrained(ckpt, dtype="float32").dtype == jnp.float32
    tokens = random_tokens(model.config)
    assert loaded(tokens).dtype == jnp.bfloat16
    if family == "llama":  # no arithmetic on the way: bit-identical weights
        for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(model.params)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sharded_checkpoint_of_another_family(tmp_path):
    model = family_model("qwen2")
    ckpt = jaxpatch.save_pretrained(model, tmp_path / "one")
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    weight_map = {}
    for i, chunk in enumerate([names[::2], names[1::2]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(out / fname))
        weight_map.update({n: fname for n in chunk})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = random_tokens(model.config)
    np.testing.assert_array_equal(jaxpatch.load_pretrained(out)(tokens), jaxpatch.load_pretrained(ckpt)(tokens))


def test_gpt_neox_fused_qkv_is_split_per_head():
    """query_key_value's output rows are [head, (q, k, v), d_head]: row n*3H + j*H + h."""
    from jaxpatch.models import hf_neox

    config = family_model("gpt_neox").config
    N, H, D = config.n_heads, config.d_head, config.d_model
    tensors = {k: v for k, v in convert.params_to_hf(config, family_model("gpt_neox").params).items()}
    rows = np.arange(3 * N * H)
    code = rows // H % 3 * 1000 + rows // (3 * H) * 10 + rows % H  # (q/k/v, head, dim) of each row
    w = np.broadcast_to(code[:, None].astype(np.float32), (3 * N * H, D))
    tensors["gpt_neox.layers.0.attention.query_key_value.weight"] = np.ascontiguousarray(w)
    tensors["gpt_neox.layers.0.attention.query_key_value.bias"] = np.ascontiguousarray(w[:, 0])
    params = hf_neox.params_from_hf(config, tensors, jnp.float32)
    for j, (wk, bk) in enumerate([("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")]):
        expect = j * 1000 + np.arange(N)[:, None] * 10 + np.arange(H)[None, :]  # [N, H]
        np.testing.assert_array_equal(params["blocks"][bk][0], expect)
        np.testing.assert_array_equal(params["blocks"][wk][0], np.broadcast_to(expect[:, None, :], (N, D, H)))
    back = convert.params_to_hf(config, params)
    np.testing.assert_array_equal(back["gpt_neox.layers.0.attention.query_key_value.weight"], w)


# config.json as transformers 4.x and 5.x write it
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 50,
          "max_position_embeddings": 128}
_GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 7,
           "intermediate_size": 96, "vocab_size": 50, "max_position_embeddings": 256, "sliding_window": 8}
CONFIG_PAIRS = {
    "llama3": (dict(_LLAMA, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}),
               dict(_LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64})),
    "linear-legacy-type-key": (dict(_LLAMA, rope_scaling={"type": "linear", "factor": 4.0}),
                               dict(_LLAMA, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})),
    "dynamic": (dict(_LLAMA, rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=1e5),
                dict(_LLAMA, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e5})),
    "pythia": ({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 50,
                "max_position_embeddings": 64, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
               {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 50,
                "max_position_embeddings": 64, "attention_bias": True, "tie_word_embeddings": False,
                "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000.0, "rope_type": "default"}}),
    "gemma3": (dict(_GEMMA3, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
                    rope_scaling={"rope_type": "linear", "factor": 8.0}),
               dict(_GEMMA3, layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "qwen2-window": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
                      "intermediate_size": 40, "vocab_size": 50, "use_sliding_window": True, "sliding_window": 5,
                      "max_window_layers": 1},
                     {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
                      "intermediate_size": 40, "vocab_size": 50, "use_sliding_window": True, "sliding_window": 5,
                      "max_window_layers": 28,
                      "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
}


@pytest.mark.parametrize("pair", sorted(CONFIG_PAIRS))
def test_transformers_4_and_5_config_json_agree(pair):
    v4, v5 = CONFIG_PAIRS[pair]
    c4, c5 = convert.config_from_hf(v4), convert.config_from_hf(v5)
    assert c4 == c5
    if pair == "gemma3":
        assert (c5.rope_base, c5.rope_local_base) == (1e6, 1e4)
        assert dict(c5.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
        assert c5.sliding_layers == (True,) * 5 + (False, True) and c5.sliding_window == 8
        assert c5.attn_scale == 256 ** -0.5 and c5.qk_norm and c5.post_norms and c5.scale_embed
    if pair == "pythia":
        assert c5.rotary_dim == 4 and c5.parallel_attn_mlp and c5.act_fn == "gelu" and c5.norm == "layernorm"
    if pair == "dynamic":  # scales from max_position_embeddings, which it exists to outgrow
        assert dict(c5.rope_scaling)["original_max_position_embeddings"] == 128 and c5.n_ctx == 256
    if pair == "qwen2-window":
        assert c5.sliding_layers == (False, True, True) and c5.qkv_bias and not c5.o_bias


def test_family_defaults_follow_transformers():
    """Keys a config.json omits take transformers 5.24's defaults (e.g. Gemma 2's soft-caps)."""
    g2 = convert.config_from_hf({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 32,
                                 "num_attention_heads": 8, "num_hidden_layers": 3, "intermediate_size": 40,
                                 "vocab_size": 50})
    assert (g2.attn_softcap, g2.final_softcap, g2.d_head, g2.n_kv_heads) == (50.0, 30.0, 256, 4)
    assert g2.sliding_layers == (True, False, True) and g2.sliding_window == 4096 and g2.tied_embeddings
    q3 = convert.config_from_hf({"model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 32,
                                 "num_hidden_layers": 1, "intermediate_size": 40, "vocab_size": 50})
    assert q3.d_head == 128 and q3.sliding_window is None and not q3.tied_embeddings
    m = convert.config_from_hf({"model_type": "mistral", "hidden_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 40,
                                "vocab_size": 50})
    assert m.sliding_window == 4096 and all(m.sliding_layers)
    g1 = convert.config_from_hf({"model_type": "gemma", "hidden_act": "gelu", "hidden_size": 32,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                 "num_hidden_layers": 1, "intermediate_size": 40, "vocab_size": 50})
    assert g1.act_fn == "gelu_new"  # GemmaConfig: "gelu" meant the tanh approximation


@pytest.mark.parametrize("change, error, match", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, jaxpatch.UnsupportedArchitectureError,
     r"'MixtralForCausalLM'.*supports: \['GPT2LMHeadModel', 'GPTNeoXForCausalLM', 'LlamaForCausalLM'"),
    ({"architectures": None, "model_type": "falcon"}, jaxpatch.UnsupportedArchitectureError,
     r"model_type 'falcon'.*LlamaForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     jaxpatch.UnsupportedArchitectureError,
     r"rope type 'yarn' is not supported; supported rope types: \['default', 'linear', 'dynamic', 'llama3'\]"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     jaxpatch.UnsupportedArchitectureError, r"rope type 'longrope' is not supported; supported rope types"),
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, jaxpatch.UnsupportedArchitectureError,
     r"num_local_experts=8 \(mixture of experts\) is not supported"),
    ({"hidden_act": "xielu"}, jaxpatch.UnsupportedArchitectureError, r"hidden_act='xielu'.*supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, jaxpatch.CheckpointError, r"rope type 'linear' needs 'factor'"),
    ({"num_key_value_heads": 3}, jaxpatch.CheckpointError, r"n_kv_heads must divide n_heads"),
    ({"partial_rotary_factor": 0.5}, jaxpatch.UnsupportedArchitectureError, r"partial_rotary_factor=0.5"),
])
def test_unsupported_configs_are_named(change, error, match):
    hf = {k: v for k, v in {**_LLAMA, **change}.items() if v is not None}
    with pytest.raises(error, match=match):
        convert.config_from_hf(hf)


@pytest.mark.parametrize("change, match", [
    ({"use_bidirectional_attention": True}, r"use_bidirectional_attention=True is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"rope type 'linear' on sliding-window layers is not supported"),
    ({"layer_types": ["chunked_attention"] * 7}, r"layer_types has \['chunked_attention'\]"),
])
def test_unsupported_gemma3_options_are_named(change, match):
    with pytest.raises(jaxpatch.UnsupportedArchitectureError, match=match):
        convert.config_from_hf({**_GEMMA3, **change})


def _tied_gpt2(model):
    """``model`` (a random GPT-2) with its unembedding tied to the embedding and no unembedding bias."""
    config = dataclasses.replace(model.config, tied_embeddings=True, unembed_bias=False)
    return jaxpatch.HookedModel(config, {k: v for k, v in model.params.items() if k not in ("W_U", "b_U")})


def test_tied_gpt2_round_trips_tied(tiny_model, tmp_path):
    """GPT-2 checkpoints tie by default: they load with no ``W_U`` (the unembedding is ``W_E``'s
    transpose, one array as in ``transformers``) and save without ``lm_head``."""
    model = _tied_gpt2(tiny_model)
    ckpt = jaxpatch.save_pretrained(model, tmp_path / "tied")
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(ckpt / "model.safetensors"))
    loaded = jaxpatch.load_pretrained(ckpt)
    assert loaded.config == model.config and "W_U" not in loaded.params
    tokens = random_tokens(model.config)
    np.testing.assert_array_equal(loaded(tokens), model(tokens))
    # the same model untied: W_U a copy of W_E's transpose, a zero unembedding bias
    untied = jaxpatch.HookedModel(tiny_model.config, {**tiny_model.params, "W_U": jnp.asarray(model.params["W_E"]).T})
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(untied(tokens)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_tied_checkpoint_with_a_different_lm_head_is_refused(family, tiny_model, tmp_path):
    model = family_model("qwen3") if family == "qwen3" else _tied_gpt2(tiny_model)
    embed = "model.embed_tokens.weight" if family == "qwen3" else "transformer.wte.weight"
    ckpt = jaxpatch.save_pretrained(model, tmp_path / "tied")
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors[embed].copy()
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert jaxpatch.load_pretrained(ckpt).config == model.config  # a stored copy of the embedding is fine
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(jaxpatch.CheckpointError, match="tie_word_embeddings=true but the checkpoint's lm_head.weight"):
        jaxpatch.load_pretrained(ckpt)


def test_configs_a_family_cannot_express_are_not_saved(tmp_path):
    config = jaxpatch.ModelConfig(n_layers=1, d_mlp=40, d_vocab=53, n_ctx=16,
                                  **{**FAMILY_CONFIGS["llama"], "post_norms": True, "o_bias": False})
    # Only the config matters here: zero weights of the right shapes (no init program to compile).
    shapes = jax.eval_shape(lambda: jaxpatch.HookedModel.from_config(config).params)
    model = jaxpatch.HookedModel(config, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
    with pytest.raises(jaxpatch.CheckpointError, match=r"Llama checkpoint: .*post_norms is True.*qkv_bias != o_bias"):
        jaxpatch.save_pretrained(model, tmp_path / "x")


def test_default_dtype_is_the_dtype_of_most_weights():
    import ml_dtypes

    from jaxpatch.loading import checkpoint_dtype

    big = np.zeros((64, 64))
    small = np.zeros(8)
    assert checkpoint_dtype({"w": big.astype(ml_dtypes.bfloat16), "inv_freq": small.astype(np.float32)}) == jnp.bfloat16
    assert checkpoint_dtype({"w": big.astype(np.float16), "mask": small.astype(bool)}) == jnp.float16
    assert checkpoint_dtype({"w": big.astype(np.float32), "n": small.astype(ml_dtypes.bfloat16)}) == jnp.float32
    assert checkpoint_dtype({"w": big.astype(np.float64)}) == jnp.float32  # float64 needs dtype= and x64
