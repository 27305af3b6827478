"""LearnerGroup: N learner actors, data-parallel through torch.distributed.

Every rank gets the whole rollout (one object-store copy per node) and takes its slice of
each micro-batch (`raydraft.learner.Learner`); gradients are summed with gloo on CPU or
NCCL on GPU, so every rank applies the same update and rank 0 speaks for the group.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raydraft.build import algorithm_class, build_algorithm, build_policy
from raydraft.config import ExperimentConfig, build_config
from raydraft.learner import Learner
from raydraft.rewards.registry import build_reward
from raydraft.rollout import RolloutResult
from raydraft.sharding import gather
from raydraft.threads import CoreShare
from raydraft_ray.broadcast_group import BroadcastGroup, Buckets, plan_buckets
from raydraft_ray.cluster import rendezvous_address, wait_for_start
from raydraft_ray.reward_serving import remote_reward
from raydraft_ray.weight_sync import WeightsMessage, to_message


class LearnerActor:
    def __init__(self, cfg: dict, rank: int, world_size: int) -> None:
        self.cfg = build_config(cfg, "the driver's config")
        ray_cfg = self.cfg.ray
        self.threads = CoreShare.for_setting(self.cfg.torch_threads)
        torch.manual_seed(self.cfg.seed)
        policy = build_policy(self.cfg.model, self.cfg.algorithm.needs_reference)
        # DRaFT's differentiable reward is part of the loss: here, or served with gradients.
        reward = None
        if not algorithm_class(self.cfg).scores_rollouts:
            serving = ray_cfg.reward_serving
            reward = (
                remote_reward(self.cfg.rewards, serving, differentiable=True)
                if serving.serve_draft_rewards
                else build_reward(self.cfg.rewards)
            )
        algorithm = build_algorithm(self.cfg, policy, reward)
        self.rank, self.world_size = rank, world_size
        self.make_learner = partial(Learner, self.cfg, policy, algorithm, rank, world_size)
        # With several ranks the Learner is made once the process group is up (FSDP
        # shards over it).
        self.learner = self.make_learner() if world_size == 1 else None
        self.weight_group: BroadcastGroup | None = None  # rank 0: the full-weight broadcast
        self.buckets: Buckets = []

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def init_process_group(self, host: str, port: int) -> None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        self.learner = self.make_learner()

    def update(self, result: RolloutResult) -> dict[str, float]:
        with self.threads.working() as threads:
            return self.learner.update(result) | {"torch_threads": float(threads)}

    # Under FSDP the methods below gather the sharded state, a collective: the group calls
    # them on every rank (`LearnerGroup.leader`) and only rank 0 answers.
    @property
    def answers(self) -> bool:
        return self.learner.rank == 0 or not self.learner.sharded

    def weights(self) -> WeightsMessage | None:
        """The weights rollouts sample with (the trailing old policy when kept)."""
        with self.learner.sampling_weights():
            return self._message()

    def _message(self) -> WeightsMessage | None:
        policy = self.learner.policy
        state = policy.trainable_state()
        return to_message(policy.version, state) if self.answers else None

    def weight_buckets(self, bucket_bytes: int) -> Buckets | None:
        state = self.learner.policy.trainable_state()
        if self.learner.rank != 0:
            return None
        self.buckets = plan_buckets(state, bucket_bytes)
        return self.buckets

    def open_weight_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        if self.learner.rank != 0:
            return
        self.weight_group = None  # a broken group first closes its connections
        device = self.learner.policy.device
        self.weight_group = BroadcastGroup(host, port, 0, world_size, device, timeout_s)

    def send_weights(self) -> int | None:
        """Broadcast the sampling weights (and their version) to the workers: bytes sent."""
        policy = self.learner.policy
        with self.learner.sampling_weights():
            state = policy.trainable_state()
        if self.learner.rank != 0:
            return None
        try:
            sent = self.weight_group.send(state, self.buckets, policy.version)
        except BaseException:
            self.weight_group = None  # a member failed: the group is unusable
            raise
        return sent

    def inference_weights(self) -> WeightsMessage | None:
        """The weights to sample with for evaluation: the EMA shadow when kept."""
        with self.learner.inference_weights():
            return self._message()

    def state(self) -> tuple[dict[str, Any], dict[str, Any], int] | None:
        tensors, optimizer = self.learner.state()
        return (tensors, optimizer, self.learner.policy.version) if self.answers else None

    def last_gradients(self) -> list[torch.Tensor] | None:
        """The gradients of the last optimizer step, as applied (summed over ranks)."""
        grads = [gather(p.grad).clone() for p in self.learner.params]
        return grads if self.answers else None

    def load_state(self, tensors: dict[str, Any], optimizer: dict[str, Any], version: int) -> None:
        self.learner.load_state(tensors, optimizer, version)

    def offload(self) -> None:
        self.learner.move_to("cpu")

    def onload(self) -> None:
        self.learner.move_to(self.learner.policy.device)

    def pid(self) -> int:
        return os.getpid()


class AllRanks:
    """`.method.remote(*args)` on every actor in order; returns the first one's ref."""

    def __init__(self, actors: list) -> None:
        self.actors = actors

    def __getattr__(self, method: str) -> _AllRanksMethod:
        return _AllRanksMethod(self.actors, method)


