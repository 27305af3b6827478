"""Versioned weight sync from learner rank 0 to the rollout workers, two transports.

`ObjectStoreSync` (LoRA states; anything on CPU): one `ray.put` of NumPy arrays per
version, which each worker on a node maps without a copy (torch tensors are pickled
instead, about ten times slower); a restarted worker is sent the newest object.

`CollectiveSync` (full weights on GPUs, GBs): a broadcast group of the leader and every
worker (`raydraft_ray.broadcast_group`), opened once and kept; a version travels in buckets,
GPU to GPU under NCCL. Workers receive on a thread of their own and apply the new weights
before their next batch, so a sync never waits for sampling in flight. A member that dies
breaks the group for everyone: the engine restarts it and `catch_up` reopens the group
and sends the newest version again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

from raydraft.config import ExperimentConfig
from raydraft_ray.broadcast_group import Buckets
from raydraft_ray.cluster import WORKER_FAILURES, failed_calls

# Rollout workers handle weight traffic here, beside the batch they are sampling.
WEIGHTS_GROUP = "weights"


@dataclass
class WeightsMessage:
    version: int
    state: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())


def to_message(version: int, state: dict[str, torch.Tensor]) -> WeightsMessage:
    return WeightsMessage(version, {k: v.detach().cpu().numpy() for k, v in state.items()})


def from_message(message: WeightsMessage) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in message.state.items()}


class ObjectStoreSync:
    """Publishes each new version once; remembers the newest for restarted workers."""

    def __init__(self) -> None:
        self.latest: ray.ObjectRef | None = None
        self.last_bytes = 0

    def open(self, leader, workers: list) -> list[ray.ObjectRef]:
        return []

    def publish(self, leader, workers: list) -> list[ray.ObjectRef]:
        """Send the leader's weights to every worker; returns the acknowledgements."""
        message = ray.get(leader.weights.remote())
        self.latest = ray.put(message)
        self.last_bytes = message.nbytes
        return [w.set_weights.remote(self.latest) for w in workers]

    def catch_up(self, leader, workers: list, revived: list[int]) -> list[int]:
        """Send the newest version to the `revived` workers; returns those that failed."""
        if self.latest is None:
            raise RuntimeError("no weights were published yet")
        calls = [workers[index].set_weights.remote(self.latest) for index in revived]
        return [revived[i] for i in failed_calls(calls)]


class BroadcastFailed(RuntimeError):
    """A member of the broadcast group failed during a sync."""


class CollectiveSync:
    def __init__(self, bucket_mb: float, timeout_s: float) -> None:
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.buckets: Buckets | None = None
        self.last_bytes = 0

    def open(self, leader, workers: list) -> list[ray.ObjectRef]:
        """(Re)build the group of the leader (rank 0) and every worker; returns the calls
        that complete once all members have joined."""
        if self.buckets is None:
            self.buckets = ray.get(leader.weight_buckets.remote(self.bucket_bytes))
        host, port = ray.get(leader.address.remote())
        world = len(workers) + 1
        joins = [leader.open_weight_group.remote(host, port, world, self.timeout_s)]
        for rank, worker in enumerate(workers, start=1):
            joins.append(
                worker.open_weight_group.remote(
                    host, port, rank, world, self.buckets, self.timeout_s
                )
            )
        return joins

    def publish(self, leader, workers: list) -> list[ray.ObjectRef]:
        """Broadcast the leader's weights; raises `BroadcastFailed` when a member failed
        (the group is then closed: `catch_up` reopens it)."""
        acks = [w.receive_weights.remote() for w in workers]
        try:
            self.last_bytes = ray.get(leader.send_weights.remote())
        except ray.exceptions.RayTaskError as error:
            raise BroadcastFailed(str(error)) from error
        return acks

    def catch_up(self, leader, workers: list, revived: list[int]) -> list[int]:
        """Rebuild the group with every worker (the `revived` ones joining anew) and send
        the newest version to all; returns the workers that failed meanwhile (empty: done)."""
        try:
            ray.get(self.open(leader, workers), timeout=self.timeout_s)
            ray.get(self.publish(leader, workers), timeout=self.timeout_s)
        except (
            *WORKER_FAILURES,
            BroadcastFailed,
            ray.exceptions.RayTaskError,  # a member's side of the rendezvous or broadcast
            ray.exceptions.GetTimeoutError,
        ):
            dead = unresponsive(workers, self.timeout_s)
            if not dead:
                raise
            return dead
        return []


def unresponsive(workers: list, timeout_s: float) -> list[int]:
    """Indices of the workers that do not answer a ping (on their weights thread)."""
    return failed_calls([w.pid.remote() for w in workers], timeout_s)


def weight_sync_for(cfg: ExperimentConfig) -> ObjectStoreSync | CollectiveSync:
    r = cfg.ray
    if r.weight_sync == "object_store":
        return ObjectStoreSync()
    return CollectiveSync(r.weight_bucket_mb, r.weight_sync_timeout_s)
