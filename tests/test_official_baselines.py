"""The baselines as their official code is today (issue 22), against formulas written out by hand.

Flow-GRPO: yifan123/flow_grpo at ac4c86e (2025-07-18), ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``
lines 40-70 and ``scripts/train_sd3.py`` lines 180-215 (the guided prediction, the unconditional branch
detached), 796-823 (the zero-advantage filter), 864 (the first ``int(S * timestep_fraction)`` steps) and
881-897 (GRPO clip, KL over ``2 std_dev_t^2``). AWM: scxue/advantage_weighted_matching at be51372,
``scripts/train_sd3_awm.py`` lines 1224-1327 (the ratio on minibatches after the first optimizer step).
Nothing here calls the project's formula code to get an expected value: the expected numbers come from
the official expressions below, fed with the model's raw predictions.
"""
import math

import pytest
import torch

from fpo_diffusion.config_io import load_config

F64 = torch.float64
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------- the official expressions, written out

def official_std_dev_t(sigma: float, sigma_max: float, a: float) -> float:
    """``torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level`` (line 47)."""
    return math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a


def official_step(v, x, sigma, sigma_next, sigma_max, a, prev_sample):
    """``(log_prob [n], prev_sample_mean, std_dev_t)`` of ``sde_step_with_logprob`` for one sigma per call."""
    dt = sigma_next - sigma
    sd = official_std_dev_t(sigma, sigma_max, a)
    mean = x * (1 + sd ** 2 / (2 * sigma) * dt) + v * (1 + sd ** 2 * (1 - sigma) / (2 * sigma)) * dt
    s = sd * math.sqrt(-dt)
    lp = -((prev_sample - mean) ** 2) / (2 * s ** 2) - math.log(s) - LOG_SQRT_2PI
    return lp.reshape(len(x), -1).mean(1), mean, sd


# ---------------------------------------------------------------- 1a: the first step's noise scale

def test_flow_grpo_first_step_replaces_only_the_denominator():
    from fpo_diffusion.algorithms.flow_grpo import sde_step_with_logprob

    g = torch.Generator().manual_seed(0)
    x, v, nxt = (torch.randn(2, 4, 3, 3, generator=g, dtype=F64) for _ in range(3))
    smax, a = 0.9, 0.7
    sigma = torch.tensor([1.0, 1.0], dtype=F64)
    sigma_next = torch.tensor([0.9, 0.9], dtype=F64)
    _, lp, mean, std = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=a, sigma_max=smax, prev_sample=nxt)
    # official: 0.7 * sqrt(1 / (1 - 0.9)) = 2.21359..., the transition std that times sqrt(0.1) = 0.7
    assert official_std_dev_t(1.0, smax, a) == pytest.approx(0.7 * math.sqrt(10))
    assert float(std.flatten()[0]) == pytest.approx(0.7 * math.sqrt(10) * math.sqrt(0.1), rel=1e-12)
    assert float(std.flatten()[0]) == pytest.approx(0.7, rel=1e-12)  # was 0.7 * sqrt(0.9) = 0.6641 (numerator too)
    lp_off, mean_off, _ = official_step(v, x, 1.0, 0.9, smax, a, nxt)
    torch.testing.assert_close(mean, mean_off, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp, lp_off, rtol=1e-12, atol=1e-12)
    # by hand for one coordinate: std_dev_t^2 = 4.9; mean = x (1 + 4.9 * -0.1 / 2) + v (1 + 0) * -0.1
    m = float(x[0, 0, 0, 0]) * (1 - 0.245) - 0.1 * float(v[0, 0, 0, 0])
    assert float(mean[0, 0, 0, 0]) == pytest.approx(m, rel=1e-12)


def test_flow_grpo_later_steps_are_the_official_formula():
    from fpo_diffusion.algorithms.flow_grpo import sde_step_with_logprob

    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(3, 4, 5, 5, generator=g, dtype=F64) for _ in range(3))
    sigma = torch.tensor([0.95, 0.7, 0.2], dtype=F64)
    sigma_next = torch.tensor([0.9, 0.5, 0.0], dtype=F64)
    x1, lp, mean, std = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=0.7, sigma_max=0.97, noise=noise)
    for i in range(3):
        s, sn = float(sigma[i]), float(sigma_next[i])
        lp_off, mean_off, sd = official_step(v[i:i + 1], x[i:i + 1], s, sn, 0.97, 0.7, x1[i:i + 1])
        torch.testing.assert_close(mean[i:i + 1], mean_off)
        torch.testing.assert_close(x1[i], mean_off[0] + sd * math.sqrt(sn - s if sn > s else s - sn) * noise[i])
        torch.testing.assert_close(lp[i:i + 1], lp_off)


