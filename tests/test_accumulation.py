"""The update (update.py): gradient accumulation over k minibatches is one step on their union.

With ``adam_eps`` far above every gradient, AdamW's first step is ``-lr * g / adam_eps``: linear in
the gradient ``g``, so the LoRA weights after one step show the gradient itself. The LoRA ``B``
matrices start at zero, so their values after the step are that update, exactly representable.
"""
from __future__ import annotations

import pytest
import torch

from fpo_diffusion.config_io import load_config


def _trainer(out, **extra):
    """A tiny SD run of 4 samples (2 prompts x 2), one epoch, AdamW linear in the gradient (lr / adam_eps = 1e-6)."""
    from fpo_diffusion.trainer import Trainer

    o = {"output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd",
         "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}", "train.iterations": 1,
         "sampling.steps": 2, "train.prompts_per_iteration": 2, "train.group_size": 2, "fpo.n_mc": 2,
         "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false", "train.lr": 1.0,
         "train.adam_eps": 1e6, "train.weight_decay": 0.0, "train.max_grad_norm": 1e9, "train.epochs": 1}
    o.update(extra)
    return Trainer(load_config(None, [f"{k}={v}" for k, v in o.items()]))


def _one_step(tmp_path, name: str, **extra):
    tr = _trainer(tmp_path / name, **extra)
    m = tr.train_iteration(0)
    tr.reward.close()
    tr.logger.close()
    b = {n: p.detach().clone() for n, p in tr.policy.denoiser.named_parameters() if "lora_B" in n}
    return b, m


def test_accumulating_two_minibatches_is_one_step_on_both(tmp_path):
    one, m1 = _one_step(tmp_path, "one", **{"train.minibatch_size": 4, "train.grad_accum_steps": 1})
    acc, m2 = _one_step(tmp_path, "acc", **{"train.minibatch_size": 2, "train.grad_accum_steps": 2})
    two, m3 = _one_step(tmp_path, "two", **{"train.minibatch_size": 2, "train.grad_accum_steps": 1})
    assert m1["reward/mean"] == m2["reward/mean"] == m3["reward/mean"]  # the same rollout
    assert m1["fpo/skipped_updates"] == m2["fpo/skipped_updates"] == 0
    size = max(float(v.abs().max()) for v in one.values())
    assert size > 0  # the step moved the weights
    for n in one:
        torch.testing.assert_close(acc[n], one[n], rtol=1e-3, atol=1e-4 * size, msg=n)
    # two separate steps are not one: the comparison can tell them apart
    assert max(float((two[n] - one[n]).abs().max()) for n in one) > 0.05 * size


@pytest.mark.parametrize("minibatch", [4, 2])
def test_the_step_is_the_loss_gradient(tmp_path, minibatch):
    """The weights move by ``-lr / adam_eps`` times the gradient of the mean loss over the samples."""
    from fpo_diffusion.advantages import group_advantages

    tr = _trainer(tmp_path / "g", **{"train.minibatch_size": minibatch, "train.grad_accum_steps": 4 // minibatch})
    ro = tr.rollout(0)

    adv = group_advantages(ro.rewards, ro.prompt_idx)
    prep = tr.algorithm.prepare(ro, 0)
    params = {n: p for n, p in tr.policy.denoiser.named_parameters() if "lora_B" in n}
    loss, _ = tr.algorithm.loss(ro, prep, torch.arange(4), adv, iteration=0, epoch=0, step=0)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    before = {n: p.detach().clone() for n, p in params.items()}
    tr.updater.update(tr.algorithm, ro, adv, prep, 0)
    tr.reward.close()
    tr.logger.close()
    size = max(float(g.abs().max()) for g in grads.values()) * 1e-6
    assert size > 0
    for n, p in params.items():
        torch.testing.assert_close(p.detach() - before[n], -grads[n] * 1e-6, rtol=1e-3, atol=1e-3 * size, msg=n)
