"""Typed configuration: the dataclasses of every setting, each field documented and range-checked where it is
defined (:class:`Config` is the whole run). Reading YAML files and dotted CLI overrides into a ``Config``, and
writing one back, is ``fpo_diffusion/config_io.py`` (:func:`~fpo_diffusion.config_io.load_config`).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .beta_control import BetaController
from .errors import UserError
from .fpo import RATIO_REDUCTIONS, FPOObjective, FPOSurrogate
from .noise import TimeSampling


class ConfigError(UserError, ValueError):
    """Bad configuration (file, field or value)."""


def _require(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False, why: str = "") -> None:
    """ConfigError naming ``name`` unless ``lo <= value <= hi`` (``lo_open``/``hi_open``: strict); NaN never passes.

    The fields' own range checks (``__post_init__`` of each section) are built from this, so every
    message reads ``<section.field> must be <range>, got <value>``.
    """
    ok = value == value  # NaN
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if ok:
        return
    if lo is not None and hi == math.inf and hi_open:
        rng = f"a finite number {'>' if lo_open else '>='} {lo}"
    elif lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo}"
    else:
        rng = f"{'<' if hi_open else '<='} {hi}"
    raise ConfigError(f"{name} must be {rng}, got {value}{f' ({why})' if why else ''}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """ConfigError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _nonempty(name: str, value: str, why: str = "") -> None:
    if not value.strip():
        raise ConfigError(f"{name} must not be empty{f' ({why})' if why else ''}")


FAMILIES = ("sd", "sdxl", "sd3", "flux", "auto")
"""``model.family`` values: the keys of ``fpo_diffusion.policies.POLICIES`` plus ``auto`` (the config sits below that
registry and cannot read it; the registry checks this list when it is imported)."""
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
"""``train.lr_schedule`` values: the ``diffusers.optimization.get_scheduler`` names that need nothing but
the warm-up and the number of steps."""


@dataclass
class ModelConfig:
    """Which model is the policy."""

    family: str = "sd3"
    """``sd`` (SD1.x/2.x), ``sdxl``, ``sd3`` (SD3/3.5), ``flux`` or ``auto`` (read ``model_index.json``)."""
    path: str = "embedded:shapes"
    """A diffusers pipeline folder or hub id; ``embedded:shapes`` is the shipped shapes model,
    ``embedded:tiny-<family>`` a tiny random model built in-process (for smoke tests)."""
    dtype: str = "float32"
    """Dtype of the frozen weights: ``float32``, ``bfloat16`` or ``float16``. LoRA weights stay float32."""

    def __post_init__(self):
        _choice("model.family", self.family, FAMILIES)
        _nonempty("model.path", self.path)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class LoRAConfig:
    """The LoRA adapter on the denoiser (UNet or transformer)."""

    rank: int = 8
    """LoRA rank (>= 1)."""
    alpha: float | None = None
    """LoRA alpha (> 0; scale = alpha / rank); ``None`` means ``alpha = rank``."""
    dropout: float = 0.0
    """LoRA dropout in ``[0, 1)``; keep 0 so the on-policy ratio is exactly 1."""
    target_modules: list[str] | None = None
    """Module-name suffixes to adapt (a non-empty list); ``None``: the family's attention projections."""

    def __post_init__(self):
        _require("lora.rank", self.rank, 1)
        if self.alpha is not None:
            _require("lora.alpha", self.alpha, 0, math.inf, lo_open=True, hi_open=True,
                     why="the LoRA's scale is alpha / rank: 0 trains nothing; null means alpha = rank")
        _require("lora.dropout", self.dropout, 0, 1, hi_open=True)
        if self.target_modules is not None and (not self.target_modules or not all(m.strip() for m in self.target_modules)):
            raise ConfigError(f"lora.target_modules must be non-empty module-name suffixes, got {self.target_modules!r} "
                             f"(null: the family's attention projections)")


@dataclass
class SamplingConfig:
    """Rollouts through the stock diffusers pipeline."""

    scheduler: str | None = None
    """Sampler name (``euler``, ``dpmsolver++``, ``unipc``, ``ddim``, ``flow_euler``...); ``None``: the pipeline's own."""
    steps: int = 10
    """Denoising steps per rollout (>= 1). FPO needs only the final latent, so any step count works;
    10 keeps the default job within 10 minutes (evaluation samples with its own steps, ShapesEval 20)."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale (finite, >= 0; ``<= 1`` turns CFG off)."""
    negative_prompt: str = ""
    """Negative prompt used with CFG."""
    height: int | None = None
    """Image height in pixels (>= 1, a multiple of the model's latent cell; ``None``: the model's default)."""
    width: int | None = None
    """Image width in pixels (>= 1, a multiple of the model's latent cell; ``None``: the model's default)."""
    batch_size: int = 64
    """Samples per pipeline call on each rank (>= 1; the default fits the shapes model: one call per
    iteration; set it to what fits in memory for a real model, e.g. 4-16)."""
    distilled_guidance: float = 3.5
    """FLUX only: the *embedded* (distilled) guidance of FLUX.1-dev-style transformers, what
    ``FluxPipeline(guidance_scale=...)`` calls guidance (stock default 3.5; finite, >= 0). It goes into the
    transformer's guidance embedding, in rollouts and in the CFM loss alike. Distinct from
    ``guidance_scale`` above, which for FLUX is true CFG (the pipeline's ``true_cfg_scale``, a second
    forward pass with the negative prompt). Ignored by models without a guidance embedding (FLUX.1-schnell)
    and by the other families."""

    def __post_init__(self):
        _require("sampling.distilled_guidance", self.distilled_guidance, 0, math.inf, hi_open=True,
                 why="FLUX.1-dev's stock value is 3.5")
        if self.scheduler is not None:
            _nonempty("sampling.scheduler", self.scheduler, "null: the pipeline's own")
        _require("sampling.steps", self.steps, 1)
        _require("sampling.guidance_scale", self.guidance_scale, 0, math.inf, hi_open=True,
                 why="values <= 1 turn CFG off")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _require(f"sampling.{name}", getattr(self, name), 1, why="null: the model's default")
        _require("sampling.batch_size", self.batch_size, 1)


