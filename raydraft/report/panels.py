"""The report's panels: the charts that the rows of metrics.jsonl give, and for what a run
did not record a note saying so (a single-process run has no weight sync), so a reader
tells "absent" from "zero".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from raydraft.metrics import METRICS
from raydraft.report.charts import Series, format_value, line_chart, stacked_chart

Rows = Sequence[dict[str, Any]]
ROW_METRICS = [m for m in METRICS if m.key and not m.labels]  # one series per row key
HELP = {m.key: m.help for m in ROW_METRICS}
UNIT = {m.key: m.unit for m in ROW_METRICS if m.unit in ("s", "bytes")}
# The parts of an iteration's wall time, in the order they happen.
STAGES = {
    "time_explore_s": "explore",
    "time_rollout_s": "rollout",
    "time_reward_s": "reward",
    "time_update_s": "update",
    "swap_s": "swap",
    "weight_sync_s": "weight sync",
    "time_requantize_s": "requantize",
}
SYNC = ("staleness", "rollouts_in_flight", "policy_version", "weight_sync_s", "weight_sync_bytes")


@dataclass(frozen=True)
class Figure:
    title: str
    image: Image.Image | None = None
    note: str = ""  # under the chart, or in its place when there is none


def column(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that recorded `key` as a number."""
    pairs = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def constant(values: Sequence[float]) -> bool:
    return len(set(values)) == 1


def recorded_keys(rows: Rows) -> list[str]:
    """Every numeric key of the rows but "step", in first-seen order."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, int | float))
    keys.pop("step", None)
    return list(keys)


def reward_chart(rows: Rows, title: str, part: str = "") -> Image.Image:
    """reward_mean ± reward_std per step (of the component `part`, "/NAME", if given) with
    its moving average (the total's is also reward_curve.png)."""
    steps, means = column(rows, f"reward_mean{part}")
    std = dict(zip(*column(rows, f"reward_std{part}"), strict=True))
    band = [std.get(s, math.nan) for s in steps] if std else None
    return line_chart(title, [Series(f"reward_mean{part}", steps, means, band, smooth=True)])


def reward_figures(rows: Rows, reward_name: str) -> list[Figure]:
    """The total reward and, for a weighted sum (or a reward with details), each part's
    mean ± std on its own scale."""
    if not column(rows, "reward_mean")[0]:
        return [Figure("Reward", note="no reward_mean recorded in this run")]
    figures = [
        Figure(
            f"Mean reward ({reward_name}) with ± one std of the iteration's samples",
            reward_chart(rows, f"reward_mean ({reward_name})"),
        )
    ]
    for key in recorded_keys(rows):
        if key.startswith("reward_mean/"):
            chart = reward_chart(rows, key, key.removeprefix("reward_mean"))
            figures.append(Figure(f"{key}: its mean ± std over the iteration's samples", chart))
    return figures


def stage_table(rows: Rows) -> list[tuple[str, float, float]]:
    """(stage, mean seconds per iteration, share of the mean step time) of each stage
    recorded; shares may add up past 1 where stages overlap (async Ray runs)."""
    step = column(rows, "time_step_s")[1]
    mean_step = sum(step) / len(step) if step else math.nan
    table = []
    for key, stage in STAGES.items():
        values = column(rows, key)[1]
        if values:
            mean = sum(values) / len(values)
            table.append((stage, mean, mean / mean_step if mean_step else math.nan))
    return table


def throughput_figures(rows: Rows) -> list[Figure]:
    steps, rate = column(rows, "images_per_s")
    figures = []
    if steps:
        chart = line_chart("images_per_s", [Series("images_per_s", steps, rate, smooth=True)])
        figures.append(Figure("Throughput: " + HELP["images_per_s"].lower(), chart))
    all_steps = [float(r["step"]) for r in rows]
    layers = {
        stage: [float(r.get(key, 0.0)) for r in rows]
        for key, stage in STAGES.items()
        if column(rows, key)[0]
    }
    if layers:
        total = Series("step (wall)", *column(rows, "time_step_s"))
        chart = stacked_chart("seconds per iteration", all_steps, layers, total, "s")
        figures.append(
            Figure("Where an iteration's time goes (rollout and reward summed over workers)", chart)
        )
    return figures or [Figure("Throughput", note="no timings recorded in this run")]


def sync_figures(rows: Rows, single_process: bool) -> list[Figure]:
    """Staleness, batches in flight, versions and weight sync: a chart where they vary, a
    line of text where they are constant or were not recorded."""
    why = " (single-process run)" if single_process else ""
    figures = []
    for key in SYNC:
        steps, values = column(rows, key)
        if not steps:
            figures.append(Figure(key, note=f"{key}: not recorded in this run{why}"))
        elif key == "policy_version" and values == steps:
            figures.append(Figure(key, note=f"{key}: equal to the step (one version per step)"))
        elif constant(values):
            value = format_value(values[0], UNIT.get(key, ""))
            figures.append(Figure(key, note=f"{key}: {value} at every step ({len(steps)} steps)"))
        else:
            series = Series(key, steps, values, smooth=key != "policy_version")
            figures.append(Figure(HELP.get(key, key), line_chart(key, [series], UNIT.get(key, ""))))
    return figures


def other_figures(rows: Rows, shown: set[str]) -> tuple[list[Figure], dict[str, float]]:
    """The remaining metrics: a chart for each that varies, and {key: value} of those
    that stayed constant (a learning rate, a batch size)."""
    figures, constants = [], {}
    for key in recorded_keys(rows):
        if key in shown or key.startswith(("reward_mean/", "reward_std/")):
            continue
        steps, values = column(rows, key)
        if constant(values):
            constants[key] = values[0]
            continue
        chart = line_chart(key, [Series(key, steps, values, smooth=True)], UNIT.get(key, ""))
        figures.append(Figure(HELP.get(key, key), chart))
    return figures, constants


def shown_keys() -> set[str]:
    """The keys the reward, throughput and sync panels already show."""
    return {"reward_mean", "reward_std", "images_per_s", "time_step_s", *STAGES, *SYNC}
