"""Float32 matmuls stay float32 on every platform (jaxpatch.precision): JAX's GPU default is
TensorFloat-32, which would move patching effects without an error. On CPU the HLO's precision
flags are the checkable part."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxpatch
from jaxpatch import models


def _dots(text: str) -> list[str]:
    return [line for line in text.splitlines() if "dot_general" in line]


def _import_and_read(env_value):
    env = {k: v for k, v in os.environ.items() if k != "JAX_DEFAULT_MATMUL_PRECISION"}
    if env_value is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = env_value
    code = "import jax, jaxpatch; print(jax.config.jax_default_matmul_precision)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif("JAX_DEFAULT_MATMUL_PRECISION" in os.environ, reason="the user chose a precision for this run")
def test_model_matmuls_are_highest_precision():
    cfg = jaxpatch.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16)
    model = jaxpatch.HookedModel.from_config(cfg, seed=0)
    tokens = jnp.zeros((2, 8), jnp.int32)
    text = jax.jit(lambda p, t: models.forward(cfg, p, t)[0]).lower(model.params, tokens).as_text()
    dots = _dots(text)
    assert len(dots) >= 6, "expected the block and unembedding matmuls in the lowered forward"
    assert all("HIGHEST" in d for d in dots), [d for d in dots if "HIGHEST" not in d][:3]


def test_import_sets_float32_when_unset():
    assert _import_and_read(None) == "float32"


def test_import_keeps_the_users_choice():
    assert _import_and_read("tensorfloat32") == "tensorfloat32"
