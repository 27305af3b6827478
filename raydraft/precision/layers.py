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


def activation_quantizer(device: torch.device) -> Callable | None:
    """On a GPU, `quantize_fp8` compiled (amax, scale and cast fused: 0.18 against 0.83 ms
    eager for an 18432×3072 bf16 input on an H200); None (eager) elsewhere or when the
    compile fails."""
    if device.type != "cuda":
        return None
    compiled = torch.compile(quantize_fp8, dynamic=True)
    try:
        compiled(torch.randn(64, 128, device=device, dtype=torch.bfloat16), rowwise=True)
    except Exception:  # no working compiler here: the eager quantizer gives the same values
        return None
    return compiled


def quantize_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A Linear or Conv2d weight in format `fmt`, one row per output channel: a
    convolution's (out, in, kh, kw) weight is quantized as (out, in·kh·kw), the product's
    K dimension in an im2col convolution, so a block holds neighbouring taps of the same
    input channels (on the toy model this ranks samples better than blocks across input
    channels: within-group Spearman 0.85 against 0.77 for NVFP4 weights, docs/benchmarks.md)."""
    return fake_quantize(weight.reshape(weight.shape[0], -1), fmt).reshape(weight.shape)


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
    (whole name), whose larger side exceeds `min_dim`, and whose rows (in features, or
    in channels × kernel taps) fill the format's blocks, sides of 16 for FP8 kernels. LoRA
    factors always stay in full precision."""
    if type(layer) not in (torch.nn.Linear, torch.nn.Conv2d) or "lora_" in name:
        return False
    if any(re.fullmatch(pattern, name) for pattern in keep):
        return False
    out_channels, in_channels = layer.weight.shape[:2]
    if max(out_channels, in_channels) <= min_dim:
        return False
    return not (layer.weight[0].numel() % BLOCK.get(fmt, 16) or out_channels % 16)
