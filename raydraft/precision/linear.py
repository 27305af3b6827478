"""FP8 W8A8 linear layers: E4M3 weights with one scale per output row, activations
quantized per row on the fly (torchao's "float8 dynamic, rowwise" recipe).

On a GPU with FP8 tensor cores (compute capability 8.9 and up) the product is
`torch._scaled_mm`; elsewhere it is the exact emulation, the dequantized operands
multiplied in float32. The full-precision layer stays as `master`, so a weight sync
re-quantizes from it (`refresh`) and never from an already-quantized copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache

import torch

from raydraft.precision.formats import quantize_fp8


@cache
def fp8_kernels(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 in hardware."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(torch.nn.Module):
    def __init__(self, master: torch.nn.Linear, quantize_activations: Callable | None = None):
        """`quantize_activations`: the row quantizer for inputs (a compiled `quantize_fp8`
        on a GPU fuses its three passes into one); default: `quantize_fp8` itself."""
        super().__init__()
        self.master = master
        self.quantize_activations = quantize_activations or quantize_fp8
        # Buffers, so that moving the module (colocated swapping) moves the FP8 copy too.
        self.register_buffer("weight_fp8", None, persistent=False)  # (out, in) E4M3
        self.register_buffer("weight_scale", None, persistent=False)  # (out, 1) float32
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Quantize the master's current weight (after a weight sync)."""
        self.weight_fp8, self.weight_scale = quantize_fp8(self.master.weight.detach(), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        values, scale = self.quantize_activations(rows, rowwise=True)
        if fp8_kernels(values.device):
            out = torch._scaled_mm(  # the bias is added in the product's epilogue
                values,
                self.weight_fp8.t(),
                scale_a=scale,
                scale_b=self.weight_scale.t(),
                bias=self.master.bias,
                out_dtype=x.dtype,
            )
        else:
            weight = self.weight_fp8.float() * self.weight_scale
            out = ((values.float() * scale) @ weight.t()).to(x.dtype)
            if self.master.bias is not None:
                out = out + self.master.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantizable(name: str, layer: torch.nn.Module, skip: Sequence[str], min_dim: int) -> bool:
    """A plain Linear whose name matches none of the regular expressions `skip` (whole
    name), whose larger side exceeds `min_dim`, and whose sides are multiples of 16 (what
    FP8 kernels take). LoRA factors always stay in full precision."""
    if type(layer) is not torch.nn.Linear or "lora_" in name:
        return False
    if any(re.fullmatch(pattern, name) for pattern in skip):
        return False
    out_features, in_features = layer.weight.shape
    return max(out_features, in_features) > min_dim and not (out_features % 16 or in_features % 16)


def quantize_linears(
    module: torch.nn.Module,
    skip: Sequence[str] = (),
    min_dim: int = 0,
    quantize_activations: Callable | None = None,
) -> list[str]:
    """Swap every quantizable Linear of `module` for a Float8Linear around it, in place;
    returns the swapped names. A LoRA-wrapped layer's base is swapped and its LoRA branch
    stays in full precision beside it (nothing to re-quantize when only the LoRA syncs)."""
    swapped = []
    for name, layer in list(module.named_modules()):
        if quantizable(name, layer, skip, min_dim):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            setattr(parent, child, Float8Linear(layer, quantize_activations))
            swapped.append(name)
    return swapped
