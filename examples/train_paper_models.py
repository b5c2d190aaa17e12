"""Train the paper's small models with known circuits (jaxpatch/data/paper/): an AND gate, an OR
gate and backup behaviour, each a tiny GPT-2 (see :mod:`jaxpatch.data.gates` for the task).

Every prompt is ``<bos> x1 x2 x3 ?``; feature *a* is ``x1 == A``, feature *b* is ``x3 == B``; the
model answers ``yes``/``no``:

* ``and_gate`` (1 layer, 2 heads): yes iff a and b. For an accurate model each feature is
  necessary (noising one destroys the answer) but not sufficient (denoising one alone does not
  restore it): patching the residual stream at position 1 or 3 before layer 0 *is* changing that
  input word, so the signature follows from the task.
* ``or_gate`` (1 layer, 2 heads): yes iff a or b; each feature sufficient but not necessary.
* ``backup`` (2 layers, 1 head each): yes iff a. Trained on three versions of the model at once:
  intact, with L0H0's output removed, and with L1H0's output removed (W_O zeroed), under label
  smoothing (0.1). Each head alone must solve the task, and a doubled answer costs loss, so L0H0
  (primary) always writes the answer and L1H0 (backup) learns to write it only when L0H0's output
  is missing: ablating either alone changes little; ablating both destroys the answer.

Training: optax Adam (lr 1e-2), full batch over every prompt of the task (1024), cross-entropy at
the last position; deterministic from ``--seed`` (JAX init, CPU float32). All three: 3.6 min wall
(83 s of CPU time) on a 2-core CPU shared with other jobs. Each model is 40-60 KB.
``examples/paper_and_or.py`` and ``examples/paper_backup.py`` show the lessons;
tests/test_report_lessons.py asserts them.

Run: python examples/train_paper_models.py [--seed 0] [--steps 600] [--out jaxpatch/data/paper]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import optax  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit('train_paper_models.py needs optax: pip install -e ".[train]" (or ".[test]")')
import jaxpatch  # noqa: E402
from jaxpatch.models import gpt2  # noqa: E402

from jaxpatch.data.gates import BACKUP, IDX, PRIMARY, RULES, VOCAB, all_prompts  # noqa: E402

LABEL_SMOOTHING = 0.1
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "jaxpatch" / "data" / "paper"


def make_config(gate: str = "and_gate"):
    if gate == "backup":
        return jaxpatch.ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=1, d_mlp=32, d_vocab=len(VOCAB), n_ctx=8)
    return jaxpatch.ModelConfig.gpt2(n_layers=1, d_model=32, n_heads=2, d_mlp=64, d_vocab=len(VOCAB), n_ctx=8)


def without_head(params, layer: int, head: int):
    """``params`` with one head's output projection zeroed (its write to the residual stream removed)."""
    blocks = dict(params["blocks"])
    blocks["W_O"] = blocks["W_O"].at[layer, head].set(0.0)
    return {**params, "blocks": blocks}


def train(gate: str, seed: int, steps: int, lr: float = 1e-2):
    config = make_config(gate)
    params = gpt2.init_params(config, jax.random.PRNGKey(seed), init_range=config.d_model ** -0.5)
    frozen = {"b_U": jnp.zeros_like(params["b_U"])}  # GPT-2 checkpoints have no unembedding bias
    params = {k: v for k, v in params.items() if k != "b_U"}
    tokens, answers, _ = all_prompts(gate)
    opt = optax.adam(lr)
    state = opt.init(params)

    def ce(p, smoothing):
        logits, _ = gpt2.forward(config, {**p, **frozen}, tokens)
        logp = jax.nn.log_softmax(logits[:, -1], -1)
        yes_no = jnp.stack([logp[:, IDX["yes"]], logp[:, IDX["no"]]], -1)  # smoothing over the two answers
        target = jax.nn.one_hot((answers == IDX["no"]).astype(jnp.int32), 2) * (1 - smoothing) + smoothing / 2
        return -jnp.mean(jnp.sum(target * yes_no, -1))

    def loss_fn(p):
        if gate != "backup":
            return ce(p, 0.0)
        # Backup behaviour: the task is trained with the primary head removed, with the backup head
        # removed, and intact. Each head alone must do the task; label smoothing makes a doubled
        # answer (both heads writing) costly, so the backup head learns to write only when the
        # primary head's output is missing from the residual stream.
        return (ce(p, LABEL_SMOOTHING) + ce(without_head(p, *PRIMARY), LABEL_SMOOTHING)
                + ce(without_head(p, *BACKUP), LABEL_SMOOTHING)) / 3

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    for i in range(steps):
        params, state, loss = step(params, state)
    model = jaxpatch.HookedModel(config, {**params, **frozen})
    pred = np.asarray(model(tokens))[:, -1].argmax(-1)
    return model, float(loss), float(np.mean(pred == answers))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    for gate in RULES:
        model, loss, acc = train(gate, args.seed, args.steps)
        out = Path(args.out) / gate
        jaxpatch.save_pretrained(model, out)
        task = {"gate": gate, "vocab": VOCAB, "layout": "<bos> x1 x2 x3 ?  (feature a: x1 == 'A'; feature b: x3 == 'B')",
                "rule": {"and_gate": "yes iff a and b", "or_gate": "yes iff a or b", "backup": "yes iff a"}[gate],
                "feature_positions": [1, 3],
                "answer_position": 4, "seed": args.seed,
                **({"primary_head": list(PRIMARY), "backup_head": list(BACKUP), "label_smoothing": LABEL_SMOOTHING}
                   if gate == "backup" else {}), "steps": args.steps, "final_loss": loss, "accuracy": acc}
        (out / "task.json").write_text(json.dumps(task, indent=1))
        print(f"{gate}: loss {loss:.4f}, accuracy {acc:.3f} on all {len(all_prompts(gate)[0])} prompts -> {out}")
        if acc < 1.0:
            print(f"{gate}: the model does not compute the gate exactly (accuracy {acc:.3f}); train longer", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
