"""Images of rendered text, for the OCR reward with its real weights."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def render_text(text: str) -> Image.Image:
    """Black text on white, 512 × 256, in Pillow's bundled TrueType font (Pillow >= 10.1)."""
    image = Image.new("RGB", (512, 256), "white")
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(image).text((256, 128), text, fill="black", font=font, anchor="mm")
    return image


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    """Float NCHW in [0, 1], as the rewards take them."""
    arrays = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
