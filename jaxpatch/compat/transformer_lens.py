"""``transformer_lens.patching``'s functions, same names, arguments and output shapes, running on
jaxpatch's vectorised engine: one compiled program per call instead of one forward per patch.

Each function takes ``(model, corrupted_tokens, clean_cache, patching_metric)`` where ``model`` is a
:class:`jaxpatch.HookedModel`, ``clean_cache`` is what ``model.run_with_cache(clean_tokens)``
returned, and ``patching_metric`` is a JAX function of logits ``[batch, pos, d_vocab]`` returning a
scalar. Results are JAX arrays with TransformerLens's shapes, e.g.
``get_act_patch_resid_pre(...)`` -> ``[n_layers, pos]``.

The metric is traced afresh on every call, so a metric that closes over arrays (``answer_tokens``)
or reads globals always sees their current values, as in TransformerLens; an unchanged metric does
not recompile. From its traced program jaxpatch proves the first position whose logits it can read
(through slices and gathers with known indices, e.g. ``logits[:, -1]``); only logits from there on
are computed, and earlier positions are reused from the cache. When the program does not prove it
(any other use of the logits), every position's logits are computed.

Migration::

    # from transformer_lens import patching          # before
    from jaxpatch.compat.transformer_lens import patching  # after (or import the functions)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from .. import sweep as _sweep
from .._errors import InputError
from ..cache import ActivationCache
from ..model import HookedModel, check_attention_mask, check_tokens
from ..sweep import CustomMetric
from ..user_metric import first_position_read, trace



def _trace_metric(metric, logits):
    """Trace the metric afresh (it may close over values that changed since the last call) and
    prove which positions it reads. Returns ``(CustomMetric, consts)``."""
    tm, consts = trace(metric, jax.ShapeDtypeStruct(logits.shape, logits.dtype))
    if tm.out_aval.shape != ():
        raise InputError(
            f"patching_metric must return a scalar (as in TransformerLens); it returned shape {tm.out_aval.shape}. "
            "Average over the batch inside the metric."
        )
    dt = tm.out_aval.dtype
    if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_):
        raise InputError(f"patching_metric must return a number, got dtype {dt}.")
    return CustomMetric(tm, first_position_read(tm, consts)), consts


def generic_activation_patch(model: HookedModel, corrupted_tokens, clean_cache: ActivationCache, patching_metric,
                             site: str, index_axis_names, attention_mask=None, **engine_kw):
    """Patch ``site`` (canonical name) over every combination of ``index_axis_names`` (jaxpatch
    grid-axis names, e.g. ``("layer", "pos")``); result shaped by those axes in that order.
    ``attention_mask`` ``[batch, pos]``: padded prompts (the clean cache must come from
    ``run_with_cache(clean_tokens, attention_mask=...)`` with the same padding)."""
    if not isinstance(model, HookedModel):
        raise InputError(f"model must be a jaxpatch HookedModel, got {type(model).__name__}.")
    if not isinstance(clean_cache, ActivationCache):
        raise InputError("clean_cache must be the ActivationCache returned by model.run_with_cache(clean_tokens).")
    tokens = check_tokens(model.config, corrupted_tokens)
    B, T = tokens.shape
    try:
        source = clean_cache.stacked(site)
    except KeyError:
        raise InputError(f"clean_cache lacks {site!r} for every layer; run run_with_cache without a names filter "
                         f"(or include every layer of {site!r}).") from None
    if source.shape[1:3] != (B, T) and site != "blocks.attn.hook_pattern" and site != "blocks.attn.hook_attn_scores":
        raise InputError(f"clean_cache was computed on prompts of shape {tuple(source.shape[1:3])}; corrupted_tokens has shape {(B, T)}.")
    if site in ("blocks.attn.hook_pattern", "blocks.attn.hook_attn_scores") and (source.shape[1], source.shape[3]) != (B, T):
        raise InputError(f"clean_cache was computed on prompts of shape {(source.shape[1], source.shape[3])}; corrupted_tokens has shape {(B, T)}.")
    mask = check_attention_mask(attention_mask, tokens)
    logits, caps = model._captures(tokens, _sweep.run_sites(model.config, site), mask)  # logits: shape and dtype only
    metric, consts = _trace_metric(patching_metric, logits)
    spec = _sweep.grid(model.config, site, index_axis_names, T)
    # Patches at positions before the first where the clean and corrupted runs' inputs to block 0
    # differ are no-ops (identical activations there at every layer): not run. Without the clean
    # cache's block-0 residual nothing is claimed.
    try:
        same_before = _sweep.first_difference(clean_cache.stacked("blocks.hook_resid_pre")[0], caps["blocks.hook_resid_pre"][0])
    except KeyError:
        same_before = 0
    if not engine_kw.get("skip", True):
        same_before = 0
    out, _ = _sweep.run(
        model.config, model.params, spec,
        _sweep.run_cache(model.config, caps, tokens, mask),
        source, True, metric, {"metric_consts": consts}, T, same_before=same_before, **engine_kw,
    )
    return jnp.asarray(out.reshape(spec.grid_shape))  # a jax array, as TransformerLens returns a torch tensor


def _make(site, axes, doc_shape):
    def fn(model, corrupted_tokens, clean_cache, patching_metric, **engine_kw):
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, site, axes, **engine_kw)

    fn.__doc__ = f"Patch ``{site}`` over {' x '.join(axes)}. Returns ``{doc_shape}``."
    return fn


get_act_patch_resid_pre = _make("blocks.hook_resid_pre", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_resid_mid = _make("blocks.hook_resid_mid", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_out = _make("blocks.hook_attn_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_mlp_out = _make("blocks.hook_mlp_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_head_out_all_pos = _make("blocks.attn.hook_z", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _make("blocks.attn.hook_q", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _make("blocks.attn.hook_k", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_v_all_pos = _make("blocks.attn.hook_v", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_pattern_all_pos = _make("blocks.attn.hook_pattern", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_out_by_pos = _make("blocks.attn.hook_z", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _make("blocks.attn.hook_q", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _make("blocks.attn.hook_k", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_v_by_pos = _make("blocks.attn.hook_v", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_pattern_by_pos = _make("blocks.attn.hook_pattern", ("layer", "head", "dest_pos"), "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos = _make(
    "blocks.attn.hook_pattern", ("layer", "head", "dest_pos", "src_pos"), "[n_layers, n_heads, dest_pos, src_pos]")


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **engine_kw):
    """resid_pre, attn_out and mlp_out by layer x pos, stacked: ``[3, n_layers, pos]``."""
    fns = (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)
    return jnp.stack([f(model, corrupted_tokens, clean_cache, metric, **engine_kw) for f in fns])


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **engine_kw):
    """Head output, q, k, v and pattern over all positions, stacked: ``[5, n_layers, n_heads]``."""
    fns = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
           get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)
    return jnp.stack([f(model, corrupted_tokens, clean_cache, metric, **engine_kw) for f in fns])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **engine_kw):
    """Head output, q, k, v and pattern by position, stacked: ``[5, n_layers, pos, n_heads]``."""
    fns = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
           get_act_patch_attn_head_v_by_pos)
    out = [f(model, corrupted_tokens, clean_cache, metric, **engine_kw) for f in fns]
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **engine_kw)
    out.append(jnp.transpose(pattern, (0, 2, 1)))
    return jnp.stack(out)


#: ``from jaxpatch.compat.transformer_lens import patching`` mirrors ``transformer_lens.patching``.
patching = sys.modules[__name__]

__all__ = [n for n in dir() if n.startswith("get_act_patch_")] + ["generic_activation_patch", "patching"]
del np
