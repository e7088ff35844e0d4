"""DiffusionNFT, AWM and ``fpo.beta: auto`` in the shared loop, on tiny models: they run end to end,
move the policy toward the reward, resume bit for bit, and the adapted temperature moves the
measured clip fraction toward its target."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion.advantages import group_advantages
from fpo_diffusion.algorithms import ALGORITHMS
from fpo_diffusion.beta_control import BetaState, update_beta
from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config

from test_trainer import read_jsonl, tiny_overrides


def _trainer(out, family="sd3", resume=None, **extra):
    from fpo_diffusion.trainer import Trainer

    extra = {"sampling.guidance_scale": 1.0, **extra}  # both baselines' official recipes are CFG-free
    if extra.get("algorithm") == "awm":  # AWM's training times come from the tiny run's 3 sampler steps
        extra = {"awm.train_timesteps": 1, **extra}
    return Trainer(load_config(None, tiny_overrides(out, family, **extra)), resume=resume)


def test_registered_and_refuse_the_vp_families(tmp_path):
    assert ALGORITHMS["diffusion_nft"].name == "diffusion_nft" and ALGORITHMS["awm"].name == "awm"
    for alg in ("diffusion_nft", "awm"):
        with pytest.raises(ConfigError, match=f"{alg}.*sd3, flux"):
            _trainer(tmp_path / alg, "sd", algorithm=alg)


def _likelihood_shift_toward(tr, ro) -> float:
    """``mean_b A_b (l_after - l_before)`` on the iteration-0 rollout ``ro`` after training ``tr``, with ``A``
    the advantages of the run's reward and ``l`` the CFM loss at 32 held-aside ``(t, eps)`` pairs per
    sample (times of the sampler's schedule): negative when the policy's likelihood moved toward the
    samples the reward favours."""
    from fpo_diffusion.policies.schedulers import flow_sigmas

    adv = group_advantages(ro.rewards.double(), ro.prompt_idx).float()
    g = torch.Generator().manual_seed(4242)  # never used by a run
    s = tr.cfg.sampling
    sig = flow_sigmas(tr.policy, s.steps, tr.policy.height, tr.policy.width).float()
    t = sig[torch.randint(0, s.steps, (len(ro.x0), 32), generator=g)]
    eps = torch.randn(len(ro.x0), 32, *ro.x0.shape[1:], generator=g)
    with torch.no_grad():
        before = tr.policy.cfm_loss(ro.x0, ro.cond, t, eps, model=tr.model).mean(1)
    tr.train()
    with torch.no_grad():
        after = tr.policy.cfm_loss(ro.x0, ro.cond, t, eps, model=tr.model).mean(1)
    return float((adv * (after - before)).mean())


@pytest.mark.parametrize("algorithm", ["diffusion_nft", "awm"])
def test_short_run_moves_the_policy_toward_the_reward(tmp_path, algorithm):
    """Two runs that differ only in the reward's sign (brightness, +1 / -1; the same samples at iteration 0):
    in each the policy's likelihood rises on the samples its own reward favours and falls on the others
    (held-aside noise draws), so the two runs move it in opposite directions; the LoRA weights move."""
    shift = {}
    for w in (1.0, -1.0):
        tr = _trainer(tmp_path / f"run{w}", algorithm=algorithm, **{"reward.weights": f"{{brightness: {w}}}",
                                                                     "train.iterations": 2, "checkpoint.every": 0})
        before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
        ro = tr.rollout(0)  # exactly the samples the run's first iteration trains on
        shift[w] = _likelihood_shift_toward(tr, ro)
        m = read_jsonl(tmp_path / f"run{w}" / "metrics.jsonl")
        assert all(math.isfinite(r[f"{algorithm}/surrogate"]) and r[f"{algorithm}/skipped_updates"] == 0 for r in m)
        assert [r[f"{algorithm}/lag_decay"] for r in m] == pytest.approx([0.001, 0.002])
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(tr.policy.trainable_parameters(), before))
        assert moved > 1e-3
        lagged = tr.algorithm.lagged
        assert any(not torch.equal(e, p) for e, p in zip(lagged.shadow, lagged.params)), \
            "the lagged copy trails the trained weights"
    assert shift[1.0] < 0 and shift[-1.0] < 0, shift  # measured with each run's own reward


def _lora(run, it):
    return load_file(str(Path(run) / "checkpoints" / f"checkpoint-{it:06d}" / "lora.safetensors"))


@pytest.mark.parametrize("algorithm,extra", [
    ("fpo", {"fpo.beta": "auto", "fpo.beta_auto.init": 50.0, "train.epochs": 2, "train.minibatch_size": 2}),
    ("diffusion_nft", {"diffusion_nft.old_decay_rate": 0.2}),
    ("awm", {"awm.ema_decay_rate": 0.2, "train.minibatch_size": 3}),
])
def test_resume_is_bit_exact(tmp_path, algorithm, extra):
    """The algorithm's own state (beta: auto's temperature, the lagged weights) is in the checkpoint."""
    extra = {"algorithm": algorithm, "train.iterations": 3, **extra}
    _trainer(tmp_path / "full", **extra).train()
    _trainer(tmp_path / "split", **extra).train(stop_after=1)
    _trainer(tmp_path / "split", resume="latest", **extra).train()
    a, b = _lora(tmp_path / "full", 3), _lora(tmp_path / "split", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "split" / "metrics.jsonl")
    keys = [k for k in ma[0] if k.startswith(f"{algorithm}/")]
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    if algorithm == "fpo":
        assert len({r["fpo/beta"] for r in ma}) > 1, "the temperature moved, so a resume must restore it"


def test_beta_auto_moves_the_clip_fraction_toward_its_target(tmp_path):
    """From a temperature far too low (the clip never binds) and from one far too high (most terms
    clipped), the adapted beta brings the measured clip fraction toward the target, by the documented
    rule, logged every iteration."""
    target = 0.2
    runs = {}
    for name, init, iters in (("low", 16.0, 7), ("high", 1e4, 6)):
        _trainer(tmp_path / name, family="sd3", **{
            "fpo.beta": "auto", "fpo.beta_auto.init": init, "fpo.beta_auto.target": target, "train.epochs": 2,
            "train.minibatch_size": 2, "train.iterations": iters, "checkpoint.every": 0}).train()
        runs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    ctl = load_config(None, ["fpo.beta_auto.target=0.2"]).fpo.beta_auto.controller()
    for name, m in runs.items():
        beta = [r["fpo/beta"] for r in m]
        clip = [r["fpo/clip_frac"] for r in m]
        assert beta[0] == (16.0 if name == "low" else 1e4)
        for k in range(len(m) - 1):  # the documented rule, applied to the measured statistic
            assert m[k]["fpo/beta_auto_clip_frac"] == pytest.approx(clip[k], abs=1e-12)
            assert beta[k + 1] == update_beta(BetaState(beta[k]), clip[k], ctl).beta == m[k]["fpo/beta_next"]
        last = sum(clip[-2:]) / 2
        assert abs(last - target) < abs(clip[0] - target) - 0.05, (name, beta, clip)
    assert runs["low"][0]["fpo/clip_frac"] == 0 and runs["low"][-1]["fpo/beta"] > 16
    assert runs["high"][0]["fpo/clip_frac"] > 0.5 and runs["high"][-1]["fpo/beta"] < 1e4


def test_fixed_beta_and_the_sum_reduction_in_the_loop(tmp_path):
    """A numeric beta stays put (logged as fpo/beta, nothing extra in the checkpoint); ratio_reduction: sum
    multiplies the log-ratio by the latent size (4 * 8 * 8 = 256 for the tiny SD3), so a beta 256 times
    smaller gives the same ratios."""
    runs = {}
    for name, extra in (("mean", {"fpo.beta": 5.0}), ("sum", {"fpo.beta": 5.0 / 256, "fpo.ratio_reduction": "sum"})):
        tr = _trainer(tmp_path / name, **{"train.epochs": 2, "train.minibatch_size": 2, "train.iterations": 2,
                                          "checkpoint.every": 1, **extra})
        assert tr.algorithm.objective.latent_dims == 256
        tr.train()
        runs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert not list((tmp_path / name / "checkpoints" / "checkpoint-000001").glob("custom_checkpoint_1.pkl"))
    assert [r["fpo/beta"] for r in runs["mean"]] == [5.0, 5.0]
    for a, b in zip(runs["mean"], runs["sum"]):
        assert a["fpo/ratio_max"] == pytest.approx(b["fpo/ratio_max"], rel=1e-4)
        assert a["fpo/ratio_max"] > 1


def _outside_the_loop(algorithm: str, **overrides):
    """``algorithm`` on a tiny SD3 policy with a random LoRA, built on an ``AlgorithmContext`` alone."""
    from fpo_diffusion.algorithms import AlgorithmContext, build_algorithm
    from fpo_diffusion.rollout import ReferenceSamples

    from helpers_policies import PROMPTS, make_policy

    pol = make_policy("sd3", init=False)
    cfg = load_config(None, [f"algorithm={algorithm}", "fpo.n_mc=2", "train.minibatch_size=2", "sampling.steps=4",
                             "sampling.guidance_scale=1", *(f"{k}={v}" for k, v in overrides.items())])
    shape = tuple(pol.latent_shape())
    ro = ReferenceSamples(torch.arange(2), torch.arange(2), pol.encode_prompts(PROMPTS),
                          torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))
    alg = build_algorithm(algorithm, AlgorithmContext.for_policy(cfg, pol, latent_shape=shape))
    alg.setup()
    return alg, pol, ro


def _grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_beta_auto_keeps_the_on_policy_gradient_of_its_initial_beta():
    """keep_gradient_scale: at rho == 1 the gradient is that of beta = init whatever beta has become; without
    it the gradient grows with beta, as a fixed beta's does."""
    adv, idx = torch.tensor([1.0, -0.5]), torch.arange(2)
    grads = {}
    for keep in (True, False):
        alg, pol, ro = _outside_the_loop("fpo", **{"fpo.beta": "auto", "fpo.beta_auto.init": 5.0, "fpo.kl_beta": 0,
                                                   "fpo.beta_auto.keep_gradient_scale": keep})
        prep = alg.prepare(ro, 0)
        for beta in (5.0, 80.0):
            alg.beta_state = BetaState(beta)
            loss, stats = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
            assert float(stats["beta"]) == beta and float(stats["ratio_max"]) == 1.0
            grads[keep, beta] = _grad(loss, pol.trainable_parameters())
    torch.testing.assert_close(grads[True, 80.0], grads[True, 5.0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[False, 80.0], 16 * grads[False, 5.0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[False, 5.0], grads[True, 5.0])


def test_diffusion_nft_samples_and_anchors_with_the_old_policy():
    """Rollouts and v_old come from the lagged weights, not the trained ones; the times are distinct
    steps of the sampler's schedule."""
    alg, pol, ro = _outside_the_loop("diffusion_nft", **{"diffusion_nft.kl_beta": 0})
    for e in alg.lagged.shadow:  # an old policy that is the base model: zero LoRA B matrices
        e.zero_()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    with torch.no_grad():
        x_old, _ = alg.sample(ro.cond, gens(), None, 0)
        with pol.reference():
            x_base = alg.ctx.stock_sample(ro.cond, gens(), None)
        x_now = alg.ctx.stock_sample(ro.cond, gens(), None)
    torch.testing.assert_close(x_old, x_base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x_old, x_now, atol=1e-4)
    prep = alg.prepare(ro, 0)
    assert prep["t"].shape == (2, 3)  # int(4 * 0.99) = 3 of the 4 steps
    assert all(len(set(row.tolist())) == 3 and set(row.tolist()) <= set(alg.sigmas[:4].float().tolist())
               for row in prep["t"])
    with torch.no_grad(), pol.reference():
        _, v_base = pol.cfm_loss(ro.x0, ro.cond, prep["t"], prep["eps"], return_pred=True)
    torch.testing.assert_close(prep["v_old"], v_base, rtol=1e-5, atol=1e-6)


def test_awm_loss_in_the_algorithm_is_the_pure_function():
    """The algorithm's loss is awm_loss on its per-pair loss plus both anchors, by hand."""
    from fpo_diffusion.awm import awm_advantages, awm_loss, awm_pair_loss
    from fpo_diffusion.fpo import kl_penalty

    alg, pol, ro = _outside_the_loop("awm", **{"awm.kl_beta": 0.5, "awm.ema_kl_beta": 2.0, "sampling.steps": 10})
    for e in alg.lagged.shadow:
        e.mul_(0.5)  # a lagged copy that differs from the weights
    prep = alg.prepare(ro, 0)
    idx, adv = torch.arange(2), torch.tensor([3.0, -8.0])
    loss, stats = alg.loss(ro, prep, idx, adv, iteration=0, epoch=0, step=0)
    t = prep["t"]
    assert t.shape == (2, 6) and bool((t < alg.sigmas[1].float() + 1e-6).all())  # step 0 (t = 1) never drawn
    mse, v = pol.cfm_loss(ro.x0, ro.cond, t, prep["eps"], return_pred=True)
    with torch.no_grad(), pol.reference():
        _, v_ref = pol.cfm_loss(ro.x0, ro.cond, t, prep["eps"], return_pred=True)
    with torch.no_grad(), alg.lagged.swapped_in():
        _, v_ema = pol.cfm_loss(ro.x0, ro.cond, t, prep["eps"], return_pred=True)
    expected = awm_loss(awm_pair_loss(mse, t, "ghuber", 0.25), awm_advantages(adv))[0] \
        + 0.5 * kl_penalty(v, v_ref).mean() + 2.0 * kl_penalty(v, v_ema).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert float(stats["kl_ema"]) > 0 and float(stats["kl_ref"]) > 0
