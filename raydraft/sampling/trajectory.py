"""The Trajectory record: what a rollout produced and what a learner needs to replay it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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
    seeds: torch.Tensor  # (B,) int64
    times: torch.Tensor  # (S + 1,) the sampler's time grid (model time)
    latents: torch.Tensor  # (B, S + 1, *latent_shape)
    log_probs: torch.Tensor  # (B, S) fp32
    sde_mask: torch.Tensor  # (S,) bool: which steps were stochastic
    policy_version: int
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    precision: str = "full"
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> Trajectory:
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            prompts=[self.prompts[i] for i in index.tolist()],
            prompt_ids=self.prompt_ids[index],
            seeds=self.seeds[index],
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            images=None if self.images is None else self.images[index],
        )

    def records(self) -> list[dict[str, Any]]:
        """One row per sample for the rollout log (no latents, no images)."""
        return [
            {
                "prompt": self.prompts[i],
                "prompt_id": int(self.prompt_ids[i]),
                "seed": int(self.seeds[i]),
                "policy_version": self.policy_version,
                "precision": self.precision,
                "log_prob_sum": float(self.log_probs[i].sum()),
            }
            for i in range(len(self))
        ]
