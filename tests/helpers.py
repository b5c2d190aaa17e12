"""Helpers shared by the tests (torch is imported lazily, only by the parity helpers)."""

from __future__ import annotations

import numpy as np


def random_tokens(config, batch=2, pos=8, seed=0):
    return np.random.default_rng(seed).integers(0, config.d_vocab, size=(batch, pos)).astype(np.int32)


def hf_gpt2(n_layers, d_model, n_heads, d_vocab, n_ctx, d_mlp=None, seed=0, act="gelu_new", tied=True, init_std=0.02):
    """A random-init ``transformers`` GPT2LMHeadModel with randomised LN params and biases too."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=d_vocab, n_positions=n_ctx,
        n_inner=d_mlp, activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tied, initializer_range=init_std,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


def tl_from_hf(hf_model, dtype="float32", device="cpu"):
    """A TransformerLens HookedTransformer with the HF model's weights, no folding or centering
    (on ``device``; the benchmarks pass ``"cuda"`` where they run on a GPU)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn=c.activation_function,
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", dtype=getattr(torch, dtype), device=device,
    )
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return tl.eval()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# The sweep a child process runs in the resume and multi-host tests (the parent runs the same one):
# random GPT-2 weights (seed 0, or the parent's from $JAXPATCH_TEST_WEIGHTS), prompts and arguments.
CHILD_SWEEP_SETUP = """
import os
import jax.numpy as jnp
import numpy as np, jaxpatch


def load_model(cfg):
    \"\"\"Random weights (seed 0), read from $JAXPATCH_TEST_WEIGHTS when the parent wrote them (random
    init is dozens of small eager compiles: seconds per process).\"\"\"
    path = os.environ.get("JAXPATCH_TEST_WEIGHTS")
    if not path:
        return jaxpatch.HookedModel.from_config(cfg, seed=0)
    params = {}
    with np.load(path) as z:
        for key in z.files:
            *outer, leaf = key.split("/")
            d = params
            for k in outer:
                d = d.setdefault(k, {})
            d[leaf] = jnp.asarray(z[key])
    return jaxpatch.HookedModel(cfg, params)
cfg = jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16)
model = load_model(cfg)
rng = np.random.default_rng(0)
clean = rng.integers(0, 50, (3, 8)).astype(np.int32)
corrupt = rng.integers(0, 50, (3, 8)).astype(np.int32)
KW = dict(site="resid_pre", answer=clean[:, -1], wrong=corrupt[:, -1], chunk_size=1, position_buckets=1,
          metrics=("logit_diff", "kl"))
"""


# Two local processes of one multi-host job (tests/test_multihost*.py): each child gets argv =
# process id, coordinator port, then the caller's arguments, and prints "CHILD DONE" at its end.
#: A child's start: join the 2-process job (2 CPU devices each), then the sweep above.
CHILD_PREAMBLE = """
import os, sys
pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import jax
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
assert (jax.device_count(), jax.local_device_count(), jax.process_count()) == (4, 2, 2)
""" + CHILD_SWEEP_SETUP


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_env(**extra: str) -> dict:
    """The children's environment: 2 CPU devices each (the test process's 8 are not inherited), and
    the test process's XLA backend optimisation level (tests/conftest.py), so that the children
    compile what the test process compiles (bitwise comparisons with it)."""
    import os
    import re

    level = re.findall(r"--xla_backend_optimization_level=\S+", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": " ".join(["--xla_force_host_platform_device_count=2"] + level[-1:]),
           "JAX_PLATFORMS": "cpu", **extra}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def child_env(tmp_path, model) -> dict:
    """:func:`two_process_env` with ``model``'s weights in a file, read by ``load_model`` of
    :data:`CHILD_SWEEP_SETUP` (random init in each child would be dozens of small compiles)."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    np.savez(tmp_path / "w.npz", **{"/".join(k.key for k in kp): np.asarray(v) for kp, v in flat})
    return two_process_env(JAXPATCH_TEST_WEIGHTS=str(tmp_path / "w.npz"))


def start_two(code: str, *args, env: dict) -> list:
    """Start ``code`` as processes 0 and 1 of one job (``python -c code pid port *args``), in the
    repository root."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    root = Path(__file__).resolve().parent.parent
    return [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), *map(str, args)], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def run_two(code: str, *args, env: dict, timeout: float = 300) -> list[tuple[int, str, str]]:
    """Run ``code`` as processes 0 and 1 of one job; each must finish within ``timeout`` seconds
    (both are killed otherwise), exit 0 and print "CHILD DONE". Returns ``(returncode, stdout,
    stderr)`` per process."""
    procs = start_two(code, *args, env=env)
    logs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            logs.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (rc, o, e) in enumerate(logs):
        assert rc == 0 and "CHILD DONE" in o, f"process {i}: rc={rc}\n{o[-2000:]}\n{e[-4000:]}"
    return logs
