"""Find the induction circuit of the embedded model by exact patching, and compare attribution.

The embedded model (trained by examples/train_toy_model.py) continues repeated word sequences:
"<bos> A B C ... A B" -> "C". Corrupting the first copy removes what induction copies from.

Run: python examples/induction_circuit.py  (about half a minute on a 2-core CPU)
"""

import numpy as np

import jaxpatch
from jaxpatch import compare, data

model = data.load_default_model()
vocab = data.load_vocab()
clean, corrupt, answer, wrong = data.induction_prompts(32, seed=1)
print(model)
print("clean:  ", " ".join(data.decode(clean[0])), "->", vocab[answer[0]])
print("corrupt:", " ".join(data.decode(corrupt[0])))

kw = dict(answer=answer, wrong=wrong, token_labels=vocab, metrics=("logit_diff", "logprob", "accuracy"))
# 1. Coarse: the residual stream by layer x position, denoising (is it sufficient?).
resid = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", **kw)
print("\nresidual stream, normalized logit diff (denoising):")
print(resid.grid_frame("logit_diff", normalized=True).round(2).to_string())

# 2. Heads over all positions, both directions.
for direction in ("denoise", "noise"):
    heads = jaxpatch.activation_patch(model, clean, corrupt, site="z", direction=direction, **kw)
    print(f"\nheads ({direction}), normalized logit diff:\n", np.round(heads.normalized("logit_diff"), 2))

# 3. Which head is where: attention-pattern scores on the clean prompts.
prev, ind = data.head_scores(model, clean, n=10)
print("\nprevious-token score per head:\n", np.round(prev, 2), "\ninduction score per head:\n", np.round(ind, 2))

# 4. Exact vs attribution on the head sweep, and the top heads verified exactly.
c = compare.compare(model, clean, corrupt, site="z", methods=("atp", "atp*"), answer=answer, wrong=wrong, k=2)
print("\nexact vs attribution (heads):\n" + str(c))
for row in compare.verify_top_k(model, clean, corrupt, site="z", k=3, method="atp", answer=answer, wrong=wrong):
    print(f"  {row['label']}: AtP {row['estimate']:+.3f}, exact {row['exact']:+.3f}")
