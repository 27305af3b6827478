"""The Trajectory record: what a rollout produced and what a learner needs to replay it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydraft.rows import Rows


@dataclass
class Trajectory(Rows):
    """One batch of rollouts, sample-major.

    `latents[:, i]` is the state before step i and `latents[:, -1]` the final latent;
    `log_probs[:, i]` scores the move latents[:, i] -> latents[:, i + 1] under the
    behaviour policy (zero on deterministic steps, see `sde_mask`).
    """

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B,) int64
    latents: torch.Tensor  # (B, S + 1, *latent_shape)
    log_probs: torch.Tensor  # (B, S) fp32
    sde_mask: torch.Tensor  # (S,) bool: which steps were stochastic
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]

    shared = ("sde_mask",)  # an iteration's stochastic steps, the same in every part

    def __len__(self) -> int:
        return len(self.prompts)
