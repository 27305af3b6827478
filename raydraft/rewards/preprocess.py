"""Pixels for reward models, two ways.

Black-box (`processor_pixels`), for the RL algorithms: what the reference implementations
feed their models, the images quantized to uint8 (`to_uint8_hwc`) and put through the
model's own image processor. The rewards load transformers' PIL processor classes by name:
where torchvision is installed transformers would otherwise pick its torchvision classes,
whose pixels differ from the references'.

Differentiable (`tensor_pixels`), for DRaFT: the processor's steps as torch ops on the
float images, so the gradient reaches the pixels: resize (antialiased, so a downscale
averages as PIL's does; clamped to [0, 1], as PIL's uint8 output is), centre crop,
normalise. It differs from the PIL path by PIL's
uint8 intermediate image and its kernel's rounding (measured in tests/test_clip_rewards.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from raydraft.rewards.base import to_pil

# OpenAI CLIP's pixel statistics, which HPSv2 and ImageReward normalise with too
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def processor_pixels(image_processor: Any, images: torch.Tensor) -> torch.Tensor:
    """`image_processor` on the uint8 PIL images, as the references call it."""
    return image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]


def resized_shape(height: int, width: int, size: Any) -> tuple[int, int]:
    """The output size of the processors' resize: the shortest edge to `shortest_edge`
    (the long edge scaled and truncated, as transformers and torchvision do), or an exact
    height and width."""
    short_edge = field(size, "shortest_edge")
    if short_edge is None:
        return field(size, "height"), field(size, "width")
    short, long = sorted((height, width))
    new_short, new_long = short_edge, int(short_edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def field(size: Any, key: str) -> int | None:
    """A processor's size entry: a SizeDict in transformers 5, a dict in 4."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central `height` × `width` window (offsets rounded down, as transformers does)."""
    top = (images.shape[-2] - height) // 2
    left = (images.shape[-1] - width) // 2
    if top < 0 or left < 0:
        raise ValueError(
            f"cannot crop {height}x{width} from {tuple(images.shape[-2:])}: resize first"
        )
    return images[..., top : top + height, left : left + width]


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(pixels - mean) / std per channel of (..., C, H, W) floats, as torchvision's Normalize."""
    mean_ = torch.tensor(mean, device=pixels.device).view(-1, 1, 1)
    std_ = torch.tensor(std, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean_) / std_


def tensor_pixels(
    image_processor: Any,
    images: torch.Tensor,
    mode: Literal["bicubic", "bilinear"] = "bicubic",
) -> torch.Tensor:
    """The processor's resize, crop and normalisation as differentiable torch ops on float
    NCHW images in [0, 1] (its rescale to [0, 1] is already done)."""
    x = images.float()
    if image_processor.do_resize:
        shape = resized_shape(*x.shape[-2:], image_processor.size)
        x = F.interpolate(x, size=shape, mode=mode, antialias=True, align_corners=False)
        x = x.clamp(0, 1)  # PIL's uint8 output cannot overshoot the way cubic kernels do
    if image_processor.do_center_crop:
        crop = image_processor.crop_size
        x = center_crop(x, field(crop, "height"), field(crop, "width"))
    if image_processor.do_normalize:
        x = normalize(x, image_processor.image_mean, image_processor.image_std)
    return x
