"""The paper's lesson: denoising and noising reveal AND and OR gates differently.

Two tiny models compute a gate of two input features (jaxpatch/data/paper, trained by
examples/train_paper_models.py): "yes" iff a AND b, and "yes" iff a OR b. Clean prompts have both
features, corrupted prompts neither. Each feature is one residual-stream position before layer 0:

* AND: noising one feature destroys the answer (necessary), denoising one alone restores nothing
  (not sufficient) — only the joint denoising restores it;
* OR: denoising one feature restores the answer (sufficient), noising one alone changes nothing
  (not necessary) — only the joint noising destroys it.

Run: python examples/paper_and_or.py [OUT_DIR]  (writes paper_and_or.png)
"""

import sys
from pathlib import Path

import numpy as np

import jaxpatch
from jaxpatch.data import gates


def run(out_dir=None, n_prompts: int = 32) -> dict:
    clean, corrupt, answer, wrong = gates.gate_prompts(n_prompts, seed=0)
    p1, p3 = ({"layer": 0, "pos": p} for p in gates.FEATURE_POSITIONS)
    out = {}
    for name in ("and_gate", "or_gate"):
        model = gates.load_gate(name)
        row = {}
        for direction in ("denoise", "noise"):
            single = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", patches=[p1, p3], direction=direction,
                                               answer=answer, wrong=wrong, progress=False)
            joint = jaxpatch.activation_patch(model, clean, corrupt, site="resid_pre", patches=[[p1, p3]], direction=direction,
                                              answer=answer, wrong=wrong, progress=False)
            row[direction] = {"a": float(single.normalized()[0]), "b": float(single.normalized()[1]),
                              "both": float(joint.normalized()[0])}
        out[name] = row
    if out_dir is not None:
        from jaxpatch.plots import _pyplot, save_figure

        plt = _pyplot()
        fig, axs = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True, sharey=True)
        for ax, name in zip(axs, out):
            x = np.arange(3)
            for j, d in enumerate(("denoise", "noise")):
                ax.bar(x + (j - 0.5) * 0.38, [out[name][d][k] for k in ("a", "b", "both")], width=0.38,
                       label=f"{d} ({'restored' if d == 'denoise' else 'destroyed'})")
            ax.set_xticks(x, ["feature a (pos 1)", "feature b (pos 3)", "both"])
            ax.set_title(name.replace("_", " ").upper(), fontsize=10)
            ax.axhline(0, color="black", lw=0.6)
        axs[0].set_ylabel("normalised logit difference")
        axs[0].legend(fontsize=8, frameon=False)
        save_figure(fig, Path(out_dir) / "paper_and_or.png", close=True)
    return out


if __name__ == "__main__":
    res = run(sys.argv[1] if len(sys.argv) > 1 else ".")
    for name, row in res.items():
        print(f"{name}: " + "; ".join(f"{d}: a {v['a']:+.2f}, b {v['b']:+.2f}, both {v['both']:+.2f}" for d, v in row.items()))
    a, o = res["and_gate"], res["or_gate"]
    print(f"AND: each feature is necessary (noising one destroys {min(a['noise']['a'], a['noise']['b']):.2f}) but not "
          f"sufficient (denoising one restores at most {max(a['denoise']['a'], a['denoise']['b']):.2f}; both together "
          f"{a['denoise']['both']:.2f}).")
    print(f"OR: each feature is sufficient (denoising one restores {min(o['denoise']['a'], o['denoise']['b']):.2f}) but not "
          f"necessary (noising one destroys at most {max(o['noise']['a'], o['noise']['b']):.2f}; both together "
          f"{o['noise']['both']:.2f}).")
