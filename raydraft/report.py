"""Pictures a person looks at: the reward curve, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def reward_curve(steps: list[int], rewards: list[float], path: str | Path, title: str) -> Path:
    """A line plot of reward against step, with a moving average over ~5% of the run."""
    points = [(s, r) for s, r in zip(steps, rewards, strict=True) if math.isfinite(r)]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 12), title, fill="black")
    if len(points) >= 2:
        xs, ys = zip(*points, strict=True)
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-9
        x_max = max(max(xs), 1)

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            return (
                MARGIN + (WIDTH - 2 * MARGIN) * x / x_max,
                HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (y - lo) / (hi - lo),
            )

        draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="grey")
        draw.line([to_pixel(x, y) for x, y in points], fill=(160, 190, 230), width=1)
        window = max(1, len(ys) // 20)
        smooth = [
            sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
            for i in range(len(ys))
        ]
        draw.line(
            [to_pixel(x, y) for x, y in zip(xs, smooth, strict=True)], fill=(20, 60, 160), width=3
        )
        draw.text((4, MARGIN - 6), f"{hi:.3f}", fill="black")
        draw.text((4, HEIGHT - MARGIN - 6), f"{lo:.3f}", fill="black")
        draw.text((WIDTH - MARGIN - 20, HEIGHT - MARGIN + 8), f"step {x_max}", fill="black")
    path = Path(path)
    image.save(path)
    return path