class _AllRanksMethod:
    def __init__(self, actors: list, method: str) -> None:
        self.actors, self.method = actors, method

    def remote(self, *args: Any) -> ray.ObjectRef:
        refs = [getattr(a, self.method).remote(*args) for a in self.actors]
        return refs[0]


class LearnerGroup:
    """The learner ranks in one placement group, driven as one."""

    def __init__(self, cfg: ExperimentConfig, actor_class: type = LearnerActor) -> None:
        ray_cfg = cfg.ray
        n = ray_cfg.learners
        bundle = {"CPU": ray_cfg.learner_cpus}
        if ray_cfg.learner_gpus:
            bundle["GPU"] = ray_cfg.learner_gpus
        if ray_cfg.placement == "colocated":  # room for rollout worker i in bundle i
            bundle["CPU"] += ray_cfg.worker_cpus
            if ray_cfg.worker_gpus:
                bundle["GPU"] = bundle.get("GPU", 0.0) + ray_cfg.worker_gpus
        self.placement = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        try:
            wait_for_start(
                [self.placement.ready()], f"{n} learner(s) of {bundle}", ray_cfg.startup_timeout_s
            )
        except RuntimeError:
            remove_placement_group(self.placement)
            raise
        self.sharded = cfg.learner.fsdp and n > 1
        cfg_dict = cfg.model_dump(mode="json")
        self.actors = [
            ray.remote(actor_class)
            .options(
                num_cpus=ray_cfg.learner_cpus,
                num_gpus=ray_cfg.learner_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, i),
            )
            .remote(cfg_dict, i, n)
            for i in range(n)
        ]
        if n > 1:
            host, port = ray.get(self.actors[0].address.remote())
            ray.get([a.init_process_group.remote(host, port) for a in self.actors])

    @property
    def leader(self):
        """Rank 0's handle; under FSDP a stand-in that calls every rank (gathering a
        sharded state is a collective) and answers with rank 0's result."""
        return AllRanks(self.actors) if self.sharded else self.actors[0]

    def update(self, result: ray.ObjectRef | RolloutResult) -> dict[str, float]:
        return ray.get([a.update.remote(result) for a in self.actors])[0]

    def load_state(self, tensors: dict[str, Any], optimizer: dict[str, Any], version: int) -> None:
        ray.get([a.load_state.remote(tensors, optimizer, version) for a in self.actors])

    def offload(self) -> None:
        ray.get([a.offload.remote() for a in self.actors])

    def onload(self) -> None:
        ray.get([a.onload.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement)
