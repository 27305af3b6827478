"""RolloutWorker: a policy copy that turns prompt batches into (scored) rollouts."""

from __future__ import annotations

import os

import torch

from actors.cluster import actor_threads
from actors.reward_serving import remote_reward
from actors.weight_sync import WeightsMessage, from_message
from raydraft.algorithms.common import PromptBatch
from raydraft.build import build_algorithm, build_policy
from raydraft.config import ExperimentConfig
from raydraft.rollout import RolloutResult, generate


class StaleWeightsError(RuntimeError):
    """The worker's weights are older than the staleness bound allows for this batch."""


class RolloutWorker:
    def __init__(self, cfg: dict, index: int) -> None:
        self.cfg = ExperimentConfig.model_validate(cfg)
        ray_cfg = self.cfg.ray
        torch.set_num_threads(actor_threads(ray_cfg.worker_cpus, ray_cfg.torch_threads))
        self.index = index
        self.policy = build_policy(self.cfg.model)
        self.algorithm = build_algorithm(self.cfg, self.policy, None)
        self.reward = (
            remote_reward(self.cfg.rewards, ray_cfg.reward_serving)
            if self.algorithm.scores_rollouts
            else None
        )

    def set_weights(self, message: WeightsMessage) -> int:
        self.policy.load_trainable(from_message(message), message.version)
        return message.version

    def generate(self, batch: PromptBatch, min_version: int) -> RolloutResult:
        if self.policy.version < min_version:
            raise StaleWeightsError(
                f"worker {self.index} holds version {self.policy.version}, "
                f"the batch of iteration {batch.iteration} needs >= {min_version}"
            )
        drop = self.cfg.rewards.on_bad_reward == "drop"
        return generate(self.algorithm, self.policy, self.reward, batch, self.cfg.seed, drop)

    def version(self) -> int:
        return self.policy.version

    def pid(self) -> int:
        return os.getpid()
