"""Shared builders for the policy/LoRA/rollout tests: tiny stock pipelines, cached and copied."""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from fpo_diffusion.policies import POLICIES
from fpo_diffusion.tiny import build_tiny_pipeline

# (id, family, prediction_type)
CASES = [("sd_eps", "sd", "epsilon"), ("sd_v", "sd", "v_prediction"), ("sdxl", "sdxl", "epsilon"),
         ("sd3", "sd3", "epsilon"), ("flux", "flux", "epsilon")]
CASE_IDS = [c[0] for c in CASES]
FLOW_FAMILIES = ("sd3", "flux")
SCHEDULERS_BY_FAMILY = {"sd": ("ddim", "euler", "dpmsolver++"), "sdxl": ("euler", "unipc", "euler_ancestral"),
                        "sd3": ("flow_euler", "flow_heun", "flow_dpm"), "flux": ("flow_euler", "flow_unipc", "flow_dpm")}
PROMPTS = ["a red circle", "two blue squares"]


def policy_kwargs(family: str) -> dict:
    """Keep the tiny T5-less/T5 sequences short and FLUX images tiny."""
    kw: dict = {}
    if family in FLOW_FAMILIES:
        kw["max_sequence_length"] = 8
    if family == "flux":
        kw.update(height=16, width=16)
    return kw


@lru_cache(maxsize=None)
def _pipeline(family: str, prediction_type: str, seed: int):
    return build_tiny_pipeline(family, seed, prediction_type=prediction_type)


def fresh_pipeline(family: str, prediction_type: str = "epsilon", seed: int = 0):
    """A private copy of the tiny pipeline (built once per process)."""
    return copy.deepcopy(_pipeline(family, prediction_type, seed))


def make_policy(family: str, prediction_type: str = "epsilon", *, lora: bool = True, init=False, rank: int = 2,
                dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny policy, optionally with a (random, non-identity by default) LoRA adapter."""
    pipe = fresh_pipeline(family, prediction_type, seed).to(dtype=dtype)
    pol = POLICIES[family](pipe, **policy_kwargs(family))
    if lora:
        torch.manual_seed(1234)
        pol.add_lora(rank=rank, init=init)
        if dtype != torch.float32:
            pol.denoiser.to(dtype)
    return pol


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def rollout(pol, steps: int = 2, cfg: float = 1.0, scheduler=None, seed: int = 0):
    cond = pol.encode_prompts(PROMPTS)
    x0 = pol.sample(cond, generators(len(PROMPTS), seed), steps=steps, guidance_scale=cfg, scheduler=scheduler)
    return cond, x0
