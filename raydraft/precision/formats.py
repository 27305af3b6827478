"""Quantization formats, defined by their quantize-dequantize.

FP8 E4M3 scales follow torchao's convention, so emulated and torchao-quantized weights
agree bit for bit: scale = amax / 448 computed in the tensor's own dtype, then cast to
float32; values are clamped before the cast because torch's E4M3 cast saturates silently.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def fp8_scale(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """float32 scales: one per row (shape (..., 1)) or one for the tensor (shape ()); a
    row of zeros gets scale 1, so it quantizes to zeros instead of 0/0."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = (amax / E4M3_MAX).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, float32 scales) with x ≈ values * scales."""
    scale = fp8_scale(x, rowwise)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    values, scale = quantize_fp8(x, rowwise=True)
    return values.float() * scale


def _fp8_tensor(x: torch.Tensor) -> torch.Tensor:
    values, scale = quantize_fp8(x, rowwise=False)
    return values.float() * scale


FORMATS = {"fp8": _fp8_rows, "fp8-tensor": _fp8_tensor}


def fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The values `x` takes in format `fmt` (FORMATS), in x's dtype."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown precision format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt](x).to(x.dtype)
