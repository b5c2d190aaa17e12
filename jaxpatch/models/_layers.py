"""Pure building blocks shared by the model families.

Einsum letter legend (used in every model file):
    B batch, T query position, S key position, N head, H d_head, D d_model, F d_mlp, V vocab,
    L layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..interventions import Interventions, apply_edits


def activation(name: str, x):
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")  # configs validate this earlier


class SiteHandler:
    """Applies interventions and records captures at named sites during one forward pass.

    Model code calls ``x = hs(name, x)`` exactly once per site (per layer); this is the whole
    mechanism: no hooks, no global state. ``layer`` is the traced layer index inside the scan.


    ``pos_offset`` (static) says the activations cover positions ``pos_offset..`` of the sequence
    only (a suffix run that reuses a cached prefix); indices and full-length values are then
    interpreted in whole-sequence coordinates.
    """

    def __init__(self, ivs: Interventions, capture: frozenset, layer=None, pos_offset: int = 0):
        self.ivs = ivs
        self.capture = capture
        self.layer = layer
        self.pos_offset = pos_offset
        self.captured: dict = {}

    def wants(self, *names: str) -> bool:
        """Whether any of these sites is edited or captured in this pass (static): lets the model
        compute a site's activation only when someone reads or changes it (per-head inputs and
        outputs), with identical results either way."""
        return any(n in self.capture or n in self.ivs.edits for n in names)

    def __call__(self, name: str, act):
        edits = self.ivs.edits.get(name)
        if edits:
            act = apply_edits(name, act, edits, self.layer, self.pos_offset)
        if name in self.capture:
            self.captured[name] = act
        return act


def layer_norm(x, w, b, eps, hs: SiteHandler, prefix: str):
    """LayerNorm with TransformerLens's sites: ``{prefix}.hook_scale`` and ``{prefix}.hook_normalized``
    (the normalised input, before the affine weight and bias)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    scale = hs(f"{prefix}.hook_scale", jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps).astype(x.dtype))
    normalized = hs(f"{prefix}.hook_normalized", (x32 / scale).astype(x.dtype))
    return normalized * lift(w, x.ndim) + lift(b, x.ndim)


def rms_norm(x, w, eps, hs: SiteHandler, prefix: str):
    """RMSNorm with the same sites as :func:`layer_norm` (``hook_scale`` is the root mean square;
    ``hook_normalized`` the input divided by it, before the weight)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    scale = hs(f"{prefix}.hook_scale", jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps).astype(x.dtype))
    normalized = hs(f"{prefix}.hook_normalized", (x32 / scale).astype(x.dtype))
    return normalized * lift(w, x.ndim)


def lift(a, ndim: int):
    """Prepend unit axes so ``a`` has rank ``ndim`` (explicit broadcasting; rank promotion may be off)."""
    return jnp.reshape(a, (1,) * (ndim - jnp.ndim(a)) + jnp.shape(a))
