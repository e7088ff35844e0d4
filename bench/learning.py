"""Learning efficiency: FPO against the strongest baselines in the same trainer, fairly.

Same model, reward, prompts, seeds, sampler steps, CFG scale, LoRA and budget for every
algorithm; each algorithm keeps its own published defaults otherwise (``fpo.*``,
``flow_grpo.*``, ``ddpo.*``, ``awm.*``, ``diffusion_nft.*``) and gets **its own learning rate**,
chosen from a grid (``--lrs``, at least 3) on the **validation** split (``--tune``: one run per
variant and learning rate, scored on ShapesEval's validation prompts; never the test set).
Then ``--seeds`` runs per variant at its chosen rate are scored on the **test** split. Runs are
separate processes (``--jobs N`` at a time, one thread each). Every curve point is the mean over
seeds with its standard error; the table gives each variant's evaluations to reach the best
baseline's final test score, per seed and as mean +- SE.

Tasks: ``--task shapes``: the shipped shapes model (SD3 family), trained on the partial-credit
``shapes`` reward, scored by the strict ShapesEval rule on a fixed subset of the chosen split.
``--task colour``: the tiny random models with a reward that cannot be
gamed: each prompt names a colour and the reward is ``1 - mean |pixel - target colour|``,
maximal only for the requested colour. Held-out prompts name the same colours with other nouns.

x-axes: **model evaluations** = denoiser rows run forward (rollout, old losses / log-probs,
update) + rows back-propagated (each backward row counts once more), counted with a forward
hook on the denoiser; and **wall-clock** of training (evaluation excluded).
Flow-GRPO runs on flow families only and DDPO on VP families only, so the colour task runs
tiny-sd3 (FPO x2, Flow-GRPO) and tiny-sd (FPO x2, DDPO).

    python bench/learning.py --task shapes --variants fpo-mean awm diffusion_nft flow_grpo \
        --lrs 1e-4 3e-4 1e-3 --tune --seeds 0 1 2 --jobs 2 --iters 40 --eval-every 10   # BENCHMARKS.md
    python bench/learning.py --seeds 0 1 2                   # colour task, tiny models, one --lr
    python bench/learning.py --smoke

``--merge DIR...`` writes one table and plot from earlier runs' ``learning_<task>.json`` files.
"""
from __future__ import annotations

import argparse
import contextlib
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
    "fpo-crn": ("fpo", ["fpo.ratio_mode=mean", "fpo.group_noise=true"]),  # common (t, eps) within a group
    "fpo-auto": ("fpo", ["fpo.ratio_mode=mean", "fpo.beta=auto"]),  # a binding clip: beta adapted to clip_frac 0.1
    "awm": ("awm", []),
    "diffusion_nft": ("diffusion_nft", []),
    "flow_grpo": ("flow_grpo", []),
    "ddpo": ("ddpo", []),
    "flow_grpo-official": ("flow_grpo", []),
    "diffusion_nft-official": ("diffusion_nft", []),
    "awm-official": ("awm", []),
}
OFFICIAL = {  # variant -> its authors' GenEval recipe as a preset (BENCHMARKS.md, "The official recipes")
    "flow_grpo-official": "shapes_flow_grpo_official.yaml",
    "diffusion_nft-official": "shapes_diffusion_nft_official.yaml",
    "awm-official": "shapes_awm_official.yaml",
}
"""A preset variant keeps its recipe's sampler, steps, CFG, LoRA, EMA, advantages, reward reading and batch
layout; the bench sets only the budget (iterations, and it checks prompts x group), the learning rate, the seed
and the tasks. Every variant is scored by the same evaluation (``--steps`` steps of the model's own sampler at
``--guidance``, the same noise); a preset variant is also scored with its recipe's own inference
(``score_own``: its sampler, steps and CFG), and with its EMA weights where the recipe keeps an EMA."""
FLOW_ONLY = {"flow_grpo"}
VP_ONLY = {"ddpo"}
OURS = ("fpo-mean", "fpo-per_sample", "fpo-crn", "fpo-auto")
"""The variants that are FPO; the others are the baselines."""


