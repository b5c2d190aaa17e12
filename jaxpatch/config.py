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


#: Model families a config may name (the Hugging Face ``model_type``); they differ only in the
#: fields below, never in code outside :mod:`jaxpatch.models`.
FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
#: Rotary scalings a config may name (``rope_scaling``'s ``rope_type``).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, as data: sizes (TransformerLens field names) and the options
    in which the families differ (as TransformerLens's ``HookedTransformerConfig`` does). The
    defaults describe GPT-2.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads: query heads per block.
        d_head: width of one head.
        d_mlp: MLP hidden width.
        d_vocab: vocabulary size.
        n_ctx: longest sequence the model accepts.
        act_fn: MLP nonlinearity, one of :data:`ACT_FNS` (``gelu_new`` is the tanh GELU).
        eps: normalisation epsilon.
        architecture: the family (:data:`FAMILIES`); it names the checkpoint format only.
        n_kv_heads: key/value heads (grouped-query attention; ``None``: as many as ``n_heads``).
        positional: ``"learned"`` (absolute position embeddings) or ``"rotary"``.
        rotary_dim: leading dims of each head that rotate (``None``: all; Pythia's ``rotary_pct``).
        rope_base: rotary base (``rope_theta``).
        rope_scaling: ``rope_scaling`` as sorted ``(key, value)`` pairs (hashable), e.g.
            ``(("factor", 8.0), ("rope_type", "llama3"), ...)``; empty for none.
        rope_local_base: rotary base of sliding-window layers, where it differs (Gemma 3).
        norm: ``"layernorm"`` or ``"rmsnorm"`` (Gemma's ``1 + weight`` is folded into the weight).
        gated_mlp: ``act(x W_gate) * (x W_in)`` (SwiGLU, GeGLU) instead of ``act(x W_in)``.
        parallel_attn_mlp: attention and MLP read the same residual (GPT-NeoX).
        qkv_bias, o_bias, mlp_bias, unembed_bias: which biases exist.
        qk_norm: RMSNorm over each query/key head (Qwen3, Gemma 3).
        post_norms: extra norms on the attention and MLP outputs (Gemma 2/3).
        tied_embeddings: the unembedding is the embedding's transpose.
        scale_embed: multiply embeddings by ``sqrt(d_model)`` (Gemma).
        attn_scale: attention-score scale (``None``: ``d_head ** -0.5``).
        attn_softcap, final_softcap: ``cap * tanh(x / cap)`` on attention scores / final logits.
        sliding_window: window of local attention layers (a query sees keys less than this many
            positions back, itself included).
        layer_types: per layer ``"full_attention"`` or ``"sliding_attention"`` (``None``: every
            layer full, or every layer sliding if ``sliding_window`` is set).
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
    n_kv_heads: int | None = None
    positional: str = "learned"
    rotary_dim: int | None = None
    rope_base: float = 10000.0
    rope_scaling: tuple = ()
    rope_local_base: float | None = None
    norm: str = "layernorm"
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = True
    qk_norm: bool = False
    post_norms: bool = False
    tied_embeddings: bool = True
    scale_embed: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple | None = None

    def __post_init__(self):
        for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise JaxpatchError(f"ModelConfig.{field} must be a positive int, got {value!r}.")
        object.__setattr__(self, "act_fn", canonical_act_fn(self.act_fn))
        if self.architecture not in FAMILIES:
            raise JaxpatchError(f"ModelConfig.architecture {self.architecture!r} is not supported; supported: {list(FAMILIES)}.")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not isinstance(kv, int) or kv <= 0 or self.n_heads % kv:
            raise JaxpatchError(f"ModelConfig.n_kv_heads must divide n_heads ({self.n_heads}); got {self.n_kv_heads!r}.")
        object.__setattr__(self, "n_kv_heads", kv)
        if self.positional not in ("learned", "rotary"):
            raise JaxpatchError(f"ModelConfig.positional must be 'learned' or 'rotary', got {self.positional!r}.")
        rd = self.d_head if self.rotary_dim is None else self.rotary_dim
        if not isinstance(rd, int) or rd <= 0 or rd > self.d_head or rd % 2:
            raise JaxpatchError(f"ModelConfig.rotary_dim must be an even int in 2..d_head ({self.d_head}); got {self.rotary_dim!r}.")
        object.__setattr__(self, "rotary_dim", rd)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        rtype = dict(self.rope_scaling).get("rope_type", "default")
        if rtype not in ROPE_TYPES:
            raise JaxpatchError(f"Unsupported rope_scaling type {rtype!r}; supported: {list(ROPE_TYPES)}.")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise JaxpatchError(f"ModelConfig.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}.")
        if self.layer_types is not None:
            lt = tuple(self.layer_types)
            if len(lt) != self.n_layers or any(t not in LAYER_TYPES for t in lt):
                raise JaxpatchError(f"ModelConfig.layer_types must give one of {list(LAYER_TYPES)} per layer "
                                    f"({self.n_layers}); got {self.layer_types!r}.")
            if "sliding_attention" in lt and not self.sliding_window:
                raise JaxpatchError("ModelConfig.layer_types has sliding layers but sliding_window is not set.")
            object.__setattr__(self, "layer_types", lt)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise JaxpatchError(f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}.")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Whether each layer attends through the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        if self.layer_types is None:
            return (True,) * self.n_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

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
