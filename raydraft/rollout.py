"""The sampling half of an iteration: a prompt batch in, a rollout (scored when the
reward is black-box) out. The single-process trainer and each rollout worker call the
same `generate`; a controller that split a batch across workers joins the parts with
`RolloutResult.concat`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from raydraft.algorithms.base import Algorithm
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Policy
from raydraft.rewards.base import Reward, component_scores, score_or_drop
from raydraft.rows import Rows
from raydraft.seeds import ROLLOUT, iteration_generator


def slowest(seconds: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's seconds of parts that ran side by side: the slowest part's."""
    return {k: max(s.get(k, 0.0) for s in seconds) for k in seconds[0]}


@dataclass
class RolloutResult(Rows):
    """One prompt batch sampled by one policy version; black-box rewards already applied."""

    shared = ("iteration", "policy_version", "seconds")
    combine: ClassVar = {"policy_version": min, "seconds": slowest}

    iteration: int
    policy_version: int
    rollout: Rows  # the algorithm's rollout batch
    records: list[dict[str, Any]]  # one row per sample for the rollout log
    rewards: torch.Tensor | None = None  # (B,), black-box rewards only
    valid: torch.Tensor | None = None  # (B,) bool: False where a bad reward was dropped
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) scores
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def reward_stats(self) -> dict[str, float]:
        """Mean and std of the kept black-box rewards (DRaFT logs its rewards in the loss)."""
        if self.rewards is None:
            return {}
        kept = self.rewards[self.valid]
        return {
            "reward_mean": float(kept.mean()) if kept.numel() else math.nan,
            "reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
        } | {
            f"reward_mean/{name}": float(scores[self.valid].mean()) if kept.numel() else math.nan
            for name, scores in self.components.items()
        }


def generate(
    algorithm: Algorithm,
    policy: Policy,
    reward: Reward | None,
    batch: PromptBatch,
    seed: int,
    drop_bad_rewards: bool,
) -> RolloutResult:
    """Sample `batch` with the policy's current weights and score it if the algorithm
    needs black-box rewards (`reward` may be a remote reward in the Ray runtime)."""
    start = time.perf_counter()
    policy.train(False)
    generator = iteration_generator(seed, batch.iteration, ROLLOUT)
    rollout = algorithm.rollout(policy, batch, generator)
    seconds = {"rollout": time.perf_counter() - start}
    rewards = valid = None
    components: dict[str, torch.Tensor] = {}
    if algorithm.scores_rollouts:
        if reward is None:
            raise ValueError(f"{type(algorithm).__name__} needs a reward to score its rollouts")
        start = time.perf_counter()
        rewards, valid = score_or_drop(
            reward, rollout.images, rollout.prompts, batch.metadata, drop_bad_rewards
        )
        components = component_scores(reward)
        seconds["reward"] = time.perf_counter() - start
    records = [
        {
            "iteration": batch.iteration,
            "prompt": batch.prompts[i],
            "prompt_id": int(batch.prompt_ids[i]),
            "seed": int(batch.seeds[i]),
            "policy_version": policy.version,
            "reward": None if rewards is None or not valid[i] else float(rewards[i]),
        }
        | {f"reward/{name}": float(scores[i]) for name, scores in components.items()}
        for i in range(len(batch))
    ]
    return RolloutResult(
        batch.iteration, policy.version, rollout, records, rewards, valid, components, seconds
    )