def family_variants(family: str, wanted: list[str]) -> list[str]:
    bad = VP_ONLY if family != "sd" else FLOW_ONLY
    return [v for v in wanted if v not in bad]


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


def preset_config(variant: str, overrides: list[str], prompts_per_it: int, group: int):
    """The config of an official-recipe variant: its authors' preset with only the bench's ``overrides`` (the
    budget in iterations, the rate, the seed, the tasks, the run folder); its rollout layout must be the race's
    ``prompts_per_it`` x ``group`` (one budget for every variant)."""
    from fpo_diffusion.config_io import load_config

    cfg = load_config(str(C.ROOT / "launch" / "configs" / OFFICIAL[variant]), overrides)
    if (cfg.train.prompts_per_iteration, cfg.train.group_size) != (prompts_per_it, group):
        raise ValueError(f"{variant}: its preset rolls out {cfg.train.prompts_per_iteration} prompts x "
                         f"{cfg.train.group_size} per iteration, the race {prompts_per_it} x {group}: give every "
                         f"variant the same budget")
    return cfg


def run_one(family: str, variant: str, seed: int, *, iters: int, steps: int, prompts_per_it: int, group: int,
            lr: float, n_eval: int, workdir: Path, task: str, guidance: float = 4.5, minibatch: int | None = None,
            eval_every: int = 1, extra_overrides: tuple[str, ...] = (), split: str = "test",
            tags: tuple[str, ...] = ()) -> dict:
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.trainer import Trainer
    from rewards.geneval.summary import overall_score, task_scores

    algo, extra = VARIANTS[variant]
    preset = OFFICIAL.get(variant)
    if preset is not None and task != "shapes":
        raise ValueError(f"{variant}: the official recipes are presets of the shapes model (--task shapes)")
    if task == "shapes":
        # The shipped shapes model; train on the partial-credit shapes reward (training prompts), score the
        # strict ShapesEval rule on a fixed subset of the validation or test split (disjoint from training).
        # ``tags``: only those tasks, in training (their training prompts) and in the evaluation.
        from fpo_diffusion.shapes.scenes import TASKS, test_metadata, validation_metadata
        from rewards.registry import build_reward

        model, reward, train_prompts, cfg_scale = "embedded:shapes", "shapes", "embedded:shapes", guidance
        tasks = [t for t in TASKS if t in tags] if tags else list(TASKS)
        if tags:
            extra = [*extra, f"prompts.tags=[{', '.join(tasks)}]"]
        held = {"test": test_metadata, "validation": validation_metadata}[split]()
        pick = []  # the same number of entries from every task, evenly spaced within the task
        for tag in tasks:
            ms = [m for m in held if m["tag"] == tag]
            k = max(1, n_eval // len(tasks))
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
    label = f"{task}-{'-'.join(tags)}" if tags else task
    out = workdir / f"{label}-{family}-{variant}-s{seed}-lr{lr:g}-{split}"
    if out.exists():  # an interrupted earlier attempt (a finished one left its result json): set it aside
        out.rename(out.with_name(f"{out.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))
    run = [f"output_dir={out}", f"algorithm={algo}", f"model.family={family}", f"model.path={model}",
           f"prompts.source={train_prompts}", f"train.iterations={iters}", f"train.lr={lr}", f"train.seed={seed}",
           "log.progress=false", "log.tensorboard=false", "log.image_every=0", "checkpoint.every=0"]
    if preset is None:  # the shared recipe
        cfg = load_config(None, [
            *run, f"reward.weights={{{reward}: 1.0}}", f"sampling.steps={steps}", f"sampling.guidance_scale={cfg_scale}",
            f"sampling.batch_size={prompts_per_it * group}", f"train.prompts_per_iteration={prompts_per_it}",
            f"train.group_size={group}", f"train.minibatch_size={minibatch or prompts_per_it * group}", *extra,
            *extra_overrides])
    else:
        cfg = preset_config(variant, [*run, *(x for x in extra if x.startswith("prompts.tags="))], prompts_per_it,
                            group)
    tr = Trainer(cfg)
    counter = EvalCounter(tr.policy.denoiser)
    score_fn = eval_reward if eval_reward is not None else (lambda pil, p, m: tr.reward(pil, p, m)[0])
    # The race's one evaluation (the model's own sampler, --steps, --guidance) for every variant; a preset's own
    # inference besides.
    from dataclasses import replace

    from fpo_diffusion.rollout import RolloutDriver

    def driver(sampling):
        return RolloutDriver(replace(cfg, sampling=sampling), tr.policy, tr.prompts, rank=0, world=1,
                             device=tr.accelerator.device, autocast=tr.rollout_driver.autocast)

    shared_sampling = replace(cfg.sampling, scheduler=None, steps=steps, guidance_scale=cfg_scale,
                              batch_size=prompts_per_it * group)
    shared_eval = driver(shared_sampling)
    # a preset whose inference is the race's own (Flow-GRPO's) is not sampled twice: its own score is the race's
    same = replace(cfg.sampling, batch_size=shared_sampling.batch_size) == shared_sampling
    own_eval = driver(cfg.sampling) if preset is not None and not same else None
    eval_seed = 10_000 + (500_000 if split == "validation" else 0)

    @torch.no_grad()
    def evaluate() -> dict:
        counter.enabled = False
        try:
            out = {}
            with tr.ema.swapped_in() if tr.ema is not None else contextlib.nullcontext():
                for key, d in (("score", shared_eval), ("score_own", own_eval)):
                    if d is None:
                        continue
                    pil = d.images(eval_prompts, seed=eval_seed, model=tr.model)
                    scores = score_fn(pil, eval_prompts, eval_meta).float()
                    # ShapesEval's overall: the mean over tasks of each task's accuracy (one task: the plain mean)
                    out[key] = overall_score(task_scores([m.get("tag", "") for m in eval_meta], scores.tolist()))[0]
            if preset is not None and own_eval is None:
                out["score_own"] = out["score"]
            return out
        finally:
            counter.enabled = True

    curve = [{"iteration": 0, "evaluations": 0, "seconds": 0.0, **evaluate(), "train_reward": float("nan")}]
    wall = 0.0
    train_curve = []  # every iteration: all variants see the same prompts, so this is a paired comparison
    for it in range(iters):
        t0 = time.perf_counter()
        m = tr.train_iteration(it)
        wall += time.perf_counter() - t0
        train_curve.append({"iteration": it + 1, "evaluations": counter.evaluations, "reward": m["reward/mean"]})
        if (it + 1) % eval_every == 0 or it + 1 == iters:
            curve.append({"iteration": it + 1, "evaluations": counter.evaluations, "seconds": wall,
                          **evaluate(), "train_reward": m["reward/mean"]})
    tr.logger.close()
    tr.reward.close()
    return {"family": family, "variant": variant, "seed": seed, "task": label, "lr": lr, "split": split,
            "curve": curve, "train_curve": train_curve}


def _mean_se(xs: list[float]) -> tuple[float, float]:
    import statistics

    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def _mean_curve(runs: list[dict]) -> dict:
    n = min(len(r["curve"]) for r in runs)
    out = {k: [] for k in ("evaluations", "seconds", "score", "score_se")}
    for i in range(n):
        for k in ("evaluations", "seconds"):
            out[k].append(sum(r["curve"][i][k] for r in runs) / len(runs))
        m, se = _mean_se([r["curve"][i]["score"] for r in runs])
        out["score"].append(m)
        out["score_se"].append(se)
    return out


def evals_to_reach(curve, target: float) -> float | None:
    """First evaluation count at which a curve (``{"evaluations": [...], "score": [...]}`` or a run's point list)
    reaches ``target``; ``None`` if it never does."""
    pts = zip(curve["evaluations"], curve["score"]) if isinstance(curve, dict) else \
        ((p["evaluations"], p["score"]) for p in curve)
    for e, s in pts:
        if s >= target:
            return e
    return None


def choose_lrs(tune: list[dict]) -> dict[tuple[str, str], float]:
    """Per (family, variant): the learning rate with the best final validation score (mean over its runs)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for key in {(r["family"], r["variant"]) for r in tune}:
        by_lr: dict[float, list[float]] = {}
        for r in tune:
            if (r["family"], r["variant"]) == key:
                by_lr.setdefault(r["lr"], []).append(r["curve"][-1]["score"])
        lr = max(by_lr, key=lambda x: (sum(by_lr[x]) / len(by_lr[x]), -x))
        best[key] = (lr, sum(by_lr[lr]) / len(by_lr[lr]))
    return {k: v[0] for k, v in best.items()}


def summarise(results: list[dict], out: Path, tune: list[dict] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    if tune:
        lines.append("\n### Learning rates chosen on the validation split (final validation score per rate)\n")
        lines.append("| variant | " + " | ".join(f"lr {lr:g}" for lr in sorted({r['lr'] for r in tune})) + " | chosen |")
        lines.append("|---|" + "---|" * (len({r['lr'] for r in tune}) + 1))
        chosen = choose_lrs(tune)
        for (fam, v), lr in sorted(chosen.items()):
            cells = []
            for x in sorted({r["lr"] for r in tune}):
                sc = [r["curve"][-1]["score"] for r in tune if (r["family"], r["variant"], r["lr"]) == (fam, v, x)]
                cells.append(f"{sum(sc) / len(sc):.3f}" if sc else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {lr:g} |")
    for fam in sorted({r["family"] for r in results}):
        runs = [r for r in results if r["family"] == fam]
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        curves = {v: _mean_curve([r for r in runs if r["variant"] == v]) for v in variants}
        base = [v for v in variants if v not in OURS]
        best_base = max(base, key=lambda v: curves[v]["score"][-1]) if base else None
        target = curves[best_base]["score"][-1] if best_base else None
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for v in variants:
            c = curves[v]
            se = [0.0 if x != x else x for x in c["score_se"]]
            for ax, xs in zip(axes, (c["evaluations"], c["seconds"])):
                ax.errorbar(xs, c["score"], yerr=se, label=v, marker=".", capsize=2)
        for ax, xl in zip(axes, ("model evaluations (forward + backward rows)", "training wall-clock (s)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("score (mean ± SE over seeds)")
            if target is not None:
                ax.axhline(target, color="grey", ls=":", lw=1)
            ax.grid(alpha=0.3)
        axes[0].legend()
        n_seeds = len({r["seed"] for r in runs})
        task = runs[0].get("task", "colour")
        fig.suptitle(f"{task} / {fam}: {runs[0].get('split', 'test')} score, mean ± SE of {n_seeds} seed(s)")
        fig.tight_layout()
        fig.savefig(out / (f"learning_{fam}.png" if task == "colour" else f"learning_{task}.png"), dpi=110)
        plt.close(fig)
        name = f"tiny-{fam}" if task == "colour" else f"{task} model ({fam})"
        lines.append(f"\n### {name}: {runs[0].get('split', 'test')} split, {n_seeds} seeds"
                     + (f"; best baseline {best_base}, final score {target:.3f}\n" if target is not None else "\n"))
        lines.append("| variant | lr | start | final (mean ± SE) | per seed | evaluations (total) | evaluations to "
                     "reach the best baseline's final: per seed | mean ± SE | ratio vs baseline | wall-clock (s) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        reach = {}
        for v in variants:
            vr = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
            reach[v] = [evals_to_reach(r["curve"], target) if target is not None else None for r in vr]
        base_reached = [e for e in reach.get(best_base, []) if e is not None]
        for v in variants:
            vr = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
            c = curves[v]
            finals = [r["curve"][-1]["score"] for r in vr]
            m, se = _mean_se(finals)
            got = [e for e in reach[v] if e is not None]
            per_seed = ", ".join("-" if e is None else f"{e:.0f}" for e in reach[v])
            if got and len(got) == len(reach[v]):
                em, ese = _mean_se(got)
                reach_txt = f"{em:.0f} ± {ese:.0f}" if ese == ese else f"{em:.0f}"
            else:
                em, reach_txt = None, f"{len(got)}/{len(reach[v])} seeds reached"
            ratio = (f"{(sum(base_reached) / len(base_reached)) / em:.2f}x fewer"
                     if (em and base_reached and v != best_base) else "-")
            lines.append(f"| {v} | {vr[0].get('lr', float('nan')):g} | {c['score'][0]:.3f} | {m:.3f} ± {se:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in finals)} | {c['evaluations'][-1]:.0f} | {per_seed} | "
                         f"{reach_txt} | {ratio} | {c['seconds'][-1]:.0f} |")
        own = [v for v in variants if all("score_own" in r["curve"][-1] for r in runs if r["variant"] == v)]
        if own:
            lines.append("\nScored with each recipe's own inference (its sampler, steps and CFG; EMA weights where it "
                         "keeps an EMA), the same noise:\n")
            lines.append("| variant | start | final (mean ± SE) | per seed |")
            lines.append("|---|---|---|---|")
            for v in own:
                vr = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
                finals = [r["curve"][-1]["score_own"] for r in vr]
                m, se = _mean_se(finals)
                start, _ = _mean_se([r["curve"][0]["score_own"] for r in vr])
                lines.append(f"| {v} | {start:.3f} | {m:.3f} ± {se:.3f} | {', '.join(f'{x:.3f}' for x in finals)} |")
    text = "\n".join(lines)
    tasks = sorted({r.get("task", "colour") for r in results})
    (out / ("learning.md" if tasks == ["colour"] else f"learning_{'_'.join(tasks)}.md")).write_text(text + "\n")
    return text


def _run_job(job: dict) -> dict:
    """One run in its own process (one thread), so runs go in parallel without sharing threads."""
    import os
    import subprocess
    import sys

    tags = "".join(f"-{t}" for t in job.get("tags", []))
    path = Path(job["workdir"]) / f"job{tags}-{job['variant']}-{job['family']}-s{job['seed']}-lr{job['lr']:g}-{job['split']}.json"
    if not path.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        spec = path.with_suffix(".spec")
        spec.write_text(json.dumps(job))
        subprocess.run([sys.executable, __file__, "--run-job", str(spec)], check=True, env=env)
    return json.loads(path.read_text())


def _job_main(spec: Path) -> None:
    job = json.loads(spec.read_text())
    C.set_threads(1)
    res = run_one(job["family"], job["variant"], job["seed"], iters=job["iters"], steps=job["steps"],
                  prompts_per_it=job["prompts"], group=job["group"], lr=job["lr"], n_eval=job["n_eval"],
                  workdir=Path(job["workdir"]), task=job["task"], guidance=job["guidance"], minibatch=job["minibatch"],
                  eval_every=job["eval_every"], extra_overrides=tuple(job["set"]), split=job["split"],
                  tags=tuple(job.get("tags", [])))
    tmp = spec.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(spec.with_suffix(".json"))


def _run_all(jobs: list[dict], n_parallel: int, label: str) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    results = []
    with ThreadPoolExecutor(max_workers=n_parallel) as ex:
        for job, r in zip(jobs, ex.map(_run_job, jobs)):
            c = r["curve"]
            print(f"[{label}] {job['variant']} lr {job['lr']:g} seed {job['seed']}: score {c[0]['score']:.3f} -> "
                  f"{c[-1]['score']:.3f} ({c[-1]['evaluations']} evaluations, {c[-1]['seconds']:.0f}s train)", flush=True)
            results.append(r)
    return results


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-job"]:
        _job_main(Path(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd3", "sd"], choices=["sd3", "sd"])
    ap.add_argument("--variants", nargs="+", default=["fpo-mean", "awm", "diffusion_nft", "flow_grpo", "ddpo"],
                    choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every variant (without --tune)")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="learning-rate grid for --tune (>= 3 values)")
    ap.add_argument("--tune", action="store_true", help="choose each variant's rate from --lrs on the validation split")
    ap.add_argument("--tune-iters", type=int, default=None, help="iterations of a tuning run (default --iters)")
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process and one thread each)")
    ap.add_argument("--task", choices=["colour", "shapes"], default="colour",
                    help="colour: tiny random models, colour-match reward; shapes: the shipped shapes model, "
                         "strict ShapesEval (sd3 family)")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale for --task shapes")
    ap.add_argument("--tags", nargs="+", default=[], metavar="TASK",
                    help="--task shapes: train on these ShapesEval tasks' training prompts only and score these "
                         "tasks only (e.g. counting); default: all")
    ap.add_argument("--minibatch", type=int, default=None, help="samples per optimizer step (default: all of an "
                    "iteration's samples, one step per iteration)")
    ap.add_argument("--eval-every", type=int, default=1, help="score the evaluation set every N iterations")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every variant (e.g. fpo.kl_beta=0.01)")
    ap.add_argument("--out", default=str(C.ROOT / "bench" / "results"))
    ap.add_argument("--workdir", default=None, help="folder of the runs (default: a fresh temporary one); a run "
                    "whose result is already there is not rerun, so an interrupted benchmark continues")
    ap.add_argument("--smoke", action="store_true", help="tiny-sd3, FPO-mean + Flow-GRPO, 1 seed, 1 iteration")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="summarise the results of earlier runs (their "
                    "learning*.json) into --out and exit")
    a = ap.parse_args(argv)
    if a.tags:
        from fpo_diffusion.shapes.scenes import TASKS, train_task_metadata

        if a.task != "shapes":
            ap.error("--tags needs --task shapes")
        bad = [t for t in a.tags if t not in TASKS or not train_task_metadata().get(t)]
        if bad:
            ap.error(f"--tags {' '.join(bad)}: not a ShapesEval task with training prompts "
                     f"({', '.join(t for t in TASKS if train_task_metadata().get(t))})")
    if a.tune and (not a.lrs or len(a.lrs) < 3):
        ap.error("--tune needs a grid of at least 3 learning rates (--lrs)")
    if a.merge:
        results = [r for d in a.merge for f in sorted(Path(d).glob("learning*.json"))
                   for r in json.loads(f.read_text())["results"]]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        print(summarise(results, out))
        return
    if a.task == "shapes":
        a.families = ["sd3"]  # the shapes model is an SD3 pipeline; DDPO needs a VP model
    out = Path(tempfile.mkdtemp(prefix="bench-learning-")) if a.smoke else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        a.families, a.variants, a.seeds, a.iters, a.steps, a.prompts, a.group, a.n_eval = \
            ["sd3"], ["fpo-mean", "flow_grpo"], [0], 1, 2, 2, 2, 4
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-learning-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    common = {"iters": a.iters, "steps": a.steps, "prompts": a.prompts, "group": a.group, "n_eval": a.n_eval,
              "workdir": str(work), "task": a.task, "guidance": a.guidance, "minibatch": a.minibatch,
              "eval_every": a.eval_every, "set": list(a.set), "tags": list(a.tags)}
    tune, chosen = [], {}
    if a.tune:
        split = "validation" if a.task == "shapes" else "test"  # the colour task has one prompt set
        jobs = [{**common, "iters": a.tune_iters or a.iters, "eval_every": a.tune_iters or a.iters, "family": f,
                 "variant": v, "seed": 1000, "lr": lr, "split": split}
                for f in a.families for v in family_variants(f, a.variants) for lr in a.lrs]
        tune = _run_all(jobs, a.jobs, "tune")
        chosen = choose_lrs(tune)
    jobs = [{**common, "family": f, "variant": v, "seed": s, "lr": chosen.get((f, v), a.lr), "split": "test"}
            for f in a.families for s in a.seeds for v in family_variants(f, a.variants)]
    results = _run_all(jobs, a.jobs, "test")
    label = "-".join([a.task, *a.tags])
    with open(out / ("learning.json" if a.task == "colour" else f"learning_{label}.json"), "w") as f:
        json.dump({"args": vars(a), "tune": tune, "results": results}, f)
    print(summarise(results, out, tune))


if __name__ == "__main__":
    main()
