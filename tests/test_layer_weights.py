"""Suffix runs read each layer's matmul weights as separate arrays (``sweep.PER_LAYER_WEIGHTS``,
``jaxpatch.models.layer_weights``): each matmul is a switch over the layers whose branch reads its
own array in place, instead of a copy of a dynamic slice of the stacked weight per layer and
chunk. Checked here: the views equal indexing the stack, the sweeps equal the stacked layout's
(the slow twin) for every path that reads the weights (packed, side rows, vectorised, entered at
``z``, per-head inputs, the read-rows-only last layer) in three families, and the compiled
program slices no weight while the twin's does."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sweep as sw
from jaxpatch.models import layer_weights as lw
from tests.test_matmul_major import CONFIGS, CORE, CHUNK_FN, _setup, compiled_sweep_text

D = 48  # tests.test_matmul_major's d_model (its GPT-2's d_mlp: 4 x 48)


def test_views_equal_indexing_the_stack():
    rng = np.random.default_rng(0)
    stacked = {"W_in": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32),
               "W_O:matmul_major": jnp.asarray(rng.normal(size=(3, 2, 4, 6)), jnp.float32),
               "b_in": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    per = lw.per_layer_blocks(stacked)
    assert lw.is_per_layer(per) and not lw.is_per_layer(stacked)
    assert isinstance(per["W_in"], lw.PerLayer) and not isinstance(per["b_in"], lw.PerLayer)
    assert len(per["W_in"].arrays) == 3 and per["W_in"].arrays[1].shape == (6, 5)
    x = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 7, 4, 2)), jnp.float32)

    @jax.jit
    def both(layer):
        w = lw.at(per["W_in"], layer)
        o = lw.map_weight(lw.at(per["W_O:matmul_major"], layer), lambda a: jnp.transpose(a, (1, 0, 2)))
        cols = lw.map_weight(w, lambda a: a[:, 1:4])
        got = (lw.mm("BTD,DF->BTF", x, w), lw.mm("BTNH,NHD->BTD", z, o), lw.mm("BTD,DF->BTF", x, cols), lw.value(cols),
               lw.at(per["b_in"], layer))
        ws, os_ = jax.lax.dynamic_index_in_dim(stacked["W_in"], layer, 0, False), jax.lax.dynamic_index_in_dim(
            stacked["W_O:matmul_major"], layer, 0, False)
        want = (jnp.einsum("BTD,DF->BTF", x, ws), jnp.einsum("BTNH,NHD->BTD", z, jnp.transpose(os_, (1, 0, 2))),
                jnp.einsum("BTD,DF->BTF", x, ws[:, 1:4]), ws[:, 1:4], stacked["b_in"][layer])
        return got, want

    for layer in range(3):
        got, want = both(jnp.int32(layer))
        for i, (g, w) in enumerate(zip(got, want)):
            if i < 3:  # products: the same sums, but XLA may pick another kernel (measured 4.8e-7 apart)
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * max(1.0, float(jnp.abs(w).max())))
            else:  # weights read out: exact
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _fresh(monkeypatch, per_layer):
    """Set the flag and drop the compiled sweep program (the flag is read when a sweep runs)."""
    monkeypatch.setattr(sw, "PER_LAYER_WEIGHTS", per_layer)
    CORE.clear_cache()
    seen = []

    def spy(config, params, *a, **k):
        seen.append(jaxpatch.models.is_per_layer(params["blocks"]))
        return CHUNK_FN(config, params, *a, **k)

    monkeypatch.setattr(sw, "_chunk_fn", spy)
    return seen


SWEEPS = [  # (site, by, pack): every reader of the block weights in a suffix run
    ("resid_pre", ("layer", "pos"), "auto"),  # packed, lead rows, read-rows-only last layer
    ("mlp_out", ("layer", "pos"), "auto"),  # packed side rows
    ("z", ("layer", "head", "pos"), False),  # vectorised chunks
    ("z", ("layer", "head"), "auto"),  # entered at z (the cached heads' outputs)
    ("q_input", ("layer", "head", "pos"), False),  # per-head inputs: the fused weights as a whole
]


#: The other families' weights differ in the MLP (gated: W_gate) and norms, read the same way:
#: every path for GPT-2, the packed and the vectorised one for them (CI time).
PATHS = {"gpt2": SWEEPS, "llama": SWEEPS[1:3], "gemma2": SWEEPS[:1] + SWEEPS[3:4]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_layer_weights_equal_the_stacked_layout(monkeypatch, name):
    m, clean, corrupt, kw = _setup(name)
    for site, by, pack in PATHS[name]:
        outs = {}
        for per_layer in (False, True):
            seen = _fresh(monkeypatch, per_layer)
            outs[per_layer] = jaxpatch.activation_patch(m, clean, corrupt, site=site, by=by, pack=pack,
                                                        metrics=("logit_diff", "kl"), **kw).per_prompt
            assert seen and set(seen) == {per_layer}, (site, by)  # traced again, with this layout
        assert np.ptp(outs[False]) > 1e-2
        # The same products read from other buffers: measured equal bit for bit; 1e-6 relative to
        # max(1, |value|) is the suite's convention for one computation laid out two ways.
        np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-6 * max(1.0, np.abs(outs[False]).max()),
                                   err_msg=f"{name} {site} {by}")
    monkeypatch.setattr(sw, "_chunk_fn", CHUNK_FN)


def _weight_slices(monkeypatch, per_layer):
    """Shapes of the dynamic slices (fused or not) in the compiled sweep program that have a
    layer's weight-matrix shape (GPT-2: fused QKV [D, 3D], W_O [H, N, D], W_in [D, F], W_out [F, D])."""
    _fresh(monkeypatch, per_layer)
    text = compiled_sweep_text(monkeypatch, "gpt2")
    F = 4 * D
    weights = {f"{D},{3 * D}", f"12,4,{D}", f"{D},{F}", f"{F},{D}"}
    out = re.findall(r"= f32\[([0-9,]+)\]\{[0-9,]+\} (?:dynamic-slice|fusion)\(([^\n]*)", text)
    return sorted(s for s, rest in out if s in weights and ("dynamic-slice" in rest or "dynamic_slice" in rest
                                                             or "dynamic-slice" in _called(text, rest)))


def _called(text: str, rest: str) -> str:
    """The body of the fused computation a fusion instruction calls (to see its dynamic slice)."""
    m = re.search(r"calls=(%?[\w.\-]+)", rest)
    if not m:
        return ""
    body = re.search(re.escape(m.group(1).lstrip("%")) + r" [^{]*\{(.*?)\n\}", text, re.S)
    return body.group(1) if body else ""


def test_no_layer_slices_its_weights(monkeypatch):
    assert _weight_slices(monkeypatch, True) == []
    assert _weight_slices(monkeypatch, False)  # the control: the stacked layout slices every layer's weights
