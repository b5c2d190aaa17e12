"""The embedded default model: a tiny 2-layer GPT-2 trained on an induction task, and its vocabulary.

The task
--------
The vocabulary is ``<bos>`` (id 0) plus 49 short English words. A sequence ``<bos> A A`` is ``n``
random words ``A`` repeated once; inside the second copy each next word is predictable: it is the
word that followed the current word in the first copy. The model (``d_model=64``, 2 heads per
layer, ``n_ctx=32``) solves this with the classic induction circuit:

* a **previous-token head** in layer 0 (position ``i`` attends to ``i - 1``, writing "the word
  before me" into the residual stream), and
* **induction heads** in layer 1 (a word in the second copy attends to the position *after* its
  earlier occurrence, matching its own word against the previous-token head's output there —
  K-composition — and copies the word it finds to the output).

In the shipped checkpoint L0H0 is the previous-token head and both layer-1 heads are induction
heads (L1H1 the stronger); ``task.json`` (see :func:`load_task`) records the heads found by the
scores of :func:`head_scores`, the scores themselves, the training settings and the accuracy.
``examples/train_toy_model.py`` reproduces the checkpoint from its seed. The model was trained on
``<bos> F A A G`` (``n`` from 2 to 12, a random-length prefix ``F`` and filler ``G`` of random
words), so it relies on content, not on positions.

Prompts for patching experiments come from :func:`induction_prompts`: a *clean* prompt
``<bos> A A[:-1]`` whose answer is ``A[-1]``, and a *corrupt* prompt ``<bos> B A[:-1]`` in which the
first copy is replaced by different words, so induction has nothing to copy and ``A[-1]`` (which
appears nowhere in the corrupt prompt) is no longer predictable. ``prefix=k`` puts ``k`` distinct
distractor words before the first copy.

Example::

    from jaxpatch import data

    model = data.load_default_model()
    clean, corrupt, answers, wrong = data.induction_prompts(32, seed=0)
    logits = model(clean)                                  # [32, 2n, d_vocab]
    print(data.decode(clean[0]), "->", data.decode([answers[0]]))
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from .._errors import InputError

#: The word id of the beginning-of-sequence token (always id 0; its string is ``vocab[0]``).
BOS_ID = 0

_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The directory of the embedded induction checkpoint (``config.json``, ``model.safetensors``,
    ``vocab.json``, ``task.json``)."""
    return _DIR / "induction"


def load_default_model(dtype="float32"):
    """The embedded 2-layer induction model as a :class:`jaxpatch.HookedModel`."""
    from ..loading import load_pretrained

    return load_pretrained(default_model_path(), dtype=dtype)


@functools.lru_cache(maxsize=None)
def _vocab() -> tuple[str, ...]:
    return tuple(json.loads((default_model_path() / "vocab.json").read_text()))


@functools.lru_cache(maxsize=None)
def _index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_vocab())}


def load_vocab() -> list[str]:
    """The model's vocabulary: a list of token strings, index = token id (``vocab[0]`` is BOS)."""
    return list(_vocab())


def load_task() -> dict:
    """The contents of ``task.json``: sequence layout, ``n``, the previous-token and induction heads
    found after training, per-head scores, seed, steps and final accuracy."""
    return json.loads((default_model_path() / "task.json").read_text())


def encode(words: str | Iterable[str]) -> np.ndarray:
    """Token ids (``int32 [len]``) of space-separated words, or of a list of words.

    Raises:
        InputError: naming the first unknown word and listing some valid ones.
    """
    if isinstance(words, str):
        words = words.split()
    else:
        words = list(words)
    index = _index()
    ids = []
    for w in words:
        if not isinstance(w, str):
            raise InputError(f"encode expects words as strings, got {type(w).__name__} ({w!r}).")
        if w not in index:
            vocab = _vocab()
            raise InputError(
                f"Unknown word {w!r}: the default model's vocabulary has {len(vocab)} tokens, e.g. "
                f"{list(vocab[:12])} (see jaxpatch.data.load_vocab())."
            )
        ids.append(index[w])
    return np.asarray(ids, dtype=np.int32)


def decode(ids) -> list[str]:
    """Token strings of a 1-D sequence of ids (list, NumPy or JAX array).

    Raises:
        InputError: for ids outside ``[0, len(vocab))`` or a non-1-D input.
    """
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}; decode rows one at a time.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"decode expects integer ids, got dtype {arr.dtype}.")
    vocab = _vocab()
    bad = [int(i) for i in arr if not 0 <= int(i) < len(vocab)]
    if bad:
        raise InputError(f"Token ids must lie in [0, {len(vocab)}) for the default vocabulary; got {bad[:10]}.")
    return [vocab[int(i)] for i in arr]


