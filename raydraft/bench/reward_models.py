"""Reward models with random weights, saved as the rewards load them. CLIP models (model, PIL
image processor and tokenizer in one directory) of a chosen size: `small` for tests and CPU
benchmarks, `vit-l` (OpenAI CLIP ViT-L/14: CLIPScore, the aesthetic predictor's backbone)
and `vit-h` (LAION CLIP ViT-H/14: PickScore, HPSv2) for benchmarks on a GPU; the aesthetic
predictor's MLP file with the original's key names; and a converted ImageReward directory
(`small`, or `full`: BLIP's ViT-L/16 and BERT-base)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import BlipTextModel, BlipVisionModel, CLIPConfig, CLIPModel, CLIPProcessor

from raydraft.models.tokenizers import byte_clip_tokenizer
from raydraft.rewards.clip_rewards import CLIPImageProcessorPil
from raydraft.rewards.imagereward import (
    MAX_TOKENS,
    REWARD_MEAN,
    REWARD_STD,
    VIT_LARGE,
    blip_tokenizer,
    text_config,
    vision_config,
)

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


def aesthetic_mlp_state(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the aesthetic predictor's MLP (ImageReward's head has the same
    layout) over `width`-dimensional inputs, keys `layers.{0,2,4,6,7}.*`."""
    generator = torch.Generator().manual_seed(seed)
    sizes = zip((width, *AESTHETIC_HIDDEN), (*AESTHETIC_HIDDEN, 1), strict=True)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes, strict=True):
        weight = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.weight"] = weight
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    return state


def save_aesthetic_mlp(path: str | Path, width: int, seed: int = 0) -> str:
    """An aesthetic MLP file over `width`-dimensional embeddings (768 for ViT-L/14), keys
    as in `sac+logos+ava1-l14-linearMSE.pth`."""
    torch.save(aesthetic_mlp_state(width, seed), path)
    return str(path)


# (BLIP ViT arguments, med_config sizes): the released ImageReward's and a tiny one
IMAGEREWARD_SIZES = {
    "small": ({"img_size": 224, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
              {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2}),
    "full": (VIT_LARGE,
             {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12}),
}  # fmt: skip


def save_imagereward(dirpath: str | Path, size: str = "small", seed: int = 0) -> str:
    """A directory as `python -m raydraft.rewards.imagereward convert` writes it, random
    weights, with a BERT tokenizer over characters (and BLIP's two added tokens)."""
    torch.manual_seed(seed)
    root = Path(dirpath)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *string.digits, *string.punctuation]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = blip_tokenizer(str(root))
    vit, med = IMAGEREWARD_SIZES[size]
    med = {**med, "vocab_size": len(tokenizer), "max_position_embeddings": 512,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12, "pad_token_id": 0,
           "add_cross_attention": True}  # fmt: skip
    vision = vision_config(vit)
    BlipVisionModel(vision).save_pretrained(root / "vision")
    text = text_config(med, vision.hidden_size)
    BlipTextModel(text, add_pooling_layer=False).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "tokenizer")
    save_file(aesthetic_mlp_state(text.hidden_size, seed), root / "mlp.safetensors")
    info = {"mean": REWARD_MEAN, "std": REWARD_STD, "max_length": MAX_TOKENS, "source": "random"}
    (root / "imagereward.json").write_text(json.dumps(info) + "\n")
    return str(root)
