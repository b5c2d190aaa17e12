"""The paper's lesson (its Figure 2): one sweep, several metrics, different pictures.

Denoising the residual stream of the embedded induction model, read under logit difference,
logprob, probability, KL, accuracy and rank. The report's detectors (jaxpatch.reporting.findings)
state the pitfalls: probability is saturated at the corrupted baseline and logprob at the clean one
(partial effects squashed); accuracy and rank are discrete and sharp (L1H0 restores a sixth of the
logit difference but all of the accuracy), so metrics rank components differently and can even
disagree in sign (restoring the previous-token head alone lowers the logit difference but improves
the answer's rank).

Run: python examples/paper_metrics.py [OUT_DIR]  (writes paper_metrics.png)
"""

import sys
from pathlib import Path

import jaxpatch
from jaxpatch import data
from jaxpatch.reporting import findings as F

METRICS = ("logit_diff", "logprob", "prob", "kl", "accuracy", "rank")


def run(out_dir=None, n_prompts: int = 32) -> dict:
    model = data.load_default_model()
    clean, corrupt, answer, wrong = data.induction_prompts(n_prompts, seed=0)
    kw = dict(answer=answer, wrong=wrong, metrics=METRICS, token_labels=data.load_vocab(), progress=False)
    resid = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", **kw)
    heads = jaxpatch.activation_patch(model, clean, corrupt, site="z", **kw)
    names_r = [f"resid_pre L{l} @{p}" for l in range(resid.shape[0]) for p in resid.labels["pos"]]
    names_h = [f"L{l}H{h}" for l in range(heads.shape[0]) for h in range(heads.shape[1])]
    found = (F.saturation_findings(resid, names_r, "logit_diff") + F.discrete_findings(heads, names_h, "logit_diff", 0.2)
             + F.disagreement_findings(heads, names_h, "logit_diff", 0.2))
    if out_dir is not None:
        from jaxpatch.reporting.figures import metrics_side_by_side

        fig = metrics_side_by_side(resid, METRICS, "resid_pre denoise")
        (Path(out_dir) / "paper_metrics.png").write_bytes(fig.png)
    return {"resid": resid, "heads": heads, "findings": found}


if __name__ == "__main__":
    res = run(sys.argv[1] if len(sys.argv) > 1 else ".")
    for m in METRICS:
        b = res["resid"].baselines(m)
        print(f"{m:>10s}: clean {b['clean']:+.3f}, corrupt {b['corrupt']:+.3f}")
    print("Pitfalls found:")
    for f in res["findings"]:
        print(f"- [{f.kind}] {f.message}")
