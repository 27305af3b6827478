"""What Flow-GRPO and DiffusionNFT share: group-relative advantages (each prompt's group of
samples is its own baseline), the rows worth training on, and the anchor to the frozen base
model that `kl_beta` weighs. Their config fields live in `config.GroupRelativeConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raydraft.models.base import Policy


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, zero-std mask) for rewards grouped by prompt; population std as flow_grpo."""
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.bincount(inverse).double()
    mean = torch.bincount(inverse, rewards) / count
    centred = rewards - mean[inverse]
    group_var = torch.bincount(inverse, centred**2) / count
    std = rewards.std(correction=0).expand_as(rewards) if global_std else group_var.sqrt()[inverse]
    advantages = (centred / (std + eps)).clamp(-clip, clip)
    zero_std = (group_var == 0)[inverse]
    advantages = torch.where(zero_std, torch.zeros_like(advantages), advantages)
    return advantages.float(), zero_std


def trainable_rows(
    rewards: torch.Tensor,
    prompt_ids: torch.Tensor,
    valid: torch.Tensor,
    global_std: bool,
    clip: float,
    keep_ties: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(advantages, the rows to train on, their statistics). A dropped (bad) reward takes
    its group with it; groups whose rewards all tie have zero advantage and stay only if
    `keep_ties`."""
    clean = rows_of_clean_groups(prompt_ids, valid)
    advantages, zero_std = group_advantages(rewards, prompt_ids, global_std, clip=clip)
    rows = (clean if keep_ties else clean & ~zero_std).nonzero().flatten()
    stats = {
        "zero_std_fraction": float(zero_std[clean].float().mean()) if clean.any() else 0.0,
        "bad_reward_dropped": float((~valid).sum()),
        "samples_trained": float(len(rows)),
    }
    return advantages, rows, stats


def rows_of_clean_groups(prompt_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose whole group kept its reward. A dropped (bad) reward takes its
    group with it, since the group's baseline would be wrong without it."""
    return ~torch.isin(prompt_ids, torch.unique(prompt_ids[~valid]))


def reference_penalty(
    loss: torch.Tensor,
    stats: dict[str, float],
    beta: float,
    policy: Policy,
    reference: Callable[[], Any],
    divergence: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """`loss` + beta · mean divergence from the frozen base: `reference()` runs under the
    base weights without gradients and `divergence(its output)` gives one value per row;
    the mean is logged as `kl_ref`. The loss itself when beta is 0."""
    if beta == 0:
        return loss
    with torch.no_grad(), policy.reference():
        base = reference()
    divergence_mean = divergence(base).mean()
    stats["kl_ref"] = float(divergence_mean.detach())
    return loss + beta * divergence_mean
