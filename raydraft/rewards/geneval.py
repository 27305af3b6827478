"""`geneval`: GenEval's object-composition check (Ghosh et al. 2023) as Flow-GRPO trains on
it. Black-box.

Each prompt carries GenEval metadata: a `tag` (single_object, two_object, counting, colors,
position, color_attr), `include` clauses {class, count, color?, position?: [relation,
index of an earlier include clause]} and `exclude` clauses {class, count} (counting
prompts exclude count + 1). An instance segmenter finds the objects; per class GenEval
keeps those above a confidence of 0.3 (0.9 on counting prompts), most confident first, at
most 16, with no overlap suppression (its max_overlap is 1.0). A colour is CLIP's
zero-shot pick among 10 names on the object's crop; a relation compares box centres after
shrinking the offset by 0.1 × the two boxes' summed sizes.

Three results per image, restating reward-server's `gen_eval.py` (Flow-GRPO's server)
rule for rule:
- `score`, the training reward: the mean of every include clause's terms. A clause asking
  k objects of which n were kept adds 1 - |n - k| / k (negative once n > 2k: the reference
  does not clamp it). If n != k, a colour or position clause adds one 0 more. If n == k, a
  colour adds 1 - |k - c| / k (c of the k have the colour) and, only if all do, a position
  adds 1 when every pair holds, else 0 followed by the reference's stray 1 (its loop
  appends 1 after a failed check too), and 0 when the target clause failed.
- `strict` (the reference's `strict_correct`): every include clause exact: n == k, all k in
  the colour, every position pair holds. Exclude clauses are not checked (for GenEval's
  prompts n == k implies them).
- `correct`, GenEval's benchmark accuracy (`evaluate_images.py`): at least k kept, colour
  and position checked on the k most confident, and no exclude clause met (n >= count).

The reward's score is `score`, or the strict 0/1 with `only_strict: true`. (Flow-GRPO's own
`only_strict` flag only skips computing `correct`; it trains on `score` either way.)
Flow-GRPO JPEG-encodes images before its server sees them; here the uint8 pixels go to
the detector directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from PIL import Image

from raydraft.rewards.base import reward_device, to_pil
from raydraft.rewards.detectors import (
    COLORS,
    ClipColorClassifier,
    Detection,
    Detector,
    Mask2FormerDetector,
)
from raydraft.rewards.registry import register_reward

THRESHOLD = 0.3  # confidence an object needs (strictly above) to count
COUNTING_THRESHOLD = 0.9  # the same on counting prompts
MAX_OBJECTS = 16  # kept per class, most confident first
NMS_THRESHOLD = 1.0  # IoU at which a less confident box of the class is dropped; 1.0: never
POSITION_THRESHOLD = 0.1  # margin of a relation, in units of the two boxes' summed size
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

ColorFn = Callable[[str, Sequence[Detection]], list[str]]


@dataclass(frozen=True)
class ClauseResult:
    """One clause's outcome. `found` is n, the objects kept of its class; `color_matches`
    and `position_ok` are the training check's (None where it did not get that far);
    `terms` are what the clause adds to the training score's mean."""

    kind: str  # "include" or "exclude"
    cls: str
    count: int
    found: int
    strict: bool
    correct: bool
    terms: tuple[float, ...] = ()
    color: str | None = None
    color_matches: int | None = None
    position: tuple[str, int] | None = None
    position_ok: bool | None = None
    reason: str = ""


