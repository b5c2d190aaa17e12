"""Every supported family loads from a `transformers` checkpoint with transformers' logits, and
saves back to a checkpoint transformers loads as the same model.

Each case is a small random-init `transformers` model (noise added to every parameter, so no
norm weight is 1 and no bias 0) with the family's options switched on: grouped-query attention,
sliding windows shorter than the prompt, rope scalings (the dynamic case's prompt outgrows
``max_position_embeddings``), Pythia's partial rotary and parallel residual, Qwen2's biases, Gemma's
soft-capping and post-norms.

float64. `transformers` keeps float32 islands inside a float64 model: RMSNorm upcasts to float32
(``hidden_states.to(torch.float32)``), the rotary cos/sin tables are computed in float32, and eager
attention takes its softmax in float32. The float64 comparison (asked: 1e-8; measured ~1e-15)
removes the first and last (RMSNorm and softmax in the model's dtype) and feeds transformers
jaxpatch's float32 rotary tables; :func:`test_rotary_tables_match_transformers` checks those tables
against transformers' own (identical inverse frequencies, cos/sin within float32 rounding: torch's
and XLA's float32 cos differ by an ulp here and there), and
:func:`test_float64_against_unmodified_transformers` bounds the whole gap.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxpatch
from jaxpatch.models import transformer
from tests.helpers import rel_err

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

VOCAB, BATCH, PROMPT = 101, 2, 12
LLAMA = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
GEMMA = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64)

#: name -> (config class, config kwargs). Sliding windows (4) are shorter than the prompt (12).
CASES = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, n_inner=64, tie_word_embeddings=False,
                                 bos_token_id=0, eos_token_id=0)),
    "pythia": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=32, rotary_pct=0.25, use_parallel_residual=True)),
    "neox-sequential": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=32, rotary_pct=0.5,
                                              rotary_emb_base=500.0, use_parallel_residual=False,
                                              attention_bias=False, hidden_act="gelu_new")),
    "llama-gqa-biases": ("LlamaConfig", dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "llama-linear-tied": ("LlamaConfig", dict(LLAMA, rope_theta=500000.0, tie_word_embeddings=True,
                                              rope_scaling={"rope_type": "linear", "factor": 2.5})),
    "llama-dynamic": ("LlamaConfig", dict(LLAMA, max_position_embeddings=8,
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-llama3": ("LlamaConfig", dict(LLAMA, head_dim=16, max_position_embeddings=256,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64})),
    "mistral-window": ("MistralConfig", dict(LLAMA, sliding_window=4)),
    "qwen2-biases": ("Qwen2Config", dict(LLAMA)),
    "qwen2-window": ("Qwen2Config", dict(LLAMA, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(LLAMA, head_dim=16, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(GEMMA, num_hidden_layers=2, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 2.0},
                                        final_logit_softcapping=5.0)),
}
MODEL_TYPES = {"GPT2Config": "gpt2", "GPTNeoXConfig": "gpt_neox", "LlamaConfig": "llama", "MistralConfig": "mistral",
               "Qwen2Config": "qwen2", "Qwen3Config": "qwen3", "GemmaConfig": "gemma", "Gemma2Config": "gemma2",
               "Gemma3TextConfig": "gemma3_text"}


def build(name: str, seed: int = 0):
    cls, kw = CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(vocab_size=VOCAB, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    hf = build(name, seed=len(name))
    path = tmp_path_factory.mktemp(name) / "ckpt"
    hf.save_pretrained(path)
    return name, hf, path


def tokens(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(BATCH, PROMPT)).astype(np.int32)


def hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()


@jax.jit(static_argnums=0)
def _logits(config, params, toks):
    return transformer.forward(config, params, toks)[0]


def run(model, toks):
    """jaxpatch logits straight from the forward pass (no n_ctx check: the dynamic case outgrows it)."""
    return np.asarray(_logits(model.config, model.params, jnp.asarray(toks)))


# ----------------------------------------------------------------------------------------------
# transformers in float64 without its float32 islands


def _native_rms_norm(module):
    gemma = type(module).__name__.startswith("Gemma")
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))

    def forward(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (1.0 + module.weight) if gemma else module.weight * y

    return forward


def _jaxpatch_rotary(config):
    def forward(x, position_ids, layer_type=None):
        cos, sin = transformer.rotary_tables(config, jnp.asarray(position_ids.numpy()))
        i = 1 if layer_type == "sliding_attention" else 0
        c, s = (torch.from_numpy(np.array(t[i])).to(x.dtype) for t in (cos, sin))
        return torch.cat([c, c], -1), torch.cat([s, s], -1)

    return forward


def _native_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' eager attention with the softmax in the model's dtype (not float32)."""
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def hf_float64(path, config, monkeypatch):
    """The checkpoint as a float64 `transformers` model computing in float64 throughout, except the
    rotary tables: jaxpatch's float32 ones (see the module docstring)."""
    import transformers.models.gemma2.modeling_gemma2 as gemma2

    monkeypatch.setattr(gemma2, "eager_attention_forward", _native_eager)
    impl = "eager" if config.architecture == "gemma2" else "sdpa"  # Gemma 2 has no sdpa (soft-capping)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation=impl).eval()
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _native_rms_norm(module)
    rotary = getattr(hf.base_model, "rotary_emb", None)
    if rotary is not None:
        rotary.forward = _jaxpatch_rotary(config)
    return hf


