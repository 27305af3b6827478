"""What every diffusers-pipeline adapter shares: placement, frozen parts, the trainable
denoiser, the memory switches, prompt caching, decoding and export.

A family adapter (sd.py, sdxl.py, sd3.py, flux.py) names its pipeline class, denoiser,
text encoders and LoRA targets, and writes the family's own parts: `_encode` (the
pipeline's `encode_prompt`), `predict`, `latent_shape` and its schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, initial_noise
from raydraft.models.loading import export_pipeline, load_pipeline
from raydraft.models.text_cache import TextEmbeddingCache
from raydraft.models.trainable import TrainableDelegate, TrainableDenoiser


class PipelinePolicy(TrainableDelegate):
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    load_kwargs: ClassVar[dict[str, Any]] = {}
    denoiser_name: ClassVar[str]  # the pipeline component that trains
    text_encoder_names: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]
    latent_shape: tuple[int, ...]  # (C, H, W), set by the family from `latent_side`

    def __init__(
        self, pipe: DiffusionPipeline, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> None:
        self.cfg = model_cfg
        self.dtype = getattr(torch, model_cfg.dtype)
        if pipe.dtype != self.dtype:  # a caller's pipeline; re-casting a loaded one only warns
            pipe.to(dtype=self.dtype)
        self.pipe = pipe
        self.denoiser = getattr(pipe, self.denoiser_name).to(self.device)
        self.vae = pipe.vae.to(self.device).requires_grad_(False).eval()
        if model_cfg.vae_slicing:
            self.vae.enable_slicing()
        if model_cfg.vae_tiling:
            self.vae.enable_tiling()
        # Offloaded encoders never reach the device: they run in host memory, and only
        # their embeddings move.
        self.text_device = torch.device("cpu") if model_cfg.offload_text_encoders else self.device
        for encoder in self.text_encoders():
            encoder.to(self.text_device).requires_grad_(False).eval()
        self.text_cache = TextEmbeddingCache(model_cfg.text_embedding_cache)
        self.trainable = TrainableDenoiser(
            self.denoiser, model_cfg.lora, self.lora_targets, keep_reference
        )
        if model_cfg.gradient_checkpointing:
            self.trainable.set_gradient_checkpointing(True)

    @classmethod
    def from_pretrained(
        cls, model_cfg: ModelConfig, keep_reference: bool = False
    ) -> PipelinePolicy:
        """Load a diffusers directory, a hub id already in the local cache, or a single-file
        denoiser with the rest of its pipeline (`models/loading.py`): never downloads."""
        pipe = load_pipeline(cls.pipeline_class, model_cfg, cls.denoiser_name, **cls.load_kwargs)
        return cls(pipe, model_cfg, keep_reference)

    def latent_side(self, native_latent_side: int, patch: int = 1) -> int:
        """The latent side for model.resolution (pixels; None: the model's native size),
        which must split into whole VAE cells and whole `patch`-sized denoiser tokens."""
        scale = self.pipe.vae_scale_factor
        resolution = self.cfg.resolution or native_latent_side * scale
        if resolution % (scale * patch):
            raise ValueError(
                f"resolution {resolution} must be divisible by {scale * patch} "
                f"(VAE scale factor {scale} × patch {patch})"
            )
        return resolution // scale

    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = (getattr(self.pipe, name, None) for name in self.text_encoder_names)
        return [encoder for encoder in encoders if encoder is not None]

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
    ) -> Conditioning:
        cond = self.text_cache.encode(prompts, negative_prompts, self._encode)
        return cond.to(self.device)

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None) -> Conditioning:
        """The pipeline's own `encode_prompt` on `text_device`, in the model dtype."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's latent denormalisation, VAE decode and postprocess, kept
        differentiable for DRaFT; float32 out so rewards see one dtype whatever the model's."""
        config = self.vae.config
        latents = latents.to(self.dtype)
        if getattr(config, "latents_mean", None) is not None:  # SDXL-style per-channel stats
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return initial_noise(self.latent_shape, seeds, self.dtype).to(self.device)

    def modules(self) -> list[torch.nn.Module]:
        """What lives on the device (offloaded text encoders stay in host memory)."""
        on_device = [] if self.cfg.offload_text_encoders else self.text_encoders()
        return [*self.trainable.modules(), self.vae, *on_device]

    def export(self, out_dir: str | Path) -> None:
        export_pipeline(self.pipe, self.trainable, self.denoiser_name, out_dir)

    def train(self, mode: bool = True) -> None:
        """Only the denoiser changes mode; the frozen parts stay in eval (T5 has dropout)."""
        self.denoiser.train(mode)
