"""Policies: on-policy ratio, analytic targets, FD gradients, loading round trips, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

from fpo_diffusion.fpo import FPOObjective, fpo_loss
from fpo_diffusion.noise import TimeSampling, draw_tau_eps
from fpo_diffusion.policies import load_policy
from fpo_diffusion.policies.flux import pack_latents

from helpers_policies import CASE_IDS, CASES, PROMPTS, make_policy, policy_kwargs, rollout, fresh_pipeline


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_on_policy_ratio_is_one(case):
    _, family, pred = case
    pol = make_policy(family, pred, init=False)
    cond, x0 = rollout(pol)
    assert x0.shape == (2, *pol.latent_shape())
    t, eps = draw_tau_eps(tuple(x0.shape[1:]), 3, TimeSampling(), seed=0, iteration=0, sample_indices=[0, 1])
    with torch.no_grad():
        l_old = pol.cfm_loss(x0, cond, t, eps)
    l_new = pol.cfm_loss(x0, cond, t, eps)
    assert l_new.shape == (2, 3) and l_new.requires_grad
    torch.testing.assert_close(l_new.detach(), l_old, rtol=0, atol=1e-6)
    for mode in ("mean", "per_sample"):
        loss, stats = fpo_loss(l_old, l_new, torch.tensor([1.0, -1.0]), FPOObjective(ratio_mode=mode, beta=5.0))
        assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0
    loss.backward()
    grads = [n for n, p in pol.denoiser.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def _oracle(pol, x0: torch.Tensor, n: int, target: str):
    """A denoiser forward that returns ``target`` exactly, knowing only x0 and the model inputs (the
    scheduler's own ``alphas_cumprod`` for VP, the flow time for SD3/FLUX): ``"epsilon"`` (the noise),
    ``"v_prediction"`` (``sqrt(a) eps - sqrt(1 - a) x0``) or ``"flow"`` (the velocity ``eps - x0``)."""
    x0r = x0.repeat_interleave(n, dim=0).to(pol.dtype)
    family = pol.family

    def forward(*args, **kw):
        if family in ("sd", "sdxl"):
            x_t, k = args[0], args[1]
            acp = pol.pipeline.scheduler.alphas_cumprod.to(x_t.dtype)[k].view(-1, 1, 1, 1)
            eps_hat = (x_t - acp.sqrt() * x0r) / (1 - acp).sqrt()
            v_hat = acp.sqrt() * eps_hat - (1 - acp).sqrt() * x0r
            out = {"epsilon": eps_hat, "v_prediction": v_hat}[target]
        else:
            x_t = kw["hidden_states"]
            x0f = x0r if family == "sd3" else pack_latents(x0r)
            tt = (kw["timestep"] / 1000 if family == "sd3" else kw["timestep"]).view(-1, *(1,) * (x_t.dim() - 1))
            eps_hat = (x_t - (1 - tt) * x0f) / tt
            out = {"flow": eps_hat - x0f, "epsilon": eps_hat}[target]
        return (out,)

    return forward


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_exact_target_gives_zero_loss(case):
    _, family, pred = case
    pol = make_policy(family, pred, lora=False, dtype=torch.float64)
    assert pol.prediction_type == ("flow" if family in ("sd3", "flux") else pred)
    cond = pol.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *pol.latent_shape(), generator=g, dtype=torch.float64)
    t = torch.tensor([[0.02, 0.5, 0.98], [0.3, 0.71, 0.9]], dtype=torch.float64)
    eps = torch.randn(2, 3, *x0.shape[1:], generator=g, dtype=torch.float64)
    right = pol.prediction_type
    pol.denoiser.forward = _oracle(pol, x0, 3, right)
    assert pol.cfm_loss(x0, cond, t, eps).abs().max() < 1e-20
    # The other parameterisation's exact target (eps where v or the velocity is expected, v where eps
    # is) gives a clearly non-zero loss at every pair: the loss tells the parameterisations apart.
    wrong = {"epsilon": "v_prediction", "v_prediction": "epsilon", "flow": "epsilon"}[right]
    pol.denoiser.forward = _oracle(pol, x0, 3, wrong)
    assert pol.cfm_loss(x0, cond, t, eps).min() > 1e-6


def test_vp_timestep_mapping():
    pol = make_policy("sd", lora=False)
    t = torch.tensor([0.0, 0.02, 0.5, 1.0])
    assert pol.timestep_index(t).tolist() == [0, 20, 500, 999]
    torch.testing.assert_close(pol.alphas_cumprod.float(), pol.pipeline.scheduler.alphas_cumprod.float())


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_fpo_gradient_matches_finite_differences(family):
    pol = make_policy(family, dtype=torch.float64, init=False)
    cond = pol.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *pol.latent_shape(), generator=g, dtype=torch.float64)
    t = torch.tensor([[0.3, 0.6], [0.45, 0.8]], dtype=torch.float64)
    eps = torch.randn(2, 2, *x0.shape[1:], generator=g, dtype=torch.float64)
    with torch.no_grad():
        l_old = pol.cfm_loss(x0, cond, t, eps)
        params = pol.trainable_parameters()[:2]
        for p in params:  # move off-policy so the ratio is not exactly 1
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    adv = torch.tensor([1.3, -0.7], dtype=torch.float64)
    obj = FPOObjective(ratio_mode="per_sample", beta=50.0, eps_clip=0.9)

    def f():
        return fpo_loss(l_old, pol.cfm_loss(x0, cond, t, eps), adv, obj)[0]

    loss = f()
    grads = torch.autograd.grad(loss, params)
    h = 1e-6
    with torch.no_grad():
        for p, gr in zip(params, grads):
            for idx in [(0, 0), tuple(s - 1 for s in p.shape)]:
                old = p[idx].item()
                p[idx] = old + h
                up = f().item()
                p[idx] = old - h
                down = f().item()
                p[idx] = old
                fd = (up - down) / (2 * h)
                assert abs(fd - gr[idx].item()) <= 1e-6 + 1e-5 * abs(fd), (fd, gr[idx].item())


def test_mean_and_per_sample_agree_with_one_pair():
    pol = make_policy("sd3", init=False)
    cond, x0 = rollout(pol)
    t, eps = draw_tau_eps(tuple(x0.shape[1:]), 1, TimeSampling(), seed=1, iteration=0, sample_indices=[0, 1])
    with torch.no_grad():
        l_old = pol.cfm_loss(x0, cond, t, eps)
        for p in pol.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    adv = torch.tensor([0.5, -1.5])
    out = []
    for mode in ("mean", "per_sample"):
        pol.denoiser.zero_grad()
        loss, _ = fpo_loss(l_old, pol.cfm_loss(x0, cond, t, eps), adv, FPOObjective(ratio_mode=mode, beta=20.0))
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in pol.trainable_parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_save_pretrained_round_trip(family, tmp_path):
    pipe = fresh_pipeline(family)
    pipe.save_pretrained(tmp_path / "model")
    from fpo_diffusion.policies import POLICIES

    ref = POLICIES[family](pipe, **policy_kwargs(family))
    for fam in (family, "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pol = load_policy(fam, str(tmp_path / "model"), **policy_kwargs(family))
        deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        assert not [m for m in deprecated if "torch_dtype" in m], deprecated  # loads with the current API
        assert type(pol) is type(ref)
        cond = pol.encode_prompts(PROMPTS)
        torch.testing.assert_close(cond, ref.encode_prompts(PROMPTS))
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(2, *pol.latent_shape(), generator=g)
        t = torch.full((2, 1), 0.5)
        eps = torch.randn(2, 1, *x0.shape[1:], generator=g)
        with torch.no_grad():
            torch.testing.assert_close(pol.cfm_loss(x0, cond, t, eps), ref.cfm_loss(x0, cond, t, eps))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model family 'x'; available: sd, sdxl, sd3, flux, auto"):
        load_policy("x", str(tmp_path))
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_policy("sd", missing)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_policy("auto", str(tmp_path))
    pol = make_policy("sd", lora=False)
    with pytest.raises(ValueError, match="prompt list is empty"):
        pol.encode_prompts([])
