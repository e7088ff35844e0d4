"""Group advantages over the global batch (after rewards are gathered from every rank).

Samples of one prompt form a group (K images, possibly spread over ranks). Per group:
``A = (r - mean_g) / (std + eps)`` with ``std`` the group's (``"group"``) or the whole
batch's (``"global"``) population std, then clipped to ``[-clip, clip]``; negative advantages are
then multiplied by ``negative_scale`` (1: symmetric, the default; 0: only better-than-the-group samples
are reinforced, nothing is pushed away from).
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, std: str = "group",
                     clip: float = 5.0, eps: float = 1e-4, negative_scale: float = 1.0) -> torch.Tensor:
    """Advantages ``[N]`` for rewards ``[N]`` with integer group ids ``[N]`` (vectorised)."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} / {tuple(group_ids.shape)}")
    r = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    if std == "group":
        var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, centred**2) / count
        scale = var.sqrt()[inv]
    elif std == "global":
        scale = r.std(unbiased=False).expand_as(r)
    else:
        raise ValueError(f"advantage std must be 'group' or 'global', got {std!r}")
    adv = (centred / (scale + eps)).clamp(-clip, clip)
    if negative_scale != 1.0:
        adv = torch.where(adv < 0, adv * negative_scale, adv)
    return adv.to(rewards.dtype)


def zero_variance_share(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of groups whose rewards are all equal (they carry no learning signal)."""
    groups = torch.unique(group_ids)
    if groups.numel() == 0:
        return 0.0
    flat = sum(bool((rewards[group_ids == g] == rewards[group_ids == g][0]).all()) for g in groups)
    return flat / groups.numel()
