"""HookedModel: a config, a params pytree and the pure forward pass, with TransformerLens-style
conveniences (``model(tokens)``, ``run_with_cache``) and input checking."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from . import interventions as _iv
from ._errors import InputError
from .cache import ActivationCache
from .config import ModelConfig
from .interventions import Interventions
from . import models
from .sites import SITES, all_full_names, check_available, name_filter, parse


@partial(jax.jit, static_argnames=("config", "capture"))
def _forward(config, params, tokens, interventions, capture, attention_mask=None):
    return models.forward(config, params, tokens, interventions, capture, attention_mask)


@partial(jax.jit, static_argnames=("config", "capture"))
def _forward_captures(config, params, tokens, capture, attention_mask=None):
    """``(logits of position 0 [B, V], captures)`` of a run without interventions: the captures
    of :func:`_forward` without unembedding every position (the vocabulary matmul is most of a
    small model's forward)."""
    rows = jnp.zeros((tokens.shape[0],), jnp.int32)
    return models.forward(config, params, tokens, None, capture, attention_mask, rows=rows)


def _spread_over_processes(params) -> bool:
    leaf = jax.tree_util.tree_leaves(params)[0]
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def check_tokens(config: ModelConfig, tokens) -> jax.Array:
    """Validate tokens and return them as ``int32 [batch, pos]`` (a 1-D array becomes batch 1).

    Concrete arrays are range-checked against the vocabulary; traced ones only by shape/dtype.
    """
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "ndim") or not hasattr(tokens, "dtype"):
        raise InputError(f"tokens must be an int array [batch, pos] or [pos], got {type(tokens).__name__}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"tokens must have an integer dtype, got {tokens.dtype}.")
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos] or [pos]; got shape {tuple(tokens.shape)}.")
    if tokens.shape[1] == 0:
        raise InputError("tokens has no positions (shape [batch, 0]).")
    if tokens.shape[1] > config.n_ctx:
        raise InputError(
            f"Sequence length {tokens.shape[1]} exceeds the model's context n_ctx={config.n_ctx}."
        )
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= config.d_vocab:
            bad = arr[(arr < 0) | (arr >= config.d_vocab)]
            raise InputError(
                f"Token ids must lie in [0, {config.d_vocab}) (d_vocab); got {sorted(set(bad.tolist()))[:10]}."
            )
    return jnp.asarray(tokens, dtype=jnp.int32)


def check_attention_mask(attention_mask, tokens):
    """Validate a padding mask for ``tokens`` ``[batch, pos]``: same shape, 0/1 values, every
    prompt with at least one real token, real tokens contiguous (left or right padding).
    Returns it as ``int32`` (``None`` stays ``None``)."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, jax.core.Tracer):
        return attention_mask.astype(jnp.int32)
    m = np.asarray(attention_mask)
    if m.ndim == 1:
        m = m[None, :]
    if m.shape != tuple(tokens.shape):
        raise InputError(f"attention_mask has shape {m.shape}; it must match the tokens, {tuple(tokens.shape)} "
                         "(1 = real token, 0 = padding).")
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
        raise InputError(f"attention_mask must hold 0/1 integers or booleans, got dtype {m.dtype}.")
    m = m.astype(np.int32)
    if np.any((m != 0) & (m != 1)):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (real token).")
    empty = np.flatnonzero(m.sum(1) == 0)
    if empty.size:
        raise InputError(f"attention_mask: prompt(s) {empty.tolist()} have no real token.")
    starts = np.diff(np.concatenate([np.zeros((m.shape[0], 1), np.int32), m], axis=1), axis=1)
    holes = np.flatnonzero((starts == 1).sum(1) > 1)
    if holes.size:
        raise InputError(f"attention_mask: the real tokens of prompt(s) {holes.tolist()} are not contiguous; "
                         "pad on the left or the right only.")
    return jnp.asarray(m)


def last_real_position(attention_mask, batch: int, T: int) -> np.ndarray:
    """Each prompt's last real token position ``[batch]`` (``T - 1`` without a mask)."""
    if attention_mask is None:
        return np.full((batch,), T - 1, np.int32)
    m = np.asarray(attention_mask)
    return (T - 1 - np.argmax(m[:, ::-1], axis=1)).astype(np.int32)


