"""Stable Diffusion 1.x / 2.x behind the Policy protocol (epsilon or v-prediction, DDIM).

The adapter wraps a `StableDiffusionPipeline` and reuses its own `encode_prompt`, CFG
combination ([uncond, text] in one UNet call) and latent scaling, so a DDIM loop over
`predict` reproduces `pipe(...)` with a `DDIMScheduler` exactly
(tests/test_sd_policy.py). Whatever scheduler the checkpoint ships (PNDM for SD 1.5), the
sampler runs DDIM over the same noise schedule: `scheduler` is a DDIMScheduler built from
its config. Only the UNet trains; the text encoder and the VAE stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, initial_noise
from raydraft.models.loading import load_pipeline
from raydraft.models.trainable import TrainableDelegate, TrainableDenoiser

# diffusers' and DDPO's SD LoRA targets: the UNet's self- and cross-attention projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SDPolicy(TrainableDelegate):
    def __init__(
        self, pipe: StableDiffusionPipeline, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> None:
        self.cfg = model_cfg
        self.dtype = getattr(torch, model_cfg.dtype)
        if pipe.dtype != self.dtype:
            pipe.to(dtype=self.dtype)
        self.pipe = pipe.to(model_cfg.device)
        self.unet = pipe.unet
        self.vae = pipe.vae
        for frozen in (pipe.vae, pipe.text_encoder):
            frozen.requires_grad_(False).eval()
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"model.path {model_cfg.path!r}: prediction_type {self.prediction_type!r}; "
                "the SD adapter takes epsilon or v_prediction models"
            )
        self.trainable = TrainableDenoiser(
            self.unet, model_cfg.lora, DEFAULT_LORA_TARGETS, keep_reference
        )
        if model_cfg.gradient_checkpointing:
            self.trainable.set_gradient_checkpointing(True)
        scale = pipe.vae_scale_factor
        resolution = model_cfg.resolution or self.unet.config.sample_size * scale
        if resolution % scale:
            raise ValueError(f"resolution {resolution} must be divisible by {scale}")
        side = resolution // scale
        self._latent_shape = (self.unet.config.in_channels, side, side)

    @classmethod
    def from_pretrained(cls, model_cfg: ModelConfig, keep_reference: bool = False) -> SDPolicy:
        """Load a diffusers directory (or a hub id already in the local cache): never downloads."""
        pipe = load_pipeline(
            StableDiffusionPipeline, model_cfg, safety_checker=None, requires_safety_checker=False
        )
        return cls(pipe, model_cfg, keep_reference)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
    ) -> Conditioning:
        prompts = list(prompts)
        negatives = list(negative_prompts or [self.cfg.negative_prompt] * len(prompts))
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompts,
            self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
        )
        return Conditioning(
            embeds=embeds.to(self.dtype), negative_embeds=negative_embeds.to(self.dtype)
        )

    def _unet(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.trainable.active(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """Epsilon or v at integer timesteps `t`; CFG as the pipeline does it."""
        latents = x.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        if guidance > 1 and cond.negative_embeds is not None:
            both = self._unet(
                torch.cat([latents, latents]),
                torch.cat([t, t]),
                torch.cat([cond.negative_embeds, cond.embeds]),
            )
            uncond, text = both.chunk(2)
            out = uncond + guidance * (text - uncond)
        else:
            out = self._unet(latents, t, cond.embeds)
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's VAE decode and postprocess, differentiable; float32 out."""
        latents = latents.to(self.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        noise = initial_noise(self.latent_shape, seeds, self.dtype)
        return (noise * self.scheduler.init_noise_sigma).to(self.device)

    def modules(self) -> list[torch.nn.Module]:
        return [*self.trainable.modules(), self.vae, self.pipe.text_encoder]

    def train(self, mode: bool = True) -> None:
        self.unet.train(mode)
