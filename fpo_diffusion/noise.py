"""Drawing the ``(t_i, eps_i)`` pairs of the CFM loss.

``t`` lives in ``(0, 1)`` for every family: ``t -> 1`` is pure noise. Flow policies use it as
the rectified-flow time; VP policies map it to a discrete training timestep
(``policies.base``). Pairs are drawn **once per sample** from a generator seeded by the
sample's global identity (run seed, iteration, global sample index), so the same pairs are
used for the old and new losses and the draw does not depend on how samples are spread
over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

TIME_SAMPLERS = ("uniform", "logit_normal", "grid")


@dataclass
class TimeSampling:
    """How ``t`` is drawn for the CFM loss."""

    kind: str = "uniform"
    """``"uniform"`` on ``[t_min, t_max]``, ``"logit_normal"`` (SD3's training density) or
    ``"grid"`` (``grid_size`` evenly spaced points strictly inside ``(t_min, t_max)``)."""
    t_min: float = 0.02
    """Smallest ``t``; keeps away from ``t = 0`` where the VP eps-loss weight vanishes."""
    t_max: float = 0.98
    """Largest ``t``; keeps away from ``t = 1`` (pure noise, no signal about ``x0``)."""
    logit_mean: float = 0.0
    """Mean of the normal before the sigmoid (``logit_normal``; finite)."""
    logit_std: float = 1.0
    """Std of the normal before the sigmoid (``logit_normal``; finite, > 0)."""
    grid_size: int = 10
    """Number of grid points (``grid``; >= 1)."""
    stratified: bool = False
    """Draw a sample's ``n`` times one per equal-probability stratum of the density (``uniform``
    and ``logit_normal``; ignored for ``grid``): time ``i`` comes from quantiles ``[i/n, (i+1)/n)``. Each time still
    has the chosen density (in a random stratum), so the CFM-loss mean stays unbiased, with less
    variance from the draw of ``t`` (no ``t`` cluster by chance)."""

    def __post_init__(self):
        if self.kind not in TIME_SAMPLERS:
            raise ValueError(f"fpo.time_sampling.kind must be one of {TIME_SAMPLERS}, got {self.kind!r}")
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"fpo.time_sampling.logit_mean must be a finite number, got {self.logit_mean}")
        if not 0 < self.logit_std < math.inf:
            raise ValueError(f"fpo.time_sampling.logit_std must be a finite number > 0, got {self.logit_std}")
        if self.grid_size < 1:
            raise ValueError(f"fpo.time_sampling.grid_size must be >= 1, got {self.grid_size}")


def sample_t(n: int, cfg: TimeSampling, generator: torch.Generator) -> torch.Tensor:
    """``n`` times in ``[t_min, t_max]`` (float32, CPU)."""
    if cfg.stratified and cfg.kind != "grid":  # one draw per quantile stratum [i/n, (i+1)/n)
        u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        if cfg.kind == "uniform":
            t = (cfg.t_min + (cfg.t_max - cfg.t_min) * u).float()
        else:  # the normal's inverse CDF, then the sigmoid
            z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)) * cfg.logit_std + cfg.logit_mean
            t = torch.sigmoid(z).clamp(cfg.t_min, cfg.t_max).float()
    elif cfg.kind == "uniform":
        u = torch.rand(n, generator=generator)
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * u
    elif cfg.kind == "logit_normal":
        z = torch.randn(n, generator=generator) * cfg.logit_std + cfg.logit_mean
        t = torch.sigmoid(z).clamp(cfg.t_min, cfg.t_max)
    else:
        grid = torch.linspace(cfg.t_min, cfg.t_max, cfg.grid_size)
        t = grid[torch.randint(0, cfg.grid_size, (n,), generator=generator)]
    return t


TAU_EPS_STREAM = 1
"""The ``sample_generator`` stream id of every ``(t, eps)`` draw (:func:`draw_tau_eps`)."""


class Stream(NamedTuple):
    """A named source of random draws: ``sample_generator(run_seed + seed_offset, iteration, key, stream)``."""

    seed_offset: int
    """Added to the run seed (``train.seed``)."""
    stream: int
    """``sample_generator``'s stream id (0..3)."""
    key: str
    """What the generator is keyed by besides the iteration."""


