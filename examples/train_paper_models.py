"""Train the paper's small models with known circuits (jaxpatch/data/paper/): an AND gate, an OR
gate and backup behaviour, each a tiny GPT-2 (see :mod:`jaxpatch.data.gates` for the task), and
an IOI-style model (see :mod:`jaxpatch.data.ioi`; :func:`train_ioi` below).

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

* ``ioi`` (3 layers, 4 heads, d_model 32): indirect object identification on word-level prompts
  ``<bos> When Mary and John went to the store , John gave a drink to`` -> ``Mary`` (16 names,
  2160 templates; one template in five and one name pair in five held out). optax AdamW
  (warm-up + cosine decay to a tenth, peak lr 3e-3, weight decay 0.01), minibatches of 128
  prompts drawn from the training split by NumPy from ``--seed``, cross-entropy at the last
  position, ``--ioi-steps`` (1000) steps: 38-56 s wall (31 s of CPU time) on a busy 2-core CPU;
  120 KB.
  ``examples/paper_ioi.py`` patches it; tests/test_report_ioi.py asserts what it shows and that
  retraining from the seed gives the shipped weights.

Run: python examples/train_paper_models.py [--seed 0] [--steps 600] [--ioi-steps 1000]
     [--only and_gate,or_gate,backup,ioi] [--out jaxpatch/data/paper]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

try:
    import optax
except ImportError:  # pragma: no cover
    sys.exit('train_paper_models.py needs optax: pip install -e ".[train]" (or ".[test]")')
import jaxpatch
from jaxpatch.data import ioi
from jaxpatch.data.gates import BACKUP, IDX, PRIMARY, RULES, VOCAB, all_prompts
from jaxpatch.models import gpt2

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


IOI_STEPS, IOI_BATCH, IOI_LR, IOI_EVAL = 1000, 128, 3e-3, 512


def make_ioi_config():
    return jaxpatch.ModelConfig.gpt2(n_layers=3, d_model=32, n_heads=4, d_mlp=64, d_vocab=len(ioi.VOCAB), n_ctx=16)


def train_ioi(seed: int = 0, steps: int = IOI_STEPS, batch: int = IOI_BATCH, lr: float = IOI_LR):
    """Train the IOI model; returns ``(model, final_loss)``. Deterministic from ``seed``: JAX
    initialisation from ``PRNGKey(seed)``, prompts from ``numpy.random.default_rng(seed)``, one
    compiled step (CPU float32). The schedule depends on ``steps`` (warm-up over a tenth of them,
    cosine decay to a tenth of ``lr`` at the end), so a shortened run is a different run, not a
    prefix of the full one."""
    config = make_ioi_config()
    params = gpt2.init_params(config, jax.random.PRNGKey(seed), init_range=config.d_model ** -0.5)
    frozen = {"b_U": jnp.zeros_like(params["b_U"])}  # GPT-2 checkpoints have no unembedding bias
    params = {k: v for k, v in params.items() if k != "b_U"}
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10), weight_decay=0.01)
    state = opt.init(params)

    def loss_fn(p, tokens, io):
        logits, _ = gpt2.forward(config, {**p, **frozen}, tokens)
        logp = jax.nn.log_softmax(logits[:, -1], -1)
        return -jnp.mean(jnp.take_along_axis(logp, io[:, None], 1))

    @jax.jit
    def step(p, s, tokens, io):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens, io)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    rng = np.random.default_rng(seed)
    loss = jnp.nan
    for _ in range(steps):
        tokens, io, _s = ioi.sample(rng, batch)
        params, state, loss = step(params, state, tokens, io)
    return jaxpatch.HookedModel(config, {**params, **frozen}, name="IOI model"), float(loss)


def evaluate_ioi(model, n: int = IOI_EVAL, seed: int = 1, held_out: bool = True) -> dict:
    """Accuracy (the IO is the top logit) and the logit difference IO - S on ``n`` prompts."""
    clean, _, io, s = ioi.ioi_prompts(n, seed=seed, held_out=held_out)
    logits = np.asarray(model(clean))[:, -1]
    ld = logits[np.arange(n), io] - logits[np.arange(n), s]
    return {"accuracy": float(np.mean(logits.argmax(-1) == io)), "logit_diff_mean": float(ld.mean()),
            "logit_diff_min": float(ld.min()), "n_prompts": n, "seed": seed}


def training_environment() -> dict:
    """What XLA's CPU arithmetic depends on besides the seed: the JAX build, the CPU and its
    instruction sets, and the number of CPUs this process may use (XLA's thread pool splits
    reductions by it). Retraining matches the shipped weights bit for bit only where these match
    (tests/test_report_ioi.py; measured: 8 simulated devices, one core or an AVX-only build each
    change the weights by up to 1.8% of a tensor's norm, with the same behaviour)."""
    import jaxlib

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine()
    isa = sorted(f for f in flags if f.startswith(("sse4", "avx", "fma", "amx", "f16c")))
    n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "cpu": cpu, "isa": isa, "cpus": n_cpus,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": jax.device_count()}


def save_ioi(model, out: Path, seed: int, steps: int, loss: float, seconds: float | None = None) -> dict:
    jaxpatch.save_pretrained(model, out)
    (out / "vocab.json").write_text(json.dumps(ioi.VOCAB))
    sp = ioi.split()
    task = {"task": "ioi", "layout": ioi.LAYOUT, "n_pos": ioi.N_POS, "name_positions": list(ioi.NAME_POSITIONS),
            "s2_position": ioi.S2_POS, "answer_position": ioi.END_POS,
            "split": {"templates": len(sp["templates"]), "templates_held_out": int(sp["template_held_out"].sum()),
                      "name_pairs": len(sp["pairs"]), "name_pairs_held_out": int(sp["pair_held_out"].sum()),
                      "rule": "template held out iff the sum of its 5 word indices % 5 == 0; pair (i < j) iff (i + j) % 5 == 0"},
            "seed": seed, "steps": steps, "batch": IOI_BATCH, "lr": IOI_LR, "final_loss": loss,
            "held_out": evaluate_ioi(model), "train": evaluate_ioi(model, held_out=False),
            **({"train_seconds": round(seconds, 1)} if seconds is not None else {}), "trained_on": training_environment()}
    (out / "task.json").write_text(json.dumps(task, indent=1))
    return task


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--ioi-steps", type=int, default=IOI_STEPS)
    ap.add_argument("--only", default=",".join([*RULES, "ioi"]), help="comma-separated models to train")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    only = args.only.split(",")
    unknown = sorted(set(only) - {*RULES, "ioi"})
    if unknown:
        ap.error(f"unknown model(s) {unknown}; valid: {[*RULES, 'ioi']}")
    for gate in [g for g in RULES if g in only]:
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
    if "ioi" in only:
        import time

        t0 = time.perf_counter()
        model, loss = train_ioi(args.seed, args.ioi_steps)
        seconds = time.perf_counter() - t0
        task = save_ioi(model, Path(args.out) / "ioi", args.seed, args.ioi_steps, loss, seconds)
        h = task["held_out"]
        print(f"ioi: loss {loss:.4f}, held-out accuracy {h['accuracy']:.3f}, logit difference IO - S mean "
              f"{h['logit_diff_mean']:.2f} (min {h['logit_diff_min']:.2f}) on {h['n_prompts']} prompts; trained in "
              f"{seconds:.0f} s -> {Path(args.out) / 'ioi'}")
        if h["accuracy"] < 0.99:
            print(f"ioi: held-out accuracy {h['accuracy']:.3f} < 0.99; train longer", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
