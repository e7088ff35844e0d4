"""FLUX's distilled guidance is a config field (``sampling.distilled_guidance``, issue 16.5), distinct
from true CFG (``sampling.guidance_scale``)."""
import pytest
import torch

from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config


def test_distilled_guidance_field_default_and_range():
    assert load_config().sampling.distilled_guidance == 3.5  # FluxPipeline's own default
    with pytest.raises(ConfigError, match="sampling.distilled_guidance must be a finite number >= 0, got -1"):
        load_config(None, ["sampling.distilled_guidance=-1"])
    with pytest.raises(ConfigError, match="sampling.distilled_guidance"):
        load_config(None, ["sampling.distilled_guidance=.inf"])


def test_trainer_gives_flux_the_configured_distilled_guidance(tmp_path):
    from fpo_diffusion.trainer import Trainer

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.family=flux", "model.path=embedded:tiny-flux",
                             "prompts.source=embedded:tiny", "reward.weights={brightness: 1.0}",
                             "sampling.distilled_guidance=2.0", "sampling.guidance_scale=3.0", "sampling.height=16",
                             "sampling.width=16", "sampling.steps=2", "train.prompts_per_iteration=2",
                             "train.group_size=2", "log.tensorboard=false", "log.progress=false"])
    tr = Trainer(cfg)
    pol = tr.policy
    assert pol.guidance == 2.0
    cond = pol.encode_prompts(["a red circle"])
    kw = pol._pipe_kwargs(cond, pol.negative_cond(1), cfg.sampling.guidance_scale)
    assert kw["guidance_scale"] == 2.0 and kw["true_cfg_scale"] == 3.0  # two different knobs
    # the CFM loss sees the same guidance embedding as the rollout
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, *pol.latent_shape(16, 16), generator=g)
    t, eps = torch.tensor([[0.5]]), torch.randn(1, 1, *x0.shape[1:], generator=g)
    with torch.no_grad():
        at_2 = pol.cfm_loss(x0, cond, t, eps)
        pol.guidance = 3.5
        at_35 = pol.cfm_loss(x0, cond, t, eps)
    assert not torch.equal(at_2, at_35)
