"""Confirm the induction circuit of the embedded model with jaxpatch.circuits: path patching,
circuit evaluation, Pareto curves of three rankings, AND/OR and backup probes.

The embedded model (examples/train_toy_model.py) continues repeated word sequences; its
previous-token head writes "the previous token was X" into each position, and its induction heads
read that through their keys. Each step below is one compiled, vectorised program.

Run: python examples/circuits_induction.py [OUT_DIR]  (about a minute on a 2-core CPU)
"""

import sys

import numpy as np

import jaxpatch
from jaxpatch import circuits, data, edges

model = data.load_default_model()
task = data.load_task()
clean, corrupt, answer, wrong = data.induction_prompts(16, seed=1)
kw = dict(answer=answer, wrong=wrong)
prev, ind = "L{}H{}".format(*task["prev_token_head"]), "L{}H{}".format(*task["induction_head"])

# 1. Path patching: which layer-0 component feeds which input of which layer-1 head?
senders = ["embed", "L0H0", "L0H1", "MLP0"]
receivers = [f"L1H{h}.{k}" for h in range(2) for k in "qkv"] + ["MLP1.in", "logits"]
paths = jaxpatch.path_patch(model, clean, corrupt, senders=senders, receivers=receivers, direction="noise", **kw)
print("path patching (noising), fraction of the logit difference destroyed:")
print(paths.grid_frame(normalized=True).round(2).to_string())
top, v = paths.top(1, normalized=True)[0]
print(f"strongest path: {top['sender']} -> {top['receiver']} ({v:+.2f}); "
      f"task.json: previous-token head {prev}, induction head {ind}")

# 2. Circuit evaluation: candidate circuits run alone, every other edge ablated (resampled).
cands = {"every head (no MLPs)": ["embed", "L0H0", "L0H1", "L1H0", "L1H1"],
         "previous-token + L0H1 + induction": ["embed", prev, "L0H1", ind],
         "previous-token + induction": ["embed", prev, ind]}
res = jaxpatch.evaluate_circuit(model, clean, corrupt, [circuits.circuit_from_nodes(model.config, n) for n in cands.values()],
                                labels=list(cands), **kw)
print("\ncircuits alone (faithfulness: 1 = the whole behaviour):")
for name, n, f in zip(cands, res.n_edges, res.faithfulness()):
    print(f"  {name:<38s} {n:3d} of {res.n_valid} edges  {f:+.2f}")

# 3. Pareto curves: nested top-k circuits of three rankings, one vectorised evaluation.
rankings = {"exact": circuits.exact_edge_scores(model, clean, corrupt, **kw),
            "eap": edges.edge_attribution_patch(model, clean, corrupt, direction="noise", **kw),
            "eap-ig": edges.edge_attribution_patch(model, clean, corrupt, direction="noise", ig_steps=8, **kw)}
curves = circuits.pareto_curve(model, clean, corrupt, rankings, n_points=16, **kw)
print("\nPareto curves, area under faithfulness vs fraction of edges kept:",
      ", ".join(f"{k} {v:.3f}" for k, v in curves.aucs().items()))
if len(sys.argv) > 1:
    path = jaxpatch.plots.save_figure(circuits.plot_pareto(curves), f"{sys.argv[1]}/pareto.png", close=True)
    print(f"wrote {path}")

# 4. AND/OR: the previous-token head and the induction head act in series: each is necessary
#    (noising either destroys the behaviour); whether restoring both suffices is what the probe
#    measures (the verdict is "neither" when more components are needed, e.g. L0H1's values).
probe = circuits.and_or_probe(model, clean, corrupt, [prev, ind], **kw)
print("\n" + probe.summary())
backup = circuits.backup_probe(model, clean, corrupt, ind, "L1H0" if ind != "L1H0" else "L1H1", **kw)
print("backup: " + backup.summary())
print("noise effects of single heads (z):", np.round(jaxpatch.activation_patch(
    model, clean, corrupt, site="z", direction="noise", **kw).normalized(), 2).tolist())
