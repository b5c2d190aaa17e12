"""Parity with `transformers` and TransformerLens on identical (random) weights."""

import numpy as np
import pytest

import jaxpatch
from tests.helpers import hf_gpt2, random_tokens, rel_err, tl_from_hf

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
pytestmark = pytest.mark.torch

SHAPES = [
    # n_layers, d_model, n_heads, d_vocab, n_ctx, d_mlp, act, tied
    (1, 16, 2, 37, 12, None, "gelu_new", True),
    (3, 48, 6, 101, 20, 80, "gelu_new", True),
    (2, 64, 4, 257, 32, None, "gelu", False),
    (4, 32, 8, 50, 16, 96, "relu", True),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"L{s[0]}D{s[1]}N{s[2]}V{s[3]}-{s[6]}-{'tied' if s[7] else 'untied'}")
def pair(request, tmp_path_factory):
    n_layers, d_model, n_heads, d_vocab, n_ctx, d_mlp, act, tied = request.param
    hf = hf_gpt2(n_layers, d_model, n_heads, d_vocab, n_ctx, d_mlp, seed=sum(request.param[:5]), act=act, tied=tied)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(path)
    return hf, jaxpatch.load_pretrained(path), path


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    tokens = random_tokens(model.config, batch=3, pos=model.config.n_ctx, seed=1)
    with torch.no_grad():
        expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(model(tokens))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def test_every_cached_activation_matches_transformer_lens(pair):
    hf, model, _ = pair
    tl = tl_from_hf(hf)
    tokens = random_tokens(model.config, batch=2, pos=model.config.n_ctx - 1, seed=2)
    with torch.no_grad():
        tl_logits, tl_cache = tl.run_with_cache(torch.tensor(tokens, dtype=torch.long))
    logits, cache = model.run_with_cache(tokens)
    assert rel_err(logits, tl_logits.numpy()) < 1e-4
    checked = 0
    for name in cache:
        assert name in tl_cache, f"TransformerLens has no {name}"
        ours, theirs = np.asarray(cache[name]), tl_cache[name].numpy()
        assert ours.shape == theirs.shape, name
        if name.endswith("hook_attn_scores"):  # masked entries are -inf in both
            assert np.array_equal(np.isneginf(ours), np.isneginf(theirs)), name
            ours, theirs = np.where(np.isneginf(ours), 0, ours), np.where(np.isneginf(theirs), 0, theirs)
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=name)
        checked += 1
    # Every TransformerLens hook of these models that jaxpatch also declares was compared.
    assert checked == len(jaxpatch.sites.all_full_names(model.config))


def test_float64_matches_transformers_float64(pair, x64):
    hf, _, path = pair
    model = jaxpatch.load_pretrained(path, dtype="float64")
    tokens = random_tokens(model.config, batch=2, pos=model.config.n_ctx, seed=3)
    with torch.no_grad():
        expected = hf.double()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    hf.float()
    assert rel_err(model(tokens), expected) < 1e-10


def test_gradients_match_transformers(pair):
    """The gradient of a scalar of the logits w.r.t. every weight equals ``transformers``'; for a
    tied checkpoint the embedding's gradient holds both of its uses (embedding and unembedding),
    as the one ``wte`` tensor's does, and there is no separate ``W_U``."""
    import jax

    from jaxpatch import models

    hf, model, _ = pair
    tied = hf.config.tie_word_embeddings
    assert ("W_U" in model.params) != tied and "b_U" not in model.params
    tokens = random_tokens(model.config, batch=2, pos=model.config.n_ctx // 2, seed=4)

    def loss(p):
        return jax.nn.logsumexp(models.forward(model.config, p, tokens)[0], axis=-1).mean()

    grads = jax.grad(loss)(model.params)
    hf.zero_grad(set_to_none=True)
    torch.logsumexp(hf(torch.tensor(tokens, dtype=torch.long)).logits, dim=-1).mean().backward()
    theirs = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    c = model.config
    D = c.d_model
    pairs = [(grads["W_E"], theirs["transformer.wte.weight"]), (grads["W_pos"], theirs["transformer.wpe.weight"]),
             (grads["ln_f_w"], theirs["transformer.ln_f.weight"])]
    if not tied:
        pairs.append((grads["W_U"], theirs["lm_head.weight"].T))
    b = grads["blocks"]
    for i in range(c.n_layers):
        h = f"transformer.h.{i}."
        qkv = theirs[h + "attn.c_attn.weight"]
        for j, w in enumerate(("W_Q", "W_K", "W_V")):
            pairs.append((b[w][i], qkv[:, j * D:(j + 1) * D].reshape(D, c.n_heads, c.d_head).transpose(1, 0, 2)))
        pairs += [(b["W_O"][i], theirs[h + "attn.c_proj.weight"].reshape(c.n_heads, c.d_head, D)),
                  (b["W_in"][i], theirs[h + "mlp.c_fc.weight"]), (b["W_out"][i], theirs[h + "mlp.c_proj.weight"]),
                  (b["b_in"][i], theirs[h + "mlp.c_fc.bias"]), (b["ln1_w"][i], theirs[h + "ln_1.weight"])]
    for ours, ref in pairs:
        assert np.asarray(ours).shape == ref.shape
        assert rel_err(ours, ref) < 1e-4
