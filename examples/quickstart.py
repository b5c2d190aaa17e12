"""Quick start: build a GPT-2-shaped model, save it as a Hugging Face checkpoint, load it back and
patch one residual-stream position from a clean run into a corrupted run.

Run: python examples/quickstart.py
"""

import tempfile

import jax.numpy as jnp
import numpy as np

import jaxpatch


def main():
    config = jaxpatch.ModelConfig.gpt2(n_layers=4, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
    with tempfile.TemporaryDirectory() as d:
        jaxpatch.save_pretrained(jaxpatch.HookedModel.from_config(config, seed=0), d)
        model = jaxpatch.load_pretrained(d)
    print(model)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 100, size=(4, 12))
    corrupt = clean.copy()
    corrupt[:, 3] = rng.integers(0, 100, size=4)  # corrupt one position
    answer = clean[:, -1]

    clean_logits, cache = model.run_with_cache(clean)
    corrupt_logits = model(corrupt)

    def metric(logits):  # logprob of the answer at the last position, averaged over prompts
        lp = logits[:, -1] - jnp.log(jnp.sum(jnp.exp(logits[:, -1]), -1, keepdims=True))
        return float(jnp.mean(jnp.take_along_axis(lp, answer[:, None], 1)))

    m_clean, m_corrupt = metric(clean_logits), metric(corrupt_logits)
    print(f"clean {m_clean:.4f}  corrupt {m_corrupt:.4f}")
    print("restored fraction, denoising blocks.{l}.hook_resid_pre at pos 3:")
    for layer in range(config.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        m = metric(model(corrupt, model.replace(name, cache[name], pos=3)))
        print(f"  layer {layer}: {(m - m_corrupt) / (m_clean - m_corrupt):+.3f}")


if __name__ == "__main__":
    main()
