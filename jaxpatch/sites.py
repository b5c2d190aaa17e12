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
    """One intervention point: its canonical name, whether it repeats per block, and its axes.

    ``kv``: its ``head`` axis counts key/value heads (``n_kv_heads``; fewer than the query heads
    under grouped-query attention). ``requires``: the model feature the site needs (``"rotary"``,
    ``"gated_mlp"``, ``"post_norms"``), or ``None`` if every model has it.
    """

    name: str
    per_layer: bool
    axes: tuple[str, ...]
    kv: bool = False
    requires: str | None = None

    def shape(self, config: ModelConfig, batch: int, pos: int) -> tuple[int, ...]:
        """Shape of this site's activation (one layer) for a ``[batch, pos]`` token array."""
        return tuple(self.axis_size(config, a, batch, pos) for a in self.axes)

    def axis_size(self, config: ModelConfig, axis: str, batch: int = 1, pos: int | None = None) -> int:
        sizes = {
            "batch": batch,
            "pos": config.n_ctx if pos is None else pos,
            "q_pos": config.n_ctx if pos is None else pos,
            "k_pos": config.n_ctx if pos is None else pos,
            "head": config.n_kv_heads if self.kv else config.n_heads,
            "d_head": config.d_head,
            "d_model": config.d_model,
            "d_mlp": config.d_mlp,
            "scale": 1,
        }
        return sizes[axis]

    def available(self, config: ModelConfig) -> bool:
        """Whether models of this config have this site."""
        if self.requires == "rotary":
            return config.positional == "rotary"
        if self.requires == "learned":
            return config.positional == "learned"
        if self.requires == "gated_mlp":
            return config.gated_mlp
        if self.requires == "post_norms":
            return config.post_norms
        return True


_RESID = ("batch", "pos", "d_model")
_HEADS = ("batch", "pos", "head", "d_head")
_HEAD_IN = ("batch", "pos", "head", "d_model")
_PATTERN = ("batch", "head", "q_pos", "k_pos")
_SCALE = ("batch", "pos", "scale")
_MLP = ("batch", "pos", "d_mlp")

#: Every site, in execution order. The forward pass calls each exactly once per layer (per-head
#: inputs and outputs, ``hook_*_input`` and ``attn.hook_result``, only when edited or captured).
SITES: dict[str, Site] = {
    s.name: s
    for s in [
        Site("hook_embed", False, _RESID),
        Site("hook_pos_embed", False, _RESID, requires="learned"),
        Site("blocks.hook_resid_pre", True, _RESID),
        Site("blocks.ln1.hook_scale", True, _SCALE),
        Site("blocks.ln1.hook_normalized", True, _RESID),
        Site("blocks.hook_q_input", True, _HEAD_IN),
        Site("blocks.hook_k_input", True, _HEAD_IN, kv=True),
        Site("blocks.hook_v_input", True, _HEAD_IN, kv=True),
        Site("blocks.attn.hook_q", True, _HEADS),
        Site("blocks.attn.hook_k", True, _HEADS, kv=True),
        Site("blocks.attn.hook_v", True, _HEADS, kv=True),
        Site("blocks.attn.hook_rot_q", True, _HEADS, requires="rotary"),
        Site("blocks.attn.hook_rot_k", True, _HEADS, kv=True, requires="rotary"),
        Site("blocks.attn.hook_attn_scores", True, _PATTERN),
        Site("blocks.attn.hook_pattern", True, _PATTERN),
        Site("blocks.attn.hook_z", True, _HEADS),
        Site("blocks.attn.hook_result", True, _HEAD_IN),
        Site("blocks.ln1_post.hook_scale", True, _SCALE, requires="post_norms"),
        Site("blocks.ln1_post.hook_normalized", True, _RESID, requires="post_norms"),
        Site("blocks.hook_attn_out", True, _RESID),
        Site("blocks.hook_resid_mid", True, _RESID),
        Site("blocks.hook_mlp_in", True, _RESID),
        Site("blocks.ln2.hook_scale", True, _SCALE),
        Site("blocks.ln2.hook_normalized", True, _RESID),
        Site("blocks.mlp.hook_pre_linear", True, _MLP, requires="gated_mlp"),
        Site("blocks.mlp.hook_pre", True, _MLP),
        Site("blocks.mlp.hook_post", True, _MLP),
        Site("blocks.ln2_post.hook_scale", True, _SCALE, requires="post_norms"),
        Site("blocks.ln2_post.hook_normalized", True, _RESID, requires="post_norms"),
        Site("blocks.hook_mlp_out", True, _RESID),
        Site("blocks.hook_resid_post", True, _RESID),
        Site("ln_final.hook_scale", False, _SCALE),
        Site("ln_final.hook_normalized", False, _RESID),
    ]
}

