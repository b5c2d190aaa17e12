"""A Llama-style grouped-query model: every cached activation equals TransformerLens 3.9's
run_with_cache, and the compat patching functions equal TransformerLens's own, on the same weights
(a random `transformers` LlamaForCausalLM, loaded by jaxpatch from its checkpoint and by
TransformerLens through convert_llama_weights, nothing folded)."""

import numpy as np
import pytest

import jaxpatch
from jaxpatch.compat.transformer_lens import patching as jp_patching

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
pytestmark = pytest.mark.torch

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_theta=10000.0)
    hf = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from 1, weights larger: every site carries signal
            p.add_(torch.randn_like(p) * 0.15)
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    hf.save_pretrained(path)
    model = jaxpatch.load_pretrained(path)
    cfg = HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, d_mlp=64, n_layers=2, n_ctx=64, d_vocab=53, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, final_rms=True, gated_mlp=True,
        n_key_value_heads=2, eps=1e-6, rotary_base=10000, original_architecture="LlamaForCausalLM",
        dtype=torch.float32, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return model, tl.eval()


def test_every_cached_activation_equals_transformer_lens(pair):
    model, tl = pair
    toks = np.random.default_rng(0).integers(0, 53, (2, 7))
    tl_logits, tl_cache = tl.run_with_cache(torch.tensor(toks))
    logits, cache = model.run_with_cache(toks)
    compared = 0
    for name in tl_cache.keys():
        if name.startswith("unembed."):  # TransformerLens-only aliases of the final residual / logits
            continue
        ours, theirs = np.asarray(cache[name]), tl_cache[name].detach().numpy()
        assert ours.shape == theirs.shape, name
        both_inf = np.isinf(ours) & np.isinf(theirs) & (np.sign(ours) == np.sign(theirs))  # masked scores
        np.testing.assert_allclose(np.where(both_inf, 0, ours), np.where(both_inf, 0, theirs), atol=TOL, err_msg=name)
        compared += 1
    assert compared == 2 * 20 + 3  # 20 sites per layer (k/v/rot_k with 2 key/value heads), hook_embed, ln_final
    assert cache["blocks.0.attn.hook_k"].shape == (2, 7, 2, 8)
    np.testing.assert_allclose(np.asarray(logits), tl_logits.detach().numpy(), atol=TOL)


FUNCTIONS = ["get_act_patch_resid_pre", "get_act_patch_attn_out", "get_act_patch_mlp_out",
             "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_by_pos"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_compat_equals_transformer_lens_patching(pair, name):
    from transformer_lens import patching as tl_patching

    model, tl = pair
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 53, size=(2, 6))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 11) % 53
    ans, wrong = rng.integers(0, 53, 2), rng.integers(0, 53, 2)
    b = np.arange(2)

    def jax_metric(logits):
        return (logits[b, -1, ans] - logits[b, -1, wrong]).mean()

    def tl_metric(logits):
        return (logits[b, -1, ans] - logits[b, -1, wrong]).mean()

    _, jp_cache = model.run_with_cache(clean)
    _, tl_cache = tl.run_with_cache(torch.tensor(clean))
    ours = np.asarray(getattr(jp_patching, name)(model, corrupt, jp_cache, jax_metric, mesh=None))
    theirs = getattr(tl_patching, name)(tl, torch.tensor(corrupt), tl_cache, tl_metric).detach().numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.ptp(theirs) > 1e-2  # the patches have different effects: the comparison can fail
