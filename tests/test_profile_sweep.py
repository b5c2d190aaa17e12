"""benchmarks/profile_sweep.py's FLOP count of a compiled program's dots (the rate it reports for
a sweep's block matmuls is these FLOPs over the traced time)."""

import jax
import jax.numpy as jnp

from benchmarks.profile_sweep import dot_flops


def test_dot_flops_of_compiled_hlo():
    def f(x, w, q, k):
        return jnp.tanh(x @ w), jnp.einsum("bqh,bkh->bqk", q, k)

    args = (jnp.ones((96, 32)), jnp.ones((32, 48)), jnp.ones((4, 8, 16)), jnp.ones((4, 6, 16)))
    flops = dot_flops(jax.jit(f).lower(*args).compile().as_text())
    got = sorted(flops.values())
    assert (2 * 96 * 48 * 32, 96, False) in got  # the matmul: rows 96, no batch dims
    assert (2 * 4 * 8 * 6 * 16, 4, True) in got  # the batched dot
    assert len(got) == 2
