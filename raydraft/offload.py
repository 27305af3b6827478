"""Moving a policy, and a learner's optimizer state, between its device and host memory.

How colocated roles take turns on one GPU (verl's hybrid engine sleeps and wakes the same
way): the rollout worker's copy goes to host memory while the learner updates, the
learner's weights, EMA and Adam moments while the worker samples. Modules move in place
(`Module.to` keeps the Parameter objects), so optimizers and EMA keep their references.
"""

from __future__ import annotations

import torch

from raydraft.models.base import Policy


def move_policy(policy: Policy, device: torch.device | str) -> None:
    for module in policy.modules():
        module.to(device)


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # scalars (step) stay
                state[key] = value.to(device)


def release_cached_memory() -> None:
    """Hand the freed blocks back to the driver, so the other role can allocate them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
