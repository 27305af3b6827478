"""`toy-geneval`: a GenEval-style rule-based checker for the shapes world. Black-box.

Detection: each pixel takes its nearest palette colour (black included); connected
components per colour of at least `MIN_AREA` pixels are objects; the fill of the bounding
box tells the shape (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2). Scoring: the prompt's
clauses (exact object count, each named object present with its colour, the relation)
give a dense score, the fraction satisfied, and a strict one, all satisfied (GenEval's
accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy import ndimage

from raydraft.data.shapes import COLORS, PromptSpec, spec_for_prompt
from raydraft.rewards.base import to_uint8_hwc
from raydraft.rewards.registry import register_reward

MIN_AREA = 10
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.64
RELATION_MARGIN = 2.0
_PALETTE = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)
_NAMES = [None, *COLORS]


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float
    cy: float
    area: int


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an HWC image (uint8 or float in [0, 1])."""
    pixels = image.astype(np.float32) * (255 if image.dtype != np.uint8 else 1)
    nearest = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    found = []
    for index in range(1, len(_PALETTE)):
        labels, count = ndimage.label(nearest == index)
        for label in range(1, count + 1):
            ys, xs = np.nonzero(labels == label)
            if len(xs) < MIN_AREA:
                continue
            box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
            fill = len(xs) / box
            shape = (
                "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
            )
            found.append(Detection(_NAMES[index], shape, xs.mean(), ys.mean(), len(xs)))
    return found


class SceneObject(Protocol):
    """A detected object, or one from a scene's layout (exact labels for learned rewards)."""

    color: str
    shape: str
    cx: float
    cy: float


def _relation(a: SceneObject, b: SceneObject, relation: str) -> bool:
    return {
        "left of": b.cx - a.cx > RELATION_MARGIN,
        "right of": a.cx - b.cx > RELATION_MARGIN,
        "above": b.cy - a.cy > RELATION_MARGIN,
        "below": a.cy - b.cy > RELATION_MARGIN,
    }[relation]


def clauses(spec: PromptSpec, found: Sequence[SceneObject]) -> list[bool]:
    """The prompt's checks on a scene's objects (detected, or laid out)."""
    result = [len(found) == len(spec.shapes)]
    if spec.category == "counting":
        result.append(sum(d.shape == spec.shapes[0] for d in found) == len(spec.shapes))
        return result
    matches = [
        [i for i, d in enumerate(found) if d.shape == shape and color in (None, d.color)]
        for color, shape in zip(spec.colors, spec.shapes, strict=True)
    ]
    result += [bool(m) for m in matches]
    if spec.relation:
        a, b = matches
        result.append(
            any(i != j and _relation(found[i], found[j], spec.relation) for i in a for j in b)
        )
    return result


def check(image: np.ndarray, prompt: str) -> tuple[float, bool]:
    """(fraction of clauses satisfied, all satisfied)."""
    ok = clauses(spec_for_prompt(prompt), detect(image))
    return sum(ok) / len(ok), all(ok)


@register_reward("toy-geneval")
class ShapesChecker:
    """Clause fraction (dense, the default) or strict 0/1 (`strict: true`)."""

    differentiable = False

    def __init__(self, strict: bool = False) -> None:
        self.name = "toy-geneval"
        self.strict = strict

    def score(self, images, prompts, metadata) -> torch.Tensor:
        arrays = to_uint8_hwc(images)
        results = [check(a, p) for a, p in zip(arrays, prompts, strict=True)]
        return torch.tensor([float(s) if self.strict else f for f, s in results])
