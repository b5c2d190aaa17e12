"""The same experiment written with TransformerLens names, through jaxpatch's compat API.

Before (TransformerLens, one forward per patch):

    from transformer_lens import patching
    _, clean_cache = model.run_with_cache(clean_tokens)
    resid = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)

After (jaxpatch, one compiled program per call): only the imports and the metric's array library
change. Run: python examples/transformer_lens_migration.py
"""

import jax.numpy as jnp
import numpy as np

from jaxpatch import data
from jaxpatch.compat.transformer_lens import patching

model = data.load_default_model()
clean_tokens, corrupted_tokens, answer, wrong = data.induction_prompts(16, seed=3)
batch = np.arange(len(answer))


def metric(logits):  # a JAX function of logits [batch, pos, d_vocab] -> scalar, as in TransformerLens
    return jnp.mean(logits[batch, -1, answer] - logits[batch, -1, wrong])


_, clean_cache = model.run_with_cache(clean_tokens)
print("clean cache:", clean_cache, "\n  blocks.1.attn.hook_z:", clean_cache["blocks.1.attn.hook_z"].shape,
      " ('pattern', 0):", clean_cache["pattern", 0].shape)
resid = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)
print("get_act_patch_resid_pre ->", resid.shape, "\n", np.round(np.asarray(resid), 2))
heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric)
print("get_act_patch_attn_head_out_all_pos ->", heads.shape, "\n", np.round(np.asarray(heads), 2))
every = patching.get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric)
print("get_act_patch_attn_head_all_pos_every -> [z, q, k, v, pattern] x layer x head", every.shape)
print(np.round(np.asarray(every), 2))
