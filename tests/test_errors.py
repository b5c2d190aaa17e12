"""Bad input gets a clear error naming what was wrong and what is valid."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpatch
from jaxpatch import sites
from tests.helpers import random_tokens


def test_site_parse_round_trip(tiny_config):
    for name in sites.all_full_names(tiny_config):
        canonical, layer = sites.parse(name, tiny_config)
        assert sites.full_name(canonical, layer) == name
    assert sites.parse("blocks.-1.hook_resid_pre", tiny_config) == ("blocks.hook_resid_pre", 2)


def test_misspelt_site_suggests_closest(tiny_model):
    with pytest.raises(jaxpatch.UnknownSiteError, match="Did you mean 'blocks.1.attn.hook_z'"):
        tiny_model.run_with_cache(random_tokens(tiny_model.config), names=["blocks.1.atn.hook_z"])
    with pytest.raises(jaxpatch.UnknownSiteError, match="Did you mean 'blocks.0.hook_resid_pre'"):
        tiny_model.replace("blocks.0.hook_resid_pr", 0.0)


def test_layer_out_of_range(tiny_model):
    with pytest.raises(jaxpatch.UnknownSiteError, match="Layer 3 .* 3 layers"):
        tiny_model.zero("blocks.3.hook_resid_pre")
    with pytest.raises(jaxpatch.UnknownSiteError, match="Layer 7"):
        tiny_model.run_with_cache(random_tokens(tiny_model.config), names="blocks.7.hook_mlp_out")
    with pytest.raises(jaxpatch.InputError, match=r"layer .* \[5\] out of range"):
        tiny_model.zero("blocks.hook_resid_pre", layer=5)


def test_per_layer_site_without_layer(tiny_model):
    with pytest.raises(jaxpatch.UnknownSiteError, match="name the layer"):
        sites.parse("blocks.attn.hook_z")


def test_index_out_of_range_and_unknown_axis(tiny_model):
    with pytest.raises(jaxpatch.InputError, match=r"head index .* \[4\] out of range: valid 0..3"):
        tiny_model.zero("blocks.0.attn.hook_z", head=4)
    with pytest.raises(jaxpatch.InputError, match="cannot index axis 'head'"):
        tiny_model.zero("blocks.0.hook_resid_pre", head=1)
    with pytest.raises(jaxpatch.InputError, match=r"pos index .* \[9\] out of range: valid 0..7"):
        tiny_model(random_tokens(tiny_model.config, pos=8), tiny_model.zero("blocks.0.hook_resid_pre", pos=9))


def test_value_of_wrong_shape(tiny_model):
    with pytest.raises(jaxpatch.InputError, match="not broadcastable to the activation shape"):
        tiny_model(random_tokens(tiny_model.config), tiny_model.replace("blocks.0.hook_resid_pre", jnp.ones((5,))))


def test_token_ids_outside_vocab(tiny_model):
    bad = random_tokens(tiny_model.config)
    bad[0, 3] = tiny_model.config.d_vocab
    with pytest.raises(jaxpatch.InputError, match=r"\[0, 61\).*\[61\]"):
        tiny_model(bad)
    with pytest.raises(jaxpatch.InputError, match=r"\[-1\]"):
        tiny_model(np.array([[1, -1]]))


def test_sequence_longer_than_context(tiny_model):
    with pytest.raises(jaxpatch.InputError, match="exceeds the model's context n_ctx=16"):
        tiny_model(np.zeros((1, 17), np.int32))


def test_non_integer_tokens(tiny_model):
    with pytest.raises(jaxpatch.InputError, match="integer dtype"):
        tiny_model(np.zeros((1, 4), np.float32))


def test_interventions_must_be_interventions(tiny_model):
    with pytest.raises(jaxpatch.InputError, match="Interventions"):
        tiny_model(random_tokens(tiny_model.config), {"blocks.0.hook_resid_pre": 0})