class HookedModel:
    """A transformer with named intervention points, as a pure function plus its parameters.

    Attributes:
        config: the static :class:`ModelConfig`.
        params: the parameter pytree (per-layer weights stacked on a leading layer axis).
        name: where it was loaded from, if anywhere.

    Example::

        model = jaxpatch.load_pretrained("path/to/gpt2-checkpoint")
        logits = model(tokens)                                   # [batch, pos, vocab]
        logits, cache = model.run_with_cache(tokens)             # cache["blocks.0.attn.hook_z"]
        iv = model.replace("blocks.2.hook_resid_pre", cache["blocks.2.hook_resid_pre"], pos=4)
        patched = model(other_tokens, interventions=iv)
    """

    def __init__(self, config: ModelConfig, params, name: str | None = None, tokenizer_path=None, tokenizer=None):
        self.config = config
        self.params = params
        self.name = name
        self.tokenizer_path = tokenizer_path
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> "HookedModel":
        """A model with random weights (for tests and toys)."""
        return cls(config, models.init_params(config, jax.random.PRNGKey(seed), dtype), name=f"random(seed={seed})")

    @property
    def dtype(self):
        return self.params["W_E"].dtype

    # ---------------------------------------------------------------------------------- running
    def run(self, tokens, interventions: Interventions | None = None, capture: Iterable[str] = (), attention_mask=None):
        """Pure forward: ``(logits, captures)`` with captures keyed by canonical site name
        (per-layer sites stacked ``[n_layers, ...]``). ``capture`` takes canonical or full names.
        ``attention_mask`` ``[batch, pos]`` (1 = real token) pads prompts of different lengths:
        each prompt gets the logits it would get alone (position ids count real tokens)."""
        tokens = check_tokens(self.config, tokens)
        mask = check_attention_mask(attention_mask, tokens)
        ivs = self._check_interventions(interventions, tokens)
        cap = frozenset(parse(n, self.config)[0] if n not in SITES else n for n in capture)
        for n in cap:
            check_available(n, self.config)
        out = _forward(self.config, self.params, tokens, ivs, cap, mask)
        if _spread_over_processes(self.params):  # every process holds the run whole (small next to the weights)
            from .multihost import replicated

            out = replicated(out)
        return out

    def _captures(self, tokens, capture: frozenset, attention_mask=None):
        """``(logits ShapeDtypeStruct [B, T, V], captures)`` of an unedited run of validated
        ``tokens`` and ``attention_mask``, capturing canonical sites ``capture``; the logits are
        described, not computed (callers that need only the captures skip the unembedding)."""
        row_logits, caps = _forward_captures(self.config, self.params, tokens, capture, attention_mask)
        if _spread_over_processes(self.params):
            from .multihost import replicated

            caps = replicated(caps)
        return jax.ShapeDtypeStruct(tokens.shape + row_logits.shape[-1:], row_logits.dtype), caps

    def __call__(self, tokens, interventions: Interventions | None = None, attention_mask=None):
        """Logits ``[batch, pos, d_vocab]`` for int tokens ``[batch, pos]`` (or ``[pos]``)."""
        return self.run(tokens, interventions, attention_mask=attention_mask)[0]

    def run_with_cache(
        self,
        tokens,
        names: Iterable[str] | Callable[[str], bool] | str | None = None,
        interventions: Interventions | None = None,
        attention_mask=None,
    ):
        """Run and keep activations: ``(logits, ActivationCache)``.

        Args:
            tokens: int array ``[batch, pos]`` or ``[pos]``.
            names: which activations to keep: ``None`` (all), a full name or list of full names
                (validated), or a predicate on full names (as TransformerLens's ``names_filter``).
            interventions: optional edits applied during the run.
        """
        keep, sites = name_filter(names, self.config)
        logits, caps = self.run(tokens, interventions, sites, attention_mask)
        return logits, ActivationCache(caps, tuple(keep), self.config.n_layers)

    def _check_interventions(self, ivs, tokens):
        if ivs is None:
            return _iv.NONE
        if not isinstance(ivs, Interventions):
            raise InputError(
                f"interventions must be a jaxpatch Interventions (from model.replace/zero/add/edit), "
                f"got {type(ivs).__name__}."
            )
        _iv.validate(ivs, self.config, tokens.shape[0], tokens.shape[1])
        return ivs

    # ---------------------------------------------------------------------------- interventions
    def edit(self, name: str, **kw) -> Interventions:
        """See :func:`jaxpatch.interventions.edit`."""
        return _iv.edit(self.config, name, **kw)

    def replace(self, name: str, value, **kw) -> Interventions:
        """Replace the activation at ``name`` by ``value`` where selected (``pos=``, ``head=`` ...)."""
        return _iv.replace(self.config, name, value, **kw)

    def zero(self, name: str, **kw) -> Interventions:
        """Zero-ablate the activation at ``name`` where selected."""
        return _iv.zero(self.config, name, **kw)

    def add(self, name: str, delta, **kw) -> Interventions:
        """Add ``delta`` to the activation at ``name`` where selected."""
        return _iv.add(self.config, name, delta, **kw)

    # ------------------------------------------------------------------------------------ text
    def _tok(self):
        if self.tokenizer is None:
            raise InputError(f"Model {self.name or ''} has no tokenizer (no tokenizer.json or vocab.json in its "
                             "checkpoint); give prompts as token ids.")
        return self.tokenizer

    def to_tokens(self, texts):
        """Text prompt(s) -> int32 tokens ``[batch, pos]`` (all prompts must have the same length)."""
        return self._tok().to_tokens(texts)

    def to_tokens_padded(self, texts, side: str = "right"):
        """Text prompts of different lengths -> ``(tokens, attention_mask)``, padded on ``side``."""
        return self._tok().to_tokens_padded(texts, side)

    def to_single_token(self, text: str) -> int:
        """The id of a one-token string (e.g. an answer); errors if it is several tokens."""
        return self._tok().to_single_token(text)

    def to_str_tokens(self, ids) -> list[str]:
        """One string per token id (for labels)."""
        return self._tok().decode_each(np.asarray(ids).reshape(-1).tolist())

    # ------------------------------------------------------------------------------------ info
    def site_shapes(self, batch: int = 1, pos: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every full site name with its activation shape for tokens ``[batch, pos]``."""
        pos = self.config.n_ctx if pos is None else pos
        return {n: SITES[parse(n)[0]].shape(self.config, batch, pos) for n in all_full_names(self.config)}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HookedModel({self.name or 'unnamed'}: {c.architecture}, n_layers={c.n_layers}, d_model={c.d_model}, "
            f"n_heads={c.n_heads}, d_mlp={c.d_mlp}, d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={self.dtype})"
        )
