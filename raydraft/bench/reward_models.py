"""Reward models with random weights, saved as the rewards load them. CLIP models (model, PIL
image processor and tokenizer in one directory) of a chosen size: `small` for tests and CPU
benchmarks, `vit-l` (OpenAI CLIP ViT-L/14: CLIPScore, the aesthetic predictor's backbone)
and `vit-h` (LAION CLIP ViT-H/14: PickScore) for benchmarks on a GPU; and the aesthetic
predictor's MLP file with the original's key names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from raydraft.models.tokenizers import byte_clip_tokenizer
from raydraft.rewards.clip_rewards import CLIPImageProcessorPil

# (text width, text layers, text heads, vision width, vision layers, vision heads, patch,
# projection): the real architectures' shapes.
CLIP_SIZES = {
    "small": (32, 2, 2, 32, 2, 2, 32, 16),
    "vit-l": (768, 12, 12, 1024, 24, 16, 14, 768),
    "vit-h": (1024, 24, 16, 1280, 32, 16, 14, 1024),
}


def save_clip(dirpath: str | Path, size: str = "small", seed: int = 0) -> str:
    """A CLIPModel of `size` (224-pixel images, 77-token text) with random weights."""
    text, text_layers, text_heads, vision, vision_layers, vision_heads, patch, proj = CLIP_SIZES[
        size
    ]
    torch.manual_seed(seed)
    tokenizer = byte_clip_tokenizer()
    ids: dict[str, Any] = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id")
                           for k in ("bos", "eos", "pad")}  # fmt: skip
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text, "intermediate_size": 4 * text,
            "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
            "max_position_embeddings": 77, **ids,
        },
        vision_config={
            "image_size": 224, "patch_size": patch, "hidden_size": vision,
            "intermediate_size": 4 * vision, "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
        },
        projection_dim=proj,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(dirpath)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    processor.save_pretrained(dirpath)
    return str(dirpath)


AESTHETIC_HIDDEN = (1024, 128, 64, 16)  # the improved aesthetic predictor's layer widths


def save_aesthetic_mlp(path: str | Path, width: int, seed: int = 0) -> str:
    """An aesthetic MLP file over `width`-dimensional embeddings (768 for ViT-L/14), keys
    `layers.{0,2,4,6,7}.*` as in `sac+logos+ava1-l14-linearMSE.pth`."""
    generator = torch.Generator().manual_seed(seed)
    sizes = zip((width, *AESTHETIC_HIDDEN), (*AESTHETIC_HIDDEN, 1), strict=True)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes, strict=True):
        weight = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.weight"] = weight
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    torch.save(state, path)
    return str(path)
