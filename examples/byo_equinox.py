"""Bring your own Equinox model: train a small transformer, then patch it without editing it.

The task: given six tokens, answer with the largest one at the last position. Corrupting one
token that was the maximum changes the answer; denoising finds which block and position carry it.

Equinox layers take one example: jaxpatch vmaps the model over the batch itself, and every
submodule is a site named by its pytree path (``blocks.0.attn``, ``blocks.1.mlp``, ``blocks.1``),
including those the model maps over positions with its own ``jax.vmap`` (``blocks.0.mlp.fc1``:
``[batch, pos, d_mlp]``). Needs ``pip install "jaxpatch[byo]"``.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpatch

V, D, H, L, T = 16, 32, 2, 2, 6


class FeedForward(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.fc1, self.fc2 = eqx.nn.Linear(D, 4 * D, key=k1), eqx.nn.Linear(4 * D, D, key=k2)

    def __call__(self, x):  # [pos, d_model]
        return jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(x)))


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: FeedForward

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(H, D, key=k1)
        self.mlp = FeedForward(k2)

    def __call__(self, x):  # [pos, d_model]
        n = x.shape[0]
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((n, n), bool)))
        return x + self.mlp(jax.vmap(self.ln2)(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: list
    ln_f: eqx.nn.LayerNorm
    unembed: eqx.nn.Linear

    def __init__(self, key):
        ks = jax.random.split(key, L + 3)
        self.embed = eqx.nn.Embedding(V, D, key=ks[0])
        self.pos = 0.02 * jax.random.normal(ks[1], (T, D))
        self.blocks = [Block(k) for k in ks[2:-1]]
        self.ln_f = eqx.nn.LayerNorm(D)
        self.unembed = eqx.nn.Linear(D, V, key=ks[-1])

    def __call__(self, tokens):  # [pos] -> [pos, vocab]
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for b in self.blocks:
            x = b(x)
        return jax.vmap(self.unembed)(jax.vmap(self.ln_f)(x))


def batch(key, n):
    toks = jax.random.randint(key, (n, T), 0, V)
    return toks, jnp.max(toks, axis=1)


def train(steps=150, seed=0):
    model = Transformer(jax.random.PRNGKey(seed))
    params, static = eqx.partition(model, eqx.is_array)  # plain jax.jit on the arrays: cheap steps
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def step(carry, key):
        params, state = carry
        toks, ans = batch(key, 64)

        def loss(p):
            logits = jax.vmap(eqx.combine(p, static))(toks)[:, -1]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ans[:, None], axis=-1))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), steps)
    (params, state), losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)  # one program
    value = losses[-1]
    return eqx.combine(params, static), float(value)


def main():
    t0 = time.perf_counter()
    model, loss = train()
    toks, ans = batch(jax.random.PRNGKey(99), 256)
    acc = float(jnp.mean(jnp.argmax(jax.vmap(model)(toks)[:, -1], -1) == ans))
    print(f"trained in {time.perf_counter() - t0:.1f}s: loss {loss:.3f}, accuracy {acc:.2f}")

    seq = ("pos", "d_model")  # per-example axes (jaxpatch adds "batch")
    patchable = jaxpatch.byo.from_equinox(model, axes={"blocks.?": seq, "blocks.?.attn": seq, "blocks.?.mlp": seq})
    print("sites:", ", ".join(patchable.sites(toks[:2])))

    # Clean prompts whose maximum sits at position 2 and is unique; the corruption lowers it.
    clean, answer = batch(jax.random.PRNGKey(3), 256)
    clean = clean.at[:, 2].set(V - 1 - (jnp.arange(256) % 3))
    answer = clean[:, 2]
    clean = clean.at[:, jnp.array([0, 1, 3, 4, 5])].set(jnp.minimum(clean[:, jnp.array([0, 1, 3, 4, 5])], answer[:, None] - 4))
    corrupt = clean.at[:, 2].set(0)
    wrong = jnp.max(corrupt, axis=1)

    sites = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    res = jaxpatch.activation_patch(patchable, clean[:32], corrupt[:32], site=sites, by=("site", "pos"),
                                    answer=answer[:32], wrong=wrong[:32], metrics=("logit_diff", "accuracy"))
    print(res)
    print(res.grid_frame(normalized=True).round(2))
    atp = jaxpatch.attribution_patch(patchable, clean[:32], corrupt[:32], site=sites, by=("site", "pos"),
                                     answer=answer[:32], wrong=wrong[:32])
    r = np.corrcoef(atp.values().ravel(), res.values().ravel())[0, 1]
    print(f"AtP vs exact over {res.values().size} components: Pearson r = {r:.3f}")
    fc1 = patchable.sites(toks[:2])["blocks.0.mlp.fc1"]  # mapped over positions by the model's own vmap
    print("blocks.0.mlp.fc1 is a site too:", fc1)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    assert acc > 0.8 and res.top(1, normalized=True)[0][1] > 0.5, (acc, res.top(1, normalized=True))


if __name__ == "__main__":
    np.set_printoptions(precision=2, suppress=True)
    main()