#: Per-layer sites whose activation at position p feeds only position p of the layer's output:
#: everything after the layer's key/value projections (and the queries, which only their own
#: position reads). An edit of one of these at position p changes, in its layer, that row only
#: (no key or value): in the last layer, a patch at a position the metric does not read changes
#: nothing the metric sees (:func:`jaxpatch.sweep.skippable`); a packed patch computes its layer
#: for the edited row alone (:func:`jaxpatch.models.transformer.run_blocks_packed`).
LOCAL_SITES = frozenset({
    "blocks.hook_q_input", "blocks.attn.hook_q", "blocks.attn.hook_rot_q", "blocks.attn.hook_attn_scores",
    "blocks.attn.hook_pattern", "blocks.attn.hook_z", "blocks.attn.hook_result", "blocks.ln1_post.hook_scale",
    "blocks.ln1_post.hook_normalized", "blocks.hook_attn_out", "blocks.hook_resid_mid", "blocks.hook_mlp_in",
    "blocks.ln2.hook_scale", "blocks.ln2.hook_normalized", "blocks.mlp.hook_pre_linear", "blocks.mlp.hook_pre",
    "blocks.mlp.hook_post", "blocks.ln2_post.hook_scale", "blocks.ln2_post.hook_normalized", "blocks.hook_mlp_out",
    "blocks.hook_resid_post",
})

#: Sites computed only when someone edits or captures them (never part of a full cache).
#: (``hook_mlp_in`` is computed always but, as in TransformerLens by default, kept out of full caches.)
ON_DEMAND = frozenset({"blocks.hook_q_input", "blocks.hook_k_input", "blocks.hook_v_input", "blocks.attn.hook_result",
                       "blocks.hook_mlp_in"})

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
    "pre_linear": "blocks.mlp.hook_pre_linear",
    "post": "blocks.mlp.hook_post",
    "rot_q": "blocks.attn.hook_rot_q",
    "rot_k": "blocks.attn.hook_rot_k",
    "result": "blocks.attn.hook_result",
    "q_input": "blocks.hook_q_input",
    "k_input": "blocks.hook_k_input",
    "v_input": "blocks.hook_v_input",
    "mlp_in": "blocks.hook_mlp_in",
    "scale": "ln_final.hook_scale",
    "normalized": "ln_final.hook_normalized",
}

_LAYER_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def all_full_names(config: ModelConfig, on_demand: bool = False) -> list[str]:
    """Every full site name of a model, in execution order (the per-head inputs and outputs
    computed on demand only with ``on_demand=True``)."""
    ok = [n for n in SITES if SITES[n].available(config) and (on_demand or n not in ON_DEMAND)]
    head = [n for n in GLOBAL_SITES if n in ok and not n.startswith("ln_final")]
    tail = [n for n in GLOBAL_SITES if n in ok and n.startswith("ln_final")]
    blocks = [full_name(b, layer) for layer in range(config.n_layers) for b in BLOCK_SITES if b in ok]
    return head + blocks + tail


def check_available(canonical: str, config: ModelConfig | None) -> None:
    """Raise :class:`UnknownSiteError` if this model has no such site (e.g. ``hook_rot_q`` of a
    model with learned positions), naming the feature it needs."""
    if config is None or SITES[canonical].available(config):
        return
    need = {"rotary": "rotary position embeddings", "learned": "learned position embeddings",
            "gated_mlp": "a gated MLP", "post_norms": "post-attention/post-MLP norms"}[SITES[canonical].requires]
    raise UnknownSiteError(f"Site {canonical!r} needs {need}; this {config.architecture} model has none.")


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
            check_available(canonical, config)
            if not -config.n_layers <= layer < config.n_layers:
                raise UnknownSiteError(
                    f"Layer {layer} in site {name!r} is out of range: the model has "
                    f"{config.n_layers} layers (valid 0..{config.n_layers - 1}, or negative from the end)."
                )
            layer %= config.n_layers
        return canonical, layer
    if name in SITES and not SITES[name].per_layer:
        check_available(name, config)
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