def _distinct_words(rng: np.random.Generator, rows: int, n: int, n_words: int, exclude=None) -> np.ndarray:
    """``[rows, n]`` word ids in ``[1, n_words]``, distinct within each row (and, if ``exclude``
    ``[rows, m]`` is given, disjoint from that row of ``exclude``)."""
    keys = rng.random((rows, n_words))
    if exclude is not None:
        np.put_along_axis(keys, exclude - 1, np.inf, axis=1)  # never chosen
    return (np.argsort(keys, axis=1)[:, :n] + 1).astype(np.int32)


def make_prompts(rng: np.random.Generator, n_prompts: int, n: int, n_words: int, prefix: int = 0):
    """The prompt generator behind :func:`induction_prompts`, given a vocabulary of ``n_words``
    words (ids ``1..n_words``) plus BOS (id 0). Returns ``(clean, corrupt, answers, wrong)``."""
    if n < 2 or prefix < 0 or prefix + 2 * n > n_words:
        raise InputError(
            f"Need n >= 2, prefix >= 0 and prefix + 2n <= {n_words} (the number of words); got n={n}, prefix={prefix}."
        )
    fa = _distinct_words(rng, n_prompts, prefix + n, n_words)
    b = _distinct_words(rng, n_prompts, n, n_words, exclude=fa)
    f, a = fa[:, :prefix], fa[:, prefix:]
    bos = np.full((n_prompts, 1), BOS_ID, np.int32)
    clean = np.concatenate([bos, f, a, a[:, :-1]], axis=1)
    corrupt = np.concatenate([bos, f, b, a[:, :-1]], axis=1)
    return clean, corrupt, a[:, -1].copy(), b[:, -1].copy()


def induction_prompts(n_prompts: int, seed: int = 0, n: int | None = None, prefix: int = 0):
    """Clean/corrupt prompt pairs for the induction task, deterministic from ``seed``.

    With ``A`` and ``B`` rows of ``n`` distinct random words, ``B`` disjoint from ``A``:

    * ``clean   = <bos> A[0..n-1] A[0..n-2]`` — the answer at the last position is ``A[n-1]``, the
      word that followed ``A[n-2]`` in the first copy (predictable by induction);
    * ``corrupt = <bos> B[0..n-1] A[0..n-2]`` — same length and same second half, but the first copy
      is replaced, so nothing can be copied and ``A[n-1]`` occurs nowhere in the prompt;
    * ``answers = A[n-1]``; ``wrong_answers = B[n-1]``, the corrupt prompt's word at the answer's
      place in the first copy (absent from the clean prompt), for a logit difference
      ``logit[answer] - logit[wrong]`` that is large on clean prompts and near zero (or negative)
      on corrupt ones.

    Note that in the clean layout the answer is also the only word seen once but not yet twice;
    ``prefix > 0`` puts that many further distinct words ``F`` (shared by clean and corrupt, disjoint
    from ``A`` and ``B``) right after ``<bos>`` (``<bos> F A A[:-1]``), so that shortcut no longer
    singles out the answer and only induction does. The model was trained with such prefixes.

    Args:
        n_prompts: number of prompt pairs.
        seed: NumPy seed.
        n: length of the repeated word sequence (default: ``task.json``'s ``n``).
        prefix: number of distinct distractor words before the first copy (default 0).

    Returns:
        ``(clean [P, 1+prefix+2n-1] int32, corrupt [same], answers [P] int32, wrong_answers [P] int32)``.
    """
    if n is None:
        n = int(load_task()["n"])
    return make_prompts(np.random.default_rng(seed), n_prompts, n, len(_vocab()) - 1, prefix)


def head_scores(model, tokens, n: int, prefix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-head ``(prev_token, induction)`` attention scores, each ``[n_layers, n_heads]``.

    ``tokens`` are ``<bos> F A A`` sequences (``[B, 1 + prefix + 2n]``; a clean prompt from
    :func:`induction_prompts` with its answer appended). The previous-token score is the mean
    attention from position ``i`` to ``i - 1`` (``i >= 1``); the induction score is the mean
    attention from each word of the second copy (position ``prefix + n + 1 + j``) to the position
    after its earlier occurrence (``prefix + j + 2``).
    """
    _, caps = model.run(tokens, capture=("blocks.attn.hook_pattern",))
    pattern = np.asarray(caps["blocks.attn.hook_pattern"], np.float32)  # [L, B, N, T, T]
    T = pattern.shape[-1]
    i = np.arange(1, T)
    prev = pattern[..., i, i - 1].mean(axis=(1, 3))
    j = np.arange(n)
    q, k = prefix + n + 1 + j, prefix + j + 2
    q, k = q[q < T], k[q < T]
    ind = pattern[..., q, k].mean(axis=(1, 3))
    return prev, ind
