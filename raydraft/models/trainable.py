"""The trainable part of a policy: its denoiser with a LoRA adapter, or all its weights.

Adapters compose one `TrainableDenoiser` so trainable state, versions, the reference
context and gradient checkpointing behave the same in every model family. Adapters call
`trainable.active` for each prediction: the denoiser, or inside `reference()` the frozen
base model (the adapter switched off, or a frozen copy for full fine-tuning).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch

from raydraft.config import LoraConfig, ModelConfig
from raydraft.models.lora import adapters_disabled, add_lora, load_lora_state, lora_state
from raydraft.sharding import gather, load_full_state, shard_module

# MM-DiT joint attention (SD3's blocks, FLUX's double-stream blocks): the image stream's
# projections and the text stream's added ones.
JOINT_ATTENTION_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


class TrainableDenoiser:
    def __init__(
        self,
        denoiser: torch.nn.Module,
        lora: LoraConfig,
        default_targets: Sequence[str],
        keep_reference: bool = False,
    ) -> None:
        self.module = denoiser
        self.uses_lora = lora.enabled
        self.version = 0
        self.sharded = False
        self.active = denoiser
        self._frozen_copy: torch.nn.Module | None = None
        if self.uses_lora:
            add_lora(denoiser, lora, default_targets)
        else:
            denoiser.requires_grad_(True)
            if keep_reference:
                self._frozen_copy = copy.deepcopy(denoiser).requires_grad_(False).eval()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def modules(self) -> list[torch.nn.Module]:
        return [self.module] + ([self._frozen_copy] if self._frozen_copy is not None else [])

    def lora_metadata(self) -> dict:
        """The adapter's peft config, which diffusers stores beside exported LoRA weights so
        that rank and alpha load back unchanged."""
        return self.module.peft_config["default"].to_dict()

    def shard(self) -> None:
        """FSDP2 over the default process group (`raydraft.sharding`); full fine-tuning
        only. From here on `state` and `load` are collectives: every rank calls them."""
        if self.uses_lora:
            raise ValueError("FSDP shards full fine-tuning: set model.lora.enabled=false")
        shard_module(self.module)
        if self._frozen_copy is not None:
            shard_module(self._frozen_copy)
        self.sharded = True

    def state(self) -> dict[str, torch.Tensor]:
        if self.uses_lora:
            return lora_state(self.module)
        if self.sharded:
            return gather(self.module.state_dict())
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        if self.uses_lora:
            load_lora_state(self.module, state)
        elif self.sharded:
            load_full_state(self.module, state)
        else:
            self.module.load_state_dict(state, strict=True)
        self.version = version

    @contextmanager
    def reference(self) -> Iterator[None]:
        if self.uses_lora:
            with adapters_disabled(self.module):
                yield
            return
        if self._frozen_copy is None:
            raise RuntimeError(
                "full fine-tuning keeps no reference model: build the policy with "
                "keep_reference=True when the algorithm needs a KL term"
            )
        self.active = self._frozen_copy
        try:
            yield
        finally:
            self.active = self.module

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.module.enable_gradient_checkpointing()
        else:
            self.module.disable_gradient_checkpointing()


class TrainableDelegate:
    """The Policy members every adapter shares: those that forward to `self.trainable`, and
    the device from the model config."""

    trainable: TrainableDenoiser
    cfg: ModelConfig

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def version(self) -> int:
        return self.trainable.version

    @version.setter
    def version(self, value: int) -> None:
        self.trainable.version = value

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable.parameters()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.trainable.state()

    def load_trainable(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.trainable.load(state, version)

    def shard(self) -> None:
        self.trainable.shard()

    def reference(self) -> AbstractContextManager[None]:
        return self.trainable.reference()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.trainable.set_gradient_checkpointing(enabled)
