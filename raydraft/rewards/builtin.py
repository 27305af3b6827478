"""Programmatic rewards that need no weights (the ones DDPO and DRaFT also demonstrate)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from raydraft.rewards.base import to_pil
from raydraft.rewards.registry import register_reward


@register_reward("toy-color")
class ColorReward:
    """Negative mean squared distance of every pixel to a target colour. Differentiable."""

    differentiable = True

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)) -> None:
        if len(target) != 3 or not all(0 <= c <= 1 for c in target):
            raise ValueError(f"toy-color target must be 3 values in [0, 1], got {target}")
        self.name = "toy-color"
        self.target = torch.tensor(target, dtype=torch.float32).view(1, 3, 1, 1)

    def score(self, images, prompts, metadata) -> torch.Tensor:
        target = self.target.to(images.device)
        return -((images.float() - target) ** 2).mean(dim=(1, 2, 3))


@register_reward("jpeg-compressibility")
class JpegCompressibility:
    """Negative JPEG size in kB at the given quality (DDPO's compressibility task). Black-box."""

    differentiable = False

    def __init__(self, quality: int = 95) -> None:
        self.name = "jpeg-compressibility"
        self.quality = quality

    def score(self, images, prompts, metadata) -> torch.Tensor:
        sizes = []
        for image in to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float32)
