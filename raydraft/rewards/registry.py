"""Rewards by name: `build_reward(RewardsConfig)` turns the config's list into one reward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raydraft.config import ConfigError, RewardsConfig
from raydraft.rewards.base import CompositeReward, Reward

RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    def add(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def make_reward(name: str, options: dict[str, Any] | None = None) -> Reward:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {reward_names()}")
    try:
        return _REGISTRY[name](**(options or {}))
    except TypeError as err:
        raise TypeError(f"reward {name!r}: bad options {options}: {err}") from None


def reward_names() -> list[str]:
    """Every registered reward's name."""
    _load_builtins()
    return sorted(_REGISTRY)


def check_reward_names(cfg: RewardsConfig) -> None:
    """ConfigError for the first component naming no registered reward, so that a misspelt
    name fails with the config's other mistakes, before Ray or a model starts, instead of
    as a KeyError inside a role. A plugin's rewards are registered once `plugins:` imports
    it, which config loading does first."""
    names = reward_names()
    for i, component in enumerate(cfg.components):
        if component.name not in names:
            raise ConfigError(
                f"rewards.components[{i}].name: unknown reward {component.name!r}; registered: "
                f"{', '.join(names)} (a plugin's rewards: list its module in `plugins`)"
            )


def build_reward(cfg: RewardsConfig) -> CompositeReward:
    return CompositeReward([(make_reward(c.name, c.options), c.weight) for c in cfg.components])


def _load_builtins() -> None:
    from raydraft.rewards import (  # noqa: F401  (each registers its rewards on import)
        builtin,
        clip_rewards,
        geneval,
        hpsv2,
        http_reward,
        imagereward,
        ocr,
        shapes_checker,
        shapes_clip,
        vlm_judge,
    )