@dataclass
class BetaAutoConfig(BetaController):
    """``fpo.beta: auto``: the ratio's temperature adapted once per iteration (``fpo_diffusion/beta_control.py``).

    After each iteration's update the measured ``statistic`` (mean over the update's minibatches and
    the ranks) moves ``beta``: below ``target / tolerance`` it is multiplied by ``rate``, above
    ``target * tolerance`` divided by it, then clamped to ``[beta_min, beta_max]`` (PPO's adaptive-KL
    rule, with ``beta`` as a temperature). The current value is logged as ``fpo/beta`` and checkpointed.
    The controller's settings (``statistic``, ``target``, ``rate``, ``tolerance``, ``beta_min``, ``beta_max``)
    are the fields of ``beta_control.BetaController``, inherited with their defaults.
    """

    init: float = 5.0
    """``beta`` of the first iteration (in ``[beta_min, beta_max]``)."""
    keep_gradient_scale: bool = True
    """Divide the surrogate by ``beta / init``, so that its gradient at ``rho == 1`` (and so its balance with
    ``kl_beta``, ``fm_anchor_beta`` and ``train.max_grad_norm``) stays that of ``beta = init`` while ``beta``
    moves only where the clip binds; ``false``: the gradient grows with ``beta``, as a fixed ``beta`` does."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require("fpo.beta_auto.init", self.init, self.beta_min, self.beta_max, why="inside [beta_min, beta_max]")

    def controller(self) -> BetaController:
        """The pure controller's settings (these fields without ``init`` and ``keep_gradient_scale``)."""
        return BetaController(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BetaController)})


