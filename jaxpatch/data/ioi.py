"""An IOI-style model (indirect object identification, Wang et al. 2022) with word-level tokens.

Trained by ``examples/train_paper_models.py`` (optax, deterministic from its seed; see
:func:`train_ioi` there) and shipped in ``jaxpatch/data/paper/ioi/`` next to the gate models
(``config.json``, ``model.safetensors``, ``vocab.json``: a word-level vocabulary that
:func:`jaxpatch.load_pretrained` turns into the model's tokenizer, ``task.json``: the layout, the
split, the training settings and the measured accuracy).

Every prompt has one layout, 15 words (one token each, space-separated)::

    <bos> When Mary and John went to the store , John gave a drink to      -> Mary
      0    1    2    3   4    5   6   7    8   9  10   11  12  13   14

The two names at positions 2 and 4 (:data:`NAME_POSITIONS`) appear in both orders (ABBA and
BABA); the subject repeated at position 10 (:data:`S2_POS`) is one of them, and the answer at the
last position (:data:`END_POS`) is the *other* name, the indirect object (IO). The template words
vary: 3 openings x 4 verb phrases x 6 places x 5 actions x 6 objects = 2160 templates over 16 names.

Held out from training (:func:`split`): one template in five and one unordered name pair in five
(by index arithmetic, fixed, independent of the training seed). Held-out prompts combine a
held-out template with a held-out name pair; every word still occurs in training.

Corruptions (:func:`ioi_prompts`), each the same template with names changed:

* ``"s2"`` -- the repeated subject replaced by a third name C (``A B ... C``): nothing is repeated,
  so the prompt no longer says which of A and B is the indirect object. Only position 10 differs.
* ``"abc"`` -- all three name slots replaced by three other distinct names (``C D ... E``, the IOI
  paper's ABC distribution): neither the clean IO nor the clean subject appears.

Example::

    from jaxpatch.data import ioi

    model = ioi.load_ioi()
    clean, corrupt, answer, wrong = ioi.ioi_prompts(32, seed=0)      # held-out prompts
    print(ioi.decode(clean[0]), "->", ioi.decode([answer[0]]))
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np

from .._errors import InputError

NAMES = ["Mary", "John", "Anna", "Tom", "Kate", "Paul", "Lucy", "Mark",
         "Emma", "Jack", "Sara", "Adam", "Rose", "Bill", "Jane", "Carl"]
OPENINGS = ["When", "After", "While"]
VERB_PHRASES = [("went", "to", "the"), ("ran", "to", "the"), ("were", "at", "the"), ("walked", "to", "the")]
PLACES = ["store", "park", "school", "office", "beach", "garden"]
ACTIONS = ["gave", "handed", "passed", "threw", "sent"]
OBJECTS = ["drink", "book", "ball", "key", "gift", "letter"]
_OTHER = ["and", ",", "a"]

VOCAB = ["<bos>"] + NAMES + list(dict.fromkeys(
    OPENINGS + [w for vp in VERB_PHRASES for w in vp] + PLACES + ACTIONS + OBJECTS + _OTHER))
IDX = {w: i for i, w in enumerate(VOCAB)}
NAME_IDS = np.asarray([IDX[n] for n in NAMES], np.int32)

#: positions of the two names of the opening clause, of the repeated subject, and of the answer.
NAME_POSITIONS = (2, 4)
S2_POS = 10
END_POS = 14
N_POS = 15
LAYOUT = "<bos> OPENING A and B V V V PLACE , S ACTION a OBJECT to -> IO  (S in {A, B}; IO the other)"

_DIR = Path(__file__).resolve().parent / "paper" / "ioi"
N_TEMPLATES = len(OPENINGS) * len(VERB_PHRASES) * len(PLACES) * len(ACTIONS) * len(OBJECTS)


def model_path() -> Path:
    """The directory of the shipped IOI checkpoint."""
    return _DIR


def load_ioi(path=None):
    """The shipped IOI model as a :class:`jaxpatch.HookedModel` (with its word-level tokenizer)."""
    from ..loading import load_pretrained

    return load_pretrained(Path(path) if path is not None else model_path())


def load_ioi_task() -> dict:
    return json.loads((model_path() / "task.json").read_text())


def encode(text: str) -> np.ndarray:
    words = text.split()
    bad = [w for w in words if w not in IDX]
    if bad:
        raise InputError(f"Unknown word {bad[0]!r}; the IOI vocabulary has {len(VOCAB)} words, e.g. {VOCAB[1:8]}.")
    return np.asarray([IDX[w] for w in words], np.int32)


def decode(ids) -> str:
    return " ".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))


@functools.cache
def split() -> dict[str, np.ndarray]:
    """The fixed train / held-out split: ``templates`` ``[2160, 5]`` (opening, verb phrase, place,
    action, object indices) with ``template_held_out`` ``[2160]`` (a template is held out when the
    sum of its indices is divisible by 5), and ``pairs`` ``[120, 2]`` (unordered name-index pairs
    ``i < j``) with ``pair_held_out`` (when ``i + j`` is divisible by 5)."""
    templates = np.asarray(list(itertools.product(range(len(OPENINGS)), range(len(VERB_PHRASES)), range(len(PLACES)),
                                                  range(len(ACTIONS)), range(len(OBJECTS)))), np.int32)
    pairs = np.asarray([(i, j) for i in range(len(NAMES)) for j in range(i + 1, len(NAMES))], np.int32)
    return {"templates": templates, "template_held_out": templates.sum(1) % 5 == 0,
            "pairs": pairs, "pair_held_out": pairs.sum(1) % 5 == 0}


def _template_tokens(t: np.ndarray) -> np.ndarray:
    """``[B, 15]`` tokens of templates ``t`` ``[B, 5]`` with the name slots left as 0."""
    B = len(t)
    tok = np.zeros((B, N_POS), np.int32)
    lut = {"o": [IDX[w] for w in OPENINGS], "p": [IDX[w] for w in PLACES], "a": [IDX[w] for w in ACTIONS],
           "x": [IDX[w] for w in OBJECTS]}
    vp = np.asarray([[IDX[w] for w in v] for v in VERB_PHRASES], np.int32)
    tok[:, 1] = np.asarray(lut["o"])[t[:, 0]]
    tok[:, 3] = IDX["and"]
    tok[:, 5:8] = vp[t[:, 1]]
    tok[:, 8] = np.asarray(lut["p"])[t[:, 2]]
    tok[:, 9] = IDX[","]
    tok[:, 11] = np.asarray(lut["a"])[t[:, 3]]
    tok[:, 12] = IDX["a"]
    tok[:, 13] = np.asarray(lut["x"])[t[:, 4]]
    tok[:, 14] = IDX["to"]
    return tok


def sample(rng: np.random.Generator, n: int, held_out: bool = False):
    """``(tokens [n, 15], io [n], s [n])``: ``n`` IOI prompts drawn from the training part of the
    split (``held_out=False``) or from the held-out part, half ABBA and half BABA at random."""
    sp = split()
    temps = sp["templates"][sp["template_held_out"] == held_out]
    pairs = sp["pairs"][sp["pair_held_out"] == held_out]
    t = temps[rng.integers(0, len(temps), n)]
    p = pairs[rng.integers(0, len(pairs), n)]
    flip = rng.integers(0, 2, n).astype(bool)  # which of the pair is the IO
    io = NAME_IDS[np.where(flip, p[:, 0], p[:, 1])]
    s = NAME_IDS[np.where(flip, p[:, 1], p[:, 0])]
    first_is_io = rng.integers(0, 2, n).astype(bool)  # ABBA (IO first) or BABA (S first)
    tok = _template_tokens(t)
    tok[:, 2] = np.where(first_is_io, io, s)
    tok[:, 4] = np.where(first_is_io, s, io)
    tok[:, S2_POS] = s
    return tok, io, s


def _other_names(rng: np.random.Generator, exclude: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` distinct name ids per row, none of them in that row of ``exclude`` ``[n, m]``."""
    keys = rng.random((len(exclude), len(NAMES)))
    np.put_along_axis(keys, exclude - NAME_IDS[0], np.inf, axis=1)
    return NAME_IDS[np.argsort(keys, axis=1)[:, :k]]


def ioi_prompts(n_prompts: int, seed: int = 0, corrupt: str = "s2", held_out: bool = True):
    """Clean/corrupt IOI prompt pairs, deterministic from ``seed``: ``(clean, corrupt, answer, wrong)``
    with ``answer`` the clean indirect object and ``wrong`` the clean subject (for the logit
    difference IO - S). ``corrupt`` is ``"s2"`` (the repeated subject replaced by a third name)
    or ``"abc"`` (all three name slots replaced by three other distinct names); see the module
    docstring. ``held_out=True`` (the default) draws from the part of the split the model never
    saw in training."""
    if corrupt not in ("s2", "abc"):
        raise InputError(f"corrupt must be 's2' or 'abc', got {corrupt!r}.")
    rng = np.random.default_rng(seed)
    clean, io, s = sample(rng, n_prompts, held_out)
    bad = clean.copy()
    if corrupt == "s2":
        bad[:, S2_POS] = _other_names(rng, np.stack([io, s], 1), 1)[:, 0]
    else:
        c, d, e = _other_names(rng, np.stack([io, s], 1), 3).T
        bad[:, NAME_POSITIONS[0]], bad[:, NAME_POSITIONS[1]], bad[:, S2_POS] = c, d, e
    return clean, bad, io, s
