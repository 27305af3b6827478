"""The shapes world: 32×32 scenes of coloured shapes with prompts in GenEval's categories.

Every scene is a list of objects (colour, shape, box) on black, drawn deterministically
from a seed. Prompts follow GenEval's six categories:

    single     "a circle"                          one object, any colour
    two        "a circle and a square"             two objects of different shapes
    counting   "three triangles"                   1-4 objects of one shape
    colors     "a red square"                      one object of a given colour
    position   "a circle left of a square"         two objects and their relation
    binding    "a red circle and a blue square"    two objects, each with its colour

Each prompt carries its structured spec (`PromptSpec`), which the rule-based checker
(`raydraft.rewards.shapes_checker`) scores images against.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
CATEGORIES = ("single", "two", "counting", "colors", "position", "binding")
OBJECT_SIZES = (8, 12)  # side of the bounding box, [lo, hi)
MIN_GAP = 2
MIN_OFFSET = 5  # a relation's centres differ by more than this along its axis
EVAL_FRACTION = 0.25


@dataclass(frozen=True)
class PromptSpec:
    """What an image must show. `colors[i]` is None where the prompt names no colour."""

    category: str
    shapes: tuple[str, ...]
    colors: tuple[str | None, ...]
    relation: str | None = None  # position: object 0 <relation> object 1

    @property
    def text(self) -> str:
        if self.category == "counting":
            n = len(self.shapes)
            noun = self.shapes[0] + ("s" if n > 1 else "")
            return f"{NUMBERS[n] if n > 1 else 'one'} {noun}"
        words = [_noun_phrase(c, s) for c, s in zip(self.colors, self.shapes, strict=True)]
        if self.category == "position":
            return f"{words[0]} {self.relation} {words[1]}"
        return " and ".join(words)


def _noun_phrase(color: str | None, shape: str) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def all_specs() -> list[PromptSpec]:
    """Every prompt of the grammar, in a fixed order."""
    specs = [PromptSpec("single", (s,), (None,)) for s in SHAPES]
    specs += [PromptSpec("two", (a, b), (None, None)) for a, b in itertools.permutations(SHAPES, 2)]
    specs += [PromptSpec("counting", (s,) * n, (None,) * n) for s in SHAPES for n in NUMBERS]
    specs += [PromptSpec("colors", (s,), (c,)) for c in COLORS for s in SHAPES]
    specs += [
        PromptSpec("position", (a, b), (None, None), r)
        for a, b in itertools.product(SHAPES, SHAPES)
        for r in RELATIONS
    ]
    specs += [
        PromptSpec("binding", (a, b), (ca, cb))
        for a, b in itertools.permutations(SHAPES, 2)
        for ca, cb in itertools.permutations(COLORS, 2)
    ]
    return specs


def is_held_out(spec: PromptSpec) -> bool:
    """Eval-only combinations. Single and two-object prompts are too few to hold any out
    (that would hide a shape from training); they are evaluated on held-out seeds."""
    if spec.category in ("single", "two"):
        return False
    digest = hashlib.sha256(spec.text.encode()).digest()
    return digest[0] / 256 < EVAL_FRACTION


def split_specs(split: str) -> list[PromptSpec]:
    """`train`: everything not held out; `eval`: held-out combos plus single/two prompts."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    specs = all_specs()
    if split == "train":
        return [s for s in specs if not is_held_out(s)]
    return [s for s in specs if is_held_out(s) or s.category in ("single", "two")]


def category_balanced(specs: list[PromptSpec]) -> list[PromptSpec]:
    """Each spec repeated so that every category carries about the same weight.

    The train split has 57 binding prompts and 3 single ones; pretraining draws categories
    uniformly and the evaluation weighs them equally, so RL epochs should too.
    """
    counts = Counter(s.category for s in specs)
    most = max(counts.values())
    return [s for s in specs for _ in range(round(most / counts[s.category]))]


def spec_for_prompt(text: str) -> PromptSpec:
    try:
        return _BY_TEXT[text]
    except KeyError:
        raise KeyError(f"{text!r} is not a prompt of the shapes world") from None


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def cx(self) -> float:
        return self.x0 + self.size / 2

    @property
    def cy(self) -> float:
        return self.y0 + self.size / 2


def _overlaps(a: ShapeObject, b: ShapeObject) -> bool:
    return not (
        a.x0 + a.size + MIN_GAP <= b.x0
        or b.x0 + b.size + MIN_GAP <= a.x0
        or a.y0 + a.size + MIN_GAP <= b.y0
        or b.y0 + b.size + MIN_GAP <= a.y0
    )


def _relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    (ax, ay), (bx, by) = (a.cx, a.cy), (b.cx, b.cy)
    return {
        "left of": bx - ax > MIN_OFFSET,
        "right of": ax - bx > MIN_OFFSET,
        "above": by - ay > MIN_OFFSET,
        "below": ay - by > MIN_OFFSET,
    }[relation]


def layout(spec: PromptSpec, seed: int) -> list[ShapeObject]:
    """Objects satisfying `spec`, placed without overlap; unnamed colours drawn at random.

    Two-object scenes use distinct colours, as colour is how the checker separates them.
    """
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    for _ in range(1000):
        colors = list(spec.colors)
        free = [c for c in names if c not in colors]
        for i, c in enumerate(colors):
            if c is None:
                if spec.category == "counting":
                    colors = [free[rng.integers(len(free))]] * len(colors)
                    break
                colors[i] = free.pop(rng.integers(len(free)))
        objects: list[ShapeObject] = []
        for color, shape in zip(colors, spec.shapes, strict=True):
            size = int(rng.integers(*OBJECT_SIZES))
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
            candidate = ShapeObject(color, shape, x0, y0, size)
            if any(_overlaps(candidate, o) for o in objects):
                break
            objects.append(candidate)
        if len(objects) < len(spec.shapes):
            continue
        if spec.relation and not _relation_holds(objects[0], objects[1], spec.relation):
            continue
        return objects
    raise RuntimeError(f"could not lay out {spec.text!r} (seed {seed})")


def render(objects: list[ShapeObject]) -> np.ndarray:
    """HWC uint8 image of the objects on black."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for obj in objects:
        u = (xs - obj.x0) / obj.size  # in [0, 1] across the box
        v = (ys - obj.y0) / obj.size
        inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
        if obj.shape == "circle":
            mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
        elif obj.shape == "triangle":  # apex up
            mask = inside & (np.abs(u - 0.5) <= v / 2)
        else:
            mask = inside
        image[mask & inside] = COLORS[obj.color]
    return image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def sample_scenes(specs: list[PromptSpec], seeds: list[int]) -> torch.Tensor:
    return to_tensor(
        np.stack([render(layout(s, seed)) for s, seed in zip(specs, seeds, strict=True)])
    )


_BY_TEXT = {s.text: s for s in all_specs()}
