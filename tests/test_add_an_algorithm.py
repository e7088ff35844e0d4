"""docs/architecture.md's "Checklist: add an algorithm", followed from a test: a ten-line algorithm
registered here (not in the package) runs one iteration of the shared loop on a tiny model. Also: the
lists that the checklists say to keep in step do agree."""
import math

import torch

from fpo_diffusion import config
from fpo_diffusion.algorithms import ALGORITHMS, Algorithm
from fpo_diffusion.config_io import load_config
from fpo_diffusion.policies import POLICIES
from fpo_diffusion.policies.base import cond_index
from fpo_diffusion.tiny import TINY_BUILDERS


class Toy(Algorithm):
    """Advantage-weighted CFM loss at one ``(t, eps)`` pair per sample (step 1 of the checklist)."""

    name = "toy"

    def prepare(self, ro, iteration):
        ctx = self.ctx  # step 2: randomness only from the run's named seed streams
        t, eps = ctx.seeds.tau_eps("tau_eps", ctx.latent_shape, 1, ctx.cfm_time_sampling, iteration,
                                   ro.global_idx)
        return {"t": t.to(ctx.device), "eps": eps.to(ctx.device)}

    def loss(self, ro, prep, idx, adv, *, iteration, epoch, step):
        with self.ctx.autocast():
            l = self.policy.cfm_loss(ro.x0[idx], cond_index(ro.cond, idx), prep["t"][idx], prep["eps"][idx],
                                     model=self.ctx.model).float()
        loss = (adv.to(l.device)[:, None] * l).mean()
        return loss, {"weighted_cfm": loss.detach()}  # unprefixed: the loop logs ``toy/weighted_cfm``


def test_a_toy_algorithm_runs_one_iteration(tmp_path, monkeypatch):
    from fpo_diffusion.trainer import Trainer

    monkeypatch.setitem(ALGORITHMS, "toy", Toy)  # step 3: the registry
    monkeypatch.setattr(config, "ALGORITHMS", (*config.ALGORITHMS, "toy"))  # step 4: the config's names
    o = {"output_dir": str(tmp_path / "run"), "model.family": "sd3", "model.path": "embedded:tiny-sd3",
         "algorithm": "toy", "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}",
         "train.iterations": 1, "sampling.steps": 2, "train.prompts_per_iteration": 2, "train.group_size": 2,
         "train.minibatch_size": 4, "train.lr": 3e-3, "log.image_every": 0, "log.tensorboard": "false",
         "log.progress": "false", "checkpoint.every": 0}
    tr = Trainer(load_config(None, [f"{k}={v}" for k, v in o.items()]))
    assert isinstance(tr.algorithm, Toy)
    before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    m = tr.train()
    assert math.isfinite(m["toy/weighted_cfm"]) and m["toy/skipped_updates"] == 0
    assert math.isfinite(m["reward/mean"])
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(tr.policy.trainable_parameters(), before)) > 0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_lists_kept_in_step_agree():
    """The config sits below the registries (it cannot read them): its names must match them."""
    assert config.ALGORITHMS == tuple(ALGORITHMS)
    assert set(config.FAMILIES) - {"auto"} == set(POLICIES) == set(TINY_BUILDERS)
    assert all(cls.name == name for name, cls in ALGORITHMS.items())
    assert all(not cls.section or hasattr(config.Config(), cls.section) for cls in ALGORITHMS.values())
    assert all(set(cls.families) <= set(POLICIES) for cls in ALGORITHMS.values())
    assert all(cls.family == name for name, cls in POLICIES.items())
