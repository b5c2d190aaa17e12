"""Float32 matmuls in full float32 on every platform.

JAX's default matmul precision leans toward speed on accelerators: a float32 ``dot`` may run in
TensorFloat-32 on recent NVIDIA GPUs (10 mantissa bits) or in bfloat16 passes on TPU. A patching
effect is a difference of two nearly equal forward passes, so that rounding can move it by more than
the effect itself, and the answer would differ from TransformerLens / ``transformers`` (which keep
float32 matmuls in float32) without any error. So, on import, jaxpatch sets JAX's
``jax_default_matmul_precision`` to ``"float32"`` (``HIGHEST``) — unless it was set already
(``JAX_DEFAULT_MATMUL_PRECISION`` in the environment, or ``jax.config.update`` before the import),
in which case the user's explicit choice is kept. On CPU this changes nothing: XLA's CPU matmuls are
float32 either way.
"""

from __future__ import annotations

import jax

#: the precision jaxpatch asks for when the user has not chosen one
FULL = "float32"


def ensure_full_float32() -> str:
    """Set ``jax_default_matmul_precision`` to :data:`FULL` unless the user already chose a value;
    returns the precision in effect."""
    current = jax.config.jax_default_matmul_precision
    if current is None:
        jax.config.update("jax_default_matmul_precision", FULL)
        return FULL
    return current
