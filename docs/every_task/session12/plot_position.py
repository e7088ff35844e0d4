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
for key, label in SELF.items():
    if key in runs["self_training"]:
        ev = runs["self_training"][key]["evals"]
        a.plot([e["iteration"] for e in ev], [e["exact"] for e in ev], "o-", label=label)
a.set_title("supervised and self-training (same 64 seeds per prompt)")
FPO = {"E6_pos2_exact": "FPO, default recipe, 2 steps/it.", "E4_pos2_exact_ep4": "FPO, train.epochs=4, 8 steps/it.",
       "E5_pos2_exact_crn": "FPO, fpo.group_noise", "E8_pos2_exact_g64": "FPO, 4x samples per step (group 64)",
       "E3_hl_pos2_exact": "FPO on heavy_long", "E7_hl_pos2_exact_kl05": "FPO on heavy_long, kl_beta 0.5"}
for key, label in FPO.items():
    if key in runs["fpo"]:
        ev = runs["fpo"][key]["evals"]
        b.errorbar([e["iteration"] for e in ev], [e["position"] for e in ev], yerr=[e["se"] or 0 for e in ev],
                   fmt="o-", capsize=2, label=label)
b.set_title("FPO (its own evaluation seeds, exact counts)")
for ax in (a, b):
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
a.set_ylabel("right with exact counts (128 images)")
fig.tight_layout()
fig.savefig(HERE / "position_runs.png", dpi=110)
print("wrote", HERE / "position_runs.png")
