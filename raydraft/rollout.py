"""The sampling half of an iteration: a prompt batch in, a rollout (scored when the
reward is black-box) out. The single-process trainer and each rollout worker call the
same `generate`; a controller that split a batch across workers joins the parts with
`RolloutResult.concat`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from raydraft.algorithms.base import Algorithm
from raydraft.data.prompts import PromptBatch
from raydraft.explore import Explorer
from raydraft.models.base import Policy
from raydraft.precision.fidelity import ranking_fidelity
from raydraft.precision.rollout_copy import RolloutCopy
from raydraft.rewards.base import Reward, component_scores, score_or_drop
from raydraft.rows import Rows
from raydraft.seeds import ROLLOUT, iteration_generator


def slowest(seconds: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's seconds of parts that ran side by side: the slowest part's."""
    return {k: max(s.get(k, 0.0) for s in seconds) for k in seconds[0]}


def mean_over_parts(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the parts that measured it."""
    keys = {k for part in stats for k in part}
    return {k: sum(p[k] for p in stats if k in p) / sum(k in p for p in stats) for k in keys}


@dataclass
class RolloutResult(Rows):
    """One prompt batch sampled by one policy version; black-box rewards already applied."""

    shared = ("iteration", "policy_version", "precision", "seconds", "stats")
    combine: ClassVar = {"policy_version": min, "seconds": slowest, "stats": mean_over_parts}

    iteration: int
    policy_version: int
    rollout: Rows  # the algorithm's rollout batch
    records: list[dict[str, Any]]  # one row per sample for the rollout log
    rewards: torch.Tensor | None = None  # (B,), black-box rewards only
    valid: torch.Tensor | None = None  # (B,) bool: False where a bad reward was dropped
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) scores
    seconds: dict[str, float] = field(default_factory=dict)
    precision: str = "full"  # of the copy that sampled (`rollout.precision`)
    # the sampling side's statistics: ranking fidelity (if audited), exploration (if any)
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def reward_stats(self) -> dict[str, float]:
        """Mean and std of the kept black-box rewards, and of each component's scores (DRaFT
        logs its rewards in the loss)."""
        if self.rewards is None:
            return {}
        stats = {}
        for suffix, scores in [
            ("", self.rewards),
            *((f"/{n}", s) for n, s in self.components.items()),
        ]:
            kept = scores[self.valid]
            stats[f"reward_mean{suffix}"] = float(kept.mean()) if kept.numel() else math.nan
            stats[f"reward_std{suffix}"] = float(kept.std()) if kept.numel() > 1 else 0.0
        return stats


def generate(
    algorithm: Algorithm,
    policy: Policy,
    reward: Reward | None,
    batch: PromptBatch,
    seed: int,
    drop_bad_rewards: bool,
    low_precision: RolloutCopy | None = None,
    explorer: Explorer | None = None,
) -> RolloutResult:
    """Sample `batch` with the policy's current weights and score it if the algorithm
    needs black-box rewards (`reward` may be a remote reward in the Ray runtime). With a
    low-precision copy, that copy samples; with an explorer as well, it only explores,
    and the selected seeds are sampled in full precision (`raydraft.explore`)."""
    policy.train(False)
    seconds, stats = {}, {}
    if explorer is not None:
        start = time.perf_counter()
        batch, preview, stats = explorer.select_batch(policy, reward, batch, low_precision)
        seconds["explore"] = time.perf_counter() - start
    start = time.perf_counter()
    generator = iteration_generator(seed, batch.iteration, ROLLOUT)
    low = low_precision if explorer is None else None
    with low.sampling(policy) if low else nullcontext():
        rollout = algorithm.rollout(policy, batch, generator)
    seconds["rollout"] = time.perf_counter() - start
    precision = low.precision if low else "full"
    if low_precision:
        seconds["requantize"] = low_precision.refresh_seconds
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
    if explorer is not None and rewards is not None:
        # The preview's ranking of the selected seeds against their regenerations'
        # (free: both were scored), the agreement that selection relies on.
        keep = valid & ~preview.isnan()
        stats |= ranking_fidelity(
            preview[keep], rewards[keep], batch.prompt_ids[keep], explorer.fidelity_k
        )
    if low and rewards is not None and low.audits(batch.iteration):
        start = time.perf_counter()
        stats |= audit_ranking(algorithm, policy, reward, batch, seed, rewards, valid,
                               low.cfg.fidelity_k)  # fmt: skip
        seconds["fidelity"] = time.perf_counter() - start
    records = [
        {
            "iteration": batch.iteration,
            "prompt": batch.prompts[i],
            "prompt_id": int(batch.prompt_ids[i]),
            "seed": int(batch.seeds[i]),
            "policy_version": policy.version,
            "precision": precision,
            "reward": None if rewards is None or not valid[i] else float(rewards[i]),
        }
        | ({"preview_reward": float(preview[i])} if explorer is not None else {})
        | {f"reward/{name}": float(scores[i]) for name, scores in components.items()}
        for i in range(len(batch))
    ]
    return RolloutResult(
        batch.iteration, policy.version, rollout, records, rewards, valid, components, seconds,
        precision, stats,
    )  # fmt: skip


def audit_ranking(
    algorithm: Algorithm,
    policy: Policy,
    reward: Reward,
    batch: PromptBatch,
    seed: int,
    low_rewards: torch.Tensor,
    low_valid: torch.Tensor,
    k: int,
) -> dict[str, float]:
    """The batch sampled again in full precision from the same seeds and streams, scored,
    and the two within-group rankings compared (`precision.fidelity`). Nothing of it
    reaches the learner."""
    generator = iteration_generator(seed, batch.iteration, ROLLOUT)
    reference = algorithm.rollout(policy, batch, generator)
    full, valid = score_or_drop(reward, reference.images, reference.prompts, batch.metadata, True)
    keep = low_valid & valid
    return ranking_fidelity(low_rewards[keep], full[keep], batch.prompt_ids[keep], k)
