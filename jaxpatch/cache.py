"""ActivationCache: the activations of one run, addressed by TransformerLens names."""

from __future__ import annotations

from typing import Iterator, Mapping

import jax

from ._errors import UnknownSiteError, closest
from .sites import SHORT_NAMES, SITES, full_name, parse


@jax.tree_util.register_pytree_node_class
class ActivationCache(Mapping):
    """Read-only mapping from full site names to activations.

    ``cache["blocks.3.attn.hook_z"]`` has TransformerLens's shape ``[batch, pos, head, d_head]``;
    ``cache["z", 3]`` is the same (TransformerLens short names, negative layers allowed);
    ``cache.stacked("blocks.attn.hook_z")`` is every layer at once, ``[n_layers, batch, ...]``.
    It is a pytree, so it can be passed into ``jit``-ted functions.
    """

    def __init__(self, stacked: Mapping, names: tuple[str, ...], n_layers: int):
        self._stacked = dict(stacked)
        self._names = tuple(names)
        self._n_layers = n_layers

    # pytree protocol
    def tree_flatten(self):
        keys = tuple(sorted(self._stacked))
        return tuple(self._stacked[k] for k in keys), (keys, self._names, self._n_layers)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, names, n_layers = aux
        return cls(dict(zip(keys, children)), names, n_layers)

    def _resolve(self, key) -> tuple[str, int | None]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise UnknownSiteError(f"Cache keys are a name or (short_name, layer); got {key!r}.")
            short, layer = key
            canonical = SHORT_NAMES.get(short, short)
            if canonical not in SITES:
                raise UnknownSiteError(
                    f"Unknown short site name {short!r}.{closest(short, SHORT_NAMES)} Valid: {sorted(SHORT_NAMES)}."
                )
            if SITES[canonical].per_layer:
                if not -self._n_layers <= layer < self._n_layers:
                    raise UnknownSiteError(f"Layer {layer} out of range for {self._n_layers} layers.")
                layer %= self._n_layers
            else:
                layer = None
            return canonical, layer
        canonical, layer = parse(key)
        if layer is not None:
            if not -self._n_layers <= layer < self._n_layers:
                raise UnknownSiteError(
                    f"Layer {layer} in {key!r} is out of range: the model has {self._n_layers} layers."
                )
            layer %= self._n_layers
        return canonical, layer

    def __getitem__(self, key):
        canonical, layer = self._resolve(key)
        name = full_name(canonical, layer)
        if name not in self._names:
            raise KeyError(
                f"{name!r} was not cached.{closest(name, self._names)} Pass it in names= to run_with_cache "
                f"(cached: {len(self._names)} activations)."
            )
        arr = self._stacked[canonical]
        return arr if layer is None else arr[layer]

    def stacked(self, canonical: str):
        """All layers of a per-layer site, ``[n_layers, ...]`` (canonical or short name)."""
        canonical = SHORT_NAMES.get(canonical, canonical)
        if canonical not in self._stacked:
            raise KeyError(f"{canonical!r} was not cached; cached sites: {sorted(self._stacked)}.")
        return self._stacked[canonical]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        try:
            canonical, layer = self._resolve(key)
        except (UnknownSiteError, TypeError):
            return False
        return full_name(canonical, layer) in self._names

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._names)} activations, sites={sorted(self._stacked)})"
