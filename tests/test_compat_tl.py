"""jaxpatch.compat.transformer_lens equals transformer_lens.patching on identical weights."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch.compat.transformer_lens import patching as jp_patching
from tests.helpers import hf_gpt2, tl_from_hf

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
pytestmark = pytest.mark.torch

FUNCTIONS = [
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = hf_gpt2(2, 32, 4, 53, 16, seed=7, init_std=0.15)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(path)
    model, tl = jaxpatch.load_pretrained(path), tl_from_hf(hf)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 53, size=(3, 6))
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 11) % 53
    corrupt[:, 3] = (corrupt[:, 3] + 5) % 53
    ans, wrong = rng.integers(0, 53, 3), rng.integers(0, 53, 3)
    return model, tl, clean, corrupt, ans, wrong


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("last_only", [True, False], ids=["last-pos-metric", "all-pos-metric"])
def test_compat_equals_transformer_lens(setup, name, last_only):
    from transformer_lens import patching as tl_patching

    model, tl, clean, corrupt, ans, wrong = setup
    b = np.arange(len(ans))

    if last_only:
        def jax_metric(logits):
            return jnp.mean(logits[b, -1, ans] - logits[b, -1, wrong])

        def tl_metric(logits):
            return (logits[b, -1, ans] - logits[b, -1, wrong]).mean()
    else:  # reads every position: the engine must compute full logits
        def jax_metric(logits):
            return jnp.mean(logits[:, :, 0]) + jnp.mean(logits[b, -1, ans])

        def tl_metric(logits):
            return logits[:, :, 0].mean() + logits[b, -1, ans].mean()

    _, clean_cache = model.run_with_cache(clean)
    ours = np.asarray(getattr(jp_patching, name)(model, corrupt, clean_cache, jax_metric))
    with torch.no_grad():
        _, tl_cache = tl.run_with_cache(torch.tensor(clean))
        theirs = getattr(tl_patching, name)(tl, torch.tensor(corrupt), tl_cache, tl_metric).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1e-2  # the patches have visibly different effects


def test_metric_must_return_scalar(setup):
    model, _, clean, corrupt, ans, _ = setup
    _, cache = model.run_with_cache(clean)
    with pytest.raises(jaxpatch.InputError, match="must return a scalar"):
        jp_patching.get_act_patch_resid_pre(model, corrupt, cache, lambda lg: lg[:, -1, 0])


def test_mismatched_cache_and_tokens(setup):
    model, _, clean, corrupt, *_ = setup
    _, cache = model.run_with_cache(clean[:2])
    with pytest.raises(jaxpatch.InputError, match="shape"):
        jp_patching.get_act_patch_resid_pre(model, corrupt, cache, lambda lg: lg[:, -1, 0].mean())