# ----------------------------------------------------------------------------------------------
# Tests


def test_config_reads_the_family(case):
    name, hf, path = case
    c = jaxpatch.load_pretrained(path).config
    assert c.architecture == MODEL_TYPES[CASES[name][0]] == hf.config.model_type
    hc = hf.config
    if c.positional == "rotary":
        assert c.n_kv_heads == getattr(hc, "num_key_value_heads", c.n_heads)
        assert c.d_head == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    if hasattr(hc, "layer_types") and c.sliding_window is not None:
        assert c.sliding_layers == tuple(t == "sliding_attention" for t in hc.layer_types)
    assert (name.endswith("window") or name.startswith(("gemma2", "gemma3"))) == any(c.sliding_layers)


def test_float32_logits_match_transformers(case):
    name, hf, path = case
    model = jaxpatch.load_pretrained(path)
    assert model.dtype == jnp.float32
    toks = tokens()
    expected = hf_logits(hf, toks)
    got = run(model, toks)
    assert got.shape == expected.shape == (BATCH, PROMPT, VOCAB)
    assert rel_err(got, expected) < 1e-4, name
    if name == "llama-dynamic":  # the prompt outgrows max_position_embeddings: scaling is live
        assert PROMPT > hf.config.max_position_embeddings
    if model.config.n_ctx >= PROMPT:  # HookedModel runs the same forward
        assert rel_err(model(toks), got) < 1e-6


def test_float64_logits_match_transformers(case, x64, monkeypatch):
    name, _, path = case
    model = jaxpatch.load_pretrained(path, dtype="float64")
    assert model.dtype == jnp.float64
    hf = hf_float64(path, model.config, monkeypatch)
    toks = tokens(seed=2)
    got = run(model, toks)
    assert got.dtype == np.float64
    assert rel_err(got, hf_logits(hf, toks)) < 1e-12, name  # measured 7e-16 .. 2e-15


def test_float64_against_unmodified_transformers(case, x64):
    """No patches: the gap is transformers' float32 RMSNorm, rotary tables and eager softmax
    (measured up to 3e-7; 1e-15 for GPT-2, which has none of them)."""
    name, _, path = case
    model = jaxpatch.load_pretrained(path, dtype="float64")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    toks = tokens(seed=3)
    assert rel_err(run(model, toks), hf_logits(hf, toks)) < 1e-6, name


