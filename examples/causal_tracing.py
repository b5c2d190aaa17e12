"""Causal tracing (Meng et al. 2022, ROME) with jaxpatch: corrupt the embeddings of some positions
with Gaussian noise (3x the embedding std, several samples batched), then restore the clean
residual stream / MLP output / attention output at each (layer, position) and see which restores
the answer's probability.

Run: python examples/causal_tracing.py
"""

import jaxpatch
from jaxpatch import data

model = data.load_default_model()
vocab = data.load_vocab()
clean, _, answer, wrong = data.induction_prompts(16, seed=2)
n = 10
first_copy = list(range(1, 1 + n))  # the "subject": the first copy of the repeated words

for site in ("resid_pre", "mlp_out", "attn_out"):
    r = jaxpatch.activation_patch(
        model, clean, None, site=site, baseline="noise", noise_positions=first_copy, noise_scale=3.0, n_noise=8,
        metrics=("prob", "logit_diff"), answer=answer, wrong=wrong, token_labels=vocab)
    b = r.baselines("prob")
    print(f"\n{site}: p(answer) clean {b['clean']:.3f}, noised {b['corrupt']:.3f}; restored fraction of p by layer x position")
    print(r.grid_frame("prob", normalized=True).round(2).to_string())
    top, value = r.top(1, "prob", normalized=True)[0]
    print("strongest restoration:", top, f"{value:+.2f}")