# ---------------------------------------------------------------- 1b-1d: the loss of the algorithm, by hand

def _flow_grpo(guidance: float, **overrides):
    """Flow-GRPO on a tiny SD3 policy with a random LoRA (so it differs from its base), outside the loop,
    with a random trajectory of 2 samples over 4 steps (only the inputs of the loss)."""
    from fpo_diffusion.algorithms import AlgorithmContext, build_algorithm
    from fpo_diffusion.rollout import ReferenceSamples

    from helpers_policies import PROMPTS, make_policy

    pol = make_policy("sd3", init=False)
    cfg = load_config(None, ["algorithm=flow_grpo", "sampling.steps=4", f"sampling.guidance_scale={guidance}",
                             "train.minibatch_size=2", *(f"{k}={v}" for k, v in overrides.items())])
    shape = tuple(pol.latent_shape())
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 5, *shape, generator=g)
    ro = ReferenceSamples(torch.arange(2), torch.arange(2), pol.encode_prompts(PROMPTS), lat[:, -1],
                          extras={"latents": lat, "log_probs": torch.randn(2, 4, generator=g) * 1e-3 - 1.0})
    alg = build_algorithm("flow_grpo", AlgorithmContext.for_policy(cfg, pol, latent_shape=shape))
    return alg, pol, ro, cfg


