"""Quantization formats, defined by their quantize-dequantize (`fake_quantize`).

- `fp8`: E4M3 with one scale per row (the absolute maximum over the last dimension / 448);
  `fp8-tensor`: one scale for the tensor. Scales follow torchao's convention, so emulated
  and torchao-quantized weights agree bit for bit: amax / 448 computed in the tensor's own
  dtype, then cast to float32.
- `nvfp4`: E2M1 values in blocks of 16 along the last dimension, each block with an E4M3
  scale, under one float32 tensor scale amax / (448 · 6).
- `mxfp4`: E2M1 values in blocks of 32 with power-of-two (E8M0) scales as the OCP MX
  specification sets them: 2^(floor(log2(block amax)) - 2), where 2 is E2M1's largest
  exponent; a block's largest values may then saturate at 6 × scale.

Values are clamped to the format's range before every cast: torch's E4M3 cast saturates
silently in some versions and gives NaN in others, and there is no E2M1 cast at all, so
E2M1 rounding (to nearest, ties to even) is done here.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
E4M3_TINY = torch.finfo(E4M3).tiny  # the smallest normal E4M3 value, 2^-6
E2M1_MAX = 6.0


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


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (float32, |x| ≤ 6 after clamping) rounded to the E2M1 grid {0, 0.5, 1, 1.5, 2, 3,
    4, 6} and their negatives, to nearest with ties to even. The grid's spacing is 0.5
    below 2, 1 below 4 and 2 up to 6, and an even multiple of the spacing is an even
    mantissa, so rounding half to even in units of the spacing is the format's rule."""
    magnitude = x.abs().clamp(max=E2M1_MAX)
    spacing = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return torch.sign(x) * torch.round(magnitude / spacing) * spacing


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of {size}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _nvfp4(x: torch.Tensor) -> torch.Tensor:
    """In torchao's order of operations (block scales relative to the tensor scale, the
    block multiplied by the reciprocal of the combined scale), so the values agree bit for
    bit with its NVFP4 weights."""
    blocks = _blocks(x, BLOCK["nvfp4"])
    tensor_scale = blocks.abs().amax() / (E4M3_MAX * E2M1_MAX)
    if tensor_scale == 0:
        return torch.zeros_like(blocks).reshape(x.shape)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / E2M1_MAX / tensor_scale).clamp(E4M3_TINY, E4M3_MAX)
    block_scale = block_scale.to(E4M3).float()
    values = round_e2m1(blocks * ((1.0 / tensor_scale) / block_scale))
    return (values * (tensor_scale * block_scale)).reshape(x.shape)


def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(x, BLOCK["mxfp4"])
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = (torch.floor(torch.log2(block_amax)) - 2).clamp(-127, 127)
    scale = torch.where(block_amax > 0, torch.exp2(exponent), torch.ones_like(block_amax))
    return (round_e2m1(blocks / scale) * scale).reshape(x.shape)


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    values, scale = quantize_fp8(x, rowwise=True)
    return values.float() * scale


def _fp8_tensor(x: torch.Tensor) -> torch.Tensor:
    values, scale = quantize_fp8(x, rowwise=False)
    return values.float() * scale


FORMATS = {"fp8": _fp8_rows, "fp8-tensor": _fp8_tensor, "nvfp4": _nvfp4, "mxfp4": _mxfp4}
BLOCK = {"nvfp4": 16, "mxfp4": 32}  # the block formats' block sizes


def fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The values `x` takes in format `fmt` (FORMATS), in x's dtype."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown precision format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt](x).to(x.dtype)
