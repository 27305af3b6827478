"""peft LoRA on a denoiser: add, extract the state, load it, disable it for the reference."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from raydraft.config import LoraConfig


def add_lora(module: torch.nn.Module, cfg: LoraConfig, default_targets: Sequence[str]) -> None:
    """Inject a LoRA adapter and freeze everything else in `module`."""
    targets = list(cfg.target_modules or default_targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=targets,
        init_lora_weights=cfg.init if cfg.init == "gaussian" else True,
        lora_dropout=cfg.dropout,
    )
    module.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, module)
    if not any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise ValueError(
            f"LoRA target_modules {targets} matched no layer of {type(module).__name__}"
        )


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (about 1% of the model), detached copies."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the adapter in place, so optimizers keep their parameters."""
    expected = set(get_peft_model_state_dict(module))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(
            f"LoRA state does not match the adapter: missing {missing[:3]}, extra {extra[:3]}"
        )
    with torch.no_grad():
        set_peft_model_state_dict(module, state)


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The base model with the adapter switched off: the KL reference of Flow-GRPO."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