@dataclass
class FPOConfig(FPOSurrogate):
    """The FPO objective (``fpo_diffusion/fpo.py``). The surrogate's own settings (``ratio_mode``, ``beta``,
    ``ratio_reduction``, ``delta``, ``eps_clip``, ``eps_clip_high``, ``negative_adv``) are the fields of
    ``fpo.FPOSurrogate``, inherited with their defaults; :meth:`objective` builds the objective from them."""

    beta: float | str = FPOSurrogate.beta
    """Scale on the loss difference inside the exp (finite, > 0); sets how far the ratio moves per step.
    ``auto``: adapted during training toward a target clip fraction or log-ratio spread (``beta_auto``)."""
    n_mc: int = 8
    """Number of ``(t, eps)`` pairs per sample (N_mc, >= 1)."""
    beta_auto: BetaAutoConfig = field(default_factory=BetaAutoConfig)
    """The controller of ``beta: auto`` (ignored for a numeric ``beta``)."""
    time_sampling: TimeSampling = field(default_factory=TimeSampling)
    """How ``t`` is drawn for the CFM loss."""
    group_noise: bool = False
    """Give every sample of a group (same prompt) the same ``(t, eps)`` pairs: common random
    numbers. Each sample's estimate is unchanged in distribution; the part of the CFM-loss
    gradient that comes from the draw of ``(t, eps)`` (not from the sample) is shared and cancels
    in the advantage-weighted sum, since a group's advantages sum to zero. Off by default."""
    kl_beta: float = 0.05
    """Weight of the KL anchor ``mean (v_theta - v_ref)^2`` to the frozen base model (adapter off; finite, >= 0)."""
    guided_loss: bool = False
    """Compute the CFM losses of the ratio (and the KL anchor's predictions) on the CFG-combined prediction
    ``v_u + w (v_c - v_u)`` at ``sampling.guidance_scale`` ``w``, the velocity the rollouts follow, the
    unconditional branch without grad (Flow-GRPO's official training forward), instead of on the conditional
    prediction alone (the collapse monitor then reads the guided loss too). Costs one more forward (no grad) per
    loss; no effect when ``w <= 1``. Measured on the shapes world's default job it learns less than the
    conditional loss (BENCHMARKS.md, "Position: the LoRA learns it from right data")."""
    fm_anchor_beta: float = 0.0
    """Weight of a flow-matching loss on samples drawn from the base model at the start (finite, >= 0; 0: off)."""
    fm_anchor_samples: int = 16
    """Number of base-model samples (per rank) drawn for the flow-matching anchor (>= 1; past one iteration's
    share they come from the ``reference`` stream's next iterations' plans, so from more prompts)."""
    fm_anchor_min_reward: float | None = None
    """Keep for the anchor only the base-model samples whose reward (the run's ``reward``) is at least this
    (finite; ``null``: keep all). With the strict shapes or GenEval reward, ``1.0`` anchors the policy to what
    the base model already draws right (its colours, its correct counts) and not to its mistakes."""
    fm_anchor_tags: list[str] | None = None
    """Keep for the anchor only the base-model samples of prompts whose metadata ``tag`` is one of these (e.g.
    ``[colors, color_attr]``: an anchor on the colour tasks alone; ``null``: every prompt's)."""
    fm_anchor_guidance_scale: float | None = None
    """CFG scale the anchor's base samples are drawn with (finite, >= 0; ``null``: ``sampling.guidance_scale``).
    The anchor fits the conditional prediction to them, so samples drawn with guidance pull the conditional model
    toward the guided distribution, which guidance then amplifies again; ``1.0`` anchors it to its own
    unguided distribution."""

    def __post_init__(self):
        _require("fpo.n_mc", self.n_mc, 1)
        if self.eps_clip_high is not None:
            _require("fpo.eps_clip_high", self.eps_clip_high, 0, math.inf, lo_open=True, hi_open=True)
        for name in ("kl_beta", "fm_anchor_beta"):
            _require(f"fpo.{name}", getattr(self, name), 0, math.inf, hi_open=True,
                     why="a negative weight pushes the policy away from what it anchors to")
        _require("fpo.fm_anchor_samples", self.fm_anchor_samples, 1)
        _check_tags("fpo.fm_anchor_tags", self.fm_anchor_tags)
        if self.fm_anchor_guidance_scale is not None:
            _require("fpo.fm_anchor_guidance_scale", self.fm_anchor_guidance_scale, 0, math.inf, hi_open=True)
        if self.fm_anchor_min_reward is not None:
            _require("fpo.fm_anchor_min_reward", self.fm_anchor_min_reward, -math.inf, math.inf, lo_open=True,
                     hi_open=True)
        if isinstance(self.beta, str):
            if self.beta != "auto":
                raise ConfigError(f"fpo.beta must be a finite number > 0 or auto, got {self.beta!r}")
        else:
            _require("fpo.beta", self.beta, 0, math.inf, lo_open=True, hi_open=True)
        _choice("fpo.ratio_reduction", self.ratio_reduction, RATIO_REDUCTIONS)
        self.objective()  # ratio_mode, negative_adv, beta, delta, eps_clip (the objective checks its own)

    def objective(self, latent_dims: int = 1, beta: float | None = None) -> FPOObjective:
        """The objective of these settings (``beta``: the temperature in use, by default ``beta`` or, for
        ``auto``, ``beta_auto.init``)."""
        if beta is None:
            beta = self.beta_auto.init if self.beta == "auto" else self.beta
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(FPOSurrogate)}
        try:
            return FPOObjective(**{**settings, "beta": beta, "latent_dims": latent_dims})
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class StepwiseConfig:
    """What the per-step log-probability baselines share (``fpo_diffusion/algorithms/stepwise.py``): a clipped
    ratio per denoising step over a share of the steps, with an optional KL to the frozen base model. The
    ``flow_grpo`` and ``ddpo`` sections extend it; ``section`` names the one whose messages these are."""

    section: typing.ClassVar[str] = ""
    """The section's name in messages (not a setting)."""
    clip_range: float = 1e-4
    """Clip range of the per-step ratio (log-probs are means over latent dims, hence tiny; in (0, 1))."""
    timestep_fraction: float = 1.0
    """Share of the denoising steps trained per sample and epoch (in ``(0, 1]``; at least one step)."""
    kl_beta: float = 0.0
    """Weight of the KL to the frozen base model per step (finite, >= 0; 0: off)."""

    def __post_init__(self):
        _require(f"{self.section}.clip_range", self.clip_range, 0, 1, lo_open=True, hi_open=True)
        _require(f"{self.section}.timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        _require(f"{self.section}.kl_beta", self.kl_beta, 0, math.inf, hi_open=True,
                 why="a negative weight pushes the policy away from the base model")


