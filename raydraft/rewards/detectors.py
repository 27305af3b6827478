"""Object detectors and the colour classifier behind the `geneval` reward, on local weights.

- `Mask2FormerDetector`: transformers' Mask2Former instance segmentation, the model family
  GenEval runs (mmdet's Mask2Former Swin-S on COCO; its transformers counterpart is
  `facebook/mask2former-swin-small-coco-instance`). Each instance keeps its binary mask,
  and its box is the mask's extent, as mmdet derives it (`mask2bbox`).
- `ClipColorClassifier`: GenEval's colour check, CLIP zero-shot over its 10 colour names
  on each object's crop, the pixels outside the object's mask greyed out (#999).

Both use transformers' PIL image processors by name: there is no torchvision here, and
where there is one transformers would pick its torchvision classes, whose pixels differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation

try:  # the PIL processor by name (transformers 5); in transformers 4 the default class is it
    from transformers import Mask2FormerImageProcessorPil
except ImportError:
    from transformers import Mask2FormerImageProcessor as Mask2FormerImageProcessorPil

from raydraft.rewards.clip_rewards import LocalClip, load_local, unit

# GenEval's colour names and the templates of its zero-shot colour classifier
# (`evaluation/evaluate_images.py`; {color} is one of COLORS, {cls} the object's class).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = (
    "a photo of a {color} {cls}",
    "a photo of a {color}-colored {cls}",
    "a photo of a {color} object",
)
CROP_BACKGROUND = "#999"  # GenEval's bgcolor: what the crop shows outside the object's mask

# GenEval's 80 object names (its `object_names.txt`): COCO's, in COCO's order, but for three.
GENEVAL_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
COCO_TO_GENEVAL = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: its class name, confidence in [0, 1], box (x0, y0, x1, y1) in
    pixels, and optionally its boolean mask (H, W) and its colour (one of COLORS)."""

    label: str
    confidence: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


@runtime_checkable
class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]: ...


def geneval_class_names(id2label: Mapping[int, str]) -> dict[int, str]:
    """The model's class names, spelled as GenEval's prompts spell them where the model has
    exactly COCO's 80 classes (COCO's "mouse", "remote", "keyboard" are GenEval's "computer
    mouse", "tv remote", "computer keyboard"); other label sets as they are."""
    names = {int(i): name for i, name in id2label.items()}
    renamed = {i: COCO_TO_GENEVAL.get(name, name) for i, name in names.items()}
    return renamed if sorted(renamed.values()) == sorted(GENEVAL_OBJECTS) else names


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box of a non-empty mask as mmdet's `mask2bbox` gives it: (first column, first
    row, last column + 1, last row + 1)."""
    columns, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)


class Mask2FormerDetector:
    """Mask2Former instance segmentation: the image processor's own preprocessing and
    `post_process_instance_segmentation` (per-instance binary maps, so instances may
    overlap as in mmdet), classes from the model config's id2label.

    `min_confidence` is the post-processor's threshold; GenEval's own thresholds (0.3, 0.9
    for counting) are applied by its rules, so keep this at or below 0.3. One caveat of
    transformers' post-processor: it resizes masks through a fixed 384×384 grid and ignores
    padding, so a batch of images of different sizes is slightly misaligned; generated
    batches share one size.
    """

    def __init__(
        self,
        reward: str,
        path: str,
        device: str | torch.device = "cpu",
        min_confidence: float = 0.3,
        option: str = "path",
    ) -> None:
        self.device = torch.device(device)
        self.min_confidence = min_confidence
        self.model = load_local(reward, Mask2FormerForUniversalSegmentation, path, option)
        self.model.to(self.device).eval().requires_grad_(False)
        self.processor = load_local(reward, Mask2FormerImageProcessorPil, path, option)
        self.class_names = geneval_class_names(self.model.config.id2label)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        images = [image.convert("RGB") for image in images]
        if not images:
            return []
        inputs = self.processor(images=images, return_tensors="pt")
        outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        results = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=self.min_confidence,
            target_sizes=[(image.height, image.width) for image in images],
            return_binary_maps=True,
        )
        return [self._detections(result) for result in results]

    def _detections(self, result: dict) -> list[Detection]:
        segments = result["segments_info"]
        if not segments:
            return []
        masks = result["segmentation"].bool().cpu().numpy()
        found = []
        for segment, mask in zip(segments, masks, strict=True):
            found.append(
                Detection(
                    label=self.class_names[segment["label_id"]],
                    confidence=float(segment["score"]),
                    box=mask_box(mask),
                    mask=mask,
                )
            )
        return found


def object_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """What GenEval's colour classifier sees of an object: the image with the pixels
    outside its mask (if it has one) set to #999, cropped to its box (PIL rounds it)."""
    image = image.convert("RGB")
    if detection.mask is not None:
        if detection.mask.shape != (image.height, image.width):
            raise ValueError(
                f"mask of shape {detection.mask.shape} for an image of {image.height}x{image.width}"
            )
        blank = Image.new("RGB", image.size, color=CROP_BACKGROUND)
        stencil = Image.fromarray(detection.mask.astype(np.uint8) * 255, mode="L")
        image = Image.composite(image, blank, stencil)
    x0, y0, x1, y1 = (round(v) for v in detection.box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ClipColorClassifier:
    """GenEval's colour classifier (clip_benchmark's zero-shot recipe): per class, each
    colour's embedding is the renormalised mean of its three templates' unit text
    embeddings; an object's colour is the one closest to its crop's unit image embedding.
    GenEval uses OpenAI's CLIP ViT-L/14; here a CLIPModel directory with its PIL image
    processor and tokenizer."""

    def __init__(
        self,
        reward: str,
        path: str,
        device: str | torch.device = "cpu",
        option: str = "clip_path",
    ) -> None:
        self.clip = LocalClip(reward, path, device=device, option=option)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def color_embeddings(self, cls: str) -> torch.Tensor:
        """(len(COLORS), D): the zero-shot classifier for objects of class `cls`, cached."""
        if cls not in self._classifiers:
            texts = [t.format(color=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            embeds = self.clip.text_embeddings(texts)
            per_color = embeds.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._classifiers[cls] = unit(per_color)
        return self._classifiers[cls]

    @torch.no_grad()
    def similarities(
        self, image: Image.Image, objects: Sequence[Detection], cls: str
    ) -> torch.Tensor:
        """(len(objects), len(COLORS)): the cosine of each object's crop to each colour."""
        crops = [object_crop(image, d) for d in objects]
        pixels = self.clip.image_processor(images=crops, return_tensors="pt")["pixel_values"]
        return self.clip.image_embeddings(pixels) @ self.color_embeddings(cls).T

    def classify(self, image: Image.Image, objects: Sequence[Detection], cls: str) -> list[str]:
        """The colour (one of COLORS) of each of `objects`, objects of class `cls` in `image`."""
        if not objects:
            return []
        return [COLORS[i] for i in self.similarities(image, objects, cls).argmax(-1).tolist()]
