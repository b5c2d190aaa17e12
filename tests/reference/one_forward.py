"""The slow, obviously-correct twin of :func:`jaxpatch.activation_patch`: one full forward per patch.

Built only from the public single-forward API -- ``model.run(tokens, ivs, capture=)``,
``model(tokens, ivs)``, ``model.edit`` / ``model.add`` and ``jaxpatch.combine`` -- and plain NumPy.
It never calls into ``jaxpatch.sweep``, ``jaxpatch.patching`` or ``jaxpatch.metrics``: the
metrics are re-implemented here in float64 from the float32 logits.

Semantics it encodes (the *intended* ones):

* a patch is a row of one or more components; a component is a dict of grid indices
  (``layer`` always, optionally ``pos``, ``head``, ``neuron``, ``dest_pos``, ``src_pos``); it
  patches exactly the indices it gives and every index of an axis it does not give; a row patches
  the union of its components. Each row becomes one boolean mask over the whole stacked activation
  ``[n_layers, 1, ...]`` and one ``model.edit(site, value=source, mask=mask, stacked=True)``.
* denoising runs the corrupted prompts (or the noised clean prompts) and patches in the clean
  activations; noising runs the clean prompts and patches in the corrupted (resample), noised
  (noise), mean-over-reference (mean) or zero (zero) activations.
* the ROME noise baseline adds ``normal(PRNGKey(seed), (n_noise*B, T, d_model)) * noise_scale *
  std(W_E)`` to ``hook_embed`` at ``noise_positions`` (zero elsewhere); the ``n_noise`` copies of
  the batch are sample-major (prompt ``b`` of sample ``s`` is row ``s*B + b``).
* the mean baseline is the float64 mean over the reference prompts, rounded to float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

import jaxpatch

#: Short site names the fuzz uses -> canonical names (TransformerLens names without the layer).
CANONICAL = {
    "resid_pre": "blocks.hook_resid_pre",
    "resid_mid": "blocks.hook_resid_mid",
    "resid_post": "blocks.hook_resid_post",
    "attn_out": "blocks.hook_attn_out",
    "mlp_out": "blocks.hook_mlp_out",
    "q": "blocks.attn.hook_q",
    "k": "blocks.attn.hook_k",
    "v": "blocks.attn.hook_v",
    "z": "blocks.attn.hook_z",
    "attn_scores": "blocks.attn.hook_attn_scores",
    "pattern": "blocks.attn.hook_pattern",
    "pre": "blocks.mlp.hook_pre",
    "post": "blocks.mlp.hook_post",
}

#: Grid/component index name -> the site axis it indexes.
AXIS_OF = {"pos": "pos", "head": "head", "neuron": "d_mlp", "dest_pos": "q_pos", "src_pos": "k_pos"}

BUILTIN_METRICS = ("logit_diff", "logprob", "prob", "kl", "accuracy", "top2_accuracy", "rank")
DISCRETE_METRICS = ("accuracy", "top2_accuracy", "rank")


# ------------------------------------------------------------------------------------------------
# Metrics, float64 NumPy


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def metric_values(names: Sequence, logits, answer, wrong, clean_logits) -> np.ndarray:
    """``[len(names), B]`` float64 metric values from answer-position logits ``[B, V]``."""
    lg = np.asarray(logits, np.float64)
    b = np.arange(lg.shape[0])
    a_logit = lg[b, answer]
    lp = log_softmax(lg)
    rank = (lg > a_logit[:, None]).sum(axis=-1).astype(np.float64)
    out = []
    for n in names:
        if callable(n):
            out.append(np.asarray(n(lg), np.float64))
        elif n == "logit_diff":
            out.append(a_logit - lg[b, wrong])
        elif n == "logprob":
            out.append(lp[b, answer])
        elif n == "prob":
            out.append(np.exp(lp[b, answer]))
        elif n == "kl":
            clp = log_softmax(clean_logits)
            out.append((np.exp(clp) * (clp - lp)).sum(axis=-1))
        elif n == "rank":
            out.append(rank)
        elif n == "accuracy":
            out.append((rank < 1).astype(np.float64))
        elif n == "top2_accuracy":
            out.append((rank < 2).astype(np.float64))
        else:
            raise ValueError(f"unknown metric {n!r}")
    return np.stack(out)


def near_tie(logits, answer, tol: float) -> np.ndarray:
    """``[B]`` bool: some other token's logit is within ``tol`` of the answer's (rank and accuracy
    are then decided by float32 rounding, not by the model)."""
    lg = np.asarray(logits, np.float64)
    b = np.arange(lg.shape[0])
    d = np.abs(lg - lg[b, answer][:, None])
    d[b, answer] = np.inf
    return (d <= tol).any(axis=-1)


# ------------------------------------------------------------------------------------------------
# Patches


def grid_rows(config, by: Sequence[str], n_pos: int) -> tuple[list[list[dict]], tuple[int, ...]]:
    """Every cell of a ``by`` grid (C order over the axes as given) as a one-component row."""
    size = {"layer": config.n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos,
            "head": config.n_heads, "neuron": config.d_mlp}
    shape = tuple(size[a] for a in by)
    rows = [[{a: int(i) for a, i in zip(by, cell)}] for cell in np.ndindex(*shape)]
    return rows, shape


def row_mask(site: str, act_shape: tuple[int, ...], row: Sequence[dict]) -> np.ndarray:
    """Boolean mask ``[n_layers, 1, *act_shape[2:]]`` of a row (union of its components) over the
    stacked activation ``act_shape = [n_layers, batch, ...]``."""
    axes = jaxpatch.SITES[site].axes  # ("batch", ...), one layer's activation
    mask = np.zeros((act_shape[0], 1) + tuple(act_shape[2:]), bool)
    for comp in row:
        sl = [int(comp["layer"]), slice(None)] + [slice(None)] * (len(axes) - 1)
        for key, val in comp.items():
            if key == "layer":
                continue
            sl[1 + axes.index(AXIS_OF[key])] = int(val)
        mask[tuple(sl)] = True
    return mask


# ------------------------------------------------------------------------------------------------
# The reference sweep


def embedding_noise(model, batch: int, n_pos: int, positions, scale: float, n_samples: int, seed: int) -> np.ndarray:
    """The ROME corruption as a dense ``[n_samples*batch, n_pos, d_model]`` addition to
    ``hook_embed``: Gaussian noise at ``positions`` (indices, negative ones counting from the end,
    or a boolean mask with one entry per position), zero elsewhere."""
    std = float(np.std(np.asarray(model.params["W_E"], np.float32).astype(np.float64)))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n_samples * batch, n_pos, model.config.d_model)))
    keep = np.zeros((1, n_pos, 1), bool)
    keep[:, np.asarray(positions)] = True
    return np.where(keep, noise * np.float32(scale * std), 0.0).astype(np.float32)


class _Runner:
    """Every reference forward has the same intervention structure -- a dense addition at
    ``hook_embed`` and one masked replacement at the patched site (both no-ops when unused) -- and
    captures the patched site, so an example compiles one forward per batch size."""

    def __init__(self, model, site: str, n_pos: int):
        self.model, self.site, self.n_pos = model, site, n_pos
        cfg = model.config
        self.act = lambda b: (cfg.n_layers,) + jaxpatch.SITES[site].shape(cfg, b, n_pos)  # noqa: E731

    def __call__(self, tokens, *, delta=None, source=None, mask=None):
        """``(logits [B, T, V], activation at the site [L, B, ...])``, both NumPy."""
        tokens = np.asarray(tokens)
        b = tokens.shape[0]
        shape = self.act(b)
        if delta is None:
            delta = np.zeros((b, self.n_pos, self.model.config.d_model), np.float32)
        if mask is None:
            source, mask = np.zeros(shape, np.float32), np.zeros((shape[0], 1) + shape[2:], bool)
        source = np.broadcast_to(np.asarray(source, np.float32), shape)
        iv = jaxpatch.combine(self.model.add("hook_embed", delta),
                              self.model.edit(self.site, value=source, mask=mask, stacked=True))
        logits, caps = self.model.run(tokens, iv, capture={self.site})
        return np.asarray(logits), np.asarray(caps[self.site])


def _rows_at(logits, apos: np.ndarray) -> np.ndarray:
    return logits[np.arange(logits.shape[0]), apos]


def reference_patch(
    model,
    clean,
    corrupt=None,
    *,
    site: str,
    rows: Sequence[Sequence[dict]],
    direction: str,
    baseline: str,
    metrics: Sequence[str | Callable],
    answer,
    wrong,
    answer_pos,
    reference_tokens=None,
    noise_positions=None,
    noise_scale: float = 3.0,
    n_noise: int = 10,
    seed: int = 0,
) -> dict:
    """One forward per (corrupted set, row). Returns float64 arrays:

    * ``per_prompt``: ``[S, P, M, B']`` (``S`` corrupted sets, 1 unless ``corrupt`` is 3-D;
      ``B' = n_noise * B`` for the noise baseline),
    * ``clean``: ``[M, B']``; ``corrupt``: ``[S, M, B']`` or ``None``,
    * ``patched_logits`` ``[S, P, B', V]``, ``clean_logits`` ``[B', V]``, ``corrupt_logits``
      ``[S, B', V]`` or ``None``: the float32 answer-position logits the metrics were read from,
    * ``answer``/``wrong`` ``[B']``: the per-row tokens.
    """
    c = CANONICAL.get(site, site)
    clean = np.asarray(clean)
    B, T = clean.shape
    tok = lambda x: np.broadcast_to(np.asarray(x), (B,)).astype(np.int64)  # noqa: E731
    ans, wr, apos = tok(answer), tok(wrong), tok(answer_pos) % T
    fwd = _Runner(model, c, T)

    corrupt_sets = None
    if corrupt is not None:
        ct = np.asarray(corrupt)
        corrupt_sets = ct if ct.ndim == 3 else ct[None]

    rep = n_noise if baseline == "noise" else 1
    ans_r, wr_r, apos_r = np.tile(ans, rep), np.tile(wr, rep), np.tile(apos, rep)
    clean_full, clean_act = fwd(clean)
    clean_lg_r = np.tile(_rows_at(clean_full, apos), (rep, 1))
    tile_batch = lambda a, n: np.tile(a, (1, n) + (1,) * (a.ndim - 2))  # noqa: E731

    # (run tokens, embedding addition of the run, source of the patched values) per set
    runs = []
    corrupt_lg = None
    if baseline == "resample":
        assert corrupt_sets is not None
        corrupt_lg = []
        for ct in corrupt_sets:
            lg, act = fwd(ct)
            corrupt_lg.append(_rows_at(lg, apos))
            runs.append((ct, None, clean_act) if direction == "denoise" else (clean, None, act))
        corrupt_lg = np.stack(corrupt_lg)
    elif baseline == "noise":
        noisy = np.tile(clean, (n_noise, 1))
        delta = embedding_noise(model, B, T, noise_positions, noise_scale, n_noise, seed)
        lg, noisy_act = fwd(noisy, delta=delta)
        corrupt_lg = _rows_at(lg, apos_r)[None]
        if direction == "denoise":
            runs.append((noisy, delta, tile_batch(clean_act, n_noise)))
        else:
            runs.append((noisy, None, noisy_act))
    else:
        assert direction == "noise"
        if corrupt_sets is not None:
            assert corrupt_sets.shape[0] == 1, "mean/zero ablation takes one corrupted set (normalisation only)"
            corrupt_lg = _rows_at(fwd(corrupt_sets[0])[0], apos)[None]
        if baseline == "mean":
            ref = reference_tokens if reference_tokens is not None else (
                corrupt_sets[0] if corrupt_sets is not None else clean)
            src = fwd(np.asarray(ref))[1].astype(np.float64).mean(axis=1, keepdims=True)
        else:
            src = np.zeros((1, 1), np.float64)
        runs.append((clean, None, src))

    per_lg = []
    for run_tokens, delta, source in runs:
        act_shape = fwd.act(run_tokens.shape[0])
        per_lg.append(np.stack([
            _rows_at(fwd(run_tokens, delta=delta, source=source, mask=row_mask(c, act_shape, row))[0], apos_r)
            for row in rows]))
    per_lg = np.stack(per_lg)  # [S, P, B', V]

    vals = lambda lg: metric_values(metrics, lg, ans_r, wr_r, clean_lg_r)  # noqa: E731
    per = np.stack([np.stack([vals(lg) for lg in s]) for s in per_lg])
    return {
        "per_prompt": per,
        "clean": vals(clean_lg_r),
        "corrupt": None if corrupt_lg is None else np.stack([vals(lg) for lg in corrupt_lg]),
        "patched_logits": per_lg,
        "clean_logits": clean_lg_r,
        "corrupt_logits": corrupt_lg,
        "answer": ans_r,
        "wrong": wr_r,
    }
