"""All of a random init's normal draws as one sampler: the same numbers as one
``jax.random.normal(key_i, shape_i, float32)`` per weight, bit for bit, compiled once.

Why: a compiled init (:func:`jaxpatch.models.init_params`) that calls ``jax.random.normal`` once
per weight holds one threefry hash loop and one uniform-to-normal conversion per weight shape,
20 to 30 of them, and XLA compiles each on its own: the init compiled several times longer than a
forward pass. Every one of those draws is elementwise in a flat counter, so they concatenate:

* bits. ``jax_threefry_partitionable`` (JAX's default): element ``j`` of a draw with key ``k``
  is ``b1 ^ b2`` with ``(b1, b2) = threefry2x32(k, (hi(j), lo(j)))``, ``j`` the element's flat
  (row-major) index as 64 bits (``hi(j) = 0``: a group holds fewer than 2**32 elements), keyed
  per element by the draw it belongs to. The original scheme: the counter ``iota(n)`` (padded with one 0
  when ``n`` is odd) is split into halves ``x1, x2`` and hashed pairwise; the draw is ``b1``
  followed by ``b2``, cut to ``n``. Either way the hash is elementwise in keys and counters, and
  the ``threefry2x32`` primitive takes one key per element: one call hashes every draw.
* uniform in ``[nextafter(-1, 0), 1)``, then ``sqrt(2) * erf_inv(u)``: the operations of
  ``jax.random.normal``'s float32 path, applied to the flat array.

Keys must be threefry2x32 keys (raw ``uint32[2]`` with that default implementation, or typed
keys of that implementation); anything else is drawn by ``jax.random.normal`` itself, as is a
draw of more than :data:`GROUP` elements (one group's flat counters, keys and bits are
materialised side by side). ``tests/test_init_draw.py`` checks the equality per shape.

The families' init code (``transformer.init_params``, ``gpt2.init_params``) stays the one
description of the layout: :func:`init_batched` traces it twice with its ``_draw`` swapped, once
to collect the draws' keys and shapes, once to hand out the batched draws.

Measured on the 2-core machine (loaded: load average ~6), CPU seconds to trace and compile the
init of the tests' 2-layer configs, float32: GPT-2 8.0 -> 1.5, Llama GQA 6.3 -> 1.1, Gemma 2
6.4 -> 1.2, Qwen3 11.3 -> 1.4, NeoX 8.5 -> 1.3 (40.4 s -> 6.5 s for the five). Keying the hash by
concatenating one broadcast key per draw instead of gathering them compiled 4x longer (30 draws'
bits: 1.44 s vs 0.36 s). A large init runs a little longer: a 124M-parameter Llama-shaped config
in bfloat16 compiles in 3.3 s instead of 7.2 s of CPU and draws in 3.5 s instead of 2.6 s (the
per-element key gathers; its three 33M-element weights go to ``jax.random.normal``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Draws are hashed together in groups of at most this many elements (float32: 64 MiB each).
GROUP = 1 << 24

_LOCK = threading.Lock()


def _threefry2x32_p():
    from jax._src.random.threefry2x32 import threefry2x32_p

    return threefry2x32_p


def _raw_threefry_key(key):
    """``uint32[2]`` key data when ``key`` is a threefry2x32 key, else None."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32" or key.shape != ():
            return None
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,) or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key


def _normal_from_bits(bits):
    """``jax.random.normal``'s float32 conversion of 32 random bits, elementwise."""
    lo = np.nextafter(np.array(-1.0, np.float32), np.array(0.0, np.float32), dtype=np.float32)
    hi = np.array(1.0, np.float32)
    minval, maxval = lax.convert_element_type(lo, np.float32), lax.convert_element_type(hi, np.float32)
    float_bits = lax.shift_right_logical(bits, jnp.array(32 - 23, jnp.uint32))
    float_bits = lax.bitwise_or(float_bits, jnp.asarray(np.array(1.0, np.float32).view(np.uint32), dtype=jnp.uint32))
    floats = lax.bitcast_convert_type(float_bits, np.float32) - jnp.array(1.0, np.float32)
    u = lax.max(minval, floats * (maxval - minval) + minval)
    return lax.mul(np.array(np.sqrt(2), np.float32), lax.erf_inv(u))


def _segments(sizes):
    """For ``sum(sizes)`` flat elements: each one's segment (which draw) and its index within it.
    Computed in the program from the static segment starts (one compare-and-count, one gather):
    concatenating one broadcast key per draw compiled several times longer."""
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.uint32)
    index = lax.iota(np.uint32, int(sum(sizes)))
    segment = jnp.sum((index[:, None] >= jnp.asarray(starts[1:])[None, :]).astype(jnp.int32), axis=1)
    return segment, index - jnp.asarray(starts)[segment]


