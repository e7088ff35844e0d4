"""``fpo.beta: auto``'s controller (a pure state -> state rule) and ``fpo.ratio_reduction``."""
import math

import pytest
import torch

from fpo_diffusion.beta_control import BetaController, BetaState, update_beta
from fpo_diffusion.fpo import FPOObjective, fpo_log_ratio, fpo_loss

from test_fpo import _toy


def test_update_rule_band_rate_and_clamps():
    ctl = BetaController(statistic="clip_frac", target=0.1, rate=2.0, tolerance=1.5, beta_min=0.5, beta_max=40.0)
    s = BetaState(beta=5.0)
    assert update_beta(s, 0.0, ctl) == BetaState(10.0, 1)  # below target / 1.5: up by the rate
    assert update_beta(s, 0.06, ctl).beta == 10.0  # 0.06 < 0.0667
    assert update_beta(s, 0.07, ctl).beta == 5.0  # inside the band: unchanged
    assert update_beta(s, 0.15, ctl).beta == 5.0  # the band's upper edge is inclusive
    assert update_beta(s, 0.16, ctl).beta == 2.5  # above target * 1.5: down by the rate
    assert update_beta(BetaState(30.0), 0.0, ctl).beta == 40.0  # clamped at beta_max
    assert update_beta(BetaState(0.6), 1.0, ctl).beta == 0.5  # clamped at beta_min
    nan = update_beta(BetaState(5.0, 7), math.nan, ctl)  # a skipped update measures nothing
    assert nan == BetaState(5.0, 8)


def test_settles_inside_the_band_for_a_statistic_proportional_to_beta():
    ctl = BetaController(statistic="log_ratio_std", target=0.05, rate=2.0, tolerance=1.5)
    for slope in (1e-5, 3e-3, 0.7):  # measured = slope * beta, from far below and far above the target
        s = BetaState(5.0)
        betas = []
        for _ in range(40):
            s = update_beta(s, slope * s.beta, ctl)
            betas.append(s.beta)
        assert ctl.target / ctl.tolerance <= slope * betas[-1] <= ctl.target * ctl.tolerance
        assert betas[-1] == betas[-2] == betas[-10], "it settles, it does not cycle"


def test_settings_are_range_checked():
    for bad, match in [(dict(statistic="kl"), "statistic"), (dict(target=1.0), "target"),
                       (dict(statistic="log_ratio_std", target=0.0), "target"), (dict(tolerance=1.0), "tolerance"),
                       (dict(rate=1.0), "rate"), (dict(rate=3.0, tolerance=1.5), "rate"),
                       (dict(beta_min=0.0), "beta_min"), (dict(beta_min=2.0, beta_max=1.0), "beta_max"),
                       (dict(beta_max=math.inf), "beta_max"),
                       # issue 24: target=1e30 drove beta from 5 to 2.6e6 and the ratio to inf
                       (dict(statistic="log_ratio_std", target=1e30), r"target must be in \(0, 1\]"),
                       (dict(statistic="log_ratio_std", target=1.5), "target")]:
        with pytest.raises(ValueError, match=match):
            BetaController(**bad)


@pytest.mark.parametrize("mode", ["mean", "per_sample"])
def test_sum_reduction_is_the_mean_times_the_latent_dims(mode):
    W, losses, adv = _toy()
    l_old = (losses(W) * 1.001).detach()
    D = 64
    s_loss, s_st = fpo_loss(l_old, losses(W), adv, FPOObjective(ratio_mode=mode, beta=0.5, ratio_reduction="sum",
                                                                 latent_dims=D))
    m_loss, m_st = fpo_loss(l_old, losses(W), adv, FPOObjective(ratio_mode=mode, beta=0.5 * D))
    assert torch.allclose(s_loss, m_loss, rtol=1e-12) and s_st["clip_frac"] == m_st["clip_frac"]
    assert s_st["clip_frac"] > 0, "a sum over 64 dims makes a 0.1% loss change bind the clip"
    assert s_st["log_ratio_std"] == pytest.approx(float(m_st["log_ratio_std"]), rel=1e-9)
    # the clamp delta applies to the summed difference
    lr = fpo_log_ratio(torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                       ratio_mode="per_sample", beta=1.0, delta=3.0, scale=D)
    assert torch.equal(lr, torch.full((1, 2), 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="ratio_reduction"):
        FPOObjective(ratio_reduction="max")
    with pytest.raises(ValueError, match="latent_dims"):
        FPOObjective(ratio_reduction="sum", latent_dims=0)


def test_log_ratio_std_is_the_spread_of_log_rho():
    l_old = torch.tensor([[0.0], [0.2], [0.4]], dtype=torch.float64)
    _, st = fpo_loss(l_old, torch.zeros(3, 1, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                     FPOObjective(beta=2.0))
    assert st["log_ratio_std"].item() == pytest.approx(torch.tensor([0.0, 0.4, 0.8]).std(unbiased=False).item())


def test_an_unreachable_log_ratio_std_target_is_one_config_line():
    from fpo_diffusion.config import ConfigError
    from fpo_diffusion.config_io import load_config

    with pytest.raises(ConfigError, match=r"^fpo.beta_auto.target must be in \(0, 1\] for log_ratio_std, got 1e\+30"):
        load_config(None, ["fpo.beta=auto", "fpo.beta_auto.statistic=log_ratio_std", "fpo.beta_auto.target=1e30"])
    assert load_config(None, ["fpo.beta=auto", "fpo.beta_auto.statistic=log_ratio_std",
                              "fpo.beta_auto.target=1"]).fpo.beta_auto.target == 1.0
