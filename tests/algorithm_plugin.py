"""An algorithm from outside raydraft, as a user's package would add one: reward-weighted
regression on the denoising objective (RWR; Lee et al. 2023, arXiv 2302.12192), with
weights softmax(reward / temperature) within each prompt's group, scaled to mean 1.

A run selects it with `plugins: [algorithm_plugin]` and `algorithm.name: reward_weighted`;
importing this module registers it. tests/test_algorithm_plugin.py trains it through the
single-process trainer and through Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat

from raydraft.algorithms.common import plan_minibatches
from raydraft.algorithms.group_relative import rows_of_clean_groups
from raydraft.config import AlgorithmSection, ExperimentConfig, register_algorithm
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Conditioning, Policy
from raydraft.rewards.base import Reward
from raydraft.rows import Rows
from raydraft.sampling.loop import StepNoise, denoise
from raydraft.sampling.samplers import Sampler
from raydraft.seeds import SDE_NOISE


class RewardWeightedConfig(AlgorithmSection):
    name: Literal["reward_weighted"]
    group_size: Annotated[int, Field(ge=2)] = 4
    temperature: PositiveFloat = 0.1
    needs_reference: ClassVar[bool] = False


@dataclass
class WeightedRollout(Rows):
    prompts: list[str]
    prompt_ids: torch.Tensor
    metadata: list[dict]
    cond: Conditioning
    images: torch.Tensor
    x0: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class WeightedBatch(Rows):
    cond: Conditioning
    x0: torch.Tensor
    steps: torch.Tensor  # (b,) sampler step whose noise level each row trains at
    noise: torch.Tensor
    weights: torch.Tensor  # (b,)

    def __len__(self) -> int:
        return len(self.weights)


def group_softmax(rewards: torch.Tensor, group_ids: torch.Tensor, temperature: float):
    """Per group, softmax(reward / temperature) times the group's size (mean weight 1)."""
    weights = torch.zeros_like(rewards, dtype=torch.float32)
    for group in group_ids.unique():
        rows = group_ids == group
        weights[rows] = torch.softmax(rewards[rows].float() / temperature, 0) * rows.sum()
    return weights


class RewardWeighted:
    scores_rollouts = True

    def __init__(self, cfg: RewardWeightedConfig, sampler: Sampler, guidance: float) -> None:
        self.cfg, self.sampler, self.guidance = cfg, sampler, guidance

    @classmethod
    def build(cls, cfg: ExperimentConfig, sampler: Sampler, reward: Reward | None):
        return cls(cfg.algorithm, sampler, cfg.sampler.guidance_scale)

    @torch.no_grad()
    def rollout(self, policy: Policy, batch: PromptBatch, generator: torch.Generator):
        cond = policy.encode(batch.prompts)
        seeds, steps = batch.seeds.tolist(), self.sampler.num_steps
        x0 = denoise(
            policy, cond, policy.initial_noise(seeds), self.sampler, range(steps),
            self.guidance, StepNoise(seeds, SDE_NOISE),
            torch.full((steps,), self.sampler.stochastic),
        ).x  # fmt: skip
        return WeightedRollout(
            list(batch.prompts), batch.prompt_ids, batch.metadata, cond,
            policy.decode(x0).float(), x0,
        )  # fmt: skip

    def recompute_behaviour(self, policy, micro_batches, truncation):
        return {}  # the loss takes nothing from the sampling policy but its samples

    def plan_updates(
        self, rollout, rewards, valid, minibatch_size, grad_accum_steps, generator
    ):  # fmt: skip
        keep = rows_of_clean_groups(rollout.prompt_ids, valid).nonzero().flatten()
        weights = group_softmax(rewards, rollout.prompt_ids, self.cfg.temperature)
        steps = torch.randint(self.sampler.num_steps, (len(rollout),), generator=generator)
        noise = torch.randn(rollout.x0.shape, generator=generator).to(rollout.x0)

        def micro_batches(index: torch.Tensor) -> list[WeightedBatch]:
            return [
                WeightedBatch(
                    rollout.cond.select(index),
                    rollout.x0[index],
                    steps[index],
                    noise[index],
                    weights[index],
                )
            ]

        updates = plan_minibatches(keep, minibatch_size, grad_accum_steps, 1, generator,
                                   micro_batches)  # fmt: skip
        return updates, {"weight_max": float(weights.max())}

    def loss(self, policy: Policy, batch: WeightedBatch):
        x_t = self.sampler.add_noise(batch.x0, batch.steps, batch.noise)
        times = torch.tensor([self.sampler.model_time(int(s)) for s in batch.steps])
        out = policy.predict(x_t, times.to(x_t.device), batch.cond, self.guidance)
        x0_pred = self.sampler.predict_x0(out, x_t, batch.steps)
        error = ((x0_pred.float() - batch.x0.float()) ** 2).flatten(1).mean(1)
        loss = (batch.weights * error).mean()
        return loss, {"policy_loss": float(loss.detach())}


register_algorithm(RewardWeightedConfig, f"{__name__}:RewardWeighted")
