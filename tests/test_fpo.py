"""The FPO objective as pure tensor functions: exact invariants."""
import math

import pytest
import torch

from fpo_diffusion.fpo import FPOObjective, fpo_log_ratio, fpo_loss, kl_penalty


def _toy(seed=0, B=6, N=4, D=5):
    """A tiny differentiable 'model': per-pair losses l[b, i] = mean_d (W x_bi - y_bi)^2."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)

    def losses(Wp):
        return ((x @ Wp.T - y) ** 2).mean(-1)

    return W, losses, adv


@pytest.mark.parametrize("mode", ["mean", "per_sample"])
def test_on_policy_ratio_is_exactly_one(mode):
    """Old losses recomputed at the same parameters (a new tensor with the same values, as after the
    rollout) give rho == 1 exactly for every term, even at a large beta; the surrogate is then -mean(A)."""
    W, losses, adv = _toy()
    l_old, l_new = losses(W).detach(), losses(W.clone())
    assert l_old.data_ptr() != l_new.data_ptr()
    beta = 1e4
    log_ratio = fpo_log_ratio(l_old, l_new, ratio_mode=mode, beta=beta)
    assert log_ratio.shape == ((6, 1) if mode == "mean" else (6, 4))
    assert torch.equal(log_ratio.exp(), torch.ones_like(log_ratio))
    loss, st = fpo_loss(l_old, l_new, adv, FPOObjective(ratio_mode=mode, beta=beta))
    assert st["ratio_mean"] == 1 and st["ratio_min"] == 1 and st["ratio_max"] == 1
    assert st["clip_frac"] == 0 and st["approx_kl"] == 0 and st["loss_diff_absmax"] == 0
    assert float(loss) == float(-adv.mean())
    # ... and the check is sensitive: one term off by 1e-9 moves that ratio off 1 at this beta.
    bumped = l_new.clone()
    bumped[2, 1] += 1e-9
    _, st = fpo_loss(l_old, bumped, adv, FPOObjective(ratio_mode=mode, beta=beta))
    assert st["ratio_min"] < 1


def test_approx_kl_is_the_k3_estimator_shared_by_every_algorithm():
    from fpo_diffusion.algorithms import stepwise
    from fpo_diffusion.fpo import approx_kl

    lr = torch.tensor([0.3, -0.2, 0.0, 1e-3], dtype=torch.float64)
    expected = ((lr.exp() - 1) - lr).mean()
    assert torch.allclose(approx_kl(lr), expected, rtol=1e-14) and float(approx_kl(lr)) > 0
    assert float(approx_kl(torch.zeros(5))) == 0
    # second order: ~ 0.5 mean(log r^2) for small log-ratios
    small = lr * 1e-3
    assert math.isclose(float(approx_kl(small)), 0.5 * float((small ** 2).mean()), rel_tol=1e-3)
    # FPO reports it from its log-ratio; the stepwise baselines use the same function
    W, losses, adv = _toy()
    l_old = losses(W).detach()
    l_new = losses(W + 0.01)
    obj = FPOObjective(ratio_mode="per_sample", beta=2.0)
    _, st = fpo_loss(l_old, l_new, adv, obj)
    ref = approx_kl(fpo_log_ratio(l_old, l_new, ratio_mode="per_sample", beta=2.0).detach().float())
    assert torch.allclose(st["approx_kl"], ref)
    assert stepwise.approx_kl is approx_kl


@pytest.mark.parametrize("mode", ["mean", "per_sample"])
def test_on_policy_gradient_is_advantage_weighted_cfm_gradient(mode):
    """At rho == 1: grad surrogate = mean_b,i A_b * beta * grad l_new[b, i] / N (both modes)."""
    W, losses, adv = _toy()
    beta = 3.0
    Wp = W.clone().requires_grad_(True)
    l = losses(Wp)
    loss, _ = fpo_loss(l.detach(), l, adv, FPOObjective(ratio_mode=mode, beta=beta))
    (g,) = torch.autograd.grad(loss, Wp)
    Wq = W.clone().requires_grad_(True)
    expected = (adv[:, None] * beta * losses(Wq)).mean()
    (g_ref,) = torch.autograd.grad(expected, Wq)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["mean", "per_sample"])
def test_gradient_matches_finite_differences_off_policy(mode):
    W, losses, adv = _toy(seed=1)
    l_old = losses(W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=W.dtype)).detach()
    obj = FPOObjective(ratio_mode=mode, beta=2.0, eps_clip=0.3)
    Wp = W.clone().requires_grad_(True)
    loss, _ = fpo_loss(l_old, losses(Wp), adv, obj)
    (g,) = torch.autograd.grad(loss, Wp)
    h = 1e-6
    fd = torch.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            E = torch.zeros_like(W)
            E[i, j] = h
            fd[i, j] = (fpo_loss(l_old, losses(W + E), adv, obj)[0] - fpo_loss(l_old, losses(W - E), adv, obj)[0]) / (2 * h)
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_mean_and_per_sample_agree_when_n_mc_is_one():
    W, losses, adv = _toy(N=1)
    l_old = (losses(W) * 1.05).detach()
    for beta, eps in [(1.0, 0.2), (10.0, 0.1)]:
        Wa = W.clone().requires_grad_(True)
        Wb = W.clone().requires_grad_(True)
        la, sa = fpo_loss(l_old, losses(Wa), adv, FPOObjective(ratio_mode="mean", beta=beta, eps_clip=eps))
        lb, sb = fpo_loss(l_old, losses(Wb), adv, FPOObjective(ratio_mode="per_sample", beta=beta, eps_clip=eps))
        assert torch.equal(la, lb)
        (ga,), (gb,) = torch.autograd.grad(la, Wa), torch.autograd.grad(lb, Wb)
        assert torch.equal(ga, gb)
        assert sa["clip_frac"] == sb["clip_frac"]


def test_clipping_removes_gradient_in_the_direction_of_the_advantage():
    eps = 0.2
    # log ratio = beta * (l_old - l_new); beta = 1. Four samples, N = 1:
    # 0: A>0, rho=1.5 (clipped, no grad)   1: A<0, rho=0.5 (clipped, no grad)
    # 2: A>0, rho=0.5 (not clipped: grad)   3: A<0, rho=1.5 (not clipped: grad)
    l_new = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    l_old = torch.tensor([[math.log(1.5)], [math.log(0.5)], [math.log(0.5)], [math.log(1.5)]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, st = fpo_loss(l_old, l_new, adv, FPOObjective(beta=1.0, eps_clip=eps))
    (g,) = torch.autograd.grad(loss, l_new)
    assert g[0].item() == 0 and g[1].item() == 0
    # d/dl_new of -(rho A)/4 with rho = exp(l_old - l_new): +rho A / 4
    assert g[2].item() == pytest.approx(0.5 * 1.0 / 4)
    assert g[3].item() == pytest.approx(1.5 * -1.0 / 4)
    assert st["clip_frac"].item() == 1.0  # every ratio is outside [0.8, 1.2]


def test_asymmetric_upper_clip_and_spo_for_negative_advantages():
    l_new = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    l_old = torch.tensor([[math.log(1.25)], [math.log(0.5)]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # eps_clip_high = 0.3: rho 1.25 is inside the upper range, so it keeps its gradient.
    _, st = fpo_loss(l_old, l_new, adv, FPOObjective(beta=1.0, eps_clip=0.2, eps_clip_high=0.3))
    loss, _ = fpo_loss(l_old, l_new, adv, FPOObjective(beta=1.0, eps_clip=0.2, eps_clip_high=0.3))
    (g,) = torch.autograd.grad(loss, l_new)
    assert g[0].item() == pytest.approx(1.25 / 2)  # d(-rho A / 2)/d l_new = rho A / 2
    assert g[1].item() == 0  # A<0 clipped at 0.8
    # SPO: A<0 sample beyond the clip still gets a gradient pulling rho back up to 1 - eps.
    loss, _ = fpo_loss(l_old, l_new, adv, FPOObjective(beta=1.0, eps_clip=0.2, negative_adv="spo"))
    (g,) = torch.autograd.grad(loss, l_new)
    rho, A, e = 0.5, -1.0, 0.2
    # objective = rho A - |A|/(2e) (rho-1)^2; d rho / d l_new = -rho; loss = -objective / 2
    d_obj = (A - abs(A) / e * (rho - 1)) * -rho
    assert g[1].item() == pytest.approx(-d_obj / 2)
    assert g[1].item() != 0
    # and the SPO optimum in rho is exactly the clip boundary 1 - eps for A < 0
    r = torch.linspace(0.5, 1.0, 50001, dtype=torch.float64)
    obj = r * A - abs(A) / (2 * e) * (r - 1) ** 2
    assert r[obj.argmax()].item() == pytest.approx(1 - e, abs=1e-4)


def test_delta_clamps_the_loss_difference():
    l_old = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    l_new = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    lr = fpo_log_ratio(l_old, l_new, ratio_mode="per_sample", beta=2.0, delta=0.1)
    assert torch.allclose(lr, torch.full((1, 2), 0.2, dtype=torch.float64))
    (g,) = torch.autograd.grad(lr.sum(), l_new)
    assert torch.all(g == 0)
    _, st = fpo_loss(l_old, l_new, torch.ones(1, dtype=torch.float64), FPOObjective(beta=2.0, delta=0.1))
    assert st["delta_clamp_frac"] == 1.0


def test_shapes_and_bad_input():
    with pytest.raises(ValueError, match="B, N"):
        fpo_log_ratio(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="ratio_mode"):
        FPOObjective(ratio_mode="geometric")
    with pytest.raises(ValueError, match="beta"):
        FPOObjective(beta=0)
    assert fpo_log_ratio(torch.zeros(3, 5), torch.zeros(3, 5), ratio_mode="mean").shape == (3, 1)
    assert fpo_log_ratio(torch.zeros(3, 5), torch.zeros(3, 5), ratio_mode="per_sample").shape == (3, 5)


def test_kl_penalty_is_mean_squared_prediction_gap():
    a = torch.arange(12.0).reshape(2, 2, 3)
    b = torch.zeros(2, 2, 3)
    assert torch.equal(kl_penalty(a, b), (a**2).flatten(1).mean(1))
    assert torch.equal(kl_penalty(a, a), torch.zeros(2))
