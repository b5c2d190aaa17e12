"""The auto-circuit column of ``bench_circuits.py``: the same nested circuits, evaluated by
auto-circuit (PyTorch, TransformerLens, edge masks) on the same weights and prompts.

auto-circuit is not a jaxpatch dependency and does not install into jaxpatch's environment
(it pins ``transformer-lens`` 4.x); install it in its own virtualenv::

    python -m venv /tmp/acvenv && /tmp/acvenv/bin/pip install torch==2.13.0 auto-circuit

``bench_circuits.py`` runs this script with that interpreter (``--python``, or ``$AUTO_CIRCUIT_PYTHON``)
when one is given, passing ``--inputs DIR``: the jaxpatch model's weights (TransformerLens names),
the prompts, the circuits as ``[C, U, V]`` masks over jaxpatch's edge graph and jaxpatch's values.
The circuits are handed to auto-circuit as edge scores (an edge's score is the number of circuits
holding it: nested circuits are then exactly auto-circuit's top-k thresholds) and run with
``run_circuits(..., PatchType.TREE_PATCH, AblationType.RESAMPLE)``: the clean prompts with every edge
outside the circuit carrying the corrupted run's value, as ``jaxpatch.evaluate_circuit`` defines it.
The logit differences are checked against jaxpatch's before any time is reported.

Without auto-circuit (the CI environment), it says so and exits 0. ``--smoke`` without
``--inputs`` builds a tiny random model itself (checks that auto-circuit runs here, nothing timed
against jaxpatch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _tl_model(meta, weights):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = meta["config"]
    cfg = HookedTransformerConfig(
        n_layers=c["n_layers"], d_model=c["d_model"], n_ctx=c["n_ctx"], d_head=c["d_head"], n_heads=c["n_heads"],
        d_mlp=c["d_mlp"], d_vocab=c["d_vocab"], act_fn=c["act_fn"], normalization_type="LN", eps=c["eps"],
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", dtype=torch.float32,
        device="cpu", seed=0)
    tl = HookedTransformer(cfg)
    if weights is not None:
        sd = {k: torch.from_numpy(weights[k].copy()) for k in weights.files}
        missing, unexpected = tl.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        assert all(k.endswith(("IGNORE", "mask")) for k in missing), missing
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    return tl.eval()


def _edge_key(name: str, dest: bool) -> str:
    """auto-circuit node names -> jaxpatch's (``A3.5`` -> ``L3H5``, ``A3.5.Q`` -> ``L3H5.q``, ``MLP 2``
    as a source -> ``MLP2``, as a destination -> ``MLP2.in``, ``Resid Start``/``End``)."""
    if name == "Resid Start":
        return "embed"
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return f"MLP{name[4:]}" + (".in" if dest else "")
    parts = name[1:].split(".")
    out = f"L{parts[0]}H{parts[1]}"
    return out + ("." + parts[2].lower() if len(parts) > 2 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--inputs", type=Path, help="directory written by bench_circuits.py")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    try:
        import auto_circuit  # noqa: F401
        import torch
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.prune import run_circuits
        from auto_circuit.types import AblationType, PatchType
        from auto_circuit.utils.graph_utils import patchable_model
    except ImportError as e:
        print(f"auto-circuit not installed here ({e}); nothing to compare (exit 0)")
        return 0
    import numpy as np

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.inputs is None:
        if not args.smoke:
            ap.error("--inputs DIR (from bench_circuits.py) is required outside --smoke")
        meta = {"config": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16, "d_mlp": 256, "d_vocab": 257,
                           "n_ctx": 32, "act_fn": "gelu_new", "eps": 1e-5}}
        rng = np.random.default_rng(0)
        clean = rng.integers(0, 257, (2, 8))
        corrupt = clean.copy()
        corrupt[:, 4] = (corrupt[:, 4] + 1) % 257
        ans, wrong = rng.integers(0, 257, 2), rng.integers(0, 257, 2)
        weights, masks, up, down, want = None, None, None, None, None
    else:
        meta = json.loads((args.inputs / "meta.json").read_text())
        weights = np.load(args.inputs / "weights.npz")
        d = np.load(args.inputs / "data.npz")
        clean, corrupt, ans, wrong, masks, want = (d[k] for k in ("clean", "corrupt", "answer", "wrong", "masks", "want"))
        up, down = meta["up"], meta["down"]

    t0 = time.perf_counter()
    tl = _tl_model(meta, weights)
    model = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))
    wrap_s = time.perf_counter() - t0
    B = clean.shape[0]
    ds = PromptDataset(torch.as_tensor(clean), torch.as_tensor(corrupt), [torch.tensor([int(a)]) for a in ans],
                       [torch.tensor([int(w)]) for w in wrong])
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=B, shuffle=False)

    # circuits -> edge scores: the number of circuits holding the edge (nested -> top-k thresholds)
    prune_scores = {mod: torch.zeros_like(m) for mod, m in model.new_prune_scores().items()} \
        if hasattr(model, "new_prune_scores") else None
    if prune_scores is None:
        from auto_circuit.utils.graph_utils import set_all_masks  # noqa: F401
        raise RuntimeError("this auto-circuit has no PatchableModel.new_prune_scores")
    if masks is None:  # smoke: random nested circuits
        scores = {e: float(s) for e, s in zip(model.edges, np.random.default_rng(0).random(len(model.edges)))}
        counts = sorted({0, len(model.edges) // 2, len(model.edges)})
    else:
        held = masks.sum(0)  # [U, V]
        scores, counts = {}, [int(c) for c in masks.sum((1, 2))]
        for e in model.edges:
            scores[e] = float(held[up.index(_edge_key(e.src.name, False)), down.index(_edge_key(e.dest.name, True))])
        n_graph = int(meta["n_graph_edges"])
        assert len(model.edges) == n_graph, f"auto-circuit graph has {len(model.edges)} edges, jaxpatch's {n_graph}"
    for e, s in scores.items():
        prune_scores[e.dest.module_name][e.patch_idx] = s

    def run():
        return run_circuits(model, loader, counts, prune_scores, patch_type=PatchType.TREE_PATCH,
                            ablation_type=AblationType.RESAMPLE)

    t0 = time.perf_counter()
    outs = run()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    b = torch.arange(B)
    got = {}
    for n, by_batch in outs.items():
        lg = next(iter(by_batch.values()))  # [B, V] at the last position
        got[int(n)] = (lg[b, torch.as_tensor(ans)] - lg[b, torch.as_tensor(wrong)]).numpy()
    res = {"auto_circuit_version": _version(), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
           "circuits": len(counts), "n_edges": len(model.edges), "wrap_s": wrap_s, "first_s": first_s,
           "median_s": statistics.median(times), "all_s": times}
    if want is not None:
        err, scale = 0.0, float(np.max(np.abs(want)))
        for i, c in enumerate(counts):
            assert c in got, f"auto-circuit ran no circuit of {c} edges (ties?): {sorted(got)[:10]}"
            err = max(err, float(np.max(np.abs(got[c] - want[i]))))
        res["max_abs_diff_vs_jaxpatch"] = err
        assert err <= 1e-3 * max(1.0, scale), f"auto-circuit differs from jaxpatch by {err} (scale {scale})"
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res))
    return 0


def _version():
    from importlib.metadata import version

    return version("auto-circuit")


if __name__ == "__main__":
    sys.exit(main())
