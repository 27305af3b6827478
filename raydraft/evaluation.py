"""GenEval-style evaluation on the shapes world: per-category accuracy on held-out prompts.

Fixed prompts and seeds (the eval split, cycled per category, seeds from `EVAL_SEED`), a
deterministic ODE sampler, the rule-based checker. The same numbers for a base model and a
trained run are therefore directly comparable.
"""

from __future__ import annotations

import torch

from raydraft.data.shapes import CATEGORIES, split_specs
from raydraft.models.base import Policy
from raydraft.rewards.base import to_uint8_hwc
from raydraft.rewards.shapes_checker import check
from raydraft.sampling.loop import sample_images
from raydraft.sampling.samplers import Sampler

EVAL_SEED = 1_000_000
EVAL_BATCH = 64


def eval_prompts(per_category: int) -> list[tuple[str, str, int]]:
    """(category, prompt, seed) rows: `per_category` held-out samples per category."""
    specs = split_specs("eval")
    rows = []
    for category in CATEGORIES:
        pool = [s for s in specs if s.category == category]
        rows += [
            (category, pool[i % len(pool)].text, EVAL_SEED + len(rows) + i)
            for i in range(per_category)
        ]
    return rows


@torch.no_grad()
def evaluate(
    policy: Policy,
    sampler: Sampler,
    guidance: float,
    per_category: int = 48,
    batch_size: int = EVAL_BATCH,
) -> dict[str, dict[str, float]]:
    """{category: {"strict": accuracy, "clauses": mean clause fraction}}, plus "overall"."""
    rows = eval_prompts(per_category)
    results: dict[str, list[tuple[float, bool]]] = {c: [] for c in CATEGORIES}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, seeds = [p for _, p, _ in chunk], [s for _, _, s in chunk]
        images = to_uint8_hwc(sample_images(policy, sampler, prompts, seeds, guidance))
        for (category, prompt, _), image in zip(chunk, images, strict=True):
            results[category].append(check(image, prompt))
    table = {
        c: {
            "strict": sum(ok for _, ok in r) / len(r),
            "clauses": sum(f for f, _ in r) / len(r),
        }
        for c, r in results.items()
    }
    table["overall"] = {
        key: sum(table[c][key] for c in CATEGORIES) / len(CATEGORIES)
        for key in ("strict", "clauses")
    }
    return table


def format_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """Strict accuracy per category, one column per named result (e.g. base, trained)."""
    names = list(tables)
    lines = [f"{'category':<10}" + "".join(f"{n:>10}" for n in names)]
    for category in [*CATEGORIES, "overall"]:
        lines.append(
            f"{category:<10}" + "".join(f"{tables[n][category]['strict']:>10.3f}" for n in names)
        )
    return "\n".join(lines)
