"""The Policy protocol: what samplers, algorithms and actors need from a model family.

A policy wraps one denoising network (UNet or transformer) with its text encoders and
decoder. Samplers call `predict`; algorithms call `decode` and the trainable-state
methods; the Ray layer ships `trainable_state()` between processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from raydraft.rows import Rows

PredictionType = Literal["epsilon", "v_prediction", "flow"]


@dataclass
class Conditioning(Rows):
    """Text conditioning for a batch; negatives are present only when CFG needs them.

    `extra` carries family-specific tensors (SDXL time ids, attention masks) whose first
    dimension is the batch, so `select`, `concat` and `repeat_interleave` stay generic.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if f.name != "extra" and getattr(self, f.name) is not None
        }
        return replace(self, **changes, extra={k: fn(v) for k, v in self.extra.items()})

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row `repeats` times in a row (a prompt's group of samples)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def unconditional_first(self) -> Conditioning:
        """The [unconditional, conditional] batch of one CFG call, as the diffusers
        pipelines build it (family extras repeat for both halves)."""
        pooled = None
        if self.pooled is not None:
            pooled = torch.cat([self.negative_pooled, self.pooled])
        return Conditioning(
            embeds=torch.cat([self.negative_embeds, self.embeds]),
            pooled=pooled,
            extra={k: torch.cat([v, v]) for k, v in self.extra.items()},
        )

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda t: t.to(device))

    def tile(self, times: int) -> Conditioning:
        """The whole batch `times` times over (rows i, i + B, ... share a prompt)."""
        return self._map(lambda t: t.repeat(times, *[1] * (t.dim() - 1)))


@runtime_checkable
class Policy(Protocol):
    """One model family behind the interface the samplers and algorithms use.

    `predict` returns epsilon (SD1/SDXL), v (v-prediction) or the flow velocity
    (SD3/FLUX/toy) according to `prediction_type`; classifier-free guidance is applied
    inside, so a sampler never sees the unconditional branch. Epsilon and v policies also
    carry `scheduler`, the DDIMScheduler of their noise schedule, for the DDIM sampler;
    flow policies carry `flow_sigmas(num_steps)`, the times their own pipeline steps through.
    """

    prediction_type: PredictionType
    version: int

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent (C, H, W), without the batch dimension."""
        ...

    @property
    def device(self) -> torch.device: ...

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
    ) -> Conditioning: ...

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """Model output at latents `x` and per-sample times `t` (the sampler's time)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], NCHW float, differentiable."""
        ...

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T with diffusers' seed convention: row i is randn from Generator().manual_seed(s_i)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What the learner broadcasts: the LoRA state, or all weights without LoRA."""
        ...

    def load_trainable(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def shard(self) -> None:
        """FSDP2 across the learner ranks (full fine-tuning); `trainable_state` and
        `load_trainable` then gather and scatter, as collectives."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Within this context `predict` is the frozen reference (adapter disabled)."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...

    def train(self, mode: bool = True) -> None: ...

    def modules(self) -> list[torch.nn.Module]:
        """Every module the policy keeps on its device, the frozen reference included (not
        text encoders offloaded to host memory): what moves when colocated roles swap a
        device (`raydraft.offload`)."""
        ...

    def export(self, out_dir: str | Path) -> None:
        """The current weights in the form the family's own tools load (`raydraft export`):
        a diffusers LoRA, a whole diffusers pipeline, or the toy model's directory."""
        ...


def initial_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Per-seed CPU normal draws stacked on the batch dimension (diffusers' generator-list rule).

    `shape` excludes the batch dimension. Drawing on CPU keeps x_T bit-identical on every
    worker, whatever its device.
    """
    rows = [
        torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=dtype)
        for s in seeds
    ]
    return torch.cat(rows)


def guided_prediction(
    model: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`model(x, t, cond)` with classifier-free guidance as the pipelines compute it: one
    call on [unconditional, conditional], then uncond + guidance * (text - uncond)."""
    latents = x.to(device, dtype)
    t = torch.as_tensor(t, device=device).expand(x.shape[0])
    if guidance > 1 and cond.negative_embeds is not None:
        both = model(torch.cat([latents, latents]), torch.cat([t, t]), cond.unconditional_first())
        uncond, text = both.chunk(2)
        out = uncond + guidance * (text - uncond)
    else:
        out = model(latents, t, cond)
    return out.to(x.dtype)