@dataclass
class FlowGRPOConfig(StepwiseConfig):
    """The Flow-GRPO baseline (``algorithm: flow_grpo``; flow families ``sd3``/``flux``).

    As yifan123/flow_grpo's code is today (``fpo_diffusion/algorithms/flow_grpo.py``). Rollouts use its
    own SDE sampler (``sampling.steps``, ``sampling.guidance_scale``; ``sampling.scheduler`` is ignored);
    with CFG the training forward is guided too (official ``train.cfg = True``). Defaults are the official
    ones (``config/base.py``, ``config/grpo.py``); the GenEval recipe adds ``kl_beta: 0.04``
    (``launch/configs/shapes_flow_grpo_official.yaml``). ``clip_range`` (GRPO's, default 1e-4) and ``kl_beta``
    (``mean_d (mean - mean_ref)^2 / (2 std_dev_t^2)`` per step, with ``std_dev_t`` the SDE's noise scale, not the
    transition's std ``std_dev_t sqrt(-dt)``, as the official code; official GenEval 0.04) are ``StepwiseConfig``'s.
    """

    section: typing.ClassVar[str] = "flow_grpo"
    """The section's name in messages (not a setting)."""
    timestep_fraction: float = 0.99
    """Steps trained per sample and epoch: ``max(1, int(sampling.steps * timestep_fraction))`` (in ``(0, 1]``)."""
    noise_level: float = 0.7
    """``a`` in the SDE's ``std_dev_t = a * sqrt(t / (1 - t))`` (Flow-GRPO's ``noise_level``; finite, > 0)."""
    timestep_selection: str = "first"
    """Which steps: ``first`` (the first ones, every sample and epoch, as the official ``train_timesteps =
    range(num_train_timesteps)``) or ``random`` (a random subset per sample, iteration and epoch)."""
    detach_uncond: bool = True
    """With CFG, detach the unconditional branch of the training forward (official since 2025-07-15): the
    gradient flows through the conditional prediction only; ``false``: through both."""
    filter_zero_advantage: bool = True
    """Leave the samples whose advantage is exactly 0 out of the update (official): the rest (padded with
    random zero-advantage samples to a multiple of the number of minibatches) is split into as many
    minibatches as the whole rollout would be (``ceil(samples / train.minibatch_size)``), so the update takes
    the same optimizer steps on fewer, smaller minibatches; ``false``: train on every sample."""

    def __post_init__(self):
        _require("flow_grpo.noise_level", self.noise_level, 0, math.inf, lo_open=True, hi_open=True)
        super().__post_init__()
        _choice("flow_grpo.timestep_selection", self.timestep_selection, ("first", "random"))


@dataclass
class DDPOConfig(StepwiseConfig):
    """The DDPO baseline (``algorithm: ddpo``; VP families ``sd``/``sdxl``).

    Rollouts use DDIM with ``eta`` (``sampling.steps``, ``sampling.guidance_scale``;
    ``sampling.scheduler`` is ignored), see ``fpo_diffusion/algorithms/ddpo.py``. ``clip_range`` (PPO's, default
    1e-4), ``timestep_fraction`` (a random subset of the steps, default all) and ``kl_beta`` (``||mean -
    mean_ref||^2 / (2 std^2)`` per step) are ``StepwiseConfig``'s.
    """

    section: typing.ClassVar[str] = "ddpo"
    """The section's name in messages (not a setting)."""
    eta: float = 1.0
    """DDIM eta of the sampler (> 0; 1 is DDPO's default)."""

    def __post_init__(self):
        _require("ddpo.eta", self.eta, 0, math.inf, lo_open=True, hi_open=True)
        super().__post_init__()


