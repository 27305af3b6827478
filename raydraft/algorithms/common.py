"""What every algorithm takes and gives: prompt batches in, optimizer-step plans out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def split_minibatches(
    num_samples: int, minibatch_size: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Index sets of at most `minibatch_size`, shuffled when a generator is given; none for
    no samples (torch would give one empty set)."""
    if num_samples == 0:
        return []
    order = (
        torch.randperm(num_samples, generator=generator)
        if generator is not None
        else torch.arange(num_samples)
    )
    return list(order.split(minibatch_size))


def optimizer_steps(micro_batches: list, size: int) -> list[list]:
    """Consecutive runs of `size` micro-batches (the last may be shorter), one per optimizer
    step."""
    return [micro_batches[i : i + size] for i in range(0, len(micro_batches), size)]


def plan_minibatches(
    rows: torch.Tensor,
    minibatch_size: int,
    grad_accum_steps: int,
    epochs: int,
    generator: torch.Generator,
    micro_batches: Callable[[torch.Tensor], list[T]],
) -> list[list[T]]:
    """Optimizer steps over shuffled minibatches of `rows`, `epochs` times: each minibatch
    gives the micro-batches `micro_batches(its rows)`, and `grad_accum_steps` minibatches
    make one optimizer step."""
    updates: list[list[T]] = []
    for _ in range(epochs):
        micro = [
            micro_batches(rows[part])
            for part in split_minibatches(len(rows), minibatch_size, generator)
        ]
        updates += [
            [b for mb in chunk for b in mb] for chunk in optimizer_steps(micro, grad_accum_steps)
        ]
    return updates
