"""The embedded tiny text-to-image flow model, built from real diffusers/transformers classes.

Pixel space, 32×32 RGB in [-1, 1]: a small `UNet2DConditionModel` predicts the flow
velocity on the image folded by a 2× pixel-unshuffle (12 channels at 16×16, which trains
far faster on CPU than a 32×32 UNet or a tiny DiT), conditioned on a tiny `CLIPTextModel`
with a byte-level `CLIPTokenizer` built in memory (no vocabulary download).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning, guided_prediction, initial_noise
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.models.tokenizers import byte_clip_tokenizer
from raydraft.models.trainable import TrainableDelegate, TrainableDenoiser

IMAGE_SIZE = 32
MAX_TOKENS = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "toy-model"


def build_toy_components(
    seed: int = 0, words: Sequence[str] = ()
) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer]:
    """Freshly initialised components (random weights), deterministic in `seed`;
    `words` become single tokens (the shapes world's vocabulary)."""
    torch.manual_seed(seed)
    tokenizer = byte_clip_tokenizer(words, MAX_TOKENS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=12,
        out_channels=12,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet, text_encoder.eval(), tokenizer


def save_toy_model(path: str | Path, unet, text_encoder, tokenizer) -> None:
    path = Path(path)
    unet.save_pretrained(path / "unet")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")


class ToyPolicy(TrainableDelegate):
    prediction_type = "flow"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        cfg: ModelConfig,
        keep_reference: bool = False,
    ) -> None:
        if cfg.resolution not in (None, IMAGE_SIZE):
            raise ValueError(f"model.resolution: the toy model is {IMAGE_SIZE}x{IMAGE_SIZE} only")
        self.cfg = cfg
        self.dtype = getattr(torch, cfg.dtype)
        self.unet = (
            unet.to(cfg.device) if unet.dtype == self.dtype else unet.to(cfg.device, self.dtype)
        )
        self.text_encoder = text_encoder.to(cfg.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.trainable = TrainableDenoiser(self.unet, cfg.lora, LORA_TARGETS, keep_reference)
        if cfg.gradient_checkpointing:
            self.trainable.set_gradient_checkpointing(True)

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, keep_reference: bool = False) -> ToyPolicy:
        """Load `cfg.path`, or the pretrained model shipped with the package."""
        path = Path(cfg.path) if cfg.path else SHIPPED_MODEL
        if not (path / "unet").is_dir():
            raise FileNotFoundError(
                f"model.path {str(path)!r}: no toy model there (expected unet/, text_encoder/ "
                "and tokenizer/; `python -m raydraft.embedded.pretrain` writes them)"
            )
        return cls(
            UNet2DConditionModel.from_pretrained(path / "unet"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            CLIPTokenizer.from_pretrained(path / "tokenizer"),
            cfg,
            keep_reference,
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def encode(self, prompts, negative_prompts=None) -> Conditioning:
        negatives = negative_prompts or [self.cfg.negative_prompt] * len(prompts)
        return Conditioning(embeds=self._embed(prompts), negative_embeds=self._embed(negatives))

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        folded = F.pixel_unshuffle(x, 2)
        out = self.trainable.active(folded, t * 1000, encoder_hidden_states=cond.embeds).sample
        return F.pixel_shuffle(out, 2)

    def predict(self, x, t, cond, guidance) -> torch.Tensor:
        return guided_prediction(self._velocity, x, t, cond, guidance, self.device, self.dtype)

    def flow_sigmas(self, num_steps: int) -> torch.Tensor:
        """The schedule the toy model was pretrained on: uniform times, no shift."""
        return flow_sigmas(num_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def initial_noise(self, seeds) -> torch.Tensor:
        return initial_noise(self.latent_shape, seeds, self.dtype).to(self.device)

    def modules(self) -> list[torch.nn.Module]:
        return [*self.trainable.modules(), self.text_encoder]

    def export(self, out_dir: str | Path) -> None:
        """The toy model's own directory with the trained weights, a LoRA merged into the
        layers it adapts: `model.path: out_dir` samples it, or trains on from it."""
        unet = self.unet
        if self.trainable.uses_lora:  # a merged copy: the policy keeps its adapter
            unet = copy.deepcopy(unet)
            unet.fuse_lora()
            unet.unload_lora()
        save_toy_model(out_dir, unet, self.text_encoder, self.tokenizer)

    def train(self, mode: bool = True) -> None:
        self.unet.train(mode)