STREAMS: dict[str, Stream] = {
    "rollout": Stream(0, 0, "global sample index (the prompt plan uses the same seed)"),
    "tau_eps": Stream(0, 1, "global sample index (or group index with fpo.group_noise)"),
    "anchor_pick": Stream(0, 2, "epoch * 100_003 + step: which reference samples an FM-anchor step uses"),
    "shuffle": Stream(0, 3, "rank * 1009 + epoch: the minibatch permutation of an epoch"),
    "reference": Stream(10_007, 0, "global sample index of the frozen base model's samples (and their plan)"),
    "reference_tau_eps": Stream(10_007, 1, "(iteration * 1000 + epoch, sample index + step * 7919): FM anchor pairs"),
    "own_cfm": Stream(20_011, 1, "global sample index: the collapse monitor's (t, eps) pair"),
    "step_subset": Stream(40_009, 2, "global sample index; the offset is multiplied by epoch + 1: stepwise steps"),
    "zero_adv_pad": Stream(50_021, 3, "the rank's first global sample index: zero-advantage samples that pad a "
                                      "filtered Flow-GRPO update"),
}
"""Every random stream of a training run, by name: one place to see that no two uses share draws.

Evaluation samples (``Trainer.sample_images``) use ``sample_generator(seed, 0, i)`` with a
caller-given seed, independent of the run seed.
"""


@dataclass(frozen=True)
class SeedStreams:
    """The named streams of :data:`STREAMS` bound to one run seed."""

    seed: int

    def seed_of(self, name: str, multiple: int = 1) -> int:
        """The seed of stream ``name``: run seed + ``multiple`` times its offset."""
        return self.seed + STREAMS[name].seed_offset * multiple

    def generator(self, name: str, iteration: int, key: int, *, multiple: int = 1) -> torch.Generator:
        """The generator of stream ``name`` for ``(iteration, key)``."""
        return sample_generator(self.seed_of(name, multiple), iteration, key, stream=STREAMS[name].stream)

    def tau_eps(self, name: str, latent_shape: tuple[int, ...], n_mc: int, cfg: TimeSampling, iteration: int,
                keys: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`draw_tau_eps` from stream ``name`` (one of the ``(t, eps)`` streams)."""
        if STREAMS[name].stream != TAU_EPS_STREAM:
            raise ValueError(f"stream {name!r} does not draw (t, eps) pairs")
        return draw_tau_eps(latent_shape, n_mc, cfg, self.seed_of(name), iteration, keys)


def sample_generator(seed: int, iteration: int, sample_index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one global sample of one iteration (stream separates uses)."""
    g = torch.Generator(device="cpu")
    # A fixed mixing of the identity into 63 bits; independent of rank layout.
    key = (seed * 1_000_003 + iteration) * 2_000_029 + sample_index
    key = (key * 4 + stream) % (2**63 - 1)
    g.manual_seed(key)
    return g


def draw_tau_eps(latent_shape: tuple[int, ...], n_mc: int, cfg: TimeSampling, seed: int,
                 iteration: int, sample_indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``t [B, N]`` and ``eps [B, N, *latent_shape]`` for the given global samples."""
    if n_mc < 1:
        raise ValueError(f"fpo.n_mc must be >= 1, got {n_mc}")
    ts, eps = [], []
    for idx in (sample_indices.tolist() if torch.is_tensor(sample_indices) else sample_indices):
        g = sample_generator(seed, iteration, int(idx), stream=TAU_EPS_STREAM)
        ts.append(sample_t(n_mc, cfg, g))
        eps.append(torch.randn((n_mc, *latent_shape), generator=g))
    return torch.stack(ts), torch.stack(eps)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution (for tests and plots)."""
    z = torch.log(t / (1 - t))
    return torch.exp(-0.5 * ((z - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
