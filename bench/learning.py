"""Learning efficiency: FPO (``mean`` and ``per_sample`` ratios) against Flow-GRPO and DDPO.

Same model, reward, prompts, seeds, sampler steps, CFG scale, LoRA and learning rate for every
algorithm; each algorithm keeps its own published defaults otherwise (FPO: ``fpo.*``,
Flow-GRPO: ``flow_grpo.*``, DDPO: ``ddpo.*``). After every iteration the policy is scored on
held-out prompts with fixed seeds through the stock (deterministic) pipeline sampler.

Tasks: ``--task shapes``: the shipped shapes model (SD3 family: FPO x2 vs Flow-GRPO), trained on
the partial-credit ``shapes`` reward, scored by the strict ShapesEval rule on a fixed subset of
held-out prompts. ``--task colour``: the tiny random models with a reward that cannot be
gamed: each prompt names a colour and the reward is ``1 - mean |pixel - target colour|``,
maximal only for the requested colour. Held-out prompts name the same colours with other nouns.

x-axes: **model evaluations** = denoiser rows run forward (rollout, old losses / log-probs,
update) + rows back-propagated (each backward row counts once more), counted with a forward
hook on the denoiser; and **wall-clock** of training (evaluation excluded).
Flow-GRPO runs on flow families only and DDPO on VP families only, so the colour task runs
tiny-sd3 (FPO x2, Flow-GRPO) and tiny-sd (FPO x2, DDPO).

    OMP_NUM_THREADS=1 python bench/learning.py --task shapes --seeds 0 1 2 --iters 60 --steps 10 \
        --prompts 8 --group 8 --minibatch 16 --lr 3e-4 --n-eval 288 --eval-every 20   # BENCHMARKS.md
    OMP_NUM_THREADS=1 python bench/learning.py --seeds 0 1 2                   # colour task, tiny models
    OMP_NUM_THREADS=1 python bench/learning.py --smoke

Seeds may run in separate processes (``--seeds 0``, ``--seeds 1`` ... with their own ``--out``);
``--merge DIR...`` then writes one table and plot from their ``learning_<task>.json`` files.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import _common as C
import torch

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
           "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0)}
TRAIN_NOUNS = ("square", "circle")
EVAL_NOUNS = ("car", "bird")
VARIANTS = {  # name -> (algorithm, overrides)
    "fpo-mean": ("fpo", ["fpo.ratio_mode=mean"]),
    "fpo-per_sample": ("fpo", ["fpo.ratio_mode=per_sample"]),
    "flow_grpo": ("flow_grpo", []),
    "ddpo": ("ddpo", []),
}
FAMILY_VARIANTS = {"sd3": ("fpo-mean", "fpo-per_sample", "flow_grpo"), "sd": ("fpo-mean", "fpo-per_sample", "ddpo")}


def _register_colour_reward() -> None:
    import numpy as np

    from rewards.base import Reward
    from rewards.registry import _REGISTRY, register_reward

    if "bench_colour" in _REGISTRY:
        return

    @register_reward("bench_colour")
    class ColourMatch(Reward):
        """``1 - mean |pixel - colour named in the prompt|`` in ``[0, 1]``."""

        range = (0.0, 1.0)

        def score(self, images, prompts, metadata):
            out = []
            for im, p in zip(images, prompts):
                name = next(c for c in COLOURS if re.search(rf"\b{c}\b", p))
                a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
                out.append(1.0 - float(np.abs(a - np.array(COLOURS[name])).mean()))
            return torch.tensor(out)


def _prompt_file(d: Path, nouns) -> Path:
    p = d / f"prompts-{'-'.join(nouns)}.txt"
    p.write_text("\n".join(f"a {c} {n}" for c in COLOURS for n in nouns) + "\n")
    return p


class EvalCounter:
    """Counts denoiser rows run forward and rows that will be back-propagated."""

    def __init__(self, module: torch.nn.Module):
        self.forward_rows = 0
        self.backward_rows = 0
        self.enabled = True
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        n = int(x.shape[0])
        self.forward_rows += n
        if torch.is_grad_enabled():
            self.backward_rows += n

    @property
    def evaluations(self) -> int:
        return self.forward_rows + self.backward_rows


def run_one(family: str, variant: str, seed: int, *, iters: int, steps: int, prompts_per_it: int, group: int,
            lr: float, n_eval: int, workdir: Path, task: str, guidance: float = 4.5, minibatch: int | None = None,
            eval_every: int = 1, extra_overrides: tuple[str, ...] = ()) -> dict:
    from fpo_diffusion.config import load_config
    from fpo_diffusion.trainer import FPOTrainer

    algo, extra = VARIANTS[variant]
    if task == "shapes":
        # The shipped shapes model; train on the partial-credit shapes reward (training prompts), score the
        # strict ShapesEval rule on a fixed subset of the held-out prompts (disjoint from training).
        from fpo_diffusion.shapes.scenes import TASKS, heldout_metadata
        from rewards.registry import build_reward

        model, reward, train_prompts, cfg_scale = "embedded:shapes", "shapes", "embedded:shapes", guidance
        held = heldout_metadata()
        pick = []  # the same number of entries from every task, evenly spaced within the task
        for tag in TASKS:
            ms = [m for m in held if m["tag"] == tag]
            k = max(1, n_eval // len(TASKS))
            pick += [ms[round(i * (len(ms) - 1) / max(1, k - 1))] for i in range(k)]
        eval_prompts, eval_meta = [m["prompt"] for m in pick], pick
        eval_reward = build_reward("shapes", mode="strict")
        extra = [*extra, "reward.options={shapes: {mode: partial}}"]
    else:
        _register_colour_reward()
        model, reward, cfg_scale = f"embedded:tiny-{family}", "bench_colour", 1.0
        train_prompts = str(_prompt_file(workdir, TRAIN_NOUNS))
        base = [ln for ln in _prompt_file(workdir, EVAL_NOUNS).read_text().splitlines() if ln]
        eval_prompts = (base * max(1, -(-n_eval // len(base))))[:n_eval]
        eval_meta = [{} for _ in eval_prompts]
        eval_reward = None
    out = workdir / f"{task}-{family}-{variant}-s{seed}"
    cfg = load_config(None, [
        f"output_dir={out}", f"algorithm={algo}", f"model.family={family}", f"model.path={model}",
        f"prompts.source={train_prompts}", f"reward.weights={{{reward}: 1.0}}", f"sampling.steps={steps}",
        f"sampling.guidance_scale={cfg_scale}", f"sampling.batch_size={prompts_per_it * group}",
        f"train.prompts_per_iteration={prompts_per_it}", f"train.group_size={group}", f"train.iterations={iters}",
        f"train.minibatch_size={minibatch or prompts_per_it * group}", f"train.lr={lr}", f"train.seed={seed}",
        "log.progress=false", "log.tensorboard=false", "log.image_every=0", "checkpoint.every=0", *extra,
        *extra_overrides])
    tr = FPOTrainer(cfg)
    counter = EvalCounter(tr.policy.denoiser)
    score_fn = eval_reward if eval_reward is not None else (lambda pil, p, m: tr.reward(pil, p, m)[0])

    @torch.no_grad()
    def evaluate() -> float:
        counter.enabled = False
        try:
            pil = tr.sample_images(eval_prompts, seed=10_000 + seed)
            scores = score_fn(pil, eval_prompts, eval_meta).float()
            tags = [m.get("tag", "") for m in eval_meta]
            # ShapesEval's overall: the mean over tasks of each task's accuracy (one task: the plain mean)
            return float(torch.stack([scores[[i for i, t in enumerate(tags) if t == u]].mean()
                                      for u in dict.fromkeys(tags)]).mean())
        finally:
            counter.enabled = True

    curve = [{"iteration": 0, "evaluations": 0, "seconds": 0.0, "score": evaluate(), "train_reward": float("nan")}]
    wall = 0.0
    train_curve = []  # every iteration: all variants see the same prompts, so this is a paired comparison
    for it in range(iters):
        t0 = time.perf_counter()
        m = tr.train_iteration(it)
        wall += time.perf_counter() - t0
        train_curve.append({"iteration": it + 1, "evaluations": counter.evaluations, "reward": m["reward/mean"]})
        if (it + 1) % eval_every == 0 or it + 1 == iters:
            curve.append({"iteration": it + 1, "evaluations": counter.evaluations, "seconds": wall,
                          "score": evaluate(), "train_reward": m["reward/mean"]})
    tr.logger.close()
    tr.reward.close()
    return {"family": family, "variant": variant, "seed": seed, "task": task, "curve": curve,
            "train_curve": train_curve}


def _mean_curve(runs: list[dict]) -> dict:
    n = min(len(r["curve"]) for r in runs)
    keys = ("evaluations", "seconds", "score")
    return {k: [sum(r["curve"][i][k] for r in runs) / len(runs) for i in range(n)] for k in keys}


def evals_to_reach(curve: dict, target: float) -> float | None:
    for e, s in zip(curve["evaluations"], curve["score"]):
        if s >= target:
            return e
    return None


def summarise(results: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for fam in sorted({r["family"] for r in results}):
        runs = [r for r in results if r["family"] == fam]
        variants = [v for v in FAMILY_VARIANTS[fam] if any(r["variant"] == v for r in runs)]
        curves = {v: _mean_curve([r for r in runs if r["variant"] == v]) for v in variants}
        base = [v for v in variants if not v.startswith("fpo")]
        best_base = max(base, key=lambda v: curves[v]["score"][-1]) if base else None
        target = curves[best_base]["score"][-1] if best_base else None
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for v in variants:
            c = curves[v]
            axes[0].plot(c["evaluations"], c["score"], label=v, marker=".")
            axes[1].plot(c["seconds"], c["score"], label=v, marker=".")
        for ax, xl in zip(axes, ("model evaluations (forward + backward rows)", "training wall-clock (s)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("held-out score")
            if target is not None:
                ax.axhline(target, color="grey", ls=":", lw=1)
            ax.grid(alpha=0.3)
        axes[0].legend()
        n_seeds = len({r["seed"] for r in runs})
        fig.suptitle(f"{runs[0].get('task', 'colour')} / {fam}: held-out score, mean of {n_seeds} seed(s)")
        fig.tight_layout()
        task = runs[0].get("task", "colour")
        fig.savefig(out / (f"learning_{fam}.png" if task == "colour" else f"learning_{task}.png"), dpi=110)
        plt.close(fig)
        name = f"tiny-{fam}" if task == "colour" else f"{task} model ({fam})"
        lines.append(f"\n### {name} (mean of {n_seeds} seeds; best baseline: {best_base}, final score "
                     f"{target:.4f})\n" if target is not None else f"\n### {name}\n")
        lines.append("| variant | start score | final score | evaluations (total) | evaluations to reach best baseline's "
                     "final | ratio vs baseline | wall-clock (s) |")
        lines.append("|---|---|---|---|---|---|---|")
        base_e = evals_to_reach(curves[best_base], target) if best_base else None
        for v in variants:
            c = curves[v]
            e = evals_to_reach(c, target) if target is not None else None
            ratio = f"{base_e / e:.2f}x fewer" if (e and base_e) else ("not reached" if e is None else "-")
            lines.append(f"| {v} | {c['score'][0]:.4f} | {c['score'][-1]:.4f} | {c['evaluations'][-1]:.0f} | "
                         f"{'not reached' if e is None else f'{e:.0f}'} | {ratio} | {c['seconds'][-1]:.1f} |")
    text = "\n".join(lines)
    tasks = sorted({r.get("task", "colour") for r in results})
    (out / ("learning.md" if tasks == ["colour"] else f"learning_{'_'.join(tasks)}.md")).write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd3", "sd"], choices=["sd3", "sd"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", choices=["colour", "shapes"], default="colour",
                    help="colour: tiny random models, colour-match reward; shapes: the shipped shapes model, "
                         "strict held-out ShapesEval (sd3 family only: FPO x2 vs Flow-GRPO)")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale for --task shapes")
    ap.add_argument("--minibatch", type=int, default=None, help="samples per optimizer step (default: all of an "
                    "iteration's samples, one step per iteration)")
    ap.add_argument("--eval-every", type=int, default=1, help="score the held-out set every N iterations")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every variant (e.g. fpo.kl_beta=0.01)")
    ap.add_argument("--out", default=str(C.ROOT / "bench" / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny-sd3, FPO-mean + Flow-GRPO, 1 seed, 1 iteration")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="summarise the results of earlier runs (their "
                    "learning*.json) into --out and exit")
    a = ap.parse_args(argv)
    if a.merge:
        results = [r for d in a.merge for f in sorted(Path(d).glob("learning*.json"))
                   for r in json.loads(f.read_text())["results"]]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        print(summarise(results, out))
        return
    C.set_threads(a.threads)
    if a.task == "shapes":
        a.families = ["sd3"]  # the shapes model is an SD3 pipeline; DDPO needs a VP model
    out = Path(tempfile.mkdtemp(prefix="bench-learning-")) if a.smoke else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        a.families, a.variants, a.seeds, a.iters, a.steps, a.prompts, a.group, a.n_eval = \
            ["sd3"], ["fpo-mean", "flow_grpo"], [0], 1, 2, 2, 2, 4
    work = Path(tempfile.mkdtemp(prefix="bench-learning-runs-"))
    results = []
    for fam in a.families:
        for s in a.seeds:  # seed-major: a cut-short run still compares every variant on the seeds it finished
            for v in [v for v in FAMILY_VARIANTS[fam] if v in a.variants]:
                t0 = time.perf_counter()
                r = run_one(fam, v, s, iters=a.iters, steps=a.steps, prompts_per_it=a.prompts, group=a.group,
                            lr=a.lr, n_eval=a.n_eval, workdir=work, task=a.task, guidance=a.guidance,
                            minibatch=a.minibatch, eval_every=a.eval_every, extra_overrides=tuple(a.set))
                results.append(r)
                c = r["curve"]
                print(f"tiny-{fam} {v} seed {s}: score {c[0]['score']:.4f} -> {c[-1]['score']:.4f} "
                      f"({c[-1]['evaluations']} evaluations, {c[-1]['seconds']:.1f}s train, "
                      f"{time.perf_counter() - t0:.1f}s total)", flush=True)
                with open(out / ("learning.json" if a.task == "colour" else f"learning_{a.task}.json"), "w") as f:
                    json.dump({"args": vars(a), "results": results}, f)
    print(summarise(results, out))


if __name__ == "__main__":
    main()
