"""Text <-> token ids for checkpoints that ship a tokenizer: a Hugging Face ``tokenizer.json``
(through the ``tokenizers`` package) or a word-level ``vocab.json`` (a JSON list, index = id,
space-separated words), as the embedded model has. Prompts are padding-free: a batch must
tokenize to one length."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._errors import InputError


@dataclasses.dataclass
class Tokenizer:
    """``encode(text) -> ids`` and ``decode_each(ids) -> one string per id``."""

    describe: str
    encode: Callable[[str], list[int]]
    decode_each: Callable[[Sequence[int]], list[str]]

    def to_tokens(self, texts: str | Sequence[str]) -> np.ndarray:
        """``[batch, pos]`` int32 ids; every text must give the same number of tokens."""
        single = isinstance(texts, str)
        rows = [self.encode(t) for t in ([texts] if single else texts)]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("Every prompt must encode to at least one token.")
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise InputError(f"Prompts tokenize to different lengths {lengths}: use to_tokens_padded(texts) for "
                             "tokens and an attention_mask, or make every prompt the same number of tokens.")
        return np.asarray(rows, np.int32)

    def to_tokens_padded(self, texts: Sequence[str], side: str = "right", pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, attention_mask)`` ``[batch, pos]`` for prompts of different lengths, padded on
        ``side`` (``"right"`` or ``"left"``) with ``pad_id``; the mask is 1 on real tokens. Pass
        the mask as ``attention_mask=`` wherever tokens go."""
        if side not in ("left", "right"):
            raise InputError(f"side must be 'left' or 'right', got {side!r}.")
        rows = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("Every prompt must encode to at least one token.")
        T = max(len(r) for r in rows)
        tokens = np.full((len(rows), T), pad_id, np.int32)
        mask = np.zeros((len(rows), T), np.int32)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            tokens[i, sl], mask[i, sl] = r, 1
        return tokens, mask

    def to_single_token(self, text: str) -> int:
        """The id of a string that must be exactly one token (an answer)."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise InputError(f"{text!r} is not a single token: it encodes to {len(ids)} tokens {self.decode_each(ids)} "
                             "(with a BPE tokenizer mind the leading space, e.g. ' Paris').")
        return ids[0]


def word_vocab(path: Path) -> list[str] | None:
    """A word-level vocabulary from a JSON list file, or ``None`` if the file is not one."""
    try:
        v = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return v if isinstance(v, list) and all(isinstance(w, str) for w in v) else None


def from_vocab(vocab: list[str], describe: str = "word-level vocab.json") -> Tokenizer:
    index = {w: i for i, w in enumerate(vocab)}

    def encode(text: str) -> list[int]:
        words = text.split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise InputError(f"Unknown word {unknown[0]!r}; the vocabulary has {len(vocab)} words, e.g. {vocab[1:6]}.")
        return [index[w] for w in words]

    def decode_each(ids):
        return [vocab[int(i)] for i in ids]

    return Tokenizer(f"{describe} ({len(vocab)} tokens)", encode, decode_each)


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint directory ships, or ``None``.

    Raises:
        InputError: the directory has a ``tokenizer.json`` but the ``tokenizers`` package is missing.
    """
    directory = Path(directory)
    tok_path = directory / "tokenizer.json"
    if tok_path.is_file():
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise InputError(f"{tok_path} needs the 'tokenizers' package: pip install tokenizers") from None
        tok = HFTokenizer.from_file(str(tok_path))
        return Tokenizer(f"tokenizer.json ({tok.get_vocab_size()} tokens)",
                         lambda s: list(tok.encode(s, add_special_tokens=False).ids),
                         lambda ids: [tok.decode([int(i)]) for i in ids])
    vocab = word_vocab(directory / "vocab.json")
    return from_vocab(vocab) if vocab is not None else None
