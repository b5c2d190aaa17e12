"""Tiny Flax linen, Flax nnx and Equinox models for the bring-your-own-model tests (random weights;
written as users write them, with no jaxpatch code inside)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

V, D, H, L, T, B = 13, 16, 2, 2, 6, 3  # vocab, d_model, heads, layers, positions, batch


# ---------------------------------------------------------------------------------------------
# Flax linen: a pre-norm transformer with a Python loop over named blocks


def linen_transformer(seed: int = 0):
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(4 * D, name="fc1")(x)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            h = nn.LayerNorm(name="ln1")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, name="attn")(h, h, mask=mask)
            return x + MLP(name="mlp")(nn.LayerNorm(name="ln2")(x))

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            pos = self.param("pos", nn.initializers.normal(0.02), (T, D))
            x = nn.Embed(V, D, name="embed")(tokens) + pos[None, : tokens.shape[1]]
            for i in range(L):
                x = Block(name=f"blocks_{i}")(x)
            return nn.Dense(V, name="unembed")(nn.LayerNorm(name="ln_f")(x))

    model = Transformer()
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, T), jnp.int32))  # eager init is slow
    return model, variables, {"Block": Block, "MLP": MLP}


def linen_shared(seed: int = 0):
    """A linen model that calls one submodule twice (tied weights): its path is two calls."""
    import flax.linen as nn

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(x.shape[-1], name="dense")
            return nn.Dense(3, name="head")(dense(jnp.tanh(dense(x))))

    model = Shared()
    return model, jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------
# Flax nnx: an MLP classifier


def nnx_mlp(seed: int = 0, n_in: int = 6, hidden: int = 8, n_classes: int = 4):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.linear1 = nnx.Linear(n_in, hidden, rngs=rngs)
            self.linear2 = nnx.Linear(hidden, hidden, rngs=rngs)
            self.head = nnx.Linear(hidden, n_classes, rngs=rngs)

        def __call__(self, x):
            h1 = nnx.relu(self.linear1(x))
            h2 = jnp.tanh(self.linear2(h1))
            return self.head(h2)

    return MLP(nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# Equinox: a transformer taking one sequence (the caller vmaps it)


def eqx_transformer(seed: int = 0):
    import equinox as eqx

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

    return eqx.filter_jit(Transformer)(jax.random.PRNGKey(seed))  # eager init is slow


def tokens(seed: int = 1):
    clean = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, V)
    corrupt = clean.at[:, 1].set((clean[:, 1] + 3) % V).at[:, 3].set((clean[:, 3] + 5) % V)
    return clean, corrupt


def to64(tree):
    def cast(a):
        return a.astype(jnp.float64) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)
