"""A plain NumPy GPT-2 forward in float64, written straight from the Hugging Face tensor layout.

Loops over heads and positions are fine here: this is the slow, obviously-correct twin that the
JAX model is checked against (it shares no code with jaxpatch, not even the weight conversion).
"""

from __future__ import annotations

import math

import numpy as np


def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def forward(tensors: dict, hf_config: dict, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits ``[B, T, V]`` and a few named activations, all float64.

    ``tensors`` are the checkpoint's arrays by HF name (``transformer.h.0.attn.c_attn.weight`` ...).
    """
    t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    n_layer, n_head, d = hf_config["n_layer"], hf_config["n_head"], hf_config["n_embd"]
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    dh = d // n_head
    B, T = tokens.shape
    x = t["transformer.wte.weight"][tokens] + t["transformer.wpe.weight"][np.arange(T)][None]
    acts = {}
    for layer in range(n_layer):
        p = lambda name: t[f"transformer.h.{layer}.{name}"]
        acts[f"blocks.{layer}.hook_resid_pre"] = x.copy()
        h = _layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
        qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        z = np.zeros((B, T, n_head, dh))
        pattern = np.zeros((B, n_head, T, T))
        for b in range(B):
            for head in range(n_head):
                sl = slice(head * dh, (head + 1) * dh)
                for i in range(T):
                    s = q[b, i, sl] @ k[b, : i + 1, sl].T / math.sqrt(dh)
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    pattern[b, head, i, : i + 1] = w
                    z[b, i, head] = w @ v[b, : i + 1, sl]
        acts[f"blocks.{layer}.attn.hook_pattern"] = pattern
        acts[f"blocks.{layer}.attn.hook_z"] = z
        attn_out = z.reshape(B, T, d) @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        x = x + attn_out
        h = _layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
        post = _gelu_new(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
        acts[f"blocks.{layer}.mlp.hook_post"] = post
        x = x + post @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
        acts[f"blocks.{layer}.hook_resid_post"] = x.copy()
    h = _layer_norm(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    w_u = t["lm_head.weight"] if "lm_head.weight" in t else t["transformer.wte.weight"]
    return h @ w_u.T, acts
