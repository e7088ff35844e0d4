"""Rollout cost: our rollout against a plain stock diffusers pipeline call, measured in one run.

ratio = time(Trainer.rollout: final latents from the stock pipeline with
        ``output_type="latent"``, VAE decode, PIL conversion, reward scoring (overlapped),
        foreground-share bookkeeping)
      / time(the stock pipeline called with the same model, text embeddings, steps, CFG
        scale, batch and generators, ``output_type="pil"``: no reward at all)

Both are timed interleaved in the same process (median of ``--repeats``). Target: <= 1.0.

    OMP_NUM_THREADS=1 python bench/rollout.py                 # tiny sd3 + tiny sd (+ the shapes model if present)
    OMP_NUM_THREADS=1 python bench/rollout.py --smoke
"""
from __future__ import annotations

import argparse
from pathlib import Path
import tempfile

import _common as C
import torch


def measure(model_path: str, family: str, *, steps: int, guidance: float, batch: int, groups: int,
            repeats: int, reward: str) -> dict:
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.noise import sample_generator
    from fpo_diffusion.trainer import Trainer

    out = tempfile.mkdtemp(prefix="bench-rollout-")
    prompts = "embedded:shapes" if model_path == "embedded:shapes" else "embedded:tiny"
    cfg = load_config(None, [
        f"output_dir={out}/run", f"model.family={family}", f"model.path={model_path}", f"prompts.source={prompts}",
        f"reward.weights={{{reward}: 1.0}}", f"sampling.steps={steps}", f"sampling.guidance_scale={guidance}",
        f"sampling.batch_size={batch}", f"train.prompts_per_iteration={groups}", "train.group_size=2",
        "log.progress=false", "log.tensorboard=false", "log.image_every=0"])
    tr = Trainer(cfg)
    pol, s = tr.policy, cfg.sampling
    ro = tr.rollout(0)  # warm-up: caches the text embeddings, as in training
    cond = tr.rollout_driver.conditions([tr.prompts[i].prompt for i in ro.prompt_idx.tolist()])
    n = len(ro.x0)

    def ours():
        tr.rollout(0)

    def stock():
        images = []
        for st in range(0, n, batch):
            sl = slice(st, min(n, st + batch))
            gens = [sample_generator(cfg.train.seed, 0, int(g), stream=0) for g in ro.global_idx[sl]]
            c = {k: v[sl] for k, v in cond.items()}
            neg = tr.rollout_driver.negative_batch(len(gens))
            with torch.no_grad():
                images += pol.pipeline(**pol._pipe_kwargs(c, neg, float(s.guidance_scale)),
                                       num_inference_steps=s.steps, generator=gens, height=pol.height,
                                       width=pol.width, output_type="pil").images
        assert len(images) == n

    t = C.interleaved({"stock": stock, "ours": ours}, repeats=repeats, warmup=1)
    tr.reward.close()
    return {"model": model_path, "family": family, "samples": n, "batch": batch, "steps": steps, "cfg": guidance,
            "reward": reward, "stock_pil_s": t["stock"], "ours_s": t["ours"], "ratio": t["ours"] / t["stock"],
            "repeats": repeats}


def main(argv: list[str] | None = None) -> list[dict]:
    from fpo_diffusion.embedded import resolve_model

    SHAPES_MODEL = Path(resolve_model("sd3", "embedded:shapes")[1])

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8, help="prompts per rollout (x2 images each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sd3, 2 steps, 2 prompts: seconds")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    C.set_threads(a.threads)
    runs = [("embedded:tiny-sd3", "sd3", "brightness"), ("embedded:tiny-sd", "sd", "brightness")]
    if (SHAPES_MODEL / "model_index.json").exists() and not a.smoke:
        runs.append(("embedded:shapes", "sd3", "shapes"))
    if a.smoke:
        runs, a.steps, a.groups, a.batch, a.repeats = runs[:1], 2, 2, 4, 1
    rows = []
    for path, fam, rew in runs:
        row = measure(path, fam, steps=a.steps, guidance=a.guidance, batch=a.batch, groups=a.groups,
                      repeats=a.repeats, reward=rew)
        rows.append(row)
        print(f"{path}: ours {row['ours_s']:.3f}s / stock pipeline (PIL) {row['stock_pil_s']:.3f}s = "
              f"{row['ratio']:.3f} (target <= 1.0)", flush=True)
    return C.report(rows, ["model", "samples", "batch", "steps", "cfg", "reward", "stock_pil_s", "ours_s",
                                  "ratio", "repeats"], a.json)


if __name__ == "__main__":
    main()
