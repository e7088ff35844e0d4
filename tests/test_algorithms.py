"""Baselines in the shared loop (Flow-GRPO, DDPO), FPO outside the loop, and the benchmark scripts' smoke modes."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpo_diffusion.algorithms import ALGORITHMS
from fpo_diffusion.algorithms.ddpo import ddim_step_with_logprob
from fpo_diffusion.algorithms.flow_grpo import sde_step_with_logprob
from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config

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
        st = a * math.sqrt(s / (1 - (smax if s >= 1 else s)))  # official: only the denominator at sigma = 1
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
    from fpo_diffusion.trainer import Trainer

    cfg = load_config(None, _overrides(tmp_path / "run", family, algorithm, **extra))
    tr = Trainer(cfg)
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


def _every_algorithm_and_family():
    """(family, algorithm) pairs in which every registered algorithm and every registered family appear once."""
    from fpo_diffusion.policies import POLICIES

    fits = lambda fam, cls: not cls.families or fam in cls.families  # noqa: E731
    cases = [(next(f for f in POLICIES if fits(f, cls)), name) for name, cls in ALGORITHMS.items()]
    cases += [(f, next(n for n, c in ALGORITHMS.items() if fits(f, c))) for f in POLICIES if f not in dict(cases)]
    return cases


@pytest.mark.parametrize("family,algorithm", _every_algorithm_and_family())
def test_every_registered_algorithm_and_family_runs_an_iteration(tmp_path, family, algorithm):
    from fpo_diffusion.trainer import Trainer

    tr = Trainer(load_config(None, _overrides(tmp_path / "run", family, algorithm, **{
        "train.iterations": 1, "train.prompts_per_iteration": 2, "train.minibatch_size": 4, "fpo.n_mc": 2, "awm.train_timesteps": 1})))
    before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    m = tr.train()
    assert math.isfinite(m["reward/mean"]) and m[f"{algorithm}/skipped_updates"] == 0
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(tr.policy.trainable_parameters(), before)) > 0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_baselines_refuse_the_wrong_family(tmp_path):
    from fpo_diffusion.trainer import Trainer

    with pytest.raises(ConfigError, match="flow_grpo"):
        Trainer(load_config(None, _overrides(tmp_path / "a", "sd", "flow_grpo")))
    with pytest.raises(ConfigError, match="ddpo"):
        Trainer(load_config(None, _overrides(tmp_path / "b", "sd3", "ddpo")))


def test_baseline_config_validation():
    with pytest.raises(ConfigError, match="noise_level"):
        load_config(None, ["flow_grpo.noise_level=0"])
    with pytest.raises(ConfigError, match="timestep_fraction"):
        load_config(None, ["ddpo.timestep_fraction=1.5"])
    assert load_config(None, ["algorithm=ddpo", "ddpo.eta=0.5"]).ddpo.eta == 0.5


def _check_rows(script: str, rows: list[dict]) -> None:
    """What each benchmark's rows must say (their own definitions, measured in this one run)."""
    assert rows
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, v)
    if script == "step_cost.py":  # FPO's update against the raw forward+backward on the same rows
        assert {r["model"] for r in rows} == {"tiny-sd", "tiny-sd3"}
        for r in rows:
            assert r["raw_fwd_bwd_s"] > 0 and r["fpo_update_s"] > 0 and r["rows"] == r["B"] * r["N_mc"]
            assert math.isclose(r["ratio"], r["fpo_update_s"] / r["raw_fwd_bwd_s"], rel_tol=1e-12)
    elif script == "gradient_snr.py":  # cosines of gradients of one rollout, the share of zero advantages
        assert [r["variant"] for r in rows] == ["fpo", "awm"]
        for r in rows:
            assert -1 <= r["cos_draws"] <= 1 and -1 <= r["cos_prompts"] <= 1 and 0 <= r["zero_advantage_share"] <= 1
            assert r["grad_norm"] >= 0 and r["rollouts"] == 2
    elif script == "rollout.py":  # our rollout against the stock pipeline, same samples
        (r,) = rows
        assert r["model"] == "embedded:tiny-sd3" and r["samples"] == 4 and r["steps"] == 2
        assert r["stock_pil_s"] > 0 and math.isclose(r["ratio"], r["ours_s"] / r["stock_pil_s"], rel_tol=1e-12)
    elif script == "memory.py":  # one row without, one with gradient checkpointing, same shapes
        assert [r["checkpointing"] for r in rows] == [False, True]
        assert rows[0]["latent"] == rows[1]["latent"] and rows[0]["B"] == rows[1]["B"]
        for r in rows:
            assert r["peak_GiB"] >= r["baseline_GiB"] >= 0 and r["update_s"] > 0
        assert "saving_vs_off" in rows[1]


