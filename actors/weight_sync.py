"""Versioned weight broadcast from learner rank 0 to the rollout workers.

States travel through the object store as NumPy arrays: one `ray.put`, and each worker on
the node maps it without a copy (torch tensors pickle about 10x slower,
../shared/research/env-ray.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch


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


class WeightSync:
    """Publishes each new version once; remembers the newest for restarted workers."""

    def __init__(self) -> None:
        self.latest: ray.ObjectRef | None = None
        self.version = -1
        self.last_bytes = 0
        self.last_seconds = 0.0

    def publish(self, message: WeightsMessage, workers: list) -> list[ray.ObjectRef]:
        """Send `message` to every worker; returns the acknowledgements to wait on."""
        start = time.perf_counter()
        self.latest = ray.put(message)
        self.version = message.version
        self.last_bytes = message.nbytes
        acks = [w.set_weights.remote(self.latest) for w in workers]
        self.last_seconds = time.perf_counter() - start
        return acks

    def send_latest(self, worker) -> ray.ObjectRef:
        if self.latest is None:
            raise RuntimeError("no weights were published yet")
        return worker.set_weights.remote(self.latest)
