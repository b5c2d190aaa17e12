"""The paper's lesson: backup behaviour hides a head from single-component ablations.

The shipped ``backup`` model (jaxpatch/data/paper/backup, trained by examples/train_paper_models.py)
answers "yes" iff feature a is present. L0H0 is the primary head; L1H0 is a backup head that writes
the answer only when L0H0's output is missing. Zero-ablating either head alone barely moves the
logit difference — each looks unimportant — but ablating both destroys the answer: the backup
head's effect appears only once the primary head is ablated. (Resample noising tells another
story: the primary head's *corrupted* output actively says "no", which nothing undoes.)

Run: python examples/paper_backup.py
"""

import jaxpatch
from jaxpatch.data import gates


def run(n_prompts: int = 32) -> dict:
    model = gates.load_gate("backup")
    clean, corrupt, answer, wrong = gates.gate_prompts(n_prompts, seed=0)
    (lp, hp), (lb, hb) = gates.PRIMARY, gates.BACKUP
    P, B = {"layer": lp, "head": hp}, {"layer": lb, "head": hb}
    out = {}
    for baseline in ("zero", "resample"):
        r = jaxpatch.activation_patch(model, clean, corrupt, site="z", direction="noise", baseline=baseline,
                                      patches=[[P, P], [B, B], [P, B]], answer=answer, wrong=wrong, progress=False)
        e = r.effects("logit_diff")  # change of the clean logit difference
        out[baseline] = {"clean": r.baselines("logit_diff")["clean"], "primary": float(e[0]), "backup": float(e[1]),
                         "both": float(e[2]), "backup_given_primary_ablated": float(e[2] - e[0])}
    return out


if __name__ == "__main__":
    res = run()
    z = res["zero"]
    print(f"clean logit difference {z['clean']:+.2f}; zero-ablating L0H0 (primary) changes it by {z['primary']:+.2f}, "
          f"L1H0 (backup) by {z['backup']:+.2f}, both by {z['both']:+.2f}.")
    print(f"The backup head's effect: {z['backup']:+.2f} with the primary intact, {z['backup_given_primary_ablated']:+.2f} "
          "once the primary is ablated. Single-head ablations would call both heads unimportant.")
    r = res["resample"]
    print(f"Resample noising (corrupted activations) tells another story: primary {r['primary']:+.2f}, backup "
          f"{r['backup']:+.2f}: the primary head's corrupted output actively says 'no', which no backup undoes. The "
          "choice of ablation changes what a patching experiment measures.")
