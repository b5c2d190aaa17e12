"""The paper's workflow on an IOI model: where does the answer's information live, layer by layer?

The shipped IOI model (jaxpatch/data/paper/ioi, 3 layers x 4 heads, trained by
examples/train_paper_models.py) completes ``<bos> When Mary and John went to the store , John
gave a drink to`` with ``Mary`` (the indirect object, IO; John is the subject, S). Prompts here
are held out from training (template and name pair); the metric is the logit difference IO - S.

Residual-stream patching by layer x position, with two corruptions of the same template:

* **S2 -> C** (``... , Lucy gave a drink to``: nothing is repeated, so nothing says which name is
  the IO; only position 10 differs). Before layer 0 the effect sits at the repeated name (S2);
  from layer 1 on it sits at the final position: one layer-0 head (L0H1, attending from the
  final position to S2) moves the subject's identity there, and restoring or corrupting that
  head alone carries most of the effect.
* **ABC** (all three name slots replaced by other names): noising finds the effect in all three
  name positions before layer 0 (each name is needed) and only at the final position in the
  last layer; denoising a single name restores little (one clean name among corrupt ones is not
  a clean prompt).

Run: python examples/paper_ioi.py [OUT_DIR]  (writes paper_ioi.png)
"""

import sys
from pathlib import Path

import numpy as np

import jaxpatch
from jaxpatch.data import ioi


def run(out_dir=None, n_prompts: int = 32, seed: int = 0) -> dict:
    model = ioi.load_ioi()
    out: dict = {"model": model}
    clean, _, io, s = ioi.ioi_prompts(n_prompts, seed=seed)
    logits = np.asarray(model(clean))[:, -1]
    ld = logits[np.arange(n_prompts), io] - logits[np.arange(n_prompts), s]
    out["accuracy"], out["logit_diff"], out["logit_diff_min"] = (float(np.mean(logits.argmax(-1) == io)), float(ld.mean()),
                                                                 float(ld.min()))
    for corrupt in ("s2", "abc"):
        clean, bad, io, s = ioi.ioi_prompts(n_prompts, seed=seed, corrupt=corrupt)
        kw = {"answer": io, "wrong": s, "progress": False}
        row = {d: np.asarray(jaxpatch.activation_patch(model, clean, bad, site="resid_pre", direction=d, **kw)
                             .normalized("logit_diff")) for d in ("denoise", "noise")}  # [layer, pos]
        if corrupt == "s2":
            for d in ("denoise", "noise"):
                row[f"heads_{d}"] = np.asarray(jaxpatch.activation_patch(model, clean, bad, site="z", direction=d, **kw)
                                               .normalized("logit_diff"))  # [layer, head]
            _, caps = model.run(clean, capture=("blocks.attn.hook_pattern",))
            pattern = np.asarray(caps["blocks.attn.hook_pattern"])  # [L, B, N, T, T]
            row["attn_end_to_s2"] = pattern[:, :, :, ioi.END_POS, ioi.S2_POS].mean(1)  # [layer, head]
        out[corrupt] = row
    if out_dir is not None:
        from jaxpatch.plots import _pyplot, save_figure

        plt = _pyplot()
        labels = ["<bos>", "When", "A", "and", "B", "went", "to", "the", "place", ",", "S2", "gave", "a", "object", "END (to)"]
        fig, axs = plt.subplots(1, 3, figsize=(13, 3.2), constrained_layout=True,
                                gridspec_kw={"width_ratios": [15, 15, 5]})
        panels = [(out["s2"]["denoise"], "resid_pre, S2 -> C, denoise (restored)"),
                  (out["abc"]["noise"], "resid_pre, ABC, noise (destroyed)")]
        for ax, (grid, title) in zip(axs, panels):
            im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(ioi.N_POS), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [f"L{i}" for i in range(grid.shape[0])])
            ax.set_title(title, fontsize=9)
        h = out["s2"]["heads_noise"]
        axs[2].imshow(h, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        axs[2].set_xticks(range(h.shape[1]), [f"H{i}" for i in range(h.shape[1])], fontsize=7)
        axs[2].set_yticks(range(h.shape[0]), [f"L{i}" for i in range(h.shape[0])])
        axs[2].set_title("heads, S2 -> C, noise", fontsize=9)
        fig.colorbar(im, ax=axs, shrink=0.8, label="normalised logit difference IO - S")
        save_figure(fig, Path(out_dir) / "paper_ioi.png", close=True)
    return out


def conclusion(res: dict) -> list[str]:
    s2, abc = res["s2"], res["abc"]
    L = s2["denoise"].shape[0]
    h = s2["heads_noise"]
    top = np.unravel_index(np.argmax(h), h.shape)
    others = np.delete(h.reshape(-1), np.ravel_multi_index(top, h.shape))
    end, p2 = ioi.END_POS, ioi.S2_POS
    a, b = ioi.NAME_POSITIONS
    late = ", ".join(f"L{i} {s2['denoise'][i, end]:.2f}" for i in range(1, L))
    return [
        (f"Held-out prompts: accuracy {res['accuracy']:.3f}, logit difference IO - S {res['logit_diff']:+.2f} "
        f"(min {res['logit_diff_min']:+.2f})."),
        (f"S2 -> C: before layer 0 the effect is at S2 (denoise {s2['denoise'][0, p2]:.2f}); from layer 1 it is at the final "
        f"position (denoise {late}; S2 by then "
        f"{max(s2['denoise'][1:, p2]):.2f})."),
        (f"The head that moves it: L{top[0]}H{top[1]} (noising it destroys {h[top]:.2f}, restoring it restores "
        f"{s2['heads_denoise'][top]:.2f}; every other head at most {others.max():.2f}); it attends from the final "
        f"position to S2 with weight {s2['attn_end_to_s2'][top]:.2f}."),
        (f"ABC: noising before layer 0 destroys {abc['noise'][0, a]:.2f} / {abc['noise'][0, b]:.2f} / "
        f"{abc['noise'][0, p2]:.2f} at the names (positions {a}, {b}, {p2}): each name is needed; in the last layer "
        f"only the final position matters ({abc['noise'][L - 1, end]:.2f}; elsewhere at most "
        f"{np.abs(np.delete(abc['noise'][L - 1], end)).max():.2f}). Denoising one clean name into a corrupt prompt "
        f"restores at most {abc['denoise'][0, [a, b, p2]].max():.2f}: the names matter jointly."),
    ]


if __name__ == "__main__":
    result = run(sys.argv[1] if len(sys.argv) > 1 else ".")
    print("\n".join(conclusion(result)))
