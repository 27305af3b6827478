"""RolloutWorker: a policy copy that turns prompt batches into (scored) rollouts.

Weights arrive two ways (`raydraft_ray.weight_sync`): `set_weights` in call order with the
batches (object store), or `receive_weights` on the worker's weights thread (broadcast
group), staged and applied before the next batch: a sample is never resumed halfway
under new weights.
"""

from __future__ import annotations

import os
import threading

import ray
import torch

from raydraft.build import build_algorithm, build_policy, explorer, rollout_copy
from raydraft.config import build_config
from raydraft.data.prompts import PromptBatch
from raydraft.offload import move_policy, release_cached_memory
from raydraft.rollout import RolloutResult, generate
from raydraft.threads import CoreShare
from raydraft_ray.broadcast_group import BroadcastGroup, Buckets
from raydraft_ray.reward_serving import remote_reward
from raydraft_ray.weight_sync import WEIGHTS_GROUP, WeightsMessage, from_message


class StaleWeightsError(RuntimeError):
    """The worker's weights are older than the staleness bound allows for this batch."""


class RolloutWorker:
    def __init__(self, cfg: dict, index: int) -> None:
        self.cfg = build_config(cfg, "the driver's config")
        ray_cfg = self.cfg.ray
        self.threads = CoreShare.for_setting(self.cfg.torch_threads)
        self.index = index
        self.policy = build_policy(self.cfg.model)
        self.algorithm = build_algorithm(self.cfg, self.policy, None)
        self.low_precision = rollout_copy(self.cfg)
        self.explorer = explorer(self.cfg)
        scores = self.algorithm.scores_rollouts or self.explorer is not None
        self.reward = remote_reward(self.cfg.rewards, ray_cfg.reward_serving) if scores else None
        self.weight_group: BroadcastGroup | None = None
        self.buckets: Buckets = []
        self.staged: tuple[int, dict[str, torch.Tensor]] | None = None
        self.weights_arrived = threading.Condition()

    def set_weights(self, message: WeightsMessage) -> int:
        self.policy.load_trainable(from_message(message), message.version)
        return message.version

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def open_weight_group(
        self, host: str, port: int, rank: int, world_size: int, buckets: Buckets, timeout_s: float
    ) -> None:
        self.weight_group = None  # a broken group first closes its connections
        self.buckets = buckets
        device = self.policy.device
        self.weight_group = BroadcastGroup(host, port, rank, world_size, device, timeout_s)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def receive_weights(self) -> int:
        if self.weight_group is None:
            raise RuntimeError(f"worker {self.index} has no open weight group")
        try:
            version, state = self.weight_group.receive(self.buckets)
        except BaseException:
            self.weight_group = None
            raise
        with self.weights_arrived:
            self.staged = (version, state)
            self.weights_arrived.notify_all()
        return version

    def generate(self, batch: PromptBatch, min_version: int) -> RolloutResult:
        self._apply_staged_weights(min_version)
        if self.policy.version < min_version:
            raise StaleWeightsError(
                f"worker {self.index} holds version {self.policy.version}, "
                f"the batch of iteration {batch.iteration} needs >= {min_version}"
            )
        drop = self.cfg.rewards.on_bad_reward == "drop"
        with self.threads.working() as threads:
            result = generate(
                self.algorithm, self.policy, self.reward, batch, self.cfg.seed, drop,
                self.low_precision, self.explorer,
            )  # fmt: skip
        result.stats["torch_threads_rollout"] = float(threads)
        return result

    def _apply_staged_weights(self, min_version: int) -> None:
        """Take the newest staged weights, waiting a while for `min_version` if a
        broadcast is still arriving."""
        with self.weights_arrived:
            if self.weight_group is not None:
                self.weights_arrived.wait_for(
                    lambda: (
                        self.policy.version >= min_version
                        or (self.staged is not None and self.staged[0] >= min_version)
                    ),
                    timeout=self.cfg.ray.weight_sync_timeout_s,
                )
            staged, self.staged = self.staged, None
        if staged is not None and staged[0] > self.policy.version:
            self.policy.load_trainable(staged[1], staged[0])

    def offload(self) -> None:
        move_policy(self.policy, "cpu")
        release_cached_memory()

    def onload(self) -> None:
        move_policy(self.policy, self.policy.device)

    def version(self) -> int:
        return self.policy.version

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def pid(self) -> int:
        return os.getpid()
