"""Peak memory of one LoRA FPO update, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess: build the real architecture (random weights),
attach LoRA (rank 8), compute the old losses, then measure one update (CFM losses of
B x N_mc rows, FPO surrogate, backward, AdamW step).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only).
* CPU: **process RSS**, sampled every 2 ms from ``/proc/self/statm`` by a thread during the
  update; reported as the peak minus the RSS just before the update (after ``malloc_trim``),
  i.e. activations + gradients + optimizer state + allocator slack; the weights are in the
  baseline. tracemalloc is not used: it does not see torch's allocations.

    OMP_NUM_THREADS=1 python bench/memory.py                  # sd15 and sd35m
    OMP_NUM_THREADS=1 python bench/memory.py --models tiny-sd3 --smoke
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import _common as C
import torch

DEFAULTS = {"tiny-sd": (8, 8, 8, 16), "tiny-sd3": (8, 8, 8, 16), "sd15": (32, 1, 2, 77), "sd35m": (16, 1, 2, 32)}
"""model -> (latent side, B, N_mc, text tokens)."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _RSSPeak:
    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.peak = _rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def one(name: str, side: int, batch: int, n_mc: int, text_len: int, checkpointing: bool) -> dict:
    """Measure in this process (called in a fresh subprocess)."""
    from fpo_diffusion.algorithms.fpo import FPO
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.lora import prepare_for_training
    from fpo_diffusion.algorithms import AlgorithmContext
    from fpo_diffusion.rollout import Rollout
    from fpo_diffusion.update import adamw

    dev = C.device()
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    policy, ch, make_cond = C.build_policy(name, dtype=dtype, dev=dev)
    params = prepare_for_training(policy, gradient_checkpointing=checkpointing, rank=8)
    policy.denoiser.train()
    opt = adamw(params, lr=1e-5)  # the trainer's optimizer
    shape = (ch, side, side)
    cfg = load_config(None, [f"fpo.n_mc={n_mc}", f"train.minibatch_size={batch}"])
    alg = FPO(AlgorithmContext.for_policy(cfg, policy, latent_shape=shape, mixed_precision="bf16" if cuda else "no"))
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    ro = Rollout(torch.arange(batch), torch.arange(batch), make_cond(batch, text_len), x0, torch.zeros(batch), {})
    prep = alg.prepare(ro, 0)
    idx, adv = torch.arange(batch, device=dev), torch.ones(batch, device=dev)

    def update():
        loss, _ = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        update()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "cuda max_memory_allocated"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        base = _rss()
        with _RSSPeak() as m:
            update()
        peak = m.peak
        method = "process RSS (sampled 2 ms)"
    return {"model": name, "device": str(dev), "dtype": "bf16" if cuda else "fp32", "latent": f"{ch}x{side}x{side}",
            "B": batch, "N_mc": n_mc, "checkpointing": checkpointing, "baseline_GiB": base / 2**30,
            "peak_GiB": peak / 2**30, "step_extra_GiB": (peak - base) / 2**30, "method": method,
            "update_s": time.perf_counter() - t0,
            "model_params_M": sum(p.numel() for p in policy.denoiser.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sd35m"], choices=list(DEFAULTS))
    ap.add_argument("--side", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--n-mc", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny-sd3 only, 2x2 rows: seconds")
    ap.add_argument("--json")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    C.set_threads(a.threads)
    if a._one:
        name, side, b, n, tl, ck = a._one.split(",")
        print("RESULT " + json.dumps(one(name, int(side), int(b), int(n), int(tl), ck == "1")), flush=True)
        return []
    models = ["tiny-sd3"] if a.smoke else a.models
    rows = []
    for m in models:
        side, b, n, tl = DEFAULTS[m]
        if a.smoke:
            b, n = 2, 2
        for ck in (False, True):
            spec = f"{m},{a.side or side},{a.batch or b},{a.n_mc or n},{tl},{int(ck)}"
            p = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--_one", spec],
                               capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                raise SystemExit(f"memory run {spec} failed:\n{p.stderr[-2000:]}")
            row = json.loads(line[0][7:])
            rows.append(row)
            print(f"{m} checkpointing={ck}: step adds {row['step_extra_GiB']:.3f} GiB "
                  f"(peak {row['peak_GiB']:.2f} GiB, {row['method']})", flush=True)
        off, on = rows[-2], rows[-1]
        on["saving_vs_off"] = 1 - on["step_extra_GiB"] / off["step_extra_GiB"] if off["step_extra_GiB"] > 0 else 0.0
    return C.report(rows, ["model", "device", "dtype", "latent", "B", "N_mc", "checkpointing", "baseline_GiB",
                                  "peak_GiB", "step_extra_GiB", "saving_vs_off", "update_s"], a.json)


if __name__ == "__main__":
    main()