@pytest.mark.parametrize("script", ["step_cost.py", "rollout.py", "memory.py", "learning.py", "gradient_snr.py"])
def test_bench_smoke(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "rows.json"
    args = ["--smoke"] + ([] if script == "learning.py" else ["--json", str(out)])
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("|")]
    assert len(table) >= 3 and table[1].startswith("|---"), p.stdout[-2000:]  # header, rule, rows
    if script == "learning.py":  # one line per variant: the held-out score before -> after training
        scores = re.findall(r"\[test\] (\S+) lr \S+ seed 0: score ([\d.]+) -> ([\d.]+) \((\d+) evaluations", p.stdout)
        assert {v for v, *_ in scores} == {"fpo-mean", "flow_grpo"}, p.stdout[-2000:]
        assert all(0 <= float(a) <= 1 and 0 <= float(b) <= 1 and int(n) > 0 for _, a, b, n in scores)
        return
    rows = json.loads(out.read_text())
    _check_rows(script, rows)
    assert len(table) == 2 + len(rows)  # the printed table is the rows written


def _fpo_outside_the_loop(**overrides):
    """FPO on a tiny SD3 policy with a random LoRA (so the policy differs from its frozen base), built
    on an ``AlgorithmContext`` alone: no trainer."""
    from fpo_diffusion.algorithms import FPO, AlgorithmContext
    from fpo_diffusion.rollout import ReferenceSamples

    from helpers_policies import PROMPTS, make_policy

    pol = make_policy("sd3", init=False)
    cfg = load_config(None, ["fpo.n_mc=2", "train.minibatch_size=2", *(f"{k}={v}" for k, v in overrides.items())])
    shape = tuple(pol.latent_shape())
    g = torch.Generator().manual_seed(0)
    cond = pol.encode_prompts(PROMPTS)
    ro = ReferenceSamples(torch.arange(2), torch.arange(2), cond, torch.randn(2, *shape, generator=g))
    anchor = ReferenceSamples(torch.arange(2), torch.arange(2), cond, torch.randn(2, *shape, generator=g))
    ctx = AlgorithmContext.for_policy(cfg, pol, latent_shape=shape, reference_samples=lambda n: anchor)
    alg = FPO(ctx)
    alg.setup()
    return alg, pol, ro, anchor


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def test_fpo_kl_anchor_adds_kl_beta_times_its_gradient():
    """The KL anchor to the frozen base model is part of the loss: the gradient is the surrogate's
    plus ``kl_beta`` times that of ``mean (v_theta - v_ref)^2``, with ``v_ref`` the adapter-disabled model."""
    from fpo_diffusion.fpo import fpo_loss, kl_penalty

    beta = 0.7
    alg, pol, ro, _ = _fpo_outside_the_loop(**{"fpo.kl_beta": beta, "fpo.fm_anchor_beta": 0})
    prep = alg.prepare(ro, 0)
    idx, adv = torch.arange(2), torch.tensor([1.0, -0.5])
    params = pol.trainable_parameters()
    loss, stats = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
    g = _grads(loss, params)
    # by hand: the surrogate at the same (t, eps), and the KL to the base model's prediction there
    l_new, pred = pol.cfm_loss(ro.x0, ro.cond, prep["t"], prep["eps"], return_pred=True)
    with torch.no_grad(), pol.reference():
        _, pred_ref = pol.cfm_loss(ro.x0, ro.cond, prep["t"], prep["eps"], return_pred=True)
    torch.testing.assert_close(prep["ref_pred"], pred_ref)
    surrogate, _ = fpo_loss(prep["l_old"], l_new.float(), adv, alg.objective)
    kl = kl_penalty(pred, pred_ref).mean()
    assert float(kl) > 0 and math.isclose(float(stats["kl_ref"]), float(kl), rel_tol=1e-5)
    torch.testing.assert_close(loss, surrogate + beta * kl, rtol=1e-5, atol=1e-8)
    g_sur, g_kl = _grads(surrogate, params), _grads(kl, params)
    assert float((beta * g_kl).norm()) > 1e-3 * float(g_sur.norm())  # the anchor's share is not negligible
    torch.testing.assert_close(g, g_sur + beta * g_kl, rtol=1e-4, atol=1e-7)
    # off: no reference predictions, the loss is the surrogate alone
    alg0, pol0, ro0, _ = _fpo_outside_the_loop(**{"fpo.kl_beta": 0, "fpo.fm_anchor_beta": 0})
    prep0 = alg0.prepare(ro0, 0)
    assert "ref_pred" not in prep0
    loss0, stats0 = alg0.loss(ro0, prep0, idx, adv, iteration=0, epoch=0, step=0)
    assert "kl_ref" not in stats0
    torch.testing.assert_close(loss0, fpo_loss(prep0["l_old"], pol0.cfm_loss(ro0.x0, ro0.cond, prep0["t"], prep0["eps"]),
                                              adv, alg0.objective)[0])


