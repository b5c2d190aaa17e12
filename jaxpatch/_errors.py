"""Error types and message helpers.

Every error a user can trigger names what was wrong and what is valid. They all derive from
:class:`JaxpatchError` (itself a ``ValueError``) so callers can catch them together.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class JaxpatchError(ValueError):
    """Base class of every user-facing jaxpatch error."""


class UnknownSiteError(JaxpatchError, KeyError):
    """A hook-site name that does not exist (misspelt, or a layer out of range)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(JaxpatchError):
    """A checkpoint directory that cannot be loaded (missing files or tensors, bad config)."""


class UnsupportedArchitectureError(JaxpatchError):
    """A checkpoint whose architecture jaxpatch does not implement."""


class InputError(JaxpatchError):
    """Bad tokens or arrays passed to a model or a patching function."""


class NonFiniteError(JaxpatchError):
    """A NaN or inf where a patching result needs a number (weights, activations, metric values);
    the message names where it arose (the tensor, the run or the patch)."""


def closest(name: str, valid: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest valid name, or an empty string."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {matches[0]!r}?" if matches else ""
