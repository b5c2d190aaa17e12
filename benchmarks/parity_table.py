"""Parity table: every family case of ``tests/test_families.py`` against ``transformers``.

For each case (a small random-init ``transformers`` model saved and loaded by jaxpatch) it prints
the relative logit error (max abs error / max abs logit):

* ``f32``: jaxpatch float32 vs transformers float32;
* ``f64``: both float64, transformers with its float32 islands removed (as the tests do);
* ``f64 raw``: both float64, transformers unmodified;
* ``padded``: a left- and a right-padded jaxpatch batch of prompts of different lengths vs
  transformers run on each prompt alone (float32; worst of both sides).

Needs the ``[test]`` extra (torch, transformers). Run: ``python benchmarks/parity_table.py``
(``--cases gpt2,gemma2`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Patch:
    """The part of pytest's monkeypatch that ``hf_float64`` uses, undone on exit."""

    def __init__(self):
        self._undo = []

    def setattr(self, obj, name, value):
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, name, old in reversed(self._undo):
            setattr(obj, name, old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import transformers

    import jaxpatch
    from tests import test_families as tf
    from tests.helpers import rel_err

    names = args.cases.split(",") if args.cases else list(tf.CASES)
    rows = []
    for name in names:
        hf = tf.build(name, seed=len(name))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ckpt"
            hf.save_pretrained(path)
            model = jaxpatch.load_pretrained(path)
            toks = tf.tokens()
            f32 = rel_err(tf.run(model, toks), tf.hf_logits(hf, toks))
            # padded: prompts of lengths 12, 7, 9 in one batch vs each alone in transformers
            lens = (tf.PROMPT, 7, 9)
            rng = np.random.default_rng(7)
            prompts = [rng.integers(0, tf.VOCAB, n).astype(np.int32) for n in lens]
            padded = 0.0
            for side in ("left", "right"):
                T = max(lens)
                t = np.zeros((len(lens), T), np.int32)
                mask = np.zeros_like(t)
                for i, p in enumerate(prompts):
                    sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
                    t[i, sl], mask[i, sl] = p, 1
                got = np.asarray(model.run(t, attention_mask=mask)[0]) if model.config.n_ctx >= T else None
                if got is None:
                    continue
                for i, p in enumerate(prompts):
                    sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
                    padded = max(padded, rel_err(got[i, sl], tf.hf_logits(hf, p[None])[0]))
            with jax.enable_x64(True):
                m64 = jaxpatch.load_pretrained(path, dtype="float64")
                toks2 = tf.tokens(seed=2)
                with _Patch() as mp:
                    h64 = tf.hf_float64(path, m64.config, mp)
                    f64 = rel_err(tf.run(m64, toks2), tf.hf_logits(h64, toks2))
                raw = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
                f64_raw = rel_err(tf.run(m64, toks2), tf.hf_logits(raw, toks2))
        row = dict(case=name, architecture=model.config.architecture, f32=float(f32), f64=float(f64),
                   f64_raw=float(f64_raw), padded=float(padded))
        rows.append(row)
        print(f"{name:18s} {row['architecture']:12s} f32 {f32:.1e}  f64 {f64:.1e}  f64 raw {f64_raw:.1e}  "
              f"padded {padded:.1e}", flush=True)
    print("\n| case | architecture | f32 rel err | f64 rel err | f64 vs unmodified transformers | padded rel err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['architecture']} | {r['f32']:.1e} | {r['f64']:.1e} | {r['f64_raw']:.1e} | "
              f"{r['padded']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
