"""FLUX.1 (dev and schnell) behind the Policy protocol (rectified flow, velocity output).

The adapter wraps a `FluxPipeline` and reuses its text encoding, 2×2 latent packing,
position ids and schedule, so our ODE sampler over `predict` reproduces `pipe(...)` exactly
(tests/test_flux_policy.py). Samplers see unpacked latents (16, H/8, W/8), the same layout
`initial_noise` draws with diffusers' seed convention; packing is a permutation, so the
Euler, SDE and CPS steps are the same in either layout and only the transformer call packs.

Guidance: FLUX.1-dev is guidance-distilled, so `sampler.guidance_scale` is the guidance
embedding the transformer takes (the pipeline's `guidance_scale`, 3.5 by default there);
schnell has no such embedding and takes 1 only. True classifier-free guidance with the
negative prompt is `model.true_cfg_scale` (the pipeline's `true_cfg_scale`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, guided_prediction
from raydraft.models.flow_schedule import pipeline_sigmas
from raydraft.models.pipeline import PipelinePolicy
from raydraft.models.trainable import JOINT_ATTENTION_LORA_TARGETS


class FluxPolicy(PipelinePolicy):
    prediction_type = "flow"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = FluxPipeline
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # The double-stream blocks' joint attention (the single-stream blocks' q/k/v too).
    lora_targets = JOINT_ATTENTION_LORA_TARGETS

    def __init__(
        self, pipe: FluxPipeline, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> None:
        super().__init__(pipe, model_cfg, keep_reference)
        self.transformer = self.denoiser
        self.max_sequence_length = model_cfg.max_sequence_length or 512  # the pipeline's default
        self.guidance_embeds = self.transformer.config.guidance_embeds
        side = self.latent_side(pipe.default_sample_size, patch=2)  # the 2×2 packing
        self.latent_shape = (self.transformer.config.in_channels // 4, side, side)
        self._image_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", self.dtype)

    def flow_sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: sigmas 1 … 1/N, shifted by the scheduler (dev: mu from
        the packed token count, schnell: none)."""
        scheduler = self.pipe.scheduler
        sigmas = None
        if not scheduler.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        _, height, width = self.latent_shape
        return pipeline_sigmas(scheduler, num_steps, (height // 2) * (width // 2), sigmas)

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None) -> Conditioning:
        """Negatives are encoded only for true CFG: T5-XXL is the costly encoder."""
        embeds, pooled = self._encode_prompts(prompts)
        if self.cfg.true_cfg_scale <= 1:
            return Conditioning(embeds=embeds, pooled=pooled)
        negative_embeds, negative_pooled = self._encode_prompts(
            negative_prompts or [self.cfg.negative_prompt] * len(prompts)
        )
        return Conditioning(embeds, pooled, negative_embeds, negative_pooled)

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.text_device,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds.to(self.dtype), pooled.to(self.dtype)

    def _velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        batch, channels, height, width = x.shape
        packed = self.pipe._pack_latents(x, batch, channels, height, width)
        embedded = None
        if self.guidance_embeds:
            embedded = torch.full((batch,), guidance, dtype=torch.float32, device=x.device)
        # The pipeline passes sigma (its timesteps / 1000); the transformer scales it back.
        out = self.trainable.active(
            hidden_states=packed,
            timestep=t,
            guidance=embedded,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=self._image_ids.to(x.device),
            return_dict=False,
        )[0]
        pixels = height * self.pipe.vae_scale_factor, width * self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, *pixels, self.pipe.vae_scale_factor)

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """Velocity at x_t = (1 - t) x0 + t eps, with `guidance` embedded (dev) and true CFG
        at `model.true_cfg_scale` when it is above 1."""
        if not self.guidance_embeds and guidance != 1:
            raise ValueError(
                f"sampler.guidance_scale={guidance}: this FLUX transformer has no guidance "
                "embedding (FLUX.1-schnell); set it to 1, or use model.true_cfg_scale"
            )

        def velocity(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            return self._velocity(x, t, cond, guidance)

        return guided_prediction(
            velocity, x, t, cond, self.cfg.true_cfg_scale, self.device, self.dtype
        )