@dataclass
class DiffusionNFTConfig:
    """The DiffusionNFT baseline (``algorithm: diffusion_nft``; flow families ``sd3``/``flux``).

    Zheng et al. 2025, official code NVlabs/DiffusionNFT: the forward-process loss with implicit positive
    and negative policies (``fpo_diffusion/nft.py``); rollouts from the stock pipeline with ``sampling`` (the
    official recipe is CFG-free: ``sampling.guidance_scale=1``) run by the old policy, a lagged copy of the
    trained one (``fpo_diffusion/algorithms/diffusion_nft.py``). Defaults are the official SD3.5 GenEval ones.
    """

    beta: float = 1.0
    """Step of the implicit policies ``v+- = v_old +- beta (v_theta - v_old)`` (finite, > 0; official 1.0,
    0.1 for OCR)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ``[-m, m]`` and mapped to ``r = A / (2 m) + 1/2``; also the loss scale (> 0)."""
    kl_beta: float = 1e-4
    """Weight of ``mean (v_theta - v_ref)^2`` to the frozen base model (finite, >= 0; official ``train.beta``)."""
    timestep_fraction: float = 0.99
    """Each sample trains on ``max(1, int(sampling.steps * timestep_fraction))`` distinct times of the
    sampler's flow schedule, a random subset (in ``(0, 1]``)."""
    old_decay_rate: float = 0.001
    """After iteration ``k`` the old policy becomes ``d * old + (1 - d) * theta`` with
    ``d = min(max(0, k + 1 - old_decay_flat) * old_decay_rate, old_decay_max)`` (``>= 0``; official ``decay_type``
    1: 0.001, 0, 0.5; 2: 0.0075, 75, 0.999; 0 everywhere: on-policy)."""
    old_decay_flat: int = 0
    """Iterations before the old policy starts to lag (>= 0)."""
    old_decay_max: float = 0.5
    """Largest decay of the old policy (in ``[0, 1)``)."""

    def __post_init__(self):
        _require("diffusion_nft.beta", self.beta, 0, math.inf, lo_open=True, hi_open=True)
        _require("diffusion_nft.adv_clip_max", self.adv_clip_max, 0, math.inf, lo_open=True, hi_open=True)
        _require("diffusion_nft.kl_beta", self.kl_beta, 0, math.inf, hi_open=True,
                 why="a negative weight pushes the policy away from the base model")
        _require("diffusion_nft.timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        _require("diffusion_nft.old_decay_rate", self.old_decay_rate, 0, math.inf, hi_open=True)
        _require("diffusion_nft.old_decay_flat", self.old_decay_flat, 0)
        _require("diffusion_nft.old_decay_max", self.old_decay_max, 0, 1, hi_open=True,
                 why="1 would freeze the old policy for good")


AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
"""``awm.weighting`` values (``fpo_diffusion.awm.WEIGHTINGS``)."""


@dataclass
class AWMConfig:
    """The AWM baseline (``algorithm: awm``; flow families ``sd3``/``flux``).

    Xue et al. 2025, official code scxue/advantage_weighted_matching: the flow-matching loss on the policy's
    own samples weighted by the advantage (``fpo_diffusion/awm.py``), i.e. FPO's surrogate gradient with the
    ratio fixed at 1; rollouts from the stock pipeline with ``sampling`` (official: CFG-free,
    ``sampling.guidance_scale=1``). Defaults are the official SD3.5 GenEval ones (``config/dgx_awm.py``).
    """

    weighting: str = "ghuber"
    """Time weighting of the per-pair loss: ``uniform``, ``t``, ``t2``, ``huber`` or ``ghuber`` (generalised Huber)."""
    ghuber_power: float = 0.25
    """Power ``p`` of ``ghuber``: ``t ((mse + 1e-10)^p - 1e-10^p) / p`` (in ``(0, 1]``)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ``[-adv_clip_max, adv_clip_max]`` (> 0) ..."""
    advantage_max: float = 1.0
    """... and rescaled to ``[-advantage_max, advantage_max]`` (finite, > 0)."""
    train_timesteps: int = 6
    """Times per sample, one per stratum of the sampler's steps ``[1, int(sampling.steps * timestep_fraction))``
    (>= 1)."""
    timestep_fraction: float = 0.9
    """Share of the sampler's steps the times are drawn from (in ``(0, 1]``; needs
    ``int(sampling.steps * timestep_fraction) >= 2``)."""
    kl_beta: float = 1e-3
    """Weight of ``mean (v_theta - v_ref)^2`` to the frozen base model (finite, >= 0; official ``train.beta``)."""
    ema_kl_beta: float = 1.0
    """Weight of ``mean (v_theta - v_ema)^2`` to a lagged copy of the policy (finite, >= 0; official ``ema_beta``)."""
    ema_decay_rate: float = 0.001
    """After iteration ``k`` the lagged copy becomes ``d * ema + (1 - d) * theta``, ``d = min((k + 1) *
    ema_decay_rate, ema_decay_max)`` (>= 0; official ``kl_ema_decay_type: linear``)."""
    ema_decay_max: float = 0.3
    """Largest decay of the lagged copy (in ``[0, 1)``; official ``kl_ema_decay``)."""
    clip_range: float = 1.0
    """Clip range ``c`` of the per-pair ratio ``exp(l_old - l)`` on the minibatches after an update's first
    optimizer step (official ``train.clip_range = 1``; finite, > 0; no effect with one step per iteration)."""

    def __post_init__(self):
        _choice("awm.weighting", self.weighting, AWM_WEIGHTINGS)
        _require("awm.ghuber_power", self.ghuber_power, 0, 1, lo_open=True)
        _require("awm.adv_clip_max", self.adv_clip_max, 0, math.inf, lo_open=True, hi_open=True)
        _require("awm.advantage_max", self.advantage_max, 0, math.inf, lo_open=True, hi_open=True)
        _require("awm.train_timesteps", self.train_timesteps, 1)
        _require("awm.timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        for name in ("kl_beta", "ema_kl_beta"):
            _require(f"awm.{name}", getattr(self, name), 0, math.inf, hi_open=True,
                     why="a negative weight pushes the policy away from what it anchors to")
        _require("awm.ema_decay_rate", self.ema_decay_rate, 0, math.inf, hi_open=True)
        _require("awm.ema_decay_max", self.ema_decay_max, 0, 1, hi_open=True)
        _require("awm.clip_range", self.clip_range, 0, math.inf, lo_open=True, hi_open=True)


@dataclass
class AdvantageConfig:
    """Per-prompt group advantages (``fpo_diffusion/advantages.py``)."""

    std: str = "group"
    """``group``: divide by each group's reward std; ``global``: by the std of the whole batch."""
    clip: float = 5.0
    """Advantages are clipped to ``[-clip, clip]`` (> 0; ``.inf``: no clip)."""
    eps: float = 1e-4
    """Added to the std (finite, > 0: a group whose rewards are all equal gets advantage 0, not 0/0)."""
    negative_scale: float = 1.0
    """Multiplies negative advantages after the clip, in ``[0, 1]``: 1 treats better- and worse-than-the-group
    samples alike (GRPO); smaller values push less away from the worse samples (0: reinforce only the
    better ones, as reward-weighted regression on the group's winners)."""

    def __post_init__(self):
        if self.std not in ("group", "global"):
            raise ConfigError(f"advantage.std must be group or global, got {self.std!r}")
        _require("advantage.clip", self.clip, 0, lo_open=True, why="clip <= 0 makes every advantage -clip or 0")
        _require("advantage.eps", self.eps, 0, math.inf, lo_open=True, hi_open=True)
        _require("advantage.negative_scale", self.negative_scale, 0, 1)


@dataclass
class RewardConfig:
    """The reward: a weighted sum of registered rewards (``rewards/``)."""

    weights: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    """``{reward name: weight}``; every component is logged separately."""
    options: dict[str, dict] = field(default_factory=lambda: {"shapes": {"mode": "strict"}})
    """``{reward name: {option: value}}`` passed to each reward's constructor (e.g. ``{remote: {url: ...}}``)."""

    def __post_init__(self):
        if not self.weights:
            raise ConfigError("reward.weights is empty: name at least one reward")
        for name, w in self.weights.items():
            if not math.isfinite(w):
                raise ConfigError(f"reward.weights.{name} must be a finite number, got {w}")
        if not any(self.weights.values()):
            raise ConfigError("reward.weights are all 0: the reward would be 0 for every sample")


def _check_tags(name: str, tags) -> None:
    if tags is None:
        return
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t.strip() for t in tags):
        raise ConfigError(f"{name} must be a non-empty list of task names (e.g. [counting]) or null, got {tags!r}")


@dataclass
class PromptConfig:
    """Where training prompts come from (``fpo_diffusion/prompts.py``)."""

    source: str = "embedded:shapes"
    """A ``.txt`` file (one prompt a line), a ``.jsonl`` file (``{"prompt": ..., ...metadata}``,
    GenEval style), ``hf:<dataset>[:<split>]`` or a folder saved by ``datasets``, or an embedded
    source: ``embedded:tiny``, or one a plug-in installs (``fpo_diffusion.prompts`` entry points):
    ``embedded:shapes`` (the shapes world's RL training prompts: 2000 GenEval-format entries, 400
    for each task with training prompts, from the combinations ShapesEval holds out none of),
    ``embedded:shapes-counting`` (those of the counting task: the default job's),
    ``embedded:shapes-validation`` (its validation split) and ``embedded:shapes-test`` (ShapesEval)."""
    column: str = "prompt"
    """Prompt column of a ``datasets`` dataset."""
    tags: list[str] | None = None
    """Keep only the prompts whose metadata ``tag`` (GenEval's task name, e.g. ``counting``) is one of these
    (a non-empty list; ``None``: every prompt). A tag no prompt carries is an error naming the tags there are."""
    task_weights: dict[str, float] | None = None
    """The task mix: ``{tag: weight}`` over the prompts' metadata ``tag`` (e.g. Flow-GRPO's GenEval mix
    ``{position: 0.35, counting: 0.25, color_attr: 0.25, two_object: 0.10, colors: 0.05}``). The prompt list is
    recomposed so that each task's share of its entries is its weight over the sum (each task's prompts cycled
    in a fixed seeded order; the list keeps its length), and prompts are drawn uniformly from it as before.
    Weights are finite and >= 0, at least one > 0; a task of the prompts left out (or weighted 0) is not
    trained; a task no prompt carries is an error. ``None``: the list as it is."""

    def __post_init__(self):
        _nonempty("prompts.source", self.source)
        _nonempty("prompts.column", self.column)
        _check_tags("prompts.tags", self.tags)
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict) or not self.task_weights:
                raise ConfigError(f"prompts.task_weights must be a non-empty {{task: weight}} mapping or null, "
                                  f"got {self.task_weights!r}")
            for tag, w in self.task_weights.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise ConfigError(f"prompts.task_weights.{tag} must be a number, got {w!r}")
                _require(f"prompts.task_weights.{tag}", w, 0, math.inf, hi_open=True)
            if not any(self.task_weights.values()):
                raise ConfigError("prompts.task_weights are all 0: no task would be trained")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    iterations: int = 30
    """Number of FPO iterations (rollout + update; >= 1)."""
    prompts_per_iteration: int = 8
    """Distinct prompts per iteration (P, >= 1), across all ranks."""
    group_size: int = 16
    """Images per prompt (K, >= 2): the group advantages are computed over. ``P * K`` must divide by the
    number of ranks. The trainer estimates an iteration's memory from ``P * K`` and refuses sizes that
    cannot fit."""
    epochs: int = 1
    """Passes (E, >= 1) over the iteration's samples."""
    minibatch_size: int = 64
    """Samples per forward/backward on each rank (>= 1)."""
    grad_accum_steps: int = 1
    """Minibatches accumulated per optimizer step (>= 1)."""
    lr: float = 1e-3
    """AdamW learning rate (finite, > 0). A step that makes any weight non-finite is undone and
    counted as skipped (``train.max_nonfinite_in_a_row``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (finite, >= 0)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas: two numbers in ``[0, 1)``."""
    adam_eps: float = 1e-8
    """AdamW epsilon (finite, > 0)."""
    lr_schedule: str = "constant"
    """``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts`` or
    ``polynomial`` (``diffusers.optimization.get_scheduler``)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up (>= 0; needs a schedule other than ``constant``, which has none)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip (finite, > 0; ``None``: off)."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16`` (through accelerate)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    ema_decay: float | None = None
    """EMA of the LoRA weights (used for export and the periodic evaluation), in ``(0, 1)``; ``None``: off."""
    ema_warmup: bool = False
    """The baselines' official EMA warm-up: after optimizer step ``n`` the decay is ``min((1 + n) / (10 + n),
    ema_decay)`` (yifan123/flow_grpo ``flow_grpo/ema.py``), so the average follows the weights early on;
    ``false``: ``ema_decay`` from the first step."""
    ema_update_every: int = 1
    """Move the EMA after optimizer step ``n`` only when ``(n + 1) % ema_update_every == 0`` (>= 1; the official
    ``update_step_interval``: Flow-GRPO 8, DiffusionNFT and AWM 1)."""
    seed: int = 0
    """Seed of everything (prompts, rollouts, ``(t, eps)`` pairs); in ``[0, 2**32)``."""
    max_nonfinite_in_a_row: int = 3
    """Stop after this many consecutive updates skipped for NaN/Inf (>= 1), or after this many consecutive
    iterations that each skipped at least one of their updates (a run whose every iteration skips its later
    steps, e.g. a ratio that overflowed, is stopped even though each iteration's first step went through)."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective (gather, barrier, gradient all-reduce) for the others before the
    run stops with one line (``InitProcessGroupKwargs``; torch's default is 30 minutes): a rank that hangs
    (stopped, deadlocked, a stuck filesystem) ends the run instead of blocking every other rank. Finite,
    > 0; it must exceed the longest time one rank works alone, e.g. a remote reward's worst case
    (``RemoteReward.worst_case_seconds``, about 4 minutes by default) or a checkpoint write. May change on resume."""

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "epochs", "minibatch_size", "grad_accum_steps"):
            _require(f"train.{name}", getattr(self, name), 1)
        _require("train.group_size", self.group_size, 2,
                 why="advantages are relative to the group: a group of one always has advantage 0")
        _require("train.lr", self.lr, 0, math.inf, lo_open=True, hi_open=True)
        _require("train.weight_decay", self.weight_decay, 0, math.inf, hi_open=True)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must be two numbers [beta1, beta2], got {self.adam_betas}")
        for i, b in enumerate(self.adam_betas):
            _require(f"train.adam_betas[{i}]", b, 0, 1, hi_open=True)
        _require("train.adam_eps", self.adam_eps, 0, math.inf, lo_open=True, hi_open=True)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _require("train.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps and self.lr_schedule == "constant":
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} has no effect with train.lr_schedule=constant; "
                             f"use constant_with_warmup (or linear, cosine)")
        if self.max_grad_norm is not None:
            _require("train.max_grad_norm", self.max_grad_norm, 0, math.inf, lo_open=True, hi_open=True,
                     why="null turns clipping off")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        _require("train.ema_update_every", self.ema_update_every, 1)
        _require("train.seed", self.seed, 0, 2**32, hi_open=True)
        _require("train.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, 1)
        _require("train.collective_timeout_s", self.collective_timeout_s, 0, math.inf, lo_open=True, hi_open=True)


@dataclass
class LogConfig:
    """What is logged (always a ``metrics.jsonl``)."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tb``."""
    wandb: bool = False
    """Also log to Weights & Biases (needs ``pip install fpo-diffusion[wandb]``)."""
    wandb_project: str = "fpo-diffusion"
    """W&B project name."""
    image_every: int = 5
    """Log an image grid every this many iterations (>= 0; 0: never)."""
    grid_images: int = 16
    """Images in a logged grid (>= 1)."""
    collapse_ratio: float = 1.5
    """Warn when the policy's CFM loss on its own samples leaves ``[start / r, start * r]`` (``r > 1``;
    ``.inf``: never)."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self):
        _nonempty("log.wandb_project", self.wandb_project)
        _require("log.image_every", self.image_every, 0, why="0: never")
        _require("log.grid_images", self.grid_images, 1)
        _require("log.collapse_ratio", self.collapse_ratio, 1, lo_open=True,
                 why="the warning band is [start / r, start * r]; .inf: never warn")


@dataclass
class EvalConfig:
    """Periodic evaluation during training (Flow-GRPO's ``eval_freq``; ``fpo_diffusion/periodic_eval.py``).

    After every ``every`` iterations' updates (and after the last) the current policy (its EMA with
    ``train.ema_decay``, what the export writes) samples ``images_per_prompt`` images for each evaluation
    prompt with fixed seeds, through the stock pipeline with the ``sampling`` settings. Its reward (and each
    reward component, and the mean per GenEval ``tag`` when the prompts' metadata has one) is merged into
    that iteration's row of ``metrics.jsonl`` and TensorBoard as ``eval/reward/*`` / ``eval/task/*``; a grid
    of its images is logged as ``images/eval_<iteration>.png``.
    """

    every: int = 0
    """Evaluate after every this many iterations and after the last (>= 0; 0: off). On the embedded
    shapes model: ``eval.every=25 eval.prompts=embedded:shapes-validation`` (its validation split)."""
    prompts: str | None = None
    """The evaluation prompt source, in any ``prompts.source`` form (``.txt``, GenEval-style ``.jsonl``,
    ``hf:<dataset>[:<split>]``, a ``datasets`` folder, ``embedded:...``); keep it disjoint from the training
    prompts. ``None``: no evaluation (``eval.every`` > 0 then needs it)."""
    column: str = "prompt"
    """Prompt column of a ``datasets`` evaluation set."""
    tags: list[str] | None = None
    """Evaluate only the prompts whose metadata ``tag`` is one of these (as ``prompts.tags``; ``None``: all)."""
    max_prompts: int | None = 64
    """Evaluate the first this many prompts (>= 1; ``None``: all)."""
    images_per_prompt: int = 2
    """Images per evaluation prompt (>= 1)."""
    seed: int = 20240601
    """Seed of the evaluation noise (>= 0): image ``j`` of prompt ``i`` gets the same draw at every evaluation,
    on any number of ranks."""
    grid_prompts: int = 8
    """Prompts (rows) in the logged evaluation grid (>= 0; 0: no grid)."""
    reward_options: dict[str, dict] | None = None
    """``{reward name: {option: value}}`` merged over ``reward.options`` for the evaluation's reward only (each
    name one of ``reward.weights``): score the evaluation by another reading than training's, e.g. train with a
    shaped reward and evaluate the strict rule (``{shapes: {color_weight: 0.0}}``). ``None``: the training reward."""
    at_start: bool = True
    """Also evaluate the starting policy before the first iteration (logged at iteration ``-1``, as Flow-GRPO
    evaluates at step 0), so every curve starts from the base model's score under the same noise; not on resume."""

    def __post_init__(self):
        _require("eval.every", self.every, 0, why="0: off")
        if self.prompts is not None:
            _nonempty("eval.prompts", self.prompts, "null: no evaluation")
        if self.every and self.prompts is None:
            raise ValueError(f"eval.every={self.every} needs eval.prompts (a prompt file, dataset or embedded set "
                             f"held out from training)")
        _nonempty("eval.column", self.column)
        _check_tags("eval.tags", self.tags)
        if self.max_prompts is not None:
            _require("eval.max_prompts", self.max_prompts, 1, why="null: all")
        _require("eval.images_per_prompt", self.images_per_prompt, 1)
        _require("eval.seed", self.seed, 0, 2**32, hi_open=True)
        _require("eval.grid_prompts", self.grid_prompts, 0, why="0: no grid")


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 10
    """Save every this many iterations (and at the end); 0: only at the end. >= 0."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (>= 0; 0: keep all)."""

    def __post_init__(self):
        _require("checkpoint.every", self.every, 0, why="0: only at the end")
        _require("checkpoint.keep_last", self.keep_last, 0, why="0: keep all")


@dataclass
class Config:
    """A whole training run."""

    output_dir: str = "runs/fpo-shapes"
    """Where the run writes config, metrics, TensorBoard, checkpoints and the exported LoRA (not empty)."""
    algorithm: str = "fpo"
    """``fpo``, ``flow_grpo``, ``ddpo``, ``diffusion_nft`` or ``awm``: FPO or a baseline in the same loop (see
    ``fpo_diffusion/algorithms``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fpo: FPOConfig = field(default_factory=FPOConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    diffusion_nft: DiffusionNFTConfig = field(default_factory=DiffusionNFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _nonempty("output_dir", self.output_dir, "an empty output_dir would write the run into the current directory")
        _choice("algorithm", self.algorithm, ALGORITHMS)
        for name, opts in (self.eval.reward_options or {}).items():
            if name not in self.reward.weights:
                raise ConfigError(f"eval.reward_options names reward {name!r}, which reward.weights does not "
                                  f"({', '.join(self.reward.weights)})")
            if not isinstance(opts, dict):
                raise ConfigError(f"eval.reward_options.{name} must be a mapping of options, got {opts!r}")

    def eval_reward_options(self) -> dict[str, dict]:
        """``reward.options`` with ``eval.reward_options`` merged over them, reward by reward."""
        out = {k: dict(v) for k, v in self.reward.options.items()}
        for name, opts in (self.eval.reward_options or {}).items():
            out[name] = {**out.get(name, {}), **opts}
        return out


ALGORITHMS = ("fpo", "flow_grpo", "ddpo", "diffusion_nft", "awm")
"""``algorithm`` values: the keys of ``fpo_diffusion.algorithms.ALGORITHMS`` (the config sits below that registry and
cannot read it; the registry checks this list when it is imported)."""


def awm_step_pool(steps: int, timestep_fraction: float) -> int:
    """``K``: AWM draws its training times from the sampler steps ``[1, K)`` of ``steps``, so at most ``K - 1``
    distinct ones (``awm.train_timesteps`` is checked against it)."""
    return int(steps * timestep_fraction)
