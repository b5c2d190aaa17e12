"""Train jaxpatch's embedded default model: a 2-layer GPT-2 that does induction.

Each training sequence is ``<bos> F A A G`` over a 49-word vocabulary: ``n`` random words ``A``
(``n`` drawn per sequence from ``[--n-min, --n-max]``) repeated once, after a prefix ``F`` of a
random number of random words and followed by random filler words ``G`` up to the context length.
Inside the second copy of ``A`` every next word is predictable (it followed the current word in
the first copy); those positions carry the loss (each sequence's predictable positions weigh the
same in total, whatever its ``n``), all others weigh ``--other-weight``. Because ``n`` and the
prefix length vary, the earlier occurrence can't be found by position, and because words repeat
at random the answer can't be found by elimination ("the word seen once but not yet twice"): the
model has to learn the content-based induction circuit, a previous-token head in layer 0 whose
output an induction head in layer 1 matches against the current word.

Training uses optax AdamW (warm-up + cosine decay) from jaxpatch's ``init_params`` with weights of
std ``1/sqrt(d_model)``, biases zeroed and the position embedding scaled up (``POS_INIT_SCALE``):
with GPT-2's small position embedding the layer-0 heads first become blurry "recent words" heads
and the model settles on an equivalent but shifted circuit (layer 1 attends one position past the
induction target and reads the answer through a layer-0 head); a larger initial position
embedding makes the sharp previous-token head form first, which gives the textbook circuit.

After training the script prints the loss curve, the accuracy on the repeated half, the clean vs
corrupt logit difference and per-head previous-token / induction scores, and writes (to ``--out``,
default ``jaxpatch/data/induction``):

* ``config.json`` + ``model.safetensors`` (via :func:`jaxpatch.save_pretrained`),
* ``vocab.json``: the token strings, index = id (``"<bos>"`` is id 0),
* ``task.json``: layouts, ``n``, the heads found, scores, seed, steps, accuracy.

Everything is deterministic from ``--seed`` (NumPy data, JAX init, CPU float32); see
:mod:`jaxpatch.data` for loading the result and building prompts.

``--smoke`` checks that the recipe still learns the task in under a minute (37-48 s measured on
a busy 2-core CPU, warm and cold compilation cache): it trains a fresh model for ``SMOKE_STEPS`` steps (the induction circuit forms around step
900-1100 of the full run), writes nothing (unless ``--out`` is given; never over the embedded
model), and exits with status 1 and a message naming the numbers if the accuracy on the
repeated half of held-out prompts, with and without a distractor prefix, is below
``SMOKE_MIN_ACCURACY`` (chance, and an untrained model: about 0.02).
``tests/test_train_smoke.py`` runs it.

Needs optax: ``pip install -e ".[train]"`` (the ``test`` extra includes it).

Run: python examples/train_toy_model.py [--seed 0] [--steps 2000] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
try:
    import optax  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit('train_toy_model.py needs optax: pip install -e ".[train]" (or ".[test]")')

import jaxpatch  # noqa: E402
from jaxpatch.data import BOS_ID, default_model_path, head_scores, make_prompts  # noqa: E402
from jaxpatch.models import gpt2  # noqa: E402

BOS = "<bos>"
#: 49 short, common, distinct English words (ids 1..49).
WORDS = (
    "cat dog sun red big run sky tree book fish bird door cold hot rain blue milk hat cup pen "
    "box car bus map key egg ant bee owl fox pig cow hen bat jam tea pie rug fan ink oak ice "
    "mud fog sea bay hill star moon"
).split()
VOCAB = [BOS] + WORDS
assert len(set(VOCAB)) == len(VOCAB) == 50

# Model and task sizes.
N_CTX = 32
D_MODEL, N_HEADS, D_MLP = 64, 2, 64
POS_INIT_SCALE = 4.0  # the initial W_pos is multiplied by this (see the module docstring)
N_EVAL = 10  # n of the prompts used for evaluation and recorded in task.json
PREFIX_EVAL = 8  # distractor prefix length of the second evaluation
DEFAULT_STEPS = 2000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "jaxpatch" / "data" / "induction"
#: --smoke: steps (same recipe, schedule compressed to them) and the accuracy the repeated half of
#: held-out prompts must reach, with and without the distractor prefix. Measured on a 2-core CPU
#: (seed 0): 0.956 / 0.933 after 1500 steps, 0.89 / 0.75 after 1200, 0.16 / 0.21 after 1000
#: (before the circuit forms); 0.02 untrained, which is chance (1/49).
SMOKE_STEPS = 1500
SMOKE_MIN_ACCURACY = 0.5


def make_config(d_model=D_MODEL, n_heads=N_HEADS, d_mlp=D_MLP):
    return jaxpatch.ModelConfig.gpt2(
        n_layers=2, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, d_vocab=len(VOCAB), n_ctx=N_CTX
    )


def make_batch(rng: np.random.Generator, batch: int, n_min: int, n_max: int, other_weight: float):
    """Tokens ``[B, N_CTX]`` laid out ``<bos> F A A G`` and loss weights ``[B, N_CTX - 1]`` per
    predicted position (``4 / (n - 1)`` where the next token is predictable by induction, else
    ``other_weight``).

    ``A``: ``n`` random words, ``n`` uniform in ``[n_min, n_max]``; ``F``: a prefix of ``f`` random
    words, ``f`` uniform in ``[0, N_CTX - 1 - 2n]``; ``G``: random filler words up to the context
    length. Words are drawn uniformly with replacement.
    """
    n_words = len(WORDS)
    n = rng.integers(n_min, n_max + 1, size=(batch, 1))
    f = np.floor(rng.random((batch, 1)) * (N_CTX - 2 * n)).astype(np.int64)  # 0 .. N_CTX-1-2n
    words = rng.integers(1, n_words + 1, size=(batch, N_CTX))  # F and A from the front, G from the back
    pos = np.arange(N_CTX)[None, :]
    first = (pos <= f + n)  # <bos>, F and the first copy of A
    second = (pos > f + n) & (pos <= f + 2 * n)
    tokens = np.where(first, np.take_along_axis(words, np.maximum(pos - 1, 0), 1), words)
    tokens = np.where(second, np.take_along_axis(words, np.clip(pos - 1 - n, 0, N_CTX - 1), 1), tokens)
    tokens[:, 0] = BOS_ID
    # Position p predicts token p+1; predictable for p in [f+n+1, f+2n-1].
    p = pos[:, :-1]
    predictable = (p >= f + n + 1) & (p <= f + 2 * n - 1)
    # Every sequence's predictable positions weigh the same in total, whatever its n.
    weights = np.where(predictable, 4.0 / (n - 1), other_weight).astype(np.float32)
    return tokens.astype(np.int32), weights


def zero_biases(params):
    """``params`` with every bias zero and every layer-norm weight one (GPT-2's own init)."""
    def fix(path, a):
        name = path[-1].key
        if name.startswith("b_") or name.endswith("_b"):
            return jnp.zeros_like(a)
        if name.endswith("_w"):
            return jnp.ones_like(a)
        return a

    return jax.tree_util.tree_map_with_path(fix, params)


def loss_fn(trainable, frozen, config, tokens, weights):
    params = {**trainable, **frozen}
    logits, _ = gpt2.forward(config, params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)


def evaluate(model, n, prefix=0, n_prompts=1000, seed=12345):
    """Metrics on fresh prompts from :func:`jaxpatch.data.make_prompts` (``<bos> F A A[:-1]``, words
    distinct): last-position accuracy, accuracy over the predictable positions of the repeated
    half, mean loss at the last position, mean clean and corrupt logit differences
    ``logit[answer] - logit[wrong]``; plus the clean prompts with their answers appended."""
    clean, corrupt, answers, wrong = make_prompts(np.random.default_rng(seed), n_prompts, n, len(WORDS), prefix)
    full = np.concatenate([clean, answers[:, None]], axis=1)  # <bos> F A A
    logits = np.asarray(model(clean), np.float64)
    corrupt_last = np.asarray(model(corrupt), np.float64)[:, -1]
    last = logits[:, -1]
    rows = np.arange(n_prompts)
    start = prefix + n + 1  # positions start .. end-1 predict tokens start+1 .. end
    logp = last - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1, keepdims=True)) - last.max(-1, keepdims=True)
    return {
        "accuracy_last_position": float(np.mean(last.argmax(-1) == answers)),
        "accuracy_repeated_half": float(np.mean(logits[:, start:].argmax(-1) == full[:, start + 1 :])),
        "loss_last_position": float(-np.mean(logp[rows, answers])),
        "logit_diff_clean": float(np.mean(last[rows, answers] - last[rows, wrong])),
        "logit_diff_corrupt": float(np.mean(corrupt_last[rows, answers] - corrupt_last[rows, wrong])),
    }, full


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_STEPS}, or {SMOKE_STEPS} with --smoke")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-min", type=int, default=2)
    ap.add_argument("--n-max", type=int, default=12)
    ap.add_argument("--other-weight", type=float, default=0.1)
    ap.add_argument("--out", default=None,
                    help="where to write the model (default: the embedded model, jaxpatch/data/induction; "
                         "with --smoke: nowhere)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"quick check that training still learns induction: {SMOKE_STEPS} steps, nothing written, "
                         f"exit status 1 if held-out repeated-half accuracy < {SMOKE_MIN_ACCURACY}")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = SMOKE_STEPS if args.smoke else DEFAULT_STEPS
    if args.smoke and args.out is not None and Path(args.out).resolve() in (DEFAULT_OUT, default_model_path().resolve()):
        ap.error("--smoke never overwrites the embedded model; give another --out or none")
    if args.out is None and not args.smoke:
        args.out = str(DEFAULT_OUT)
    if not 2 <= args.n_min <= args.n_max or 1 + 2 * args.n_max > N_CTX:
        ap.error(f"need 2 <= n_min <= n_max and 1 + 2 * n_max <= n_ctx = {N_CTX}")

    config = make_config()
    init_range = config.d_model**-0.5
    params = zero_biases(gpt2.init_params(config, jax.random.PRNGKey(args.seed), init_range=init_range))
    params["W_pos"] = params["W_pos"] * POS_INIT_SCALE
    untrained = evaluate(jaxpatch.HookedModel(config, params), N_EVAL, prefix=PREFIX_EVAL, n_prompts=200)[0] if args.smoke else None
    # GPT-2 checkpoints have no unembedding bias: keep b_U frozen at zero.
    frozen = {"b_U": params.pop("b_U")}
    trainable = params
    warmup = min(200, args.steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, config, tokens, weights)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    losses = []
    report_every = max(1, args.steps // 20)
    print(f"training {config} for {args.steps} steps (batch {args.batch}, lr {args.lr})")
    for i in range(args.steps):
        tokens, weights = make_batch(rng, args.batch, args.n_min, args.n_max, args.other_weight)
        trainable, opt_state, loss = step(trainable, opt_state, tokens, weights)
        losses.append(loss)
        if (i + 1) % report_every == 0 or i + 1 == args.steps:
            recent = float(np.mean(np.asarray(jnp.stack(losses[-report_every:]))))
            print(f"step {i + 1:5d}  weighted loss {recent:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    train_time = time.perf_counter() - t0
    final_loss = float(np.asarray(jnp.stack(losses[-100:])).mean())
    print(f"trained {args.steps} steps in {train_time:.1f}s; final weighted loss (mean of last 100 steps) {final_loss:.4f}")

    model = jaxpatch.HookedModel(config, {**trainable, **frozen})
    metrics, full = evaluate(model, N_EVAL)
    metrics_p, _ = evaluate(model, N_EVAL, prefix=PREFIX_EVAL)
    for name, m in ((f"n={N_EVAL}", metrics), (f"n={N_EVAL}, prefix={PREFIX_EVAL}", metrics_p)):
        print(
            f"eval ({name}): accuracy last position {m['accuracy_last_position']:.4f}, repeated half "
            f"{m['accuracy_repeated_half']:.4f}; last-position loss {m['loss_last_position']:.4f}; "
            f"logit diff clean {m['logit_diff_clean']:.2f}, corrupt {m['logit_diff_corrupt']:.2f}"
        )

    prev, ind = head_scores(model, full[:500], N_EVAL)
    print("\nper-head scores (prev-token / induction):")
    print("         " + "  ".join(f"{'H' + str(h):>15s}" for h in range(config.n_heads)))
    for layer in range(config.n_layers):
        cells = "  ".join(f"{prev[layer, h]:6.3f} / {ind[layer, h]:5.3f}" for h in range(config.n_heads))
        print(f"  L{layer}     {cells}")
    prev_head = [0, int(prev[0].argmax())]
    ind_head = [int(x) for x in np.unravel_index(ind.argmax(), ind.shape)]
    prev_heads = [[0, int(h)] for h in np.argsort(-prev[0]) if prev[0, h] > 0.5]
    ind_heads = [[int(l), int(h)] for l, h in zip(*np.unravel_index(np.argsort(-ind, axis=None), ind.shape)) if ind[l, h] > 0.5]
    print(f"previous-token head: L{prev_head[0]}H{prev_head[1]}  induction head: L{ind_head[0]}H{ind_head[1]}")
    print(f"all heads scoring > 0.5: previous-token {prev_heads}, induction {ind_heads}")
    if ind_head[0] != 1 or prev[tuple(prev_head)] < 0.5 or ind[tuple(ind_head)] < 0.5:
        print("WARNING: no clear previous-token head in layer 0 and induction head in layer 1")

    if args.smoke:
        acc = {"no prefix": metrics["accuracy_repeated_half"], f"prefix {PREFIX_EVAL}": metrics_p["accuracy_repeated_half"]}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        print(f"\nsmoke: held-out repeated-half accuracy {shown}; untrained {untrained['accuracy_repeated_half']:.3f}, "
              f"chance {1 / len(WORDS):.3f}; required >= {SMOKE_MIN_ACCURACY} ({time.perf_counter() - t0:.1f}s)")
        if min(acc.values()) < SMOKE_MIN_ACCURACY:
            sys.exit(f"SMOKE FAILED: after {args.steps} steps (seed {args.seed}) the model did not learn induction: "
                     f"held-out repeated-half accuracy {shown} is below {SMOKE_MIN_ACCURACY} "
                     f"(chance {1 / len(WORDS):.3f}). The training recipe or the model code has regressed.")
        print("smoke: OK, the training recipe still learns induction")
        if args.out is None:
            return

    out = Path(args.out)
    jaxpatch.save_pretrained(model, out)
    (out / "vocab.json").write_text(json.dumps(VOCAB) + "\n")
    task = {
        "task": "induction",
        "description": (
            "Continue a repeated word sequence: in '<bos> A A' (A = n random words), each word of the "
            "second copy is followed by the word that followed it in the first copy."
        ),
        "layout": "<bos> A[0..n-1] A[0..n-1]",
        "prompts": {
            "clean": "<bos> A[0..n-1] A[0..n-2] -> answer A[n-1]",
            "corrupt": "<bos> B[0..n-1] A[0..n-2] (B disjoint from A) -> answer unpredictable",
            "wrong_answer": "B[n-1]",
            "words": "distinct within A, and B disjoint from A",
            "prefix": "optional distinct distractor words F after <bos>, shared by clean and corrupt",
        },
        "bos_id": BOS_ID,
        "n": N_EVAL,
        "n_ctx": N_CTX,
        "prev_token_head": prev_head,
        "induction_head": ind_head,
        "prev_token_heads": prev_heads,
        "induction_heads": ind_heads,
        "scores": {
            "prev_token": [[round(float(x), 4) for x in row] for row in prev],
            "induction": [[round(float(x), 4) for x in row] for row in ind],
            "definition": (
                "[layer][head] mean attention on clean '<bos> A A' sequences (n=%d): prev_token from "
                "position i to i-1; induction from each word of the second copy to the position after "
                "its first occurrence" % N_EVAL
            ),
        },
        "training": {
            "script": "examples/train_toy_model.py",
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "optimizer": "optax adamw(weight_decay=0.01), warmup_cosine_decay lr, clip_by_global_norm(1.0)",
            "lr": args.lr,
            "init": f"init_params(init_range={init_range:.4f}), biases zero, LN weights one, W_pos x{POS_INIT_SCALE}",
            "layout": "<bos> F A A G: n in [n_min, n_max], prefix F of 0..n_ctx-1-2n words, filler G; words i.i.d. uniform",
            "n_min": args.n_min,
            "n_max": args.n_max,
            "loss_weights": "4/(n-1) on the n-1 predictable positions of the second copy, other_weight elsewhere",
            "other_weight": args.other_weight,
            "final_weighted_loss": round(final_loss, 4),
            "train_seconds": round(train_time, 1),
        },
        "eval": {"prefix": 0, "n_prompts": 1000, **{k: round(v, 4) for k, v in metrics.items()}},
        "eval_prefix": {"prefix": PREFIX_EVAL, "n_prompts": 1000, **{k: round(v, 4) for k, v in metrics_p.items()}},
    }
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")
    print(f"\nwrote {out}: " + ", ".join(f"{q.name} ({q.stat().st_size} B)" for q in sorted(out.iterdir())))


if __name__ == "__main__":
    main()