@dataclass(frozen=True)
class GenEvalResult:
    """One image's verdicts: the reference's `strict_correct`, GenEval's benchmark
    `correct`, the training `score`, and every clause's result."""

    tag: str
    strict: bool
    correct: bool
    score: float
    clauses: tuple[ClauseResult, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for metadata and logs."""
        return asdict(self)


def confidence_threshold(tag: str) -> float:
    return COUNTING_THRESHOLD if tag == "counting" else THRESHOLD


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel areas ((x1 - x0 + 1) × (y1 - y0 + 1))."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: Sequence[Detection],
    threshold: float,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """GenEval's kept objects per class: confidence strictly above `threshold`, most
    confident first, the first `max_objects`, then greedy suppression of boxes overlapping
    a kept one by IoU >= `nms_threshold` (none at 1.0). Classes with none are absent."""
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if d.confidence > threshold:
            by_class.setdefault(d.label, []).append(d)
    kept: dict[str, list[Detection]] = {}
    for cls, found in by_class.items():
        queue = sorted(found, key=lambda d: -d.confidence)[:max_objects]
        kept[cls] = []
        while queue:
            best = queue.pop(0)
            kept[cls].append(best)
            if nms_threshold != 1:
                queue = [d for d in queue if box_iou(best.box, d.box) < nms_threshold]
    return kept


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD
) -> set[str]:
    """Where box A is relative to box B ("left of", "right of", "above", "below"; y grows
    downwards): the centre offset, each axis shrunk towards 0 by `margin` × the two boxes'
    summed extent on it, over the offset's length, must pass ±0.5 on that axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box_a[:4], box_b[:4]
    offset_x = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    offset_y = (ay0 + ay1) / 2 - (by0 + by1) / 2
    width, height = abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0)
    revised_x = max(abs(offset_x) - margin * width, 0) * _sign(offset_x)
    revised_y = max(abs(offset_y) - margin * height, 0) * _sign(offset_y)
    if abs(revised_x) < 1e-3 and abs(revised_y) < 1e-3:
        return set()
    length = math.hypot(offset_x, offset_y)
    dx, dy = revised_x / length, revised_y / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """ValueError unless `metadata` is a GenEval prompt's: a tag, include clauses with a
    class and a count >= 1, colours among GenEval's, positions naming a known relation
    and an earlier clause, exclude clauses with a class and a count."""
    if not isinstance(metadata, Mapping) or "tag" not in metadata:
        raise ValueError("GenEval metadata needs a 'tag' and 'include' clauses")
    include = metadata.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str):
        raise ValueError("GenEval metadata needs a list of 'include' clauses")
    for index, req in enumerate(include):
        if (
            not isinstance(req, Mapping)
            or not isinstance(req.get("class"), str)
            or not isinstance(req.get("count"), int)
        ):
            raise ValueError(f"include clause {index} needs a 'class' and an integer 'count'")
        if req["count"] < 1:
            raise ValueError(f"include clause {index}: count must be >= 1, got {req['count']}")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"include clause {index}: colour {req['color']!r} not in {COLORS}")
        if "position" in req:
            position = req["position"]
            if not (
                isinstance(position, Sequence)
                and len(position) == 2
                and position[0] in RELATIONS
                and isinstance(position[1], int)
                and 0 <= position[1] < index
            ):
                raise ValueError(
                    f"include clause {index}: position {req['position']!r} must name one of "
                    f"{RELATIONS} and an earlier include clause"
                )
    for index, req in enumerate(metadata.get("exclude", [])):
        if (
            not isinstance(req, Mapping)
            or not isinstance(req.get("class"), str)
            or not isinstance(req.get("count"), int)
        ):
            raise ValueError(f"exclude clause {index} needs a 'class' and an integer 'count'")


def _colors(objects: Sequence[Detection]) -> list[str]:
    colors = [d.color for d in objects]
    if None in colors:
        raise ValueError("a colour clause needs the objects' colours (pass classify_colors)")
    return colors  # type: ignore[return-value]


def _misplaced(
    objects: Sequence[Detection], targets: Sequence[Detection], relation: str
) -> set[str] | None:
    """The relations of the first (object, target) pair lacking `relation`, or None."""
    for obj in objects:
        for target in targets:
            relations = relative_position(obj.box, target.box)
            if relation not in relations:
                return relations
    return None


def evaluate(
    metadata: Mapping[str, Any], objects: Mapping[str, Sequence[Detection]]
) -> GenEvalResult:
    """GenEval's verdicts on one image from its kept objects per class (`select_objects`),
    which must carry colours where a clause asks one. See the module docstring."""
    check_metadata(metadata)
    clauses: list[ClauseResult] = []
    strict_groups: list[Sequence[Detection] | None] = []  # the training check's matches
    bench_groups: list[Sequence[Detection] | None] = []  # the benchmark's
    for req in metadata["include"]:
        cls, k = req["class"], req["count"]
        color, position = req.get("color"), req.get("position")
        found = list(objects.get(cls, []))
        n = len(found)

        # Flow-GRPO's training score and strict check: exactly k.
        terms, ok, reasons = [1 - abs(k - n) / k], n == k, []
        color_matches = position_ok = None
        if not ok:
            reasons.append(f"expected {cls}=={k}, found {n}")
            if color or position:
                terms.append(0.0)
        else:
            if color:
                color_matches = _colors(found).count(color)
                terms.append(1 - abs(k - color_matches) / k)
                if color_matches != k:
                    ok = False
                    reasons.append(f"expected {k} {color} {cls}, found {color_matches}")
            if position and ok:
                relation, target = position
                if strict_groups[target] is None:
                    ok = position_ok = False
                    terms.append(0.0)
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    wrong = _misplaced(found, strict_groups[target], relation)
                    position_ok = wrong is None
                    if wrong is not None:
                        ok = False
                        terms.append(0.0)
                        reasons.append(
                            f"expected {cls} {relation} target, found "
                            f"{' and '.join(sorted(wrong)) or 'no relation to the'} target"
                        )
                    terms.append(1.0)  # the reference appends it after a failure too
        strict_groups.append(found if ok else None)

        # GenEval's benchmark: at least k, colour and position on the k most confident.
        top = found[:k]
        correct = len(top) >= k
        if correct and color:
            correct = _colors(top).count(color) >= k
        if correct and position:
            relation, target = position
            targets = bench_groups[target]
            correct = targets is not None and _misplaced(top, targets, relation) is None
        bench_groups.append(top if correct else None)

        clauses.append(
            ClauseResult(
                kind="include",
                cls=cls,
                count=k,
                found=n,
                strict=ok,
                correct=correct,
                terms=tuple(terms),
                color=color,
                color_matches=color_matches,
                position=tuple(position) if position else None,
                position_ok=position_ok,
                reason="; ".join(reasons),
            )
        )
    for req in metadata.get("exclude", []):
        cls, count = req["class"], req["count"]
        n = len(objects.get(cls, []))
        clauses.append(
            ClauseResult(
                kind="exclude",
                cls=cls,
                count=count,
                found=n,
                strict=True,
                correct=n < count,
                reason="" if n < count else f"expected {cls}<{count}, found {n}",
            )
        )
    terms = [t for c in clauses for t in c.terms]
    return GenEvalResult(
        tag=metadata["tag"],
        strict=all(c.strict for c in clauses),
        correct=all(c.correct for c in clauses),
        score=sum(terms) / len(terms) if terms else 0.0,
        clauses=tuple(clauses),
    )