def test_rotary_tables_match_transformers(case):
    """jaxpatch's float32 rotary tables are transformers' up to float32 rounding of cos/sin (libm
    differences), with identical inverse frequencies (dynamic NTK: within one float32 ulp)."""
    name, _, path = case
    config = jaxpatch.load_pretrained(path).config
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)  # fresh: dynamic NTK state changes on use
    rotary = getattr(hf.base_model, "rotary_emb", None)
    if config.positional != "rotary":
        assert rotary is None
        return
    seq = 20  # past the dynamic case's max_position_embeddings (8)
    position_ids = torch.arange(seq)[None]
    cos, sin = transformer.rotary_tables(config, jnp.asarray(position_ids.numpy()))
    half = config.rotary_dim // 2
    layer_types = ["full_attention", "sliding_attention"] if config.architecture == "gemma3_text" else [None]
    for i, lt in enumerate(layer_types):
        x = torch.zeros(1)
        with torch.no_grad():
            hc, hs = rotary(x, position_ids) if lt is None else rotary(x, position_ids, lt)
        assert hc.shape[-1] == config.rotary_dim
        prefix = "" if lt is None else f"{lt}_"
        hf_inv = getattr(rotary, f"{prefix}inv_freq").numpy()
        ours_inv = np.asarray(transformer._inv_freq(config, config.rope_base if i == 0 else config.rope_local_base,
                                                    dict(config.rope_scaling) if i == 0 else {}, jnp.asarray(seq - 1)))
        if dict(config.rope_scaling).get("rope_type") == "dynamic":
            np.testing.assert_allclose(ours_inv, hf_inv, rtol=1.2e-7, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(ours_inv, hf_inv, err_msg=name)
        for ours, theirs in ((cos[i, 0], hc[0, :, :half]), (sin[i, 0], hs[0, :, :half])):
            np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=0, atol=2.5e-7, err_msg=name)


def test_save_pretrained_round_trip(case, tmp_path):
    """transformers loads jaxpatch's checkpoint as the same model (same class, config, logits)."""
    name, hf, path = case
    model = jaxpatch.load_pretrained(path)
    out = jaxpatch.save_pretrained(model, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    for key in ("num_key_value_heads", "head_dim", "sliding_window", "layer_types", "tie_word_embeddings",
                "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "use_parallel_residual"):
        if hasattr(hf.config, key):
            assert getattr(back.config, key) == getattr(hf.config, key), key
    if hasattr(hf.config, "rope_parameters"):
        assert back.config.rope_parameters == hf.config.rope_parameters
    toks = tokens(seed=4)
    expected = hf_logits(hf, toks)
    assert rel_err(hf_logits(back, toks), expected) < 1e-6, name  # Gemma's 1 + w - 1 rounds in float32
    again = jaxpatch.load_pretrained(out)
    assert again.config == model.config
    np.testing.assert_allclose(run(again, toks), run(model, toks), rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers_on_each_prompt_alone(case, side):
    """Prompts of lengths 12, 7, 9 in one padded batch get transformers' logits for each prompt run
    alone (the dynamic-NTK case: its scaling follows each prompt's own length, 7 < 8 < 9 < 12)."""
    name, hf, path = case
    model = jaxpatch.load_pretrained(path)
    lens = (PROMPT, 7, 9)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, n).astype(np.int32) for n in lens]
    toks, mask = np.zeros((3, PROMPT), np.int32), np.zeros((3, PROMPT), np.int32)
    rows = [slice(PROMPT - n, PROMPT) if side == "left" else slice(0, n) for n in lens]
    for i, (p, sl) in enumerate(zip(prompts, rows)):
        toks[i, sl], mask[i, sl] = p, 1
    got = np.asarray(jax.jit(transformer.forward, static_argnums=0)(model.config, model.params, jnp.asarray(toks),
                                                                     attention_mask=jnp.asarray(mask))[0])
    for i, (p, sl) in enumerate(zip(prompts, rows)):
        assert rel_err(got[i, sl], hf_logits(hf, p[None])[0]) < 1e-4, (name, i)
