"""The paper's small models with known circuits: an AND gate, an OR gate and backup behaviour.

Trained by ``examples/train_paper_models.py`` (optax, deterministic from its seed) and shipped in
``jaxpatch/data/paper/<name>/`` (``config.json``, ``model.safetensors``, ``task.json``). Every
prompt is ``<bos> x1 x2 x3 ?`` over a 14-word vocabulary; feature *a* is present when ``x1`` is
``A``, feature *b* when ``x3`` is ``B`` (otherwise filler words ``w1..w8``); the model answers
``yes`` or ``no`` at ``?``:

* ``and_gate`` (1 layer, 2 heads): ``yes`` iff a and b;
* ``or_gate`` (1 layer, 2 heads): ``yes`` iff a or b;
* ``backup`` (2 layers, 1 head each): ``yes`` iff a. Trained intact, with L0H0 removed and with
  L1H0 removed, under label smoothing: L0H0 is the primary head and L1H0 a backup head that
  writes the answer only when L0H0's output is missing.

:func:`gate_prompts` gives clean prompts with both features (answer ``yes``) and corrupted prompts
with neither (``no``), so the circuit is known by construction: patching the residual stream at
position 1 or 3 before layer 0 is changing that input word.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from .._errors import InputError

VOCAB = ["<bos>", "yes", "no", "?", "A", "B"] + [f"w{i}" for i in range(1, 9)]
IDX = {w: i for i, w in enumerate(VOCAB)}
FILLERS = [IDX[f"w{i}"] for i in range(1, 9)]
RULES = {"and_gate": lambda a, b: a and b, "or_gate": lambda a, b: a or b, "backup": lambda a, b: a}
#: backup model: (layer, head) of the primary and of the backup head.
PRIMARY, BACKUP = (0, 0), (1, 0)
FEATURE_POSITIONS = (1, 3)

_DIR = Path(__file__).resolve().parent / "paper"


def model_path(name: str) -> Path:
    if name not in RULES:
        raise InputError(f"Unknown gate model {name!r}; valid: {list(RULES)}.")
    return _DIR / name


def load_gate(name: str, path=None):
    """A shipped gate model (``"and_gate"``, ``"or_gate"``, ``"backup"``) as a HookedModel."""
    from ..loading import load_pretrained

    return load_pretrained(Path(path) if path is not None else model_path(name))


def load_gate_task(name: str) -> dict:
    return json.loads((model_path(name) / "task.json").read_text())


def all_prompts(name: str):
    """Every prompt of a task: ``(tokens [N, 5], answers [N], features [N, 2])``."""
    rule = RULES[name]
    rows, answers, feats = [], [], []
    for a, b in itertools.product((0, 1), (0, 1)):
        for f1, f2, f3 in itertools.product(FILLERS, FILLERS[:4], FILLERS):
            rows.append([IDX["<bos>"], IDX["A"] if a else f1, f2, IDX["B"] if b else f3, IDX["?"]])
            answers.append(IDX["yes"] if rule(a, b) else IDX["no"])
            feats.append((a, b))
    return np.asarray(rows, np.int32), np.asarray(answers, np.int32), np.asarray(feats, np.int32)


def gate_prompts(n: int, seed: int = 0):
    """``(clean, corrupt, answer, wrong)``: clean prompts have both features (answer ``yes``),
    corrupted ones neither (``no``), with the same random filler at position 2."""
    rng = np.random.default_rng(seed)
    f = rng.choice(FILLERS, size=(n, 3))
    f[:, 1] = rng.choice(FILLERS[:4], size=n)
    col = lambda v: np.full((n, 1), v)  # noqa: E731
    clean = np.concatenate([col(IDX["<bos>"]), col(IDX["A"]), f[:, 1:2], col(IDX["B"]), col(IDX["?"])], 1)
    corrupt = np.concatenate([col(IDX["<bos>"]), f[:, 0:1], f[:, 1:2], f[:, 2:3], col(IDX["?"])], 1)
    return clean.astype(np.int32), corrupt.astype(np.int32), np.full(n, IDX["yes"], np.int32), np.full(n, IDX["no"], np.int32)
