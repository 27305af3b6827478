"""The Algorithm contract: what the trainer, the learner and the Ray layer call, the same
for every algorithm, so none of them asks which algorithm it runs.

A new algorithm is:
1. a config class (`raydraft.config.AlgorithmSection` with `name: Literal["..."]`) that
   answers `group_size` (samples per prompt) and `needs_reference` (whether the loss
   evaluates the frozen base model);
2. one module with a class that follows `Algorithm` below, its rollout and minibatch
   types (`raydraft.rows.Rows` dataclasses with `prompts` and `images`), and random draws
   from the streams of `raydraft.seeds`;
3. its line in `raydraft.config.ALGORITHMS`, or from another package a call of
   `raydraft.config.register_algorithm` in a module that the run's config lists under
   `plugins` (tests/plugins/reward_weighted.py is one, trained in the tests through both
   engines);
4. its tests.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from raydraft.config import ExperimentConfig
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Policy
from raydraft.rewards.base import Reward
from raydraft.sampling.samplers import Sampler


class Algorithm(Protocol):
    # True: black-box rewards score the rollout's images before the update (the rewards
    # live with the rollout workers, or behind Serve). False: the reward is part of
    # `loss` (DRaFT), and `build` is given it.
    scores_rollouts: ClassVar[bool]

    @classmethod
    def build(cls, cfg: ExperimentConfig, sampler: Sampler, reward: Reward | None) -> Algorithm: ...

    def rollout(self, policy: Policy, batch: PromptBatch, generator: torch.Generator) -> Any:
        """Samples for `batch` without gradients, as a `Rows` batch with `prompts` and
        `images`; `generator` is the iteration's ROLLOUT stream."""
        ...

    def recompute_behaviour(
        self, policy: Policy, micro_batches: list[Any], truncation: float
    ) -> dict[str, float]:
        """Called after `plan_updates` and before any optimizer step when a low-precision
        copy sampled the rollout, with `policy` in full precision at the rollout's version;
        also when the algorithm has `behaviour_in_rollout = False` (optional, default True:
        a rollout whose sampling weights the learner holds left the behaviour out), with
        `policy` at those weights: every micro-batch with a trailing old policy, all but the
        first step's when the trained weights sampled (that step's loss takes the behaviour
        from its own forward pass). Recompute in place, micro-batch by micro-batch (the
        shapes the loss will see, so a first ratio is exactly 1), what the loss takes from
        the sampling policy (Flow-GRPO's old log-probs, DiffusionNFT's old predictions), and
        weigh the difference (importance weights truncated at `truncation`). Returns
        statistics of the mismatch."""
        ...

    def plan_updates(
        self,
        rollout: Any,
        rewards: torch.Tensor | None,
        valid: torch.Tensor | None,
        minibatch_size: int,
        grad_accum_steps: int,
        generator: torch.Generator,
    ) -> tuple[list[list[Any]], dict[str, float]]:
        """Optimizer steps, each a list of micro-batches whose gradients are averaged, and
        statistics of the plan. `rewards` / `valid` are the rollout's black-box scores
        (None when the reward is in the loss); `generator` is the iteration's UPDATE
        stream."""
        ...

    def loss(self, policy: Policy, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss to minimise, and statistics to log."""
        ...
