"""What every algorithm takes and gives: prompt batches in, optimizer-step plans out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

ROLLOUT_STREAM = 0  # the iteration's rollout choices (SDE window, DRaFT truncation)
UPDATE_STREAM = 1  # the iteration's minibatch shuffling


@dataclass
class PromptBatch:
    """Prompts of one iteration, one row per sample (a group repeats its prompt)."""

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B,) int64
    seeds: torch.Tensor  # (B,) int64
    metadata: list[dict]
    iteration: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> PromptBatch:
        rows = index.tolist()
        return PromptBatch(
            prompts=[self.prompts[i] for i in rows],
            prompt_ids=self.prompt_ids[index],
            seeds=self.seeds[index],
            metadata=[self.metadata[i] for i in rows],
            iteration=self.iteration,
        )

    def groups(self) -> list[torch.Tensor]:
        """Row indices of each group (a run of one prompt id), in order."""
        ids = self.prompt_ids
        starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
        bounds = [*starts, len(ids)]
        return [torch.arange(bounds[i], bounds[i + 1]) for i in range(len(starts))]

    def split(self, parts: int) -> list[PromptBatch]:
        """At most `parts` batches of whole groups, in order."""
        runs = self.groups()
        chunks = np.array_split(np.arange(len(runs)), min(parts, len(runs)))
        return [self.select(torch.cat([runs[i] for i in chunk])) for chunk in chunks]

    def group_first_seeds(self) -> list[int]:
        """Each row's seed replaced by its group's first: one initial noise per group, the
        same wherever the batch is split (only ever between groups)."""
        return [int(self.seeds[run[0]]) for run in self.groups() for _ in run]


def iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    """The generator for one purpose of one iteration: wherever an iteration runs (this
    process, a rollout worker, a learner rank, a resumed run) it draws the same numbers."""
    state = np.random.SeedSequence([int(seed) % 2**63, iteration, stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


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


def group(items: list, size: int) -> list[list]:
    """Consecutive groups of `size` (the last may be shorter): micro-batches per optimizer step."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def rows_of_clean_groups(prompt_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose whole group kept its reward. A dropped (bad) reward takes its
    group with it, since the group's baseline would be wrong without it."""
    return ~torch.isin(prompt_ids, torch.unique(prompt_ids[~valid]))


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
        updates += [[b for mb in chunk for b in mb] for chunk in group(micro, grad_accum_steps)]
    return updates