def test_fpo_flow_matching_anchor_adds_its_beta_times_the_anchor_cfm_loss():
    """With ``fm_anchor_beta`` the loss adds that times the CFM loss on the reference sampler's samples."""
    fm = 0.3
    alg, pol, ro, anchor = _fpo_outside_the_loop(**{"fpo.kl_beta": 0, "fpo.fm_anchor_beta": fm,
                                                    "fpo.fm_anchor_samples": 2})
    assert alg.anchor is anchor  # setup took the context's reference samples
    prep = alg.prepare(ro, 0)
    idx, adv = torch.arange(2), torch.ones(2)
    loss, stats = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
    anc = alg._anchor_loss(0, 0, 0, len(idx))
    assert float(anc) > 0 and math.isclose(float(stats["fm_anchor_loss"]), float(anc), rel_tol=1e-6)
    from fpo_diffusion.fpo import fpo_loss

    surrogate, _ = fpo_loss(prep["l_old"], pol.cfm_loss(ro.x0, ro.cond, prep["t"], prep["eps"]), adv, alg.objective)
    torch.testing.assert_close(loss, surrogate + fm * anc, rtol=1e-5, atol=1e-8)


def test_fpo_guided_loss_is_the_cfm_loss_of_the_cfg_combined_prediction_with_the_unconditional_branch_detached():
    """``fpo.guided_loss``: old and new losses (and the KL's predictions) are those of ``v_u + w (v_c - v_u)`` at
    the rollouts' CFG scale, computed by hand from two plain forwards; the gradient flows only through ``v_c``
    (``w`` times the conditional branch's), and the default is the conditional loss."""
    from fpo_diffusion.fpo import fpo_loss

    w = 3.0
    alg, pol, ro, _ = _fpo_outside_the_loop(**{"fpo.kl_beta": 0, "fpo.fm_anchor_beta": 0, "fpo.guided_loss": True,
                                               "sampling.guidance_scale": w})
    prep = alg.prepare(ro, 0)
    t, eps = prep["t"], prep["eps"]
    b, n = t.shape
    x0 = ro.x0.repeat_interleave(n, 0)
    tt = t.reshape(-1, 1, 1, 1)
    x_t, target = (1 - tt) * x0 + tt * eps.flatten(0, 1), eps.flatten(0, 1) - x0
    c = {k: v.repeat_interleave(n, 0) for k, v in ro.cond.items()}
    neg = {k: v.expand(b * n, *v.shape[1:]) for k, v in pol.encode_prompts([""]).items()}

    def by_hand(detach):
        v_c = pol.predict(x_t, t.flatten(), c)
        v_u = pol.predict(x_t, t.flatten(), neg)
        v_u = v_u.detach() if detach else v_u
        return ((v_u + w * (v_c - v_u) - target) ** 2).reshape(b, n, -1).mean(2)

    torch.testing.assert_close(prep["l_old"], by_hand(True).detach(), rtol=1e-5, atol=1e-6)
    idx, adv = torch.arange(2), torch.tensor([1.0, -0.5])
    params = pol.trainable_parameters()
    loss, _ = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
    ref = fpo_loss(prep["l_old"], by_hand(True), adv, alg.objective)[0]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    g, g_ref = _grads(loss, params), _grads(ref, params)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    # not the gradient through both branches, nor the conditional loss's
    g_both = _grads(fpo_loss(prep["l_old"], by_hand(False), adv, alg.objective)[0], params)
    assert float((g - g_both).norm()) > 1e-3 * float(g.norm())
    alg0, pol0, ro0, _ = _fpo_outside_the_loop(**{"fpo.kl_beta": 0, "fpo.fm_anchor_beta": 0,
                                                  "sampling.guidance_scale": w})
    prep0 = alg0.prepare(ro0, 0)
    torch.testing.assert_close(prep0["l_old"], pol0.cfm_loss(ro0.x0, ro0.cond, prep0["t"], prep0["eps"]).detach())
    assert float((prep0["l_old"] - prep["l_old"]).abs().max()) > 1e-3


def test_learning_bench_official_variants_keep_their_recipe(tmp_path):
    """An official-recipe variant of the race is its preset with only the budget, rate, seed and tasks changed."""
    import dataclasses
    import sys

    from fpo_diffusion.config_io import load_config

    sys.path.insert(0, str(ROOT / "bench"))
    import learning

    assert set(learning.OFFICIAL) <= set(learning.VARIANTS)
    for variant, preset in learning.OFFICIAL.items():
        ref = load_config(str(ROOT / "launch" / "configs" / preset), [f"output_dir={tmp_path / 'ref'}"])
        cfg = learning.preset_config(variant, [f"output_dir={tmp_path / variant}", "train.lr=0.0123", "train.seed=7",
                                               "train.iterations=3", "prompts.tags=[counting]"], 4, 16)
        assert cfg.algorithm == learning.VARIANTS[variant][0] == ref.algorithm
        assert (cfg.train.lr, cfg.train.seed, cfg.train.iterations, cfg.prompts.tags) == (0.0123, 7, 3, ["counting"])
        for section in ("sampling", "lora", "advantage", "reward", cfg.algorithm):
            assert getattr(cfg, section) == getattr(ref, section), (variant, section)
        keep = {f.name for f in dataclasses.fields(cfg.train)} - {"lr", "seed", "iterations"}
        assert all(getattr(cfg.train, k) == getattr(ref.train, k) for k in keep), variant
        with pytest.raises(ValueError, match="same budget"):
            learning.preset_config(variant, [f"output_dir={tmp_path / 'x'}"], 8, 16)
