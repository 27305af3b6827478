"""What every algorithm takes and gives: prompt batches in, optimizer-step plans out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """Prompts of one iteration, one row per sample (a group repeats its prompt)."""

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B,) int64
    seeds: torch.Tensor  # (B,) int64
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.prompts)


def split_minibatches(
    num_samples: int, minibatch_size: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Index sets of at most `minibatch_size`, shuffled when a generator is given."""
    order = (
        torch.randperm(num_samples, generator=generator)
        if generator is not None
        else torch.arange(num_samples)
    )
    return list(order.split(minibatch_size))


def group(items: list, size: int) -> list[list]:
    """Consecutive groups of `size` (the last may be shorter): micro-batches per optimizer step."""
    return [items[i : i + size] for i in range(0, len(items), size)]
