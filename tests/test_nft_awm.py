"""The DiffusionNFT and AWM objectives as pure tensor functions: hand-computed values and their
relation to FPO's surrogate at rho == 1."""
import pytest
import torch

from fpo_diffusion.awm import awm_advantages, awm_loss, awm_pair_loss, stratified_step_indices
from fpo_diffusion.fpo import FPOObjective, fpo_loss
from fpo_diffusion.lagged import lag_decay
from fpo_diffusion.nft import adaptive_x0_loss, nft_loss, nft_optimality

F64 = torch.float64


def _nft_case():
    """Two samples, one pair each, two latent dims. Worked by hand below."""
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
    eps = torch.tensor([[[0.0, 2.0]], [[0.0, 2.0]]], dtype=F64)
    t = torch.tensor([[0.5], [0.5]], dtype=F64)
    v_old = torch.zeros(2, 1, 2, dtype=F64)
    v_theta = torch.ones(2, 1, 2, dtype=F64, requires_grad=True)
    adv = torch.tensor([2.5, -10.0], dtype=F64)  # r = 0.75, and r = 0 (A clipped to -5)
    return v_theta, v_old, x0, eps, t, adv


def test_nft_loss_equals_the_hand_computed_value_and_gradient():
    v_theta, v_old, x0, eps, t, adv = _nft_case()
    # x_t = [0.5, 1]; beta = 0.5: v+ = [0.5, 0.5], v- = [-0.5, -0.5]
    # x0_hat(v+) = [0.25, 0.75]: err+ = [-0.75, 0.75], mean err^2 = 0.5625, mean |err| = 0.75 -> L+ = 0.75
    # x0_hat(v-) = [0.75, 1.25]: err- = [-0.25, 1.25], mean err^2 = 0.8125, mean |err| = 0.75 -> L- = 13/12
    # sample 0: r = 0.75: 5 * (0.75 * 0.75 + 0.25 * 13/12) / 0.5 = 25/3
    # sample 1: r = 0:    5 * (13/12) / 0.5 = 65/6
    loss, st = nft_loss(v_theta, v_old, x0, eps, t, adv, beta=0.5, adv_clip_max=5.0)
    assert loss.item() == pytest.approx((25 / 3 + 65 / 6) / 2, rel=1e-12)
    assert st["positive_loss"].item() == pytest.approx(0.75, rel=1e-12)
    assert st["negative_loss"].item() == pytest.approx(13 / 12, rel=1e-12)
    assert st["optimality_mean"].item() == pytest.approx(0.375, rel=1e-12)
    assert st["old_deviate"].item() == pytest.approx(1.0, rel=1e-12)
    (g,) = torch.autograd.grad(loss, v_theta)
    # d err+/d v_theta = -t beta = -0.25, d err-/d v_theta = +0.25 (the weights are constants):
    # dL+/dv_j = 2 err+_j / 2 / 0.75 * -0.25 = [0.25, -0.25];  dL-/dv_j = err-_j / 3 = [-1/12, 5/12]
    # sample 0: (5 / 0.5) / 2 * (0.75 dL+ + 0.25 dL-) = [5/6, -5/12];  sample 1: 5 * dL- = [-5/12, 25/12]
    expected = torch.tensor([[[5 / 6, -5 / 12]], [[-5 / 12, 25 / 12]]], dtype=F64)
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)


