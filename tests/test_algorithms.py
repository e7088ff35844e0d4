"""Baselines in the shared loop (Flow-GRPO, DDPO) and the benchmark scripts' smoke modes."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpo_diffusion.algorithms import ALGORITHMS
from fpo_diffusion.algorithms.ddpo import ddim_step_with_logprob
from fpo_diffusion.algorithms.flow_grpo import sde_step_with_logprob
from fpo_diffusion.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _normal_logpdf_mean(x, mean, std):
    d = torch.distributions.Normal(mean, std.expand_as(mean))
    return d.log_prob(x).reshape(x.shape[0], -1).mean(1)


def test_registered():
    assert {"fpo", "flow_grpo", "ddpo"} <= set(ALGORITHMS)


def test_flow_grpo_step_log_prob_is_the_gaussian_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.7, 0.2], dtype=torch.float64)
    sigma_next = torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64)
    a, smax = 0.7, 0.9
    x1, lp, mean, std = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=a, sigma_max=smax, noise=noise)
    # Flow-GRPO's formula written out per row
    for i in range(3):
        s, sn = float(sigma[i]), float(sigma_next[i])
        dt = sn - s
        st = a * math.sqrt((smax if s >= 1 else s) / (1 - (smax if s >= 1 else s)))
        m = x[i] * (1 + st ** 2 / (2 * s) * dt) + v[i] * (1 + st ** 2 * (1 - s) / (2 * s)) * dt
        sd = st * math.sqrt(-dt)
        assert torch.allclose(mean[i], m) and math.isclose(float(std[i].flatten()[0]), sd, rel_tol=1e-12)
        assert torch.allclose(x1[i], m + sd * noise[i])
    assert torch.allclose(lp, _normal_logpdf_mean(x1, mean, std))
    # evaluating the sampled step gives the same log-prob
    _, lp2, _, _ = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=a, sigma_max=smax, prev_sample=x1)
    assert torch.equal(lp, lp2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpo_step_log_prob_is_the_gaussian_formula(prediction_type):
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    out = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, prediction_type=prediction_type)
    sched.set_timesteps(10)
    acp = sched.alphas_cumprod.double()
    t, tp = 501, 401
    at, ap = acp[[t, t]], acp[[tp, tp]]
    x1, lp, mean, std = ddim_step_with_logprob(out, at, ap, x, eta=1.0, prediction_type=prediction_type, noise=noise)
    # diffusers' DDIM step with eta=1 and the same noise gives the same sample
    ref = torch.stack([sched.step(out[i:i + 1], t, x[i:i + 1], eta=1.0, variance_noise=noise[i:i + 1]).prev_sample[0]
                       for i in range(2)])
    assert torch.allclose(x1, ref, atol=1e-5)  # diffusers keeps alphas_cumprod in float32
    var = (1 - acp[tp]) / (1 - acp[t]) * (1 - acp[t] / acp[tp])
    assert torch.allclose(std.flatten()[0], var.sqrt())
    assert torch.allclose(lp, _normal_logpdf_mean(x1, mean, std))


def _overrides(out, family, algorithm, **extra):
    o = {"output_dir": str(out), "model.family": family, "model.path": f"embedded:tiny-{family}",
         "algorithm": algorithm, "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}",
         "train.iterations": 2, "sampling.steps": 3, "train.prompts_per_iteration": 3, "train.group_size": 2,
         "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false", "train.minibatch_size": 6,
         "train.lr": 3e-3, "checkpoint.every": 0}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.parametrize("family,algorithm,extra", [
    ("sd3", "flow_grpo", {"flow_grpo.kl_beta": 0.01, "flow_grpo.timestep_fraction": 0.5}),
    ("sd", "ddpo", {"sampling.guidance_scale": 1.0}),
])
def test_baseline_trains_lora_with_finite_losses_and_unit_on_policy_ratio(tmp_path, family, algorithm, extra):
    from fpo_diffusion.trainer import FPOTrainer

    cfg = load_config(None, _overrides(tmp_path / "run", family, algorithm, **extra))
    tr = FPOTrainer(cfg)
    before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    # on-policy: the first minibatch's ratio is 1 (up to batch-composition rounding)
    ro = tr.rollout(0)
    assert ro.extras["latents"].shape[1] == cfg.sampling.steps + 1
    assert ro.extras["log_probs"].shape == (len(ro.x0), cfg.sampling.steps)
    assert torch.equal(ro.extras["latents"][:, -1], ro.x0)
    prep = tr.algorithm.prepare(ro, 0)
    idx = torch.arange(len(ro.x0))
    loss, stats = tr.algorithm.loss(ro, prep, idx, torch.ones(len(idx)), iteration=0, epoch=0, step=0)
    assert torch.isfinite(loss)
    assert abs(float(stats["ratio_mean"]) - 1) < 1e-5 and float(stats["clip_frac"]) == 0.0
    # with ratio 1 and A = 1 the surrogate is -1 (plus the KL term, 0 on-policy: the adapter starts at 0)
    assert float(loss.detach()) == pytest.approx(-1.0, abs=1e-5)
    m = tr.train()
    assert math.isfinite(m[f"{algorithm}/surrogate"]) and m[f"{algorithm}/skipped_updates"] == 0
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(tr.policy.trainable_parameters(), before))
    assert moved > 0


def test_baselines_refuse_the_wrong_family(tmp_path):
    from fpo_diffusion.trainer import FPOTrainer

    with pytest.raises(ConfigError, match="flow_grpo"):
        FPOTrainer(load_config(None, _overrides(tmp_path / "a", "sd", "flow_grpo")))
    with pytest.raises(ConfigError, match="ddpo"):
        FPOTrainer(load_config(None, _overrides(tmp_path / "b", "sd3", "ddpo")))


def test_baseline_config_validation():
    with pytest.raises(ConfigError, match="noise_level"):
        load_config(None, ["flow_grpo.noise_level=0"])
    with pytest.raises(ConfigError, match="timestep_fraction"):
        load_config(None, ["ddpo.timestep_fraction=1.5"])
    assert load_config(None, ["algorithm=ddpo", "ddpo.eta=0.5"]).ddpo.eta == 0.5


@pytest.mark.parametrize("script", ["step_cost.py", "rollout.py", "memory.py", "learning.py"])
def test_bench_smoke(script):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "|" in p.stdout  # printed its table
