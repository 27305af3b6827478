"""A bucketed tensor broadcast over a process group of its own.

The learner ranks already own the default torch.distributed group (data parallel); the
full-weight sync joins learner rank 0 with every rollout worker, so it builds a standalone
gloo (CPU) or NCCL (GPU) group over its own TCPStore, as verl and OpenRLHF build their
weight-update groups. The group stays open between syncs. A state travels in buckets
(one flat buffer per bucket, one dtype each): few collectives, bounded extra memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "float32", "bfloat16", ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


Buckets = list[list[TensorSpec]]


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> Buckets:
    """Group tensors by dtype, then fill buckets of at most `bucket_bytes` (a larger
    tensor gets a bucket of its own)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, tensor in state.items():
        by_dtype.setdefault(tensor.dtype, []).append(name)
    buckets: Buckets = []
    for dtype, names in by_dtype.items():
        current: list[TensorSpec] = []
        size = 0
        for name in names:
            tensor = state[name]
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(TensorSpec(name, tuple(tensor.shape), str(dtype).removeprefix("torch.")))
            size += nbytes
        buckets.append(current)
    return buckets


class BroadcastGroup:
    """Rank 0 sends, every other rank receives; `timeout_s` bounds a dead peer's wait."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        timeout = timedelta(seconds=timeout_s)
        # The master's store must outlive the group: keep a reference.
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self.device = device
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def send(self, state: dict[str, torch.Tensor], buckets: Buckets, version: int) -> int:
        """Broadcast `version` and `state` from rank 0; returns the bytes sent."""
        self._broadcast(torch.tensor([version], device=self.device))
        sent = 0
        for bucket in buckets:
            flat = torch.cat([state[s.name].detach().reshape(-1).to(self.device) for s in bucket])
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, buckets: Buckets) -> tuple[int, dict[str, torch.Tensor]]:
        version = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(version)
        state: dict[str, torch.Tensor] = {}
        for bucket in buckets:
            dtype = getattr(torch, bucket[0].dtype)
            flat = torch.empty(sum(s.numel for s in bucket), dtype=dtype, device=self.device)
            self._broadcast(flat)
            for spec, part in zip(bucket, flat.split([s.numel for s in bucket]), strict=True):
                state[spec.name] = part.view(spec.shape)
        return int(version.item()), state

    def _broadcast(self, flat: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([flat], options).wait()
