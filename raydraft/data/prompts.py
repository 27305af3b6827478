"""Prompt sets and the resumable stream that turns them into per-iteration batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydraft.data.shapes import category_balanced, spec_for_prompt, split_specs
from raydraft.rows import Rows
from raydraft.seeds import sample_seeds


@dataclass
class PromptBatch(Rows):
    """Prompts of one iteration, one row per sample (a group repeats its prompt)."""

    shared = ("iteration",)

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B,) int64
    seeds: torch.Tensor  # (B,) int64
    metadata: list[dict]
    iteration: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

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


COLORS = ("red", "green", "blue", "yellow", "white", "purple")
THINGS = ("circle", "square", "triangle", "blob", "image", "picture")

PROMPT_SETS = {
    "toy-colors": [f"a {c} {t}" for c in COLORS for t in THINGS],
    "shapes-train": [s.text for s in category_balanced(split_specs("train"))],
    "shapes-eval": [s.text for s in split_specs("eval")],
}


def load_prompts(name_or_path: str) -> list[str]:
    """A registered prompt set, or a file of prompts (see `load_prompts_with_metadata`)."""
    return load_prompts_with_metadata(name_or_path)[0]


def load_prompts_with_metadata(name_or_path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, each prompt's metadata) of a registered prompt set (no metadata), a text
    file with one prompt per line (none either), or a `.jsonl` file of JSON objects, each a
    prompt's metadata with its text under "prompt" (GenEval's and flow_grpo's
    `*_metadata.jsonl`: tag, include, exclude), which rewards receive with every sample."""
    if name_or_path in PROMPT_SETS:
        prompts = list(PROMPT_SETS[name_or_path])
        return prompts, [{} for _ in prompts]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data.prompts {name_or_path!r}: not a prompt set {sorted(PROMPT_SETS)} nor a file"
        )
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"data.prompts {name_or_path!r}: the file has no prompts")
    if path.suffix != ".jsonl":
        return [line for _, line in lines], [{} for _ in lines]
    metadata = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.prompts {name_or_path!r} line {number}: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(
                f"data.prompts {name_or_path!r} line {number}: expected a JSON object with "
                'a "prompt" string'
            )
        metadata.append(record)
    return [record["prompt"] for record in metadata], metadata


def prompt_category(prompt: str, metadata: dict[str, Any]) -> str | None:
    """GenEval's metadata "tag", else the shapes world's category (None if neither)."""
    if "tag" in metadata:
        return str(metadata["tag"])
    try:
        return spec_for_prompt(prompt).category
    except KeyError:
        return None


def repeat_categories(
    prompts: list[str], metadata: list[dict[str, Any]], repeats: dict[str, int]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Each prompt of a category in `repeats` that many times (`data.category_repeats`)."""
    categories = [prompt_category(p, m) for p, m in zip(prompts, metadata, strict=True)]
    unknown = sorted(set(repeats) - set(categories))
    if unknown:
        known = sorted({c for c in categories if c is not None})
        raise ValueError(
            f"data.category_repeats: no prompt of category {', '.join(map(repr, unknown))} "
            f"in the prompts (their categories: {known or 'none'})"
        )
    times = [repeats.get(c, 1) if c is not None else 1 for c in categories]
    return (
        [p for p, n in zip(prompts, times, strict=True) for _ in range(n)],
        [m for m, n in zip(metadata, times, strict=True) for _ in range(n)],
    )


class PromptStream:
    """Epochs over a prompt list in a seeded order; its cursor is checkpointed.

    Each iteration takes `prompts_per_step` prompts, each repeated `group_size` times
    (Flow-GRPO's groups; 1 for DRaFT), each row with a copy of its prompt's metadata.
    Seeds come from (run seed, iteration, row), so an iteration is reproducible wherever it
    runs.
    """

    def __init__(
        self,
        prompts: list[str],
        prompts_per_step: int,
        group_size: int,
        seed: int,
        shuffle: bool,
        metadata: list[dict[str, Any]] | None = None,
    ) -> None:
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"{len(metadata)} metadata records for {len(prompts)} prompts")
        self.prompts = prompts
        self.metadata = metadata or [{} for _ in prompts]
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
        self.iteration += 1
        return PromptBatch(
            prompts=[self.prompts[i] for i in rows],
            prompt_ids=torch.tensor(rows, dtype=torch.long),
            seeds=sample_seeds(self.seed, self.iteration - 1, len(rows)),
            metadata=[dict(self.metadata[i]) for i in rows],
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
