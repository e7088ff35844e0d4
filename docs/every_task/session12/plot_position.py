"""plot_position.py: the position runs of session 12 (``position_runs.json`` beside this file) as one figure, the
score of the pair "an arrow left / right of a cross" right with exact counts against iterations, each run's Adam
steps per iteration in its label.

    python docs/every_task/session12/plot_position.py   # writes position_runs.png beside it
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
runs = json.loads((HERE / "position_runs.json").read_text())
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
SELF = {"D2": "supervised on the world's scenes, 8 steps/it.", "D1": "the same, 2 steps/it.",
        "R1": "self-training on its right samples (RAFT), lr 1e-3, ~1 step/it.", "R7": "RAFT, lr 3e-4",
        "R3": "RAFT, guided loss, lr 1e-3", "R4": "RAFT, unguided rollouts, lr 1e-3"}
FPO = {"E6_pos2_exact": "FPO, default recipe, 2 steps/it.", "E4_pos2_exact_ep4": "FPO, train.epochs=4, 8 steps/it.",
       "E5_pos2_exact_crn": "FPO, fpo.group_noise", "E3_hl_pos2_exact": "FPO on heavy_long",
       "E7_hl_pos2_exact_kl05": "FPO on heavy_long, kl_beta 0.5"}
PANELS = [(a, "self_training", SELF, "exact", "supervised and self-training (same 64 seeds per prompt)"),
          (b, "fpo", FPO, "position", "FPO (its own evaluation seeds, exact counts)")]
for ax, kind, labels, score, title in PANELS:
    for key, label in labels.items():
        ev = runs[kind][key]["evals"]
        ax.errorbar([e["iteration"] for e in ev], [e[score] for e in ev], yerr=[e.get("se") or 0 for e in ev],
                    fmt="o-", capsize=2, label=label)
    ax.set_title(title)
for ax in (a, b):
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
a.set_ylabel("right with exact counts (128 images)")
fig.tight_layout()
fig.savefig(HERE / "position_runs.png", dpi=110)
print("wrote", HERE / "position_runs.png")
