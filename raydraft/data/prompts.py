"""Prompt sets and the resumable stream that turns them into per-iteration batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raydraft.algorithms.common import PromptBatch
from raydraft.data.shapes import category_balanced, split_specs

COLORS = ("red", "green", "blue", "yellow", "white", "purple")
THINGS = ("circle", "square", "triangle", "blob", "image", "picture")

PROMPT_SETS = {
    "toy-colors": [f"a {c} {t}" for c in COLORS for t in THINGS],
    "shapes-train": [s.text for s in category_balanced(split_specs("train"))],
    "shapes-eval": [s.text for s in split_specs("eval")],
}


def load_prompts(name_or_path: str) -> list[str]:
    """A registered prompt set, or a text file with one prompt per line."""
    if name_or_path in PROMPT_SETS:
        return list(PROMPT_SETS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data.prompts {name_or_path!r}: not a prompt set {sorted(PROMPT_SETS)} nor a file"
        )
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts {name_or_path!r}: the file has no prompts")
    return prompts


class PromptStream:
    """Epochs over a prompt list in a seeded order; its cursor is checkpointed.

    Each iteration takes `prompts_per_step` prompts, each repeated `group_size` times
    (Flow-GRPO's groups; 1 for DRaFT). Seeds come from (run seed, iteration, row), so an
    iteration is reproducible wherever it runs.
    """

    def __init__(
        self, prompts: list[str], prompts_per_step: int, group_size: int, seed: int, shuffle: bool
    ) -> None:
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self.iteration = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        return torch.randperm(
            len(self.prompts), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()

    def next_batch(self) -> PromptBatch:
        ids: list[int] = []
        while len(ids) < self.prompts_per_step:
            order = self._order()
            take = order[self.cursor : self.cursor + self.prompts_per_step - len(ids)]
            ids += take
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        rows = [i for i in ids for _ in range(self.group_size)]
        seeds = np.random.SeedSequence([self.seed, self.iteration]).generate_state(len(rows))
        self.iteration += 1
        return PromptBatch(
            prompts=[self.prompts[i] for i in rows],
            prompt_ids=torch.tensor(rows, dtype=torch.long),
            seeds=torch.tensor(seeds.astype(np.int64) >> 1, dtype=torch.long),
            metadata=[{} for _ in rows],
            iteration=self.iteration - 1,
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.iteration = (
            state["epoch"],
            state["cursor"],
            state["iteration"],
        )
