"""Bring your own Flax linen model: train a small transformer, then patch it without editing it.

The task: read five random tokens, then a query token ``?``; answer with the FIRST token. To
answer, the model must move token 0's identity to the last position through attention. The
corrupted prompts change only token 0, so denoising (patching clean activations into the
corrupted run) should find where that information lives: token 0's position early on, the last
position later.

Every submodule output is a site named by its module path (``blocks_0.attn``, ``blocks_1.mlp.fc1``
...); jaxpatch finds them with ``nn.intercept_methods``. Needs ``pip install "jaxpatch[byo]"``.
Runs in well under a minute on a laptop CPU.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpatch

V, D, H, L, T = 16, 32, 2, 2, 6  # vocabulary (token 0 = "?"), width, heads, layers, positions


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(4 * D, name="fc1")(h)))


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (T, D))
        x = nn.Embed(V, D, name="embed")(tokens) + pos[None, : tokens.shape[1]]
        for i in range(L):
            x = Block(name=f"blocks_{i}")(x)
        return nn.Dense(V, name="unembed")(nn.LayerNorm(name="ln_f")(x))


def batch(key, n):
    toks = jax.random.randint(key, (n, T), 1, V).at[:, -1].set(0)  # last token is the query "?"
    return toks, toks[:, 0]


def train(steps=150, seed=0):
    model = Transformer()
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def step(carry, key):
        params, state = carry
        toks, ans = batch(key, 64)

        def loss(p):
            logits = model.apply(p, toks)[:, -1]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ans[:, None], axis=-1))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), steps)
    (params, state), losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)  # one program
    value = losses[-1]
    return model, params, float(value)


def main():
    t0 = time.perf_counter()
    model, variables, loss = train()
    toks, ans = batch(jax.random.PRNGKey(123), 256)
    acc = float(jnp.mean(jnp.argmax(model.apply(variables, toks)[:, -1], -1) == ans))
    print(f"trained in {time.perf_counter() - t0:.1f}s: loss {loss:.3f}, accuracy {acc:.2f}")

    RESID = ("batch", "pos", "d_model")  # name the axes of the sites we sweep (others: dim1, dim2...)
    patchable = jaxpatch.byo.from_flax(model, variables, axes={"blocks_?": RESID, "blocks_?.attn": RESID})
    clean, answer = batch(jax.random.PRNGKey(7), 16)
    corrupt = clean.at[:, 0].set(1 + (clean[:, 0] % (V - 1)))  # another first token
    wrong = corrupt[:, 0]
    print("sites:", ", ".join(list(patchable.sites(clean))[:8]), "...")

    # The residual stream after each block and each block's attention output, by position: one
    # compiled, vmapped sweep; then attribution patching estimates the same grid from one backward pass.
    sites = ["blocks_0", "blocks_1", "blocks_0.attn", "blocks_1.attn"]
    res = jaxpatch.activation_patch(patchable, clean, corrupt, site=sites, by=("site", "pos"),
                                    answer=answer, wrong=wrong, metrics=("logit_diff", "accuracy"))
    print(res)
    print(res.grid_frame(normalized=True).round(2))
    atp = jaxpatch.attribution_patch(patchable, clean, corrupt, site=sites, by=("site", "pos"), answer=answer, wrong=wrong)
    print("AtP estimates:\n", atp.grid_frame(normalized=True).round(2))
    r = np.corrcoef(atp.values().ravel(), res.values().ravel())[0, 1]
    print(f"AtP vs exact over {res.values().size} components: Pearson r = {r:.3f}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    top = res.top(1, normalized=True)[0]
    assert acc > 0.9 and top[1] > 0.5, (acc, top)


if __name__ == "__main__":
    np.set_printoptions(precision=2, suppress=True)
    main()
