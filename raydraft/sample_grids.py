"""Sample grids a person can read: images tiled with their prompts as captions, and the
prompts of a run's grids chosen to cover every category."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from raydraft.data.prompts import prompt_category
from raydraft.rewards.base import to_pil

SAMPLE_CELL = 128  # smallest side a sample is shown at (the toy's 32 px scaled 4x)
CAPTION_LINES = 3
GRID_COLUMNS = 6  # without categories (with them: one column per category, up to 8)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """NCHW images in [0, 1] tiled row-major into one RGB picture."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.zeros(3, rows * h, columns * w)
    for i, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    pixels = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class GridPrompts:
    """The prompts of the sample grids, their categories (None: unknown) and the grid's
    columns, fixed for a run so that every grid shows the same prompts and seeds."""

    prompts: list[str]
    categories: list[str | None]
    columns: int


def grid_prompts(prompts: list[str], metadata: list[dict[str, Any]], size: int) -> GridPrompts:
    """At least `size` prompts covering every category, the same number from each, spread
    over the category's distinct prompts, laid out one category per column (the first
    `size` prompts, cycled, when the prompts have no categories)."""
    distinct: dict[str, dict[str, None]] = {}  # category: its prompts, in order, once each
    for prompt, meta in zip(prompts, metadata, strict=True):
        category = prompt_category(prompt, meta)
        if category is None:
            return GridPrompts(
                [prompts[i % len(prompts)] for i in range(size)], [None] * size, GRID_COLUMNS
            )
        distinct.setdefault(category, {})[prompt] = None
    pools = {category: list(pool) for category, pool in distinct.items()}
    per_category = math.ceil(size / len(pools))
    rows = [
        [(pool[(i * len(pool)) // per_category], category) for category, pool in pools.items()]
        for i in range(per_category)
    ]
    chosen = [cell for row in rows for cell in row]
    columns = len(pools) if len(pools) <= 8 else GRID_COLUMNS
    return GridPrompts([p for p, _ in chosen], [c for _, c in chosen], columns)


def _wrap(text: str, font: Font, width: float, lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels in at most `lines` lines, what does not fit cut
    with …: a caption never runs into the next image."""
    wrapped: list[str] = []
    for word in text.split():
        if wrapped and font.getlength(f"{wrapped[-1]} {word}") <= width:
            wrapped[-1] += f" {word}"
        else:
            wrapped.append(word)
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], " ".join(wrapped[lines - 1 :])]
    return [_cut(line, font, width) for line in wrapped]


def _cut(line: str, font: Font, width: float) -> str:
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line + "…"


def captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    columns: int,
    headers: list[str | None] | None = None,
) -> Image.Image:
    """NCHW images in [0, 1] tiled with each image's caption (its prompt) below it and an
    optional grey header (its category) above the caption: a grid a person can read.
    Small images are scaled up by a whole factor, nearest-neighbour, so that the pixels
    the model drew stay visible instead of blurring."""
    tiles = to_pil(images)
    width, height = tiles[0].size
    factor = max(1, math.ceil(SAMPLE_CELL / min(width, height)))
    cell_w, cell_h = width * factor, height * factor
    size = max(13, cell_w // 24)
    font = ImageFont.load_default(size=size)
    line_h = round(size * 1.25)
    text_h = line_h * (CAPTION_LINES + (headers is not None)) + 6
    pad = 8
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new(
        "RGB", (pad + columns * (cell_w + pad), pad + rows * (cell_h + text_h + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        row, column = divmod(i, columns)
        x, y = pad + column * (cell_w + pad), pad + row * (cell_h + text_h + pad)
        canvas.paste(tile.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        y += cell_h + 4
        if headers is not None and headers[i]:
            draw.text((x, y), headers[i], fill=(110, 110, 110), font=font)
        y += line_h if headers is not None else 0
        for line in _wrap(captions[i], font, cell_w, CAPTION_LINES):
            draw.text((x, y), line, fill="black", font=font)
            y += line_h
    return canvas
