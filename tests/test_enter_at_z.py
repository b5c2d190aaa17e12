"""Vectorised chunks of sites at or after the heads' outputs (``sweep.FROM_Z_SITES``) enter their
first layer at ``z`` from the run's cache (``sweep.ENTER_AT_Z``; ``False`` is the slow twin): no
queries, keys, values or attention there. Exact: equal to the slow twin and to one full forward
per patch, for heads over all positions and by position, ``mlp_out``, ``resid_post``, neurons and
per-head results, chunks that straddle layers, both directions and the noise baseline; the
cached ``z`` is captured only for those sites; runs with their own per-layer interventions keep
the whole layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import models
from jaxpatch import sweep as sw
from jaxpatch._errors import JaxpatchError
from jaxpatch.interventions import NONE, Edit, Interventions
from jaxpatch.models._layers import SiteHandler
from tests.test_skip import B, L, T, close, model  # noqa: F401  (model: a fixture; close: TOL 2e-5 relative)

CASES = [
    ("z", ("layer", "head")),
    ("z", ("layer", "pos", "head")),
    ("mlp_out", ("layer",)),
    ("resid_post", ("layer", "pos")),
    ("result", ("layer", "head")),
]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    clean = rng.integers(0, 61, (B, T))
    corrupt = clean.copy()
    corrupt[:, 4] = (corrupt[:, 4] + 9) % 61
    return clean, corrupt, rng.integers(0, 61, B), rng.integers(0, 61, B)


def _both(model, monkeypatch, **kw):
    out = {}
    for at_z in (True, False):
        monkeypatch.setattr(sw, "ENTER_AT_Z", at_z)
        jax.clear_caches()  # the flag is read when the sweep program is traced
        out[at_z] = jaxpatch.activation_patch(model, mesh=None, pack=False, **kw)
        assert sw.last_plan.from_z == at_z and sw.last_plan.packed == 0
    return out[True], out[False]


@pytest.mark.parametrize("site,by", CASES)
def test_enter_at_z_equals_whole_layer(model, prompts, site, by, monkeypatch):
    clean, corrupt, ans, wrong = prompts
    fast, slow = _both(model, monkeypatch, clean_tokens=clean, corrupt_tokens=corrupt, site=site, by=by, answer=ans,
                       wrong=wrong, metrics=("logit_diff", "kl"), chunk_size=5)  # chunks of 5 straddle layers
    assert np.ptp(slow.per_prompt) > 1e-3
    assert close(fast.per_prompt, slow.per_prompt), (site, by)


@pytest.mark.parametrize("direction,baseline", [("noise", "resample"), ("denoise", "noise"), ("noise", "zero")])
def test_enter_at_z_directions_and_baselines(model, prompts, direction, baseline, monkeypatch):
    clean, corrupt, ans, wrong = prompts
    kw = dict(clean_tokens=clean, corrupt_tokens=corrupt, site="z", by=("layer", "head"), answer=ans, wrong=wrong,
              direction=direction, baseline=baseline, chunk_size=4)
    if baseline == "noise":
        kw.update(seed=3, n_noise=2, noise_positions=[4, 5])
    fast, slow = _both(model, monkeypatch, **kw)
    assert close(fast.per_prompt, slow.per_prompt), (direction, baseline)


def test_enter_at_z_equals_single_forwards(model, prompts, monkeypatch):
    """Heads over all positions against one full forward per (layer, head) patch."""
    clean, corrupt, ans, wrong = prompts
    fast, _ = _both(model, monkeypatch, clean_tokens=clean, corrupt_tokens=corrupt, site="z", by=("layer", "head"),
                    answer=ans, wrong=wrong, metrics=("logit_diff",), chunk_size=3)
    _, caps = model.run(clean, capture={"blocks.attn.hook_z"})
    src = caps["blocks.attn.hook_z"]
    b = np.arange(B)
    for la in range(L):
        for h in range(model.config.n_heads):
            lg = np.asarray(model(corrupt, model.edit("blocks.attn.hook_z", value=src, stacked=True, layer=la, head=h)))[:, -1]
            ref = lg[b, ans] - lg[b, wrong]
            got = np.asarray(fast.per_prompt)[la, h, 0]  # [layer, head, metric, prompt]
            assert close(got, ref), (la, h)


def test_z_is_captured_only_for_sites_from_z(model):
    cfg = model.config
    assert "blocks.attn.hook_z" in sw.run_sites(cfg, "blocks.hook_mlp_out")
    assert "blocks.attn.hook_z" in sw.run_sites(cfg, "blocks.attn.hook_z")
    for site in ("blocks.hook_resid_pre", "blocks.attn.hook_q", "blocks.attn.hook_pattern", None):
        assert "blocks.attn.hook_z" not in sw.run_sites(cfg, site), site


def test_run_edits_keep_the_whole_layer(model):
    cache = {"z": jnp.zeros(())}
    assert sw.enters_at_z("blocks.attn.hook_z", cache, NONE)
    assert not sw.enters_at_z("blocks.attn.hook_q", cache, NONE)
    assert not sw.enters_at_z("blocks.attn.hook_z", {}, NONE)
    own = Interventions({"blocks.hook_resid_pre": (Edit(layers=jnp.asarray(0), index={}, value=jnp.zeros(()), stacked=False),)})
    assert not sw.enters_at_z("blocks.attn.hook_z", cache, own)


def test_block_entered_at_z_refuses_earlier_sites(model):
    cfg = model.config
    p = models.transformer._layer_params(model.params["blocks"], 0)
    x = jnp.zeros((1, T, cfg.d_model))
    z = jnp.zeros((1, T, cfg.n_heads, cfg.d_head))
    edit = Interventions({"blocks.attn.hook_q": (Edit(layers=jnp.asarray(0), index={}, value=jnp.zeros(()), stacked=False),)})
    with pytest.raises(JaxpatchError, match="entered at z"):
        models.transformer.block(cfg, p, x, SiteHandler(edit, frozenset(), 0), None, z=z)
