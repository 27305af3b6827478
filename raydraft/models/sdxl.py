"""Stable Diffusion XL behind the Policy protocol: the SD adapter plus SDXL's conditioning.

SDXL's UNet also takes the pooled embedding of its second text encoder and six "time ids"
(original size, crop corner, target size); classifier-free guidance concatenates them the
way `StableDiffusionXLPipeline` does, so a DDIM loop over `predict` reproduces the pipeline
(tests/test_sd_policy.py). Without a negative prompt the unconditional embeddings are the
zeros of `force_zeros_for_empty_prompt`, as in the pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from raydraft.models.base import Conditioning
from raydraft.models.sd import SDPolicy


class SDXLPolicy(SDPolicy):
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionXLPipeline
    load_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}  # not part of the model
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None) -> Conditioning:
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=self._negatives(len(prompts), negative_prompts),
        )
        pixels = tuple(side * self.pipe.vae_scale_factor for side in self.latent_shape[1:])
        time_ids = torch.tensor(
            [[*pixels, 0, 0, *pixels]], dtype=self.dtype, device=self.text_device
        )
        return Conditioning(
            embeds=embeds.to(self.dtype),
            pooled=pooled.to(self.dtype),
            negative_embeds=negative_embeds.to(self.dtype),
            negative_pooled=negative_pooled.to(self.dtype),
            extra={"time_ids": time_ids.repeat(len(prompts), 1)},
        )

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return self.trainable.active(
            x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]