def _bits_partitionable(keys, sizes):
    """Each draw's 32 bits, end to end: ``b1 ^ b2`` of ``threefry2x32(key, (0, j))``."""
    segment, local = _segments(sizes)
    table = jnp.stack(keys)  # [draws, 2]
    b1, b2 = _threefry2x32_p().bind(table[:, 0][segment], table[:, 1][segment], jnp.zeros_like(local), local)
    return b1 ^ b2


def _bits_original(keys, sizes):
    """Each draw's 32 bits, end to end, in the original scheme: draw ``i`` of ``n`` elements
    hashes the pairs ``(j, j + h)``, ``j < h = ceil(n / 2)`` (a pad of 0 past ``n``), and is
    ``b1`` followed by ``b2``, cut to ``n``."""
    halves = np.array([(n + 1) // 2 for n in sizes], np.uint32)
    n_arr = np.array(sizes, np.uint32)
    segment, local = _segments([int(h) for h in halves])
    table = jnp.stack(keys)
    h = jnp.asarray(halves)[segment]
    x2 = jnp.where(local + h < jnp.asarray(n_arr)[segment], local + h, jnp.zeros_like(local))
    b1, b2 = _threefry2x32_p().bind(table[:, 0][segment], table[:, 1][segment], local, x2)
    # element j of draw i: b1[hs_i + j] for j < h_i, else b2[hs_i + j - h_i]
    half_starts = np.cumsum([0, *halves[:-1]]).astype(np.uint32)
    out_seg, out_local = _segments(sizes)
    hs, h = jnp.asarray(half_starts)[out_seg], jnp.asarray(halves)[out_seg]
    first = out_local < h
    where = jnp.where(first, hs + out_local, np.uint32(int(halves.sum())) + hs + out_local - h)
    return jnp.concatenate([b1, b2])[where]


def normal_many(requests):
    """``[jax.random.normal(key, shape, float32) for key, shape in requests]``, bit for bit, with
    the threefry draws hashed and converted together (see the module docstring)."""
    out: list = [None] * len(requests)
    group: list = []

    def flush():
        if not group:
            return
        keys = [k for _, k, _ in group]
        sizes = [int(np.prod(s, dtype=np.int64)) for _, _, s in group]
        bits = (_bits_partitionable if jax.config.jax_threefry_partitionable else _bits_original)(keys, sizes)
        flat = lax.optimization_barrier(_normal_from_bits(bits))
        pieces, start = [], 0
        for n in sizes:
            pieces.append(flat[start:start + n])
            start += n
        for (i, _, shape), piece in zip(group, pieces):
            out[i] = piece.reshape(shape)
        group.clear()

    total = 0
    for i, (key, shape) in enumerate(requests):
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        raw = _raw_threefry_key(key)
        if raw is None or size == 0 or size > GROUP:
            out[i] = jax.random.normal(key, shape, jnp.float32)
            continue
        if total + size > GROUP:
            flush()
            total = 0
        group.append((i, raw, shape))
        total += size
    flush()
    return out


@contextmanager
def _drawing_with(draw):
    """Within the block, this thread's family inits (``transformer.init_params``,
    ``gpt2.init_params``) draw through ``draw(key, shape)``; other threads keep the original."""
    from . import gpt2, transformer

    original = transformer._draw
    owner = threading.get_ident()

    def dispatch(key, shape):
        return draw(key, shape) if threading.get_ident() == owner else original(key, shape)

    with _LOCK:
        transformer._draw = gpt2._draw = dispatch
        try:
            yield
        finally:
            transformer._draw = gpt2._draw = original


def init_batched(family_init, config, key, dtype):
    """``family_init(config, key, dtype)`` traced with every normal draw made by :func:`normal_many`:
    a first trace records the draws' keys and shapes (its outputs are dropped), a second builds the
    parameters from the batched draws. Call inside ``jax.jit``."""
    requests: list = []

    def record(k, shape):
        requests.append((k, tuple(shape)))
        return jnp.zeros(shape, jnp.float32)

    with _drawing_with(record):
        family_init(config, key, dtype)
    draws = iter(normal_many(requests))
    shapes = iter(s for _, s in requests)

    def take(k, shape):
        expected = next(shapes)
        assert tuple(shape) == expected, (shape, expected)
        return lax.optimization_barrier(next(draws))  # as the family's own _draw

    with _drawing_with(take):
        return family_init(config, key, dtype)
