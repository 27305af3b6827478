"""Low-precision stand-ins for a model's Linear and Conv2d layers.

- `Float8Linear`: FP8 W8A8, E4M3 weights with one scale per output row and activations
  quantized per row on the fly (torchao's "float8 dynamic, rowwise" recipe), multiplied by
  `torch._scaled_mm` on a GPU with FP8 tensor cores (compute capability 8.9 and up), by
  the exact emulation elsewhere.
- `FakeQuantized`: any format of `formats.FORMATS`, emulated: the layer computes with the
  format's dequantized weights (and inputs, for Linear layers when activations are
  quantized), so its numbers are the format's on every device.

Both read their full-precision weight from a `weight` callable and re-quantize it on
`refresh` (at a weight sync), never from an already-quantized copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache

import torch
import torch.nn.functional as F

from raydraft.precision.formats import BLOCK, fake_quantize, quantize_fp8

Weight = Callable[[], torch.Tensor]


@cache
def fp8_kernels(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 in hardware."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A Linear or Conv2d weight in format `fmt`, rows and blocks running along the input
    channels (a convolution's weight is (out, in, kh, kw): its input channels go last)."""
    if weight.dim() == 2:
        return fake_quantize(weight, fmt)
    return fake_quantize(weight.permute(0, 2, 3, 1), fmt).permute(0, 3, 1, 2).contiguous()


class Float8Linear(torch.nn.Module):
    def __init__(
        self,
        layer: torch.nn.Linear,
        weight: Weight | None = None,
        quantize_activations: Callable | None = None,
    ) -> None:
        """`weight`: where the full-precision weight comes from (default: the layer's own);
        `quantize_activations`: the row quantizer for inputs (a compiled `quantize_fp8`
        on a GPU fuses its passes into one kernel); default `quantize_fp8` itself."""
        super().__init__()
        self.layer = layer  # a submodule, so that moving this module moves it too
        self.weight_source = weight or (lambda: layer.weight)
        self.quantize_activations = quantize_activations or quantize_fp8
        # Buffers, so that moving the module (colocated swapping) moves the FP8 copy too.
        self.register_buffer("weight_fp8", None, persistent=False)  # (out, in) E4M3
        self.register_buffer("weight_scale", None, persistent=False)  # (out, 1) float32
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Quantize the current full-precision weight (after a weight sync)."""
        self.weight_fp8, self.weight_scale = quantize_fp8(self.weight_source().detach(), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        values, scale = self.quantize_activations(rows, rowwise=True)
        if fp8_kernels(values.device):
            out = torch._scaled_mm(  # the bias is added in the product's epilogue
                values,
                self.weight_fp8.t(),
                scale_a=scale,
                scale_b=self.weight_scale.t(),
                bias=self.layer.bias,
                out_dtype=x.dtype,
            )
        else:
            weight = self.weight_fp8.float() * self.weight_scale
            out = ((values.float() * scale) @ weight.t()).to(x.dtype)
            if self.layer.bias is not None:
                out = out + self.layer.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


class FakeQuantized(torch.nn.Module):
    def __init__(
        self,
        layer: torch.nn.Linear | torch.nn.Conv2d,
        fmt: str,
        quantize_activations: bool,
        weight: Weight | None = None,
    ) -> None:
        """Activations are quantized for Linear inputs only (rows or blocks along the
        features); a convolution's input has no row that maps to a product's row."""
        super().__init__()
        self.layer, self.fmt = layer, fmt
        self.activations = quantize_activations and isinstance(layer, torch.nn.Linear)
        self.weight_source = weight or (lambda: layer.weight)
        self.register_buffer("weight", None, persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.weight = quantize_weight(self.weight_source().detach(), self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, torch.nn.Conv2d):
            return self.layer._conv_forward(x, self.weight, self.layer.bias)
        if self.activations:
            x = fake_quantize(x, self.fmt)
        return F.linear(x, self.weight, self.layer.bias)


def quantizable(
    name: str, layer: torch.nn.Module, keep: Sequence[str], min_dim: int, fmt: str = "fp8"
) -> bool:
    """A plain Linear or Conv2d whose name matches none of the regular expressions `keep`
    (whole name), whose larger side exceeds `min_dim`, and whose input channels fill the
    format's blocks (and, for FP8 kernels, whose sides are multiples of 16). LoRA factors
    always stay in full precision."""
    if type(layer) not in (torch.nn.Linear, torch.nn.Conv2d) or "lora_" in name:
        return False
    if any(re.fullmatch(pattern, name) for pattern in keep):
        return False
    out_channels, in_channels = layer.weight.shape[:2]
    if max(out_channels, in_channels) <= min_dim:
        return False
    return not (in_channels % BLOCK.get(fmt, 16) or out_channels % 16)


def quantize_linears(
    module: torch.nn.Module,
    keep: Sequence[str] = (),
    min_dim: int = 0,
    quantize_activations: Callable | None = None,
) -> list[str]:
    """Swap every quantizable Linear of `module` for a Float8Linear around it, in place,
    and return the swapped names (the GPU check's FP8 denoisers). A LoRA-wrapped layer's
    base is swapped and its LoRA branch stays in full precision beside it."""
    swapped = []
    for name, layer in list(module.named_modules()):
        if isinstance(layer, torch.nn.Linear) and quantizable(name, layer, keep, min_dim):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            setattr(parent, child, Float8Linear(layer, quantize_activations=quantize_activations))
            swapped.append(name)
    return swapped
