"""Model configuration: a frozen, hashable dataclass of sizes (static under ``jit``)."""

from __future__ import annotations

import dataclasses

from ._errors import JaxpatchError

#: Activation functions a config may name (Hugging Face spellings accepted as aliases).
ACT_FNS = ("gelu_new", "gelu", "relu", "silu")
_ACT_ALIASES = {
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def canonical_act_fn(name: str) -> str:
    try:
        return _ACT_ALIASES[name]
    except KeyError:
        raise JaxpatchError(
            f"Unsupported activation function {name!r}; supported: {sorted(_ACT_ALIASES)}."
        ) from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of a GPT-2-style transformer, with TransformerLens field names.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads: attention heads per block.
        d_head: width of one head (``d_model // n_heads`` for GPT-2).
        d_mlp: MLP hidden width.
        d_vocab: vocabulary size.
        n_ctx: longest sequence the position embedding covers.
        act_fn: MLP nonlinearity, one of :data:`ACT_FNS` (``gelu_new`` is GPT-2's tanh GELU).
        eps: layer-norm epsilon.
        architecture: model family; only ``"gpt2"`` today.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str = "gelu_new"
    eps: float = 1e-5
    architecture: str = "gpt2"

    def __post_init__(self):
        for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise JaxpatchError(f"ModelConfig.{field} must be a positive int, got {value!r}.")
        object.__setattr__(self, "act_fn", canonical_act_fn(self.act_fn))
        if self.architecture != "gpt2":
            raise JaxpatchError(
                f"ModelConfig.architecture {self.architecture!r} is not supported; supported: ['gpt2']."
            )

    @classmethod
    def gpt2(cls, n_layers=2, d_model=64, n_heads=4, d_mlp=None, d_vocab=101, n_ctx=32, **kw):
        """A GPT-2-shaped config; ``d_head = d_model // n_heads`` and ``d_mlp`` defaults to 4·d_model."""
        if d_model % n_heads:
            raise JaxpatchError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        return cls(
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_model // n_heads,
            d_mlp=d_mlp if d_mlp is not None else 4 * d_model,
            d_vocab=d_vocab,
            n_ctx=n_ctx,
            **kw,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