def _sigmas(pol, steps):
    """The flow schedule straight from diffusers (the model's own scheduler config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pol.base_scheduler.config)
    sched.set_timesteps(steps)
    return [float(s) for s in sched.sigmas]


def _official_loss(pol, ro, adv, cfg, *, detach_uncond=True, model_ctx=None):
    """``(policy_loss, kl_loss)`` of ``train_sd3.py`` lines 864-897 on ``ro``'s trajectory, summed over the
    trained steps the way the project averages them (one mean over all (sample, step) rows)."""
    import contextlib

    a = cfg.flow_grpo
    S = cfg.sampling.steps
    k = int(S * a.timestep_fraction)  # num_train_timesteps; the first k steps (line 864)
    sig = _sigmas(pol, S)
    smax = sig[1]
    gs = cfg.sampling.guidance_scale
    cond = ro.cond
    neg = pol.negative_cond(len(ro.x0))

    def guided(x, t, ctx):
        with ctx:
            con = pol.predict(x, t, cond).double()
            if gs <= 1:
                return con
            unc = pol.predict(x, t, neg).double()
        if detach_uncond:
            unc = unc.detach()
        return unc + gs * (con - unc)

    pol_terms, kl_terms = [], []
    for j in range(k):
        x = ro.extras["latents"][:, j].double()
        nxt = ro.extras["latents"][:, j + 1].double()
        t = torch.full((len(x),), sig[j], dtype=torch.float32)
        v = guided(x, t, contextlib.nullcontext())
        lp, mean, sd = official_step(v, x, sig[j], sig[j + 1], smax, a.noise_level, nxt)
        ratio = torch.exp(lp - ro.extras["log_probs"][:, j].double())
        adv_c = adv.double().clamp(-5, 5)
        unclipped = -adv_c * ratio
        clipped = -adv_c * ratio.clamp(1 - a.clip_range, 1 + a.clip_range)
        pol_terms.append(torch.maximum(unclipped, clipped))
        with torch.no_grad():
            v_ref = guided(x, t, pol.reference())
        _, mean_ref, _ = official_step(v_ref, x, sig[j], sig[j + 1], smax, a.noise_level, nxt)
        kl_terms.append(((mean - mean_ref) ** 2).reshape(len(x), -1).mean(1) / (2 * sd ** 2))  # line 895
    return torch.stack(pol_terms).mean(), torch.stack(kl_terms).mean(), torch.stack(kl_terms), sig


def test_flow_grpo_trains_the_first_steps_of_every_sample():
    alg, _, ro, _ = _flow_grpo(1.0)
    j = alg.select_steps(ro, torch.arange(2), iteration=3, epoch=1)
    assert j.tolist() == [[0, 1, 2], [0, 1, 2]]  # int(4 * 0.99) = 3, the first three (official line 864)
    alg_r, _, ro_r, _ = _flow_grpo(1.0, **{"flow_grpo.timestep_selection": "random", "flow_grpo.timestep_fraction": 0.5})
    assert alg_r.select_steps(ro_r, torch.arange(2), iteration=0, epoch=0).shape == (2, 2)


def test_flow_grpo_kl_is_divided_by_std_dev_t_squared():
    """``kl_beta * mean (mean - mean_ref)^2 / (2 std_dev_t^2)``; the transition variance ``std_dev_t^2 (-dt)``
    the old code divided by made each step's term ``1 / (-dt)`` times larger (1.7x-112x per step, 6.3x overall
    on this tiny model's 4-step schedule)."""
    beta = 0.04
    alg, pol, ro, cfg = _flow_grpo(1.0, **{"flow_grpo.kl_beta": beta, "flow_grpo.timestep_fraction": 1.0})
    adv = torch.tensor([1.0, -0.5])
    loss, stats = alg.loss(ro, alg.prepare(ro, 0), torch.arange(2), adv, iteration=0, epoch=0, step=0)
    pol_loss, kl, kl_steps, sig = _official_loss(pol, ro, adv, cfg)
    assert float(kl.detach()) > 0
    assert float(stats["kl_ref"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(loss) == pytest.approx(float(pol_loss + beta * kl), rel=1e-4, abs=1e-7)
    # what the transition variance in the denominator gave: each step's term over -dt, 6.3x the official here
    neg_dt = torch.tensor([sig[j] - sig[j + 1] for j in range(4)], dtype=F64).reshape(4, 1)
    kl_transition = float((kl_steps.detach() / neg_dt).mean())
    assert kl_transition > 4 * float(kl.detach())


@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_flow_grpo_cfg_detaches_the_unconditional_branch(kl_beta):
    """With CFG the gradient is that of the official loss, whose unconditional prediction is detached; it
    differs from the gradient through both branches."""
    alg, pol, ro, cfg = _flow_grpo(4.5, **{"flow_grpo.kl_beta": kl_beta, "flow_grpo.timestep_fraction": 1.0})
    params = pol.trainable_parameters()
    adv = torch.tensor([1.0, -0.5])
    loss, _ = alg.loss(ro, alg.prepare(ro, 0), torch.arange(2), adv, iteration=0, epoch=0, step=0)
    g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
    pl, kl, _, _ = _official_loss(pol, ro, adv, cfg)
    g_off = torch.cat([x.flatten() for x in torch.autograd.grad(pl + kl_beta * kl, params)])
    pl2, kl2, _, _ = _official_loss(pol, ro, adv, cfg, detach_uncond=False)
    g_both = torch.cat([x.flatten() for x in torch.autograd.grad(pl2 + kl_beta * kl2, params)])
    torch.testing.assert_close(g.double(), g_off.double(), rtol=2e-3, atol=1e-7)
    assert float((g_both - g_off).norm()) > 0.05 * float(g_off.norm())  # the detach matters here
    # the option off: the gradient through both branches
    alg_b, pol_b, ro_b, cfg_b = _flow_grpo(4.5, **{"flow_grpo.kl_beta": kl_beta, "flow_grpo.timestep_fraction": 1.0,
                                                   "flow_grpo.detach_uncond": "false"})
    loss_b, _ = alg_b.loss(ro_b, alg_b.prepare(ro_b, 0), torch.arange(2), adv, iteration=0, epoch=0, step=0)
    gb = torch.cat([x.flatten() for x in torch.autograd.grad(loss_b, pol_b.trainable_parameters())])
    torch.testing.assert_close(gb.double(), g_both.double(), rtol=2e-3, atol=1e-7)


# ---------------------------------------------------------------- 1d: zero-advantage filtering

def test_zero_advantage_subset_by_hand():
    from fpo_diffusion.algorithms.flow_grpo import zero_advantage_subset

    adv = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    keep = zero_advantage_subset(adv, 2, g)  # 3 nonzero, padded with one zero-advantage sample to 4
    assert len(keep) == 4 and {1, 3, 4} <= set(keep.tolist())
    assert zero_advantage_subset(adv, 3, g).tolist() == [1, 3, 4]  # already a multiple of 3
    assert len(zero_advantage_subset(torch.zeros(8), 4, g)) == 4  # none left: one per minibatch (every rank steps)
    assert zero_advantage_subset(torch.ones(5), 2, g).tolist() == [0, 1, 2, 3, 4]  # no zero to pad with


def test_update_trains_only_the_nonzero_advantages_in_as_many_minibatches():
    """The loop's update with Flow-GRPO's filter: the same number of minibatches (and optimizer steps),
    smaller, holding the nonzero-advantage samples (official lines 796-823)."""
    from accelerate import Accelerator

    from fpo_diffusion.algorithms.flow_grpo import FlowGRPO
    from fpo_diffusion.config import TrainConfig
    from fpo_diffusion.noise import SeedStreams
    from fpo_diffusion.rollout import ReferenceSamples
    from fpo_diffusion.update import NonfiniteGuard, Updater

    class Recorder:
        name = "rec"

        def __init__(self, filt):
            self.seen, self.acfg = [], type("A", (), {"filter_zero_advantage": filt})()
            self.ctx = type("C", (), {"seeds": SeedStreams(0)})()

        update_subset = FlowGRPO.update_subset

        def loss(self, ro, prep, idx, adv, **kw):
            self.seen.append(sorted(idx.tolist()))
            return (w * ro.x0[idx]).sum(), {}

    w = torch.nn.Parameter(torch.zeros(()))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.SGD([w], lr=0.1)
    acc = Accelerator(cpu=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = TrainConfig(minibatch_size=4, grad_accum_steps=1)
    ro = ReferenceSamples(torch.arange(12), torch.arange(12), {}, torch.ones(12))
    adv = torch.tensor([0, 1, 0, 0, -1, 0, 2, 0, 0, -2, 0, 0.5])  # 5 nonzero; 3 minibatches of the 12
    for filt, expect_sizes in ((True, [2, 2, 2]), (False, [4, 4, 4])):
        up = Updater(tr, acc, model, opt, sched, n_local=12, guard=NonfiniteGuard(3, verbose=False))
        rec = Recorder(filt)
        out = up.update(rec, ro, adv, {}, 0)
        assert [len(s) for s in rec.seen] == expect_sizes
        if filt:
            trained = {i for s in rec.seen for i in s}
            assert {1, 4, 6, 9, 11} <= trained and len(trained) == 6  # padded with one zero to 6 = 3 x 2
            assert out.algorithm["trained_samples"] == 6


# ---------------------------------------------------------------- AWM: the ratio after the first optimizer step

def _awm(**overrides):
    from fpo_diffusion.algorithms import AlgorithmContext, build_algorithm
    from fpo_diffusion.rollout import ReferenceSamples

    from helpers_policies import PROMPTS, make_policy

    pol = make_policy("sd3", init=False)
    cfg = load_config(None, ["algorithm=awm", "sampling.steps=10", "sampling.guidance_scale=1",
                             "awm.kl_beta=0", "awm.ema_kl_beta=0", *(f"{k}={v}" for k, v in overrides.items())])
    shape = tuple(pol.latent_shape())
    ro = ReferenceSamples(torch.arange(2), torch.arange(2), pol.encode_prompts(PROMPTS),
                          torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))
    alg = build_algorithm("awm", AlgorithmContext.for_policy(cfg, pol, latent_shape=shape))
    alg.setup()
    return alg, pol, ro


def _official_pair_loss(pol, ro, t, eps, p=0.25):
    """``-log_prob`` of ``compute_log_prob_awm`` (ghuber): ``t ((mse + 1e-10)^p - 1e-10^p) / p``."""
    x0 = ro.x0.unsqueeze(1)
    tt = t.reshape(*t.shape, *(1,) * (x0.dim() - 2))
    xt = (1 - tt) * x0 + tt * eps
    n, k = t.shape
    rep = {kk: v.repeat_interleave(k, 0) for kk, v in ro.cond.items()}
    v = pol.predict(xt.reshape(n * k, *x0.shape[2:]), t.reshape(-1), rep).reshape(n, k, -1)
    mse = ((v - (eps - x0).reshape(n, k, -1)) ** 2).mean(-1)
    return t * ((mse + 1e-10) ** p - 1e-10 ** p) / p


@pytest.mark.parametrize("clip_range", [1.0, 0.002])
def test_awm_takes_the_ratio_after_the_first_optimizer_step(clip_range):
    """Minibatches of 1, no accumulation: two optimizer steps. The first minibatch is the plain
    advantage-weighted loss; the second takes ``rho = exp(l_old - l)`` against the weights the update started
    from and the official clipped surrogate."""
    alg, pol, ro = _awm(**{"train.minibatch_size": 1, "awm.clip_range": clip_range})
    prep = alg.prepare(ro, 0)
    t, eps = prep["t"], prep["eps"]
    with torch.no_grad():
        l_start = _official_pair_loss(pol, ro, t, eps)
        for p in pol.trainable_parameters():  # the first optimizer step moved the weights
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adv = torch.tensor([3.0, -7.0])
    a_w = adv.clamp(-5, 5) / 5  # lines 1293-1299
    # first step's minibatch: rho == 1, the plain weighted loss
    loss0, _ = alg.loss(ro, prep, torch.tensor([0]), adv[:1], iteration=0, epoch=0, step=0)
    l_now = _official_pair_loss(pol, ro, t, eps)
    assert float(loss0) == pytest.approx(float((a_w[0] * l_now[0]).mean()), rel=1e-4)
    # second step's minibatch: the official surrogate
    loss1, stats = alg.loss(ro, prep, torch.tensor([1]), adv[1:], iteration=0, epoch=0, step=1)
    rho = torch.exp(l_start[1] - l_now[1])
    exp = torch.maximum(-a_w[1] * rho, -a_w[1] * rho.clamp(1 - clip_range, 1 + clip_range)).mean()
    assert float(loss1) == pytest.approx(float(exp), rel=1e-4)
    assert float((rho - 1).abs().max()) > 1e-3  # the weights moved: rho is not 1
    assert float(stats["ratio_mean"]) == pytest.approx(float(rho.mean()), rel=1e-4)
    g = torch.autograd.grad(loss1, pol.trainable_parameters(), allow_unused=True)
    assert any(x is not None and float(x.abs().max()) > 0 for x in g) == (clip_range == 1.0 or
                                                                          bool(((rho - 1).abs() <= clip_range).any()))


def test_awm_one_step_per_iteration_computes_no_old_losses():
    alg, pol, ro = _awm(**{"train.minibatch_size": 2})
    assert "l_old" not in alg.prepare(ro, 0)  # one optimizer step: rho == 1 throughout, nothing to compute
    alg2, _, ro2 = _awm(**{"train.minibatch_size": 1, "train.grad_accum_steps": 2})
    assert "l_old" not in alg2.prepare(ro2, 0)


# ---------------------------------------------------------------- the official EMA

def test_ema_warmup_and_interval_follow_the_official_wrapper():
    from fpo_diffusion.run_state import EMA

    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], 0.9, warmup=True, every=1)
    shadow = 0.0
    for n in range(1, 6):  # NFT / AWM: every step, decay min((1 + n) / (10 + n), 0.9) with n the 1-based step
        with torch.no_grad():
            p.fill_(float(n))
        ema.step()
        d = min((1 + n) / (10 + n), 0.9)
        shadow = d * shadow + (1 - d) * n
        assert float(ema.shadow[0]) == pytest.approx(shadow, rel=1e-6)
    ema8 = EMA([p], 0.9, warmup=True, every=8)
    moved = []
    for n in range(1, 17):
        before = float(ema8.shadow[0])
        with torch.no_grad():
            p.fill_(100.0 + n)
        ema8.step()
        if float(ema8.shadow[0]) != before:
            moved.append(n)
    assert moved == [7, 15]  # (n + 1) % 8 == 0 (flow_grpo/ema.py line 45)
    state = ema8.state_dict()
    fresh = EMA([p], 0.9, warmup=True, every=8)
    fresh.load_state_dict(state)
    assert fresh.steps == 16
    plain = EMA([p], 0.9)
    assert "steps" not in plain.state_dict()  # the plain EMA's checkpoint is unchanged


# ---------------------------------------------------------------- the official presets

PRESETS = ["shapes_flow_grpo_official.yaml", "shapes_diffusion_nft_official.yaml", "shapes_awm_official.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_official_preset_loads_and_builds(name, tmp_path):
    from pathlib import Path

    from fpo_diffusion.algorithms import AlgorithmContext, build_algorithm
    from fpo_diffusion.embedded import load_model
    from fpo_diffusion.lora import prepare_for_training

    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / name
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}"])
    assert cfg.algorithm in name
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 64 and cfg.advantage.std == "global"
    assert cfg.train.ema_decay and cfg.train.ema_warmup
    pol = load_model(cfg.model.family, cfg.model.path, dtype=cfg.model.dtype)
    assert prepare_for_training(pol, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                                dropout=cfg.lora.dropout, gradient_checkpointing=False)
    alg = build_algorithm(cfg.algorithm, AlgorithmContext.for_policy(cfg, pol))
    assert alg.name == cfg.algorithm
    alg.setup()
    x0, _ = alg.sample(pol.encode_prompts(["two red circles"]), [torch.Generator().manual_seed(0)], None, 0)
    assert x0.shape[0] == 1 and bool(torch.isfinite(x0).all())  # the recipe's sampler runs on the shapes model