def geneval_rules(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    classify_colors: ColorFn | None = None,
) -> GenEvalResult:
    """GenEval on one image's raw detections: keep the objects at the tag's confidence
    threshold, colour those a colour clause will look at (`classify_colors(cls, objects)`;
    detections that already carry a colour need none), then `evaluate`."""
    check_metadata(metadata)
    objects = select_objects(detections, confidence_threshold(metadata["tag"]))
    if classify_colors is not None:
        for req in metadata["include"]:
            found = objects.get(req["class"], [])
            if "color" in req and len(found) >= req["count"] and found[0].color is None:
                colors = classify_colors(req["class"], found)
                objects[req["class"]] = [
                    replace(d, color=c) for d, c in zip(found, colors, strict=True)
                ]
    return evaluate(metadata, objects)


@register_reward("geneval")
class GenEvalReward:
    """GenEval's training reward (or strict 0/1) on a Mask2Former detector and a CLIP colour
    classifier, both from local weights: `path` a Mask2FormerForUniversalSegmentation
    directory saved with its image processor (COCO instance, e.g.
    facebook/mask2former-swin-small-coco-instance), `clip_path` a CLIPModel directory with
    its processor and tokenizer (GenEval: openai/clip-vit-large-patch14). Each sample's
    metadata must be its GenEval prompt's (see the module docstring). `last_results` keeps
    the last batch's per-image verdicts and clauses for logging."""

    differentiable = False

    def __init__(
        self,
        path: str | None = None,
        clip_path: str | None = None,
        only_strict: bool = False,
        device: str | None = None,
    ) -> None:
        self.name = "geneval"
        for option, value, what in (
            ("path", path, "a Mask2Former COCO instance-segmentation directory"),
            ("clip_path", clip_path, "a CLIP model directory, for the colour clauses"),
        ):
            if not value:
                raise ValueError(f"reward 'geneval' needs options.{option} ({what})")
        self.only_strict = only_strict
        self.device = reward_device(device)
        self.detector: Detector = Mask2FormerDetector(self.name, path, self.device)
        self.colors = ClipColorClassifier(self.name, clip_path, self.device)
        self.last_results: list[GenEvalResult] = []
        self.last_details: dict[str, torch.Tensor] = {}  # strict: 1 where all clauses hold

    def _metadata(self, metadata: Any, prompt: str) -> Mapping[str, Any]:
        if not isinstance(metadata, Mapping) or "include" not in metadata:
            raise ValueError(
                f"reward 'geneval': prompt {prompt!r} has no GenEval metadata (a dict with "
                "'tag' and 'include' clauses, as in GenEval's evaluation_metadata.jsonl)"
            )
        try:
            check_metadata(metadata)
        except ValueError as err:
            raise ValueError(f"reward 'geneval': prompt {prompt!r}: {err}") from None
        names = getattr(self.detector, "class_names", None)
        if names is not None:
            clauses = [*metadata["include"], *metadata.get("exclude", [])]
            unknown = {c["class"] for c in clauses} - set(names.values())
            if unknown:
                raise ValueError(
                    f"reward 'geneval': prompt {prompt!r} names classes the detector does "
                    f"not have: {sorted(unknown)}"
                )
        return metadata

    def _classify(self, image: Image.Image, cls: str, objects: Sequence[Detection]) -> list[str]:
        return self.colors.classify(image, objects, cls)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        if len(metadata) != len(prompts):
            raise ValueError(
                f"reward 'geneval': {len(prompts)} prompts but {len(metadata)} metadata"
            )
        specs = [self._metadata(m, p) for m, p in zip(metadata, prompts, strict=True)]
        pil = to_pil(images)
        detections = self.detector.detect(pil)
        self.last_results = [
            geneval_rules(spec, found, partial(self._classify, image))
            for spec, found, image in zip(specs, detections, pil, strict=True)
        ]
        strict = [float(r.strict) for r in self.last_results]
        scores = strict if self.only_strict else [r.score for r in self.last_results]
        self.last_details = {"strict": torch.tensor(strict, dtype=torch.float32)}
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
