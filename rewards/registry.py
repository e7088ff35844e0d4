"""Rewards by name: ``@register_reward("name")`` and ``build_reward(name, **options)``."""
from __future__ import annotations

import importlib
from typing import Callable

from .base import Reward, UnknownRewardError

_REGISTRY: dict[str, type[Reward]] = {}

# Modules imported on first lookup so that ``build_reward`` sees every built-in reward.
_BUILTIN_MODULES = ["rewards.builtin", "rewards.simple", "rewards.geneval.reward"]
PLUGIN_GROUP = "fpo_diffusion.rewards"
"""Entry-point group of rewards other packages provide (value: a module that registers them on import),
e.g. the shapes world's ``shapes = "fpo_diffusion.shapes.reward"``. ``rewards`` never imports them by name."""


def register_reward(name: str) -> Callable[[type[Reward]], type[Reward]]:
    def deco(cls: type[Reward]) -> type[Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reward {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_builtins() -> None:
    from importlib.metadata import entry_points

    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in _REGISTRY:
            importlib.import_module(ep.value)


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def reward_class(name: str) -> type[Reward]:
    """The registered class of ``name`` (nothing is built)."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name]


def build_reward(name: str, **options) -> Reward:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name](**options)
