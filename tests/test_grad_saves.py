"""A gradient through the layer scan keeps only the token-row matmuls' outputs of each block
(``transformer.GRAD_SAVES``) and recomputes the rest in the backward pass: the gradients must be
those of the plain scan (``GRAD_SAVES = None``, which keeps every intermediate), for every family,
for weights and for activations (AtP's gradients w.r.t. edits at hook sites)."""

import jax
import jax.numpy as jnp
import pytest

from jaxpatch import models
from jaxpatch.interventions import Edit, Interventions
from jaxpatch.models import transformer
from tests.helpers import random_tokens
from tests.test_init_draw import CONFIGS

#: float64 on both sides: the two orders of the same arithmetic agree to rounding.
TOL = 1e-12


def _grads(config, params, tokens):
    """Gradients of a scalar of the logits w.r.t. every weight and w.r.t. deltas added at three
    sites of every layer (what AtP differentiates)."""
    sites = ("blocks.hook_resid_pre", "blocks.attn.hook_z", "blocks.mlp.hook_post")

    def loss(p, deltas):
        ivs = Interventions({s: (Edit(delta=d, stacked=True),) for s, d in deltas.items()})
        logits, _ = models.forward(config, p, tokens, ivs)
        return jax.nn.logsumexp(logits, axis=-1).mean() + logits[:, -1, 3].sum()

    _, caps = jax.eval_shape(lambda p: models.forward(config, p, tokens, capture=frozenset(sites)), params)
    zeros = {s: jnp.zeros(caps[s].shape, params["W_E"].dtype) for s in sites}
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, zeros)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "neox"])
def test_kept_matmul_outputs_give_the_plain_scans_gradients(family, x64, monkeypatch):
    config = CONFIGS[family]
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), models.init_params(config, jax.random.key(0)))
    tokens = random_tokens(config, batch=2, pos=7, seed=1)
    fast = _grads(config, params, tokens)
    monkeypatch.setattr(transformer, "GRAD_SAVES", None)
    plain = _grads(config, params, tokens)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(plain))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree_util.tree_leaves(fast)):
        assert float(jnp.max(jnp.abs(a - b))) <= TOL * scale, jax.tree_util.keystr(path)


def test_the_policy_keeps_less_than_the_plain_scan(monkeypatch):
    """The saving is real: the compiled gradient holds less temporary memory (the residuals)."""
    config = CONFIGS["gpt2"]
    params = models.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(random_tokens(config, batch=4, pos=16, seed=1))

    def temp_bytes():
        f = jax.jit(jax.grad(lambda p: jax.nn.logsumexp(models.forward(config, p, tokens)[0], axis=-1).mean()))
        return f.lower(params).compile().memory_analysis().temp_size_in_bytes

    kept = temp_bytes()
    monkeypatch.setattr(transformer, "GRAD_SAVES", None)
    assert kept < temp_bytes()
