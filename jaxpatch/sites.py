"""The hook-site registry: every named intervention point and its axes, declared once.

Names follow TransformerLens. A *full* name carries the layer (``blocks.3.attn.hook_z``); a
*canonical* name does not (``blocks.attn.hook_z``): the layer is data, never part of the program.
:func:`parse` is the only string parser; :func:`full_name` is its inverse.

Axis vocabulary (the shape of one site's activation, batch first):

=========  ==========================================================
batch      prompts in the batch
pos        token position (``q_pos``/``k_pos``: destination/source positions of attention)
head       attention head
d_head     width of one head
d_model    residual-stream width
d_mlp      MLP hidden width
scale      a length-1 axis (layer-norm scale factors)
=========  ==========================================================
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

from ._errors import UnknownSiteError, closest
from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Site:
    """One intervention point: its canonical name, whether it repeats per block, and its axes."""

    name: str
    per_layer: bool
    axes: tuple[str, ...]

    def shape(self, config: ModelConfig, batch: int, pos: int) -> tuple[int, ...]:
        """Shape of this site's activation (one layer) for a ``[batch, pos]`` token array."""
        sizes = {
            "batch": batch,
            "pos": pos,
            "q_pos": pos,
            "k_pos": pos,
            "head": config.n_heads,
            "d_head": config.d_head,
            "d_model": config.d_model,
            "d_mlp": config.d_mlp,
            "scale": 1,
        }
        return tuple(sizes[a] for a in self.axes)


_RESID = ("batch", "pos", "d_model")
_HEADS = ("batch", "pos", "head", "d_head")
_PATTERN = ("batch", "head", "q_pos", "k_pos")
_SCALE = ("batch", "pos", "scale")
_MLP = ("batch", "pos", "d_mlp")

#: Every site, in execution order. The forward pass calls each exactly once per layer.
SITES: dict[str, Site] = {
    s.name: s
    for s in [
        Site("hook_embed", False, _RESID),
        Site("hook_pos_embed", False, _RESID),
        Site("blocks.hook_resid_pre", True, _RESID),
        Site("blocks.ln1.hook_scale", True, _SCALE),
        Site("blocks.ln1.hook_normalized", True, _RESID),
        Site("blocks.attn.hook_q", True, _HEADS),
        Site("blocks.attn.hook_k", True, _HEADS),
        Site("blocks.attn.hook_v", True, _HEADS),
        Site("blocks.attn.hook_attn_scores", True, _PATTERN),
        Site("blocks.attn.hook_pattern", True, _PATTERN),
        Site("blocks.attn.hook_z", True, _HEADS),
        Site("blocks.hook_attn_out", True, _RESID),
        Site("blocks.hook_resid_mid", True, _RESID),
        Site("blocks.ln2.hook_scale", True, _SCALE),
        Site("blocks.ln2.hook_normalized", True, _RESID),
        Site("blocks.mlp.hook_pre", True, _MLP),
        Site("blocks.mlp.hook_post", True, _MLP),
        Site("blocks.hook_mlp_out", True, _RESID),
        Site("blocks.hook_resid_post", True, _RESID),
        Site("ln_final.hook_scale", False, _SCALE),
        Site("ln_final.hook_normalized", False, _RESID),
    ]
}

BLOCK_SITES = tuple(n for n, s in SITES.items() if s.per_layer)
GLOBAL_SITES = tuple(n for n, s in SITES.items() if not s.per_layer)

#: TransformerLens-style short names accepted by :func:`resolve` and ``cache[short, layer]``.
SHORT_NAMES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
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
    "scale": "ln_final.hook_scale",
    "normalized": "ln_final.hook_normalized",
}

_LAYER_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def all_full_names(config: ModelConfig) -> list[str]:
    """Every full site name of a model, in execution order."""
    head = [n for n in GLOBAL_SITES if not n.startswith("ln_final")]
    tail = [n for n in GLOBAL_SITES if n.startswith("ln_final")]
    blocks = [full_name(b, layer) for layer in range(config.n_layers) for b in BLOCK_SITES]
    return head + blocks + tail


def full_name(canonical: str, layer: int | None = None) -> str:
    """``("blocks.attn.hook_z", 3) -> "blocks.3.attn.hook_z"``; global sites take no layer."""
    if SITES[canonical].per_layer:
        return canonical.replace("blocks.", f"blocks.{layer}.", 1)
    return canonical


def parse(name: str, config: ModelConfig | None = None) -> tuple[str, int | None]:
    """Split a full site name into ``(canonical name, layer)``.

    ``parse("blocks.3.attn.hook_z") == ("blocks.attn.hook_z", 3)``;
    ``parse("hook_embed") == ("hook_embed", None)``. With a config, the layer is range-checked
    and negative layers count from the end.

    Raises:
        UnknownSiteError: the name is not a site (the closest valid name is suggested), or its
            layer is out of range for ``config``.
    """
    if not isinstance(name, str):
        raise UnknownSiteError(f"A site name must be a string, got {type(name).__name__}.")
    m = _LAYER_RE.match(name)
    if m:
        canonical, layer = "blocks." + m.group(2), int(m.group(1))
        if canonical not in SITES or not SITES[canonical].per_layer:
            _unknown(name, config)
        if config is not None:
            if not -config.n_layers <= layer < config.n_layers:
                raise UnknownSiteError(
                    f"Layer {layer} in site {name!r} is out of range: the model has "
                    f"{config.n_layers} layers (valid 0..{config.n_layers - 1}, or negative from the end)."
                )
            layer %= config.n_layers
        return canonical, layer
    if name in SITES and not SITES[name].per_layer:
        return name, None
    if name in SITES:  # a per-layer site without its layer
        raise UnknownSiteError(
            f"Site {name!r} repeats in every block; name the layer, e.g. {full_name(name, 0)!r}."
        )
    _unknown(name, config)
    raise AssertionError  # unreachable


def canonical(name: str) -> str:
    """Canonical name from a canonical, full or short name (``"z"``, ``"blocks.0.attn.hook_z"``)."""
    if name in SITES:
        return name
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    return parse(name)[0]


def _unknown(name: str, config: ModelConfig | None):
    valid = all_full_names(config) if config is not None else list(SITES)
    hint = closest(name, valid)
    raise UnknownSiteError(
        f"Unknown site {name!r}.{hint} Valid sites: {', '.join(SITES)} "
        f"(per-layer sites take the layer after 'blocks.', e.g. 'blocks.0.hook_resid_pre')."
    )


def name_filter(names: Iterable[str] | Callable[[str], bool] | str | None, config: ModelConfig):
    """Normalise a ``names`` argument into (the set of full names kept, canonical sites to capture).

    ``None`` keeps everything; a string or list names full sites (each validated); a callable is a
    predicate on full names.
    """
    every = all_full_names(config)
    if names is None:
        keep = every
    elif callable(names):
        keep = [n for n in every if names(n)]
    else:
        if isinstance(names, str):
            names = [names]
        keep = []
        for n in names:
            c, layer = parse(n, config)
            keep.append(full_name(c, layer))
    sites = frozenset(parse(n)[0] for n in keep)
    return keep, sites
