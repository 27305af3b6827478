"""The Trajectory record: what a rollout produced and what a learner needs to replay it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Trajectory:
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

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def concat(cls, parts: list[Trajectory]) -> Trajectory:
        """Batches of one iteration (same steps) gathered from workers."""
        first = parts[0]
        for part in parts[1:]:
            if not torch.equal(part.sde_mask, first.sde_mask):
                raise ValueError("trajectories of one iteration must share their SDE steps")
        return replace(
            first,
            prompts=[p for part in parts for p in part.prompts],
            prompt_ids=torch.cat([p.prompt_ids for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            images=None if first.images is None else torch.cat([p.images for p in parts]),
        )