def test_nft_pieces_by_hand():
    assert torch.allclose(nft_optimality(torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0, 9.0], dtype=F64)),
                          torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0], dtype=F64))
    # the weight's floor: an exact prediction has loss 0, not 0/0
    x0 = torch.zeros(1, 1, 3, dtype=F64)
    assert adaptive_x0_loss(x0.clone(), x0).item() == 0.0
    # the adaptive weight is a constant: the gradient is 2 err / (D w), not that of mean(err^2) / mean|err|
    x0_hat = torch.tensor([[[1.0, -3.0]]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(adaptive_x0_loss(x0_hat, torch.zeros(1, 1, 2, dtype=F64)).sum(), x0_hat)
    assert torch.allclose(g, torch.tensor([[[0.5, -1.5]]], dtype=F64))
    # DiffusionNFT's decay_type 1 (default) and 2, AWM's linear EMA decay
    assert lag_decay(0) == 0.0 and lag_decay(100) == pytest.approx(0.1) and lag_decay(10_000) == 0.5
    assert lag_decay(70, flat=75, rate=0.0075, maximum=0.999) == 0.0
    assert lag_decay(85, flat=75, rate=0.0075, maximum=0.999) == pytest.approx(0.075)
    assert lag_decay(1000, maximum=0.3) == 0.3


def _toy_velocity_model(seed=0, B=4, N=3, D=5):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    h = torch.randn(B, N, D, generator=g, dtype=F64)
    x0 = torch.randn(B, D, generator=g, dtype=F64)
    eps = torch.randn(B, N, D, generator=g, dtype=F64)
    t = torch.rand(B, N, generator=g, dtype=F64) * 0.9 + 0.05
    adv = torch.tensor([1.3, -0.4, 4.0, -2.2], dtype=F64)[:B]
    return W, (lambda Wp: h @ Wp.T), x0, eps, t, adv


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_on_policy_gradient_is_the_advantage_weighted_matching_gradient(beta):
    """v_theta == v_old: grad = clamp(A, -m, m) * grad l_w, l_w the adaptive-weighted CFM loss; beta cancels."""
    W, vel, x0, eps, t, adv = _toy_velocity_model()
    Wa = W.clone().requires_grad_(True)
    v = vel(Wa)
    loss, _ = nft_loss(v, v.detach(), x0, eps, t, adv, beta=beta, adv_clip_max=5.0)
    (g,) = torch.autograd.grad(loss, Wa)
    Wb = W.clone().requires_grad_(True)
    tt = t[..., None]
    x_t = (1 - tt) * x0[:, None] + tt * eps
    l_w = adaptive_x0_loss(x_t - tt * vel(Wb), x0[:, None])  # [B, N]
    (g_ref,) = torch.autograd.grad((adv.clamp(-5, 5)[:, None] * l_w).mean(), Wb)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_nft_shapes_and_bad_input():
    v_theta, v_old, x0, eps, t, adv = _nft_case()
    with pytest.raises(ValueError, match="shape mismatch"):
        nft_loss(v_theta, v_old, x0, eps, t, adv[:1])
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_theta, v_old, x0, eps, t, adv, beta=0.0)


def test_awm_pair_loss_weightings_by_hand():
    mse = torch.tensor([16.0, 0.0625], dtype=F64)
    t = torch.tensor([0.5, 0.8], dtype=F64)
    assert torch.equal(awm_pair_loss(mse, t, "uniform"), mse)
    assert torch.allclose(awm_pair_loss(mse, t, "t"), torch.tensor([8.0, 0.05], dtype=F64))
    assert torch.allclose(awm_pair_loss(mse, t, "t2"), torch.tensor([4.0, 0.04], dtype=F64))
    # huber: t (sqrt(mse + 1e-10) - 1e-5)
    assert torch.allclose(awm_pair_loss(mse, t, "huber"), torch.tensor([0.5 * (4 - 1e-5), 0.8 * (0.25 - 1e-5)], dtype=F64))
    # ghuber, p = 1/4: t ((mse + 1e-10)^p - 10^-2.5) / p; 16^(1/4) = 2, 0.0625^(1/4) = 0.5
    exp = torch.tensor([0.5 * (2 - 10 ** -2.5) * 4, 0.8 * (0.5 - 10 ** -2.5) * 4], dtype=F64)
    assert torch.allclose(awm_pair_loss(mse, t, "ghuber", 0.25), exp, rtol=1e-9)
    with pytest.raises(ValueError, match="weighting"):
        awm_pair_loss(mse, t, "t**2")


def test_awm_loss_and_advantages_by_hand():
    l_new = torch.tensor([[0.5, 1.0], [2.0, 4.0]], dtype=F64, requires_grad=True)
    adv = awm_advantages(torch.tensor([5.0, -20.0], dtype=F64), adv_clip_max=5.0, advantage_max=1.0)
    assert torch.equal(adv, torch.tensor([1.0, -1.0], dtype=F64))
    loss, st = awm_loss(l_new, adv)
    assert loss.item() == pytest.approx((0.5 + 1.0 - 2.0 - 4.0) / 4)
    (g,) = torch.autograd.grad(loss, l_new)
    assert torch.equal(g, torch.tensor([[0.25, 0.25], [-0.25, -0.25]], dtype=F64))
    assert st["matching_loss"].item() == pytest.approx(1.875) and st["positive_share"].item() == 0.5
    with pytest.raises(ValueError, match="B, N"):
        awm_loss(l_new[0], adv)


def test_awm_gradient_is_fpo_surrogate_gradient_at_rho_one():
    """AWM is FPO with the ratio fixed at 1: same gradient as FPO's per-pair surrogate (beta = 1) on-policy."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 5, generator=g, dtype=F64)
    x = torch.randn(6, 4, 5, generator=g, dtype=F64)
    y = torch.randn(6, 4, 5, generator=g, dtype=F64)
    t = torch.rand(6, 4, generator=g, dtype=F64)
    adv = torch.randn(6, generator=g, dtype=F64)

    def pair_losses(Wp):
        return awm_pair_loss(((x @ Wp.T - y) ** 2).mean(-1), t, "ghuber", 0.25)

    Wa, Wb = W.clone().requires_grad_(True), W.clone().requires_grad_(True)
    la, lb = pair_losses(Wa), pair_losses(Wb)
    (ga,) = torch.autograd.grad(awm_loss(la, adv)[0], Wa)
    fpo, st = fpo_loss(lb.detach(), lb, adv, FPOObjective(ratio_mode="per_sample", beta=1.0))
    (gb,) = torch.autograd.grad(fpo, Wb)
    assert st["ratio_min"] == 1 and st["ratio_max"] == 1
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)
    # off-policy they part: FPO's ratio and clip act, AWM's weights do not change
    Wc = W.clone().requires_grad_(True)
    fpo_off, _ = fpo_loss((pair_losses(W) * 1.5).detach(), pair_losses(Wc), adv,
                          FPOObjective(ratio_mode="per_sample", beta=1.0))
    (gc,) = torch.autograd.grad(fpo_off, Wc)
    assert not torch.allclose(ga, gc, rtol=1e-3)


def test_awm_stratified_step_indices_by_hand():
    # steps 14, fraction 0.9: K = 12, boundaries linspace(1, 12, 7) -> [1, 2, 4, 6, 8, 10, 12]
    assert stratified_step_indices(14, 6, 0.9, torch.zeros(6)).tolist() == [1, 2, 4, 6, 8, 10]
    assert stratified_step_indices(14, 6, 0.9, torch.full((6,), 0.999)).tolist() == [1, 3, 5, 7, 9, 11]
    # batched uniforms, and more strata than steps: width-0 strata give their lower bound
    idx = stratified_step_indices(4, 3, 1.0, torch.full((2, 3), 0.5))
    assert idx.shape == (2, 3) and idx.tolist() == [[1, 2, 3], [1, 2, 3]]
    assert stratified_step_indices(4, 5, 1.0, torch.full((5,), 0.9)).min() >= 1
    with pytest.raises(ValueError, match="two sampler steps"):
        stratified_step_indices(1, 2, 1.0, torch.zeros(2))
