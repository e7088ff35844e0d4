"""Reward-filtered self-training on the prompts themselves: can the LoRA learn position by plain flow matching on
its own right samples, where FPO on the same prompts does not? (issue 21, session 12; a diagnostic, never a result)

    OMP_NUM_THREADS=1 python docs/every_task/session12/self_training.py PROMPTS.jsonl OUT [key=value ...]

Each iteration draws ``group`` images per prompt from the current policy (``steps`` steps, CFG ``cfg``, the
``prompts_per_iteration`` prompts cycled in order), keeps those the strict shapes reward calls right (with
``exact=1``: every asked class exactly as often as asked, so extra copies are not kept), and takes ``epochs``
passes of the plain CFM loss on the kept latents (minibatches of ``minibatch``, ``n_mc`` (t, eps) pairs per
sample, t uniform on [0.02, 0.98], Adam at ``lr``) on the same LoRA as the default job (r8, the attention
projections). That is online rejection-sampling fine-tuning (RAFT / ReST): FPO's update with advantages 1 for
right samples and 0 for the rest, no ratio, no clip, no KL.

- ``guided_loss=1``: the loss of the CFG-combined velocity the sampler follows (the unconditional branch
  detached), not of the conditional prediction alone;
- ``rollout_cfg`` (>= 0): the training images at another CFG scale than the evaluation's ``cfg`` (``1``:
  unguided, so the conditional model is fit to its own distribution);
- ``data=1``: no images drawn; each prompt's ``group`` training latents are the world's own scenes for it
  (``scenes.scene_for``, encoded by the VAE): supervised fine-tuning on right data, the LoRA's capacity for the
  prompts without RL's signal;
- ``model``: another pipeline folder (default the shipped shapes model);
- ``eval_prompts``: score another prompt file (e.g. held-out prompts) instead of the training prompts.

Every ``eval_every`` iterations (and at the start) every prompt is scored on ``eval_images`` images at seeds 1000+
(the same noise each time): right by GenEval's rule, right with exact counts, objects per image. One JSON line per
evaluation goes to OUT/evals.jsonl, one per iteration to OUT/train.jsonl; the LoRA is saved as OUT/lora at the end.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from fpo_diffusion.images import to_pil  # noqa: E402
from fpo_diffusion.policies.sd3 import SD3Policy  # noqa: E402
from fpo_diffusion.shapes.detector import ShapesDetector  # noqa: E402
from fpo_diffusion.shapes.plugin import DEFAULT_ASSET  # noqa: E402
from fpo_diffusion.shapes.render import render_array, to_tensor_batch  # noqa: E402
from fpo_diffusion.shapes.reward import shapes_score  # noqa: E402
from fpo_diffusion.shapes.scenes import scene_for  # noqa: E402

S = dict(iterations=40, prompts_per_iteration=8, group=16, lr=1e-3, epochs=1, minibatch=64, n_mc=8, steps=10,
         cfg=4.5, exact=1, eval_every=10, eval_images=64, seed=0, rank=8, guided_loss=0, rollout_cfg=-1.0, data=0,
         eval_prompts="", model=str(DEFAULT_ASSET))
metas = [json.loads(line) for line in open(sys.argv[1])]
out = Path(sys.argv[2])
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    if k not in S:
        sys.exit(f"self_training.py: unknown setting {k!r} (known: {', '.join(S)})")
    S[k] = type(S[k])(float(v)) if isinstance(S[k], int) else type(S[k])(v)  # model: a pipeline folder
out.mkdir(parents=True, exist_ok=False)
(out / "settings.json").write_text(json.dumps({**S, "prompts": sys.argv[1]}, indent=1))
torch.set_num_threads(1)
torch.manual_seed(S["seed"])

policy = SD3Policy.from_pretrained(S["model"])
policy.add_lora(rank=S["rank"])
params = policy.trainable_parameters()
opt = torch.optim.Adam(params, lr=S["lr"])
det = ShapesDetector()
conds = {m["prompt"]: policy.encode_prompts([m["prompt"]]) for m in metas}


def draw(meta, seeds, cfg=None):
    cond = {k: v.repeat(len(seeds), *([1] * (v.dim() - 1))) for k, v in conds[meta["prompt"]].items()}
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        x0 = policy.sample(cond, gens, steps=S["steps"], guidance_scale=S["cfg"] if cfg is None else cfg)
        images = to_pil(policy.decode(x0))
    return x0, images


def rendered(meta, rng):
    """``group`` scenes that satisfy ``meta`` exactly (``scenes.scene_for``), as latents (the VAE's mean)."""
    arrays = [render_array(scene_for(meta, rng)) for _ in range(S["group"])]
    vae = policy.pipeline.vae
    with torch.no_grad():
        z = vae.encode(to_tensor_batch(arrays)).latent_dist.mean
    return (z - (vae.config.get("shift_factor", None) or 0.0)) * vae.config.scaling_factor


eval_metas = [json.loads(line) for line in open(S["eval_prompts"])] if S["eval_prompts"] else metas
conds.update({m["prompt"]: policy.encode_prompts([m["prompt"]]) for m in eval_metas if m["prompt"] not in conds})


def evaluate(it):
    row = {"iteration": it, "prompts": {}}
    n = S["eval_images"]
    tot = [0, 0, 0.0]
    for m in eval_metas:
        _, imgs = draw(m, range(1000, 1000 + n))
        ok = sum(shapes_score(im, m)[0] > 0.5 for im in imgs)
        ex = sum(shapes_score(im, m, exact_counts=True)[0] > 0.5 for im in imgs)
        objs = sum(sum(len(v) for v in det.detect(im).values()) for im in imgs) / n
        row["prompts"][m["prompt"]] = {"right": ok / n, "exact": ex / n, "objects": objs}
        tot[0] += ok; tot[1] += ex; tot[2] += objs
    k = len(eval_metas)
    row.update(right=tot[0] / (n * k), exact=tot[1] / (n * k), objects=tot[2] / k, images=n * k)
    with open(out / "evals.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"eval {it}: right {row['right']:.3f} exact {row['exact']:.3f} objects {row['objects']:.2f}", flush=True)


evaluate(0)
gen = torch.Generator("cpu").manual_seed(S["seed"] + 12345)
for it in range(S["iterations"]):
    t0 = time.time()
    chosen = [metas[(it * S["prompts_per_iteration"] + j) % len(metas)] for j in range(S["prompts_per_iteration"])]
    kept_x, kept_c, rewards = [], [], []
    for j, m in enumerate(chosen):
        if S["data"]:  # the world's own scenes for the prompt (right by construction), not the policy's samples
            x0 = rendered(m, np.random.default_rng([S["seed"], it, j]))
            kept_x += list(x0)
            kept_c += [m["prompt"]] * len(x0)
            rewards += [1.0] * len(x0)
            continue
        seeds = [10_000_000 + (it * S["prompts_per_iteration"] + j) * S["group"] + g for g in range(S["group"])]
        x0, imgs = draw(m, seeds, S["rollout_cfg"] if S["rollout_cfg"] >= 0 else None)
        r = [shapes_score(im, m, exact_counts=bool(S["exact"]))[0] for im in imgs]
        rewards += r
        for g, rg in enumerate(r):
            if rg > 0.5:
                kept_x.append(x0[g])
                kept_c.append(m["prompt"])
    losses = []
    if kept_x:
        x = torch.stack(kept_x)
        for _ in range(S["epochs"]):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), S["minibatch"]):
                idx = perm[s:s + S["minibatch"]]
                cond = {k: torch.cat([conds[kept_c[i]][k] for i in idx.tolist()]) for k in conds[kept_c[0]]}
                t = 0.02 + 0.96 * torch.rand(len(idx), S["n_mc"], generator=gen)
                eps = torch.randn(len(idx), S["n_mc"], *x.shape[1:], generator=gen)
                w = S["cfg"] if S["guided_loss"] else 1.0  # the CFG-combined velocity, unconditional branch detached
                loss = policy.cfm_loss(x[idx], cond, t, eps, guidance_scale=w).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    row = {"iteration": it + 1, "reward": sum(rewards) / len(rewards), "kept": len(kept_x),
           "cfm_loss": sum(losses) / len(losses) if losses else None, "seconds": time.time() - t0}
    with open(out / "train.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"it {it + 1}: reward {row['reward']:.3f} kept {len(kept_x)} loss {row['cfm_loss']} "
          f"({row['seconds']:.0f} s)", flush=True)
    if (it + 1) % S["eval_every"] == 0:
        evaluate(it + 1)
policy.export_lora(str(out / "lora"))
