"""Gradient agreement: how much of an algorithm's update is signal, on one rollout of the shapes model.

Every algorithm here estimates its gradient from flow-matching losses at random ``(t, eps)`` pairs.
Adam takes a step of about the learning rate whatever the gradient holds, so what matters is how much
of the gradient is the rollout's signal and how much is the draw of the pairs. For one fixed rollout
(the same samples, rewards and advantages for every variant; ``--rollouts`` of them, the base
model on each iteration's prompts, mean ± SE over the rollouts), this measures:

* ``cos draws``: the cosine between the full-batch gradients at two independent ``(t, eps)`` draws
  (``--pairs`` pairs of draws per rollout). 1: the draw does not matter; 0: the gradient is the draw's noise.
* ``cos prompts``: the cosine between the gradients of two disjoint halves of the prompts (same draw
  seed): whether different prompts push the LoRA the same way (a shared skill) or apart.
* ``|g|``: the gradient norm (the same advantages, so comparable across draws of one variant).

    OMP_NUM_THREADS=1 python bench/gradient_snr.py                       # fpo, fpo + group noise, awm, nft
    OMP_NUM_THREADS=1 python bench/gradient_snr.py --variants fpo fpo-crn --pairs 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import _common as C
import torch

VARIANTS = {  # name -> (algorithm, overrides)
    "fpo": ("fpo", []),
    "fpo-crn": ("fpo", ["fpo.group_noise=true"]),
    "fpo-nmc32": ("fpo", ["fpo.n_mc=32"]),
    "awm": ("awm", []),
    "diffusion_nft": ("diffusion_nft", []),
}


def _grad(tr, ro, prep, idx, adv) -> torch.Tensor:
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr.algorithm.loss(ro, prep, idx, adv[idx], iteration=0, epoch=0, step=0)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in tr.policy.trainable_parameters()])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def measure(variant: str, *, prompts: int, group: int, pairs: int, rollouts: int, steps: int, reward_mode: str,
            seed: int) -> dict:
    from fpo_diffusion.advantages import group_advantages
    from fpo_diffusion.config import AWMConfig, awm_step_pool
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.trainer import Trainer

    algo, extra = VARIANTS[variant]
    if algo == "awm":  # AWM's training times need as many sampler steps to draw from (the smoke run has 3)
        pool = awm_step_pool(steps, AWMConfig.timestep_fraction) - 1
        extra = [*extra, f"awm.train_timesteps={min(AWMConfig.train_timesteps, max(1, pool))}"]
    out = tempfile.mkdtemp(prefix="grad-snr-")
    cfg = load_config(None, [
        f"output_dir={out}/run", f"algorithm={algo}", f"sampling.steps={steps}", f"train.seed={seed}",
        f"train.prompts_per_iteration={prompts}", f"train.group_size={group}", f"sampling.batch_size={prompts * group}",
        f"train.minibatch_size={prompts * group}", f"reward.options={{shapes: {{mode: {reward_mode}}}}}",
        "log.progress=false", "log.tensorboard=false", "log.image_every=0", "checkpoint.every=0", *extra])
    tr = Trainer(cfg)
    a = cfg.advantage
    cos_draws, cos_prompts, norms, zero = [], [], [], []
    for it in range(rollouts):  # the policy never steps: every rollout is the base model's, on other prompts
        ro = tr.rollout(it)
        adv = group_advantages(ro.rewards, ro.prompt_idx, std=a.std, clip=a.clip, eps=a.eps)
        zero.append(float((adv.abs() < 1e-6).float().mean()))
        every = torch.arange(len(ro.rewards))
        groups = ro.prompt_idx.unique()
        in_first = torch.isin(ro.prompt_idx, groups[: (len(groups) + 1) // 2])
        first, second = torch.nonzero(in_first).reshape(-1), torch.nonzero(~in_first).reshape(-1)
        for k in range(pairs):
            pa, pb = tr.algorithm.prepare(ro, 1000 + 2 * k), tr.algorithm.prepare(ro, 1001 + 2 * k)
            ga, gb = _grad(tr, ro, pa, every, adv), _grad(tr, ro, pb, every, adv)
            cos_draws.append(_cos(ga, gb))
            norms += [float(ga.norm()), float(gb.norm())]
            cos_prompts.append(_cos(_grad(tr, ro, pa, first, adv), _grad(tr, ro, pa, second, adv)))
    tr.reward.close()
    tr.logger.close()
    se = lambda xs: statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")  # noqa: E731
    return {"variant": variant, "samples": prompts * group, "rollouts": rollouts,
            "zero_advantage_share": statistics.fmean(zero), "zero_advantage_share_se": se(zero),
            "cos_draws": statistics.fmean(cos_draws), "cos_draws_se": se(cos_draws),
            "cos_prompts": statistics.fmean(cos_prompts), "cos_prompts_se": se(cos_prompts),
            "grad_norm": statistics.fmean(norms), "pairs": pairs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["fpo", "fpo-crn", "awm", "diffusion_nft"], choices=list(VARIANTS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=1, help="pairs of independent (t, eps) draws per rollout")
    ap.add_argument("--rollouts", type=int, default=3, help="rollouts (iterations' prompts) measured; SE over them")
    ap.add_argument("--steps", type=int, default=10, help="rollout sampler steps")
    ap.add_argument("--reward-mode", choices=["strict", "partial"], default="strict")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="fpo and awm, 2 prompts x 2, 2 rollouts of 3 steps: seconds")
    a = ap.parse_args(argv)
    if a.smoke:
        a.variants, a.prompts, a.group, a.rollouts, a.pairs, a.steps = ["fpo", "awm"], 2, 2, 2, 1, 3
    C.set_threads(1)
    rows = []
    print("| variant | prompts x group | zero-advantage share | cos draws | cos prompts | grad norm |")
    print("|---|---|---|---|---|---|")
    for v in a.variants:
        r = measure(v, prompts=a.prompts, group=a.group, pairs=a.pairs, rollouts=a.rollouts, steps=a.steps,
                    reward_mode=a.reward_mode, seed=a.seed)
        rows.append(r)
        print(f"| {v} | {a.prompts} x {a.group} | {r['zero_advantage_share']:.2f} ± {r['zero_advantage_share_se']:.2f} | {r['cos_draws']:.3f} ± {r['cos_draws_se']:.3f} "
              f"| {r['cos_prompts']:.3f} ± {r['cos_prompts_se']:.3f} | {r['grad_norm']:.3g} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**r, "args": vars(a)} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
