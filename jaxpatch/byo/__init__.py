"""Bring your own JAX model: patch any Flax (linen, nnx), Equinox or plain-JAX model.

* :func:`site` marks an intervention point inside any pure JAX function; :func:`scan` is
  ``jax.lax.scan`` whose body's sites carry the layer as data.
* :func:`patchable` wraps such a function; :func:`from_flax`, :func:`from_nnx` and
  :func:`from_equinox` wrap framework models, every submodule's output a site named by its path.
* :func:`jaxpatch.activation_patch` and :func:`jaxpatch.attribution_patch` take the result like a
  built-in model and return the same :class:`~jaxpatch.PatchResult`.

flax and equinox are imported only when their adapter is called (``pip install "jaxpatch[byo]"``).
"""

from ._equinox import from_equinox as from_equinox
from ._flax import from_flax as from_flax, from_nnx as from_nnx
from ._model import Patchable as Patchable, combine as combine, is_patchable as is_patchable, patchable as patchable
from ._site import SiteEdit as SiteEdit, SiteError as SiteError, SiteInfo as SiteInfo, scan as scan, site as site
from ._sweep import activation_patch as activation_patch, attribution_patch as attribution_patch
