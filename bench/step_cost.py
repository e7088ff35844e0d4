"""Step cost: one FPO update against the hardware floor, measured in one run.

ratio = time(one FPO update of B samples x N_mc pairs: CFM losses at the fixed (t, eps),
        the clipped FPO surrogate, backward, AdamW step on the LoRA weights)
      / time(B x N_mc raw forward + backward passes of the same LoRA model on the same
        inputs (x_t, timestep, text embeddings), loss = mean(pred^2))

Both are timed interleaved in the same process (median of ``--repeats``). The old-loss pass
(``prepare``, no grad, once per iteration) is reported too, as its own ratio to the floor.
Target: ratio <= 1.10.

    OMP_NUM_THREADS=1 python bench/step_cost.py                      # tiny-sd, tiny-sd3, shapes, sd15, sd35m
    OMP_NUM_THREADS=1 python bench/step_cost.py --models tiny-sd3 --smoke
"""
from __future__ import annotations

import argparse

import _common as C
from fpo_diffusion.lora import prepare_for_training
from fpo_diffusion.update import adamw
import torch

DEFAULTS = {  # model -> (image side in latent cells, batch B, N_mc, text tokens, repeats)
    "tiny-sd": (8, 8, 8, 16, 7),
    "tiny-sd3": (8, 8, 8, 16, 7),
    "shapes": (4, 8, 8, 33, 7),  # the shipped shapes model at the default job's update: minibatch 8 x 8 pairs
    "sd15": (32, 1, 2, 77, 2),
    "sd35m": (16, 1, 2, 32, 2),
}


def measure(name: str, *, side: int, batch: int, n_mc: int, text_len: int, repeats: int,
            mixed_precision: str = "no", gradient_checkpointing: bool = False) -> dict:
    from fpo_diffusion.algorithms.fpo import FPO
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.algorithms import AlgorithmContext
    from fpo_diffusion.rollout import Rollout

    dev = C.device()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    policy, ch, make_cond = C.build_policy(name, dtype=dtype, dev=dev)
    params = prepare_for_training(policy, gradient_checkpointing=gradient_checkpointing, rank=8)
    policy.denoiser.train()
    opt = adamw(params, lr=1e-5)  # the trainer's optimizer (fused where available)
    shape = (ch, side, side)
    cfg = load_config(None, [f"fpo.n_mc={n_mc}", f"train.minibatch_size={batch}"])
    alg = FPO(AlgorithmContext.for_policy(cfg, policy, latent_shape=shape, mixed_precision=mixed_precision))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, *shape, generator=g).to(dev)
    cond = make_cond(batch, text_len)
    ro = Rollout(torch.arange(batch), torch.arange(batch), cond, x0, torch.zeros(batch), {})
    prep = alg.prepare(ro, 0)
    idx = torch.arange(batch, device=dev)
    adv = torch.randn(batch, generator=g).to(dev)

    # The raw floor on the same rows FPO feeds the model.
    n = batch * n_mc
    x0r = x0.repeat_interleave(n_mc, dim=0)
    x_t, _, mt = policy._noise(x0r, prep["t"].reshape(n), prep["eps"].reshape(n, *shape))
    x_t = x_t.to(dtype)
    cond_r = {k: v.repeat_interleave(n_mc, dim=0) for k, v in cond.items()}

    def raw():
        with alg.ctx.autocast():
            pred = policy._forward(policy.denoiser, x_t, mt, cond_r)
        pred.float().pow(2).mean().backward()
        opt.zero_grad(set_to_none=True)

    def fpo_update():
        loss, _ = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fpo_loss_backward():  # the update without the AdamW step
        loss, _ = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
        loss.backward()
        opt.zero_grad(set_to_none=True)

    def fpo_prepare():
        alg.prepare(ro, 0)

    t = C.interleaved({"raw": raw, "fpo": fpo_update, "fpo_nostep": fpo_loss_backward,
                       "prepare": fpo_prepare}, repeats=repeats)
    return {"model": name, "device": str(dev), "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "latent": f"{ch}x{side}x{side}", "B": batch, "N_mc": n_mc, "rows": n,
            "raw_fwd_bwd_s": t["raw"], "fpo_update_s": t["fpo"], "ratio": t["fpo"] / t["raw"],
            "ratio_without_adamw": t["fpo_nostep"] / t["raw"],
            "prepare_s": t["prepare"], "prepare_ratio": t["prepare"] / t["raw"], "repeats": repeats,
            "lora_params": sum(p.numel() for p in params),
            "model_params": sum(p.numel() for p in policy.denoiser.parameters())}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    ap.add_argument("--batch", type=int, help="B (default per model)")
    ap.add_argument("--n-mc", type=int, help="N_mc (default per model)")
    ap.add_argument("--side", type=int, help="latent side (default per model)")
    ap.add_argument("--repeats", type=int, help="timed repeats (default per model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 weights + autocast (default on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 repeats: seconds")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    C.set_threads(a.threads)
    models = [m for m in a.models if m.startswith("tiny")] if a.smoke else a.models
    bf16 = a.bf16 or torch.cuda.is_available()
    rows = []
    for m in models:
        side, b, n, tl, r = DEFAULTS[m]
        if a.smoke:
            b, n, r = 2, 2, 2
        row = measure(m, side=a.side or side, batch=a.batch or b, n_mc=a.n_mc or n, text_len=tl,
                      repeats=a.repeats or r, mixed_precision="bf16" if bf16 else "no")
        rows.append(row)
        print(f"{m}: fpo update {row['fpo_update_s']:.4f}s / raw fwd+bwd {row['raw_fwd_bwd_s']:.4f}s "
              f"= {row['ratio']:.3f} (target <= 1.10; without the AdamW step {row['ratio_without_adamw']:.3f}); prepare/raw = {row['prepare_ratio']:.3f}", flush=True)
    return C.report(rows, ["model", "device", "dtype", "latent", "B", "N_mc", "raw_fwd_bwd_s", "fpo_update_s",
                                  "ratio", "ratio_without_adamw", "prepare_ratio", "repeats"], a.json)


if __name__ == "__main__":
    main()
