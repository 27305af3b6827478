"""The rollouts' low-precision copy of a policy's denoiser.

While a rollout samples (`RolloutCopy.sampling`), each quantizable layer of the denoiser is
swapped for a stand-in (`layers.Float8Linear` on FP8 tensor cores, `layers.FakeQuantized`
elsewhere) and swapped back afterwards, so the full-precision weights stay the master that
the learner trains, syncs and checkpoints. Stand-ins read their weights from the master
and are re-quantized when the policy's version changes (a weight sync), except a LoRA
run's `side` copy, whose quantized base never changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from raydraft.config import RolloutConfig
from raydraft.models.base import Policy
from raydraft.precision.layers import (
    FakeQuantized,
    Float8Linear,
    activation_quantizer,
    fp8_kernels,
    quantizable,
)

# Kept in full precision by default, per model family (regular expressions over layer
# names): the input and output layers, the time/text embedders and the adaLN modulation,
# as Sol-RL keeps them. And a width at or below which a layer stays: Sol-RL's for SD3
# and FLUX (SD3.5 Medium's 1536-wide attention is too narrow for FP8 to pay,
# docs/benchmarks.md), none for the UNets.
FULL_PRECISION_LAYERS = {
    "toy": ("conv_in", "conv_out", r"time_embedding\..*"),
    "sd": ("conv_in", "conv_out", r"time_embedding\..*"),
    "sdxl": ("conv_in", "conv_out", r"time_embedding\..*", r"add_embedding\..*"),
    "sd3": (r"pos_embed\..*", "context_embedder", r"time_text_embed\..*", r"norm_out\..*",
            "proj_out", r".*\.norm1(_context)?\.linear"),
    "flux": ("x_embedder", "context_embedder", r"time_text_embed\..*", r"norm_out\..*",
             "proj_out", r".*\.norm1?(_context)?\.linear"),
}  # fmt: skip
MIN_DIM = {"sd3": 2432, "flux": 1000}


@dataclass
class _Swap:
    parent: torch.nn.Module
    name: str
    original: torch.nn.Module
    stand_in: FakeQuantized | Float8Linear


class RolloutCopy:
    def __init__(self, cfg: RolloutConfig, family: str) -> None:
        if cfg.precision == "full":
            raise ValueError("a RolloutCopy is for rollout.precision other than full")
        self.cfg = cfg
        self.keep = tuple(cfg.keep_full_precision or FULL_PRECISION_LAYERS[family])
        self.min_dim = cfg.min_dim if cfg.min_dim is not None else MIN_DIM.get(family, 0)
        self.swaps: list[_Swap] = []
        self._module: torch.nn.Module | None = None
        self._version: int | None = None
        self._refreshes = True
        self.refresh_seconds = 0.0  # this sampling's re-quantization (a sync's cost), if any

    def audits(self, iteration: int) -> bool:
        """Whether this iteration's rollouts are also sampled in full precision, to measure
        the ranking fidelity (`rollout.fidelity_every`)."""
        return self.cfg.fidelity_every > 0 and iteration % self.cfg.fidelity_every == 0

    @property
    def precision(self) -> str:
        weights_only = "" if self.cfg.quantize_activations else "-weights"
        return f"{self.cfg.precision}{weights_only}"

    @contextmanager
    def sampling(self, policy: Policy) -> Iterator[None]:
        """The policy's denoiser in low precision inside the block, for its weights now."""
        module = policy.trainable.module
        self.refresh_seconds = 0.0
        if module is not self._module:
            self._plan(module, policy.trainable.uses_lora)
        elif self._refreshes and policy.version != self._version:
            start = time.perf_counter()
            for swap in self.swaps:
                swap.stand_in.refresh()
            self.refresh_seconds = time.perf_counter() - start
        self._version = policy.version
        for swap in self.swaps:
            setattr(swap.parent, swap.name, swap.stand_in)
        try:
            yield
        finally:
            for swap in self.swaps:
                setattr(swap.parent, swap.name, swap.original)

    def _plan(self, module: torch.nn.Module, uses_lora: bool) -> None:
        """Which layers get stand-ins, and the stand-ins, quantized now."""
        start = time.perf_counter()
        merge = uses_lora and self.cfg.lora == "merge"
        self._refreshes = merge or not uses_lora  # a side copy's base is frozen
        self.swaps = []
        for name, layer in list(module.named_modules()):
            plain = name.removesuffix(".base_layer")
            if isinstance(layer, LoraLayer):
                if merge and quantizable(plain, layer.base_layer, self.keep, self.min_dim,
                                         self.cfg.precision):  # fmt: skip
                    self._add(module, name, layer, layer.base_layer, _merged(layer))
            elif not (merge and name.endswith(".base_layer")) and quantizable(
                plain, layer, self.keep, self.min_dim, self.cfg.precision
            ):
                self._add(module, name, layer, layer, None)
        self._module = module
        self.refresh_seconds = time.perf_counter() - start

    def _add(self, module, name, original, layer, weight) -> None:
        parent_name, _, child = name.rpartition(".")
        fmt, activations = self.cfg.precision, self.cfg.quantize_activations
        device = layer.weight.device
        kernels = self.cfg.kernels == "auto" and fp8_kernels(device)
        if fmt == "fp8" and activations and kernels and isinstance(layer, torch.nn.Linear):
            stand_in = Float8Linear(layer, weight, activation_quantizer(device))
        else:
            stand_in = FakeQuantized(layer, fmt, activations, weight)
        self.swaps.append(_Swap(module.get_submodule(parent_name), child, original, stand_in))


def _merged(lora_layer: LoraLayer):
    """The merged weight W + s·BA of a LoRA-wrapped layer's active adapter."""

    def weight() -> torch.Tensor:
        base = lora_layer.base_layer.weight
        delta = sum(lora_layer.get_delta_weight(a) for a in lora_layer.active_adapters)
        return base + delta

    return weight
