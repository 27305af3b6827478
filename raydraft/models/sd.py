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
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, guided_prediction
from raydraft.models.pipeline import PipelinePolicy

# diffusers' and DDPO's SD LoRA targets: the UNet's self- and cross-attention projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SDPolicy(PipelinePolicy):
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionPipeline
    load_kwargs: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)
    lora_targets = DEFAULT_LORA_TARGETS

    def __init__(
        self, pipe: DiffusionPipeline, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> None:
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"model.path {model_cfg.path!r}: prediction_type {self.prediction_type!r}; "
                "the SD adapter takes epsilon or v_prediction models"
            )
        super().__init__(pipe, model_cfg, keep_reference)
        self.unet = self.denoiser
        side = self.latent_side(self.unet.config.sample_size)
        self.latent_shape = (self.unet.config.in_channels, side, side)

    def _negatives(self, n: int, negative_prompts: Sequence[str] | None) -> list[str] | None:
        """None when no negative prompt is set: the pipeline's own rule then applies (SDXL
        zeroes the unconditional embeddings, SD 1.x encodes "")."""
        if negative_prompts:
            return list(negative_prompts)
        return [self.cfg.negative_prompt] * n if self.cfg.negative_prompt else None

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None) -> Conditioning:
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompts,
            self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=self._negatives(len(prompts), negative_prompts),
        )
        return Conditioning(
            embeds=embeds.to(self.dtype), negative_embeds=negative_embeds.to(self.dtype)
        )

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.trainable.active(x, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """Epsilon or v at integer timesteps `t`."""
        return guided_prediction(self._unet, x, t, cond, guidance, self.device, self.dtype)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return super().initial_noise(seeds) * self.scheduler.init_noise_sigma
