"""Stable Diffusion 3 / 3.5 behind the Policy protocol (rectified flow, velocity output).

The adapter wraps a `StableDiffusion3Pipeline` and reuses its own `encode_prompt`, timestep
scaling, CFG combination, latent (de)normalisation and schedule, so our ODE sampler over
`predict` reproduces `pipe(...)` exactly (tests/test_sd3_policy.py checks this). Only the
transformer trains; the three text encoders and the VAE stay frozen.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, guided_prediction
from raydraft.models.flow_schedule import pipeline_sigmas
from raydraft.models.pipeline import PipelinePolicy
from raydraft.models.trainable import JOINT_ATTENTION_LORA_TARGETS


class SD3Policy(PipelinePolicy):
    prediction_type = "flow"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_targets = JOINT_ATTENTION_LORA_TARGETS  # Flow-GRPO's SD3 targets

    def __init__(
        self, pipe: StableDiffusion3Pipeline, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> None:
        super().__init__(pipe, model_cfg, keep_reference)
        self.transformer = self.denoiser
        self.max_sequence_length = model_cfg.max_sequence_length or 256  # the pipeline's default
        config = self.transformer.config
        side = self.latent_side(config.sample_size, config.patch_size)
        self.latent_shape = (config.in_channels, side, side)

    def flow_sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: its scheduler's shift (3.0 for SD3), or a dynamic one."""
        patch = self.transformer.config.patch_size
        _, height, width = self.latent_shape
        return pipeline_sigmas(self.pipe.scheduler, num_steps, (height // patch) * (width // patch))

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None) -> Conditioning:
        """Negatives are always encoded, so whether to use CFG is decided per `predict` call."""
        negatives = negative_prompts or [self.cfg.negative_prompt] * len(prompts)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            embeds=embeds.to(self.dtype),
            pooled=pooled.to(self.dtype),
            negative_embeds=neg_embeds.to(self.dtype),
            negative_pooled=neg_pooled.to(self.dtype),
        )

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # The pipeline feeds the scheduler's timesteps, sigma * num_train_timesteps (1000).
        return self.trainable.active(
            hidden_states=x,
            timestep=t * 1000,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """Velocity at x_t = (1 - t) x0 + t eps."""
        return guided_prediction(self._velocity, x, t, cond, guidance, self.device, self.dtype)
