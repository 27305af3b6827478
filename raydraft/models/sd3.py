"""Stable Diffusion 3 / 3.5 behind the Policy protocol (rectified flow, velocity output).

The adapter wraps a `StableDiffusion3Pipeline` and reuses its own `encode_prompt`, timestep
scaling, CFG combination and latent (de)normalisation, so a plain Euler loop over `predict`
reproduces `pipe(...)` exactly (tests/test_sd3_policy.py checks this). Only the transformer
trains; the three text encoders and the VAE stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, guided_prediction, initial_noise
from raydraft.models.loading import export_pipeline, load_pipeline
from raydraft.models.trainable import TrainableDelegate, TrainableDenoiser

# Flow-GRPO's SD3 LoRA targets: the image-stream and the text-stream (joint) attention.
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


class SD3Policy(TrainableDelegate):
    prediction_type = "flow"

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        model_cfg: ModelConfig,
        keep_reference: bool = False,
        max_sequence_length: int = 256,
    ) -> None:
        """`max_sequence_length` is the T5 prompt length (the pipeline's default is 256)."""
        self.cfg = model_cfg
        self.dtype = getattr(torch, model_cfg.dtype)
        self.max_sequence_length = max_sequence_length
        if pipe.dtype != self.dtype:  # a caller's pipeline; re-casting a loaded one only warns
            pipe.to(dtype=self.dtype)
        self.pipe = pipe.to(model_cfg.device)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.trainable = TrainableDenoiser(
            self.transformer, model_cfg.lora, DEFAULT_LORA_TARGETS, keep_reference
        )
        if model_cfg.gradient_checkpointing:
            self.trainable.set_gradient_checkpointing(True)
        self._latent_shape = self._compute_latent_shape()

    @classmethod
    def from_pretrained(cls, model_cfg: ModelConfig, keep_reference: bool = False) -> SD3Policy:
        """Load a diffusers directory (or a hub id already in the local cache): never downloads."""
        pipe = load_pipeline(StableDiffusion3Pipeline, model_cfg)
        return cls(pipe, model_cfg, keep_reference)

    def _compute_latent_shape(self) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        config = self.transformer.config
        resolution = self.cfg.resolution or config.sample_size * scale
        if resolution % (scale * config.patch_size):
            raise ValueError(
                f"resolution {resolution} must be divisible by {scale * config.patch_size} "
                "(VAE scale factor × transformer patch size)"
            )
        return (config.in_channels, resolution // scale, resolution // scale)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
    ) -> Conditioning:
        """Negatives are always encoded, so whether to use CFG is decided per `predict` call."""
        prompts = list(prompts)
        negatives = list(negative_prompts or [self.cfg.negative_prompt] * len(prompts))
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's VAE decode and postprocess, kept differentiable for DRaFT; float32
        out so rewards see one dtype whatever the model's."""
        config = self.vae.config
        latents = latents.to(self.dtype) / config.scaling_factor + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return initial_noise(self.latent_shape, seeds, self.dtype).to(self.device)

    def modules(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        frozen = (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        return [*self.trainable.modules(), *(m for m in frozen if m is not None)]

    def export(self, out_dir: str | Path) -> None:
        export_pipeline(self.pipe, self.trainable, "transformer", out_dir)

    def train(self, mode: bool = True) -> None:
        """Only the transformer changes mode: T5 has dropout, and the frozen parts stay eval."""
        self.transformer.train(mode)
