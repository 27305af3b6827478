"""ImageReward (Xu et al. 2023), the human-preference reward flow_grpo and DiffusionNFT train
on, ported onto transformers' BLIP classes.

The reference (`image-reward` 1.5, `ImageReward/ImageReward.py`) cannot be installed here:
it pins timm and fairscale, needs torchvision, and its BLIP `med.py` fails on transformers
5. Its model is BLIP's: a ViT-L/16 at 224 (`vit.py`, timm's layout) and a BERT text encoder
that cross-attends to the image tokens in every layer (`med.py`); the text's [CLS] hidden
state goes through an MLP 768→1024→128→64→16→1 (dropouts between, no activations), then
`r = (mlp − 0.16717362830052426) / 1.0333394966054072`. transformers' `BlipVisionModel`
and `BlipTextModel` (the classes behind `BlipForImageTextRetrieval`) compute the same
layers: pre-norm ViT blocks with a fused qkv and a final LayerNorm; post-norm BERT layers
with word + position embeddings (no token types) and a cross-attention after each
self-attention. `convert_imagereward` renames the checkpoint's keys onto them, and
`python -m raydraft.rewards.imagereward convert ...` writes a directory this reward loads.

Text: BERT's uncased tokenizer with BLIP's added [DEC] and [ENC] tokens, padded to 35.
Pixels, black-box (the reference's `score`): the uint8 image through PIL, Resize(224,
bicubic) on the shortest edge, CenterCrop(224) (torchvision's, which rounds the offset),
ToTensor, Normalize(OpenAI CLIP mean/std). Differentiable (`differentiable: true`, ReFL's
`score_gard` input): the same resize as an antialiased bicubic interpolation of the float
images (torchvision's tensor Resize, unclamped), the crop and the normalisation.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)

from raydraft.local_weights import first_line, from_local
from raydraft.rewards.base import grad_if, reward_device, to_pil
from raydraft.rewards.clip_rewards import aesthetic_head
from raydraft.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resized_shape
from raydraft.rewards.registry import register_reward

NAME = "imagereward"
REWARD_MEAN = 0.16717362830052426  # ImageReward.mean: the MLP output over its training set
REWARD_STD = 1.0333394966054072  # ImageReward.std
MAX_TOKENS = 35
# BLIP's `create_vit('large', 224)`, in the arguments of its VisionTransformer
VIT_LARGE = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
VIT_DEFAULTS = {"mlp_ratio": 4.0}
VIT_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6)
# the checkpoint's vision keys (timm's ViT) -> BlipVisionModel's; {i} a block, {p} weight/bias
VISION_KEYS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.{p}": "embeddings.patch_embedding.{p}",
    "blocks.{i}.norm1.{p}": "encoder.layers.{i}.layer_norm1.{p}",
    "blocks.{i}.attn.qkv.{p}": "encoder.layers.{i}.self_attn.qkv.{p}",
    "blocks.{i}.attn.proj.{p}": "encoder.layers.{i}.self_attn.projection.{p}",
    "blocks.{i}.norm2.{p}": "encoder.layers.{i}.layer_norm2.{p}",
    "blocks.{i}.mlp.fc1.{p}": "encoder.layers.{i}.mlp.fc1.{p}",
    "blocks.{i}.mlp.fc2.{p}": "encoder.layers.{i}.mlp.fc2.{p}",
    "norm.{p}": "post_layernorm.{p}",
}
VISION_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
MLP_LINEARS = (0, 2, 4, 6, 7)
# in the checkpoint but not in the score: BLIP's contrastive projections, a position buffer
UNUSED_KEYS = re.compile(
    r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids"
)
HOW_TO_FETCH = (
    "raydraft never downloads weights. Where the hub is reachable, fetch the checkpoint "
    "(`hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir SRC`) and "
    "BERT's tokenizer (`hf download bert-base-uncased vocab.txt tokenizer_config.json "
    "--local-dir TOK`), then convert them: `python -m raydraft.rewards.imagereward convert "
    "--checkpoint SRC/ImageReward.pt --med-config SRC/med_config.json --tokenizer TOK --out "
    "DIR` and set options.path to DIR."
)

Configs = tuple[BlipVisionConfig, BlipTextConfig]
States = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def vision_config(vit: dict[str, Any]) -> BlipVisionConfig:
    """BlipVisionConfig of BLIP's VisionTransformer arguments (timm's names; BLIP keeps
    its qkv bias, GELU and the LayerNorm eps of 1e-6)."""
    vit = {**VIT_DEFAULTS, **vit}
    unknown = sorted(set(vit) - set(VIT_LARGE) - set(VIT_DEFAULTS))
    if unknown:
        raise ValueError(f"unsupported ViT arguments {unknown} (BLIP's ViT takes {VIT_LARGE})")
    return BlipVisionConfig(
        hidden_size=vit["embed_dim"],
        intermediate_size=int(vit["embed_dim"] * vit["mlp_ratio"]),
        num_hidden_layers=vit["depth"],
        num_attention_heads=vit["num_heads"],
        image_size=vit["img_size"],
        patch_size=vit["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def text_config(med: dict[str, Any], encoder_width: int) -> BlipTextConfig:
    """BlipTextConfig of a BLIP `med_config.json`; the cross-attention width is the ViT's,
    as BLIP_Pretrain sets `encoder_width`. `is_decoder` only makes transformers build the
    cross-attention layers: the reward calls the model as an encoder (no causal mask)."""
    if not med.get("add_cross_attention"):
        raise ValueError("med_config: ImageReward's text encoder needs add_cross_attention")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"med_config: unsupported {med['position_embedding_type']!r} positions")
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"],
        hidden_dropout_prob=med["hidden_dropout_prob"],
        attention_probs_dropout_prob=med["attention_probs_dropout_prob"],
        layer_norm_eps=med["layer_norm_eps"],
        pad_token_id=med["pad_token_id"],
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,
    )


def vision_key_map(depth: int) -> dict[str, str]:
    """Every vision key of the checkpoint for a ViT of `depth` blocks -> its HF name."""
    names = {}
    for old, new in VISION_KEYS.items():
        for i in range(depth) if "{i}" in old else [None]:
            for p in ("weight", "bias") if "{p}" in old else [None]:
                names[VISION_PREFIX + old.format(i=i, p=p)] = new.format(i=i, p=p)
    return names


def text_key_map(config: BlipTextConfig) -> dict[str, str]:
    """Every text key of the checkpoint -> its HF name: med.py's names are transformers'."""
    with torch.device("meta"):
        keys = BlipTextModel(config, add_pooling_layer=False).state_dict()
    return {TEXT_PREFIX + key: key for key in keys}


def mlp_key_map() -> dict[str, str]:
    return {
        f"{MLP_PREFIX}layers.{i}.{p}": f"layers.{i}.{p}"
        for i in MLP_LINEARS
        for p in ("weight", "bias")
    }


def check_keys(state_dict: dict[str, torch.Tensor], expected: set[str]) -> None:
    """One error listing the checkpoint's missing and unexpected keys."""
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in expected and not UNUSED_KEYS.fullmatch(k))
    if missing or unexpected:
        raise KeyError(
            f"not an ImageReward checkpoint for these configs: missing keys {listed(missing)}, "
            f"unexpected keys {listed(unexpected)}"
        )


def listed(keys: list[str], shown: int = 8) -> str:
    return f"{keys[:shown]}{' …' if len(keys) > shown else ''} ({len(keys)})"


def renamed(state_dict: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of `names` under their new names, floats as float32 (the reference's)."""
    return {
        new: state_dict[old].float() if state_dict[old].is_floating_point() else state_dict[old]
        for old, new in names.items()
    }


def convert_imagereward(
    state_dict: dict[str, torch.Tensor],
    vision_cfg: dict[str, Any],
    text_cfg: dict[str, Any],
) -> tuple[Configs, States, nn.Sequential]:
    """ImageReward's state dict (`ImageReward.pt`) -> the configs and state dicts of a
    BlipVisionModel and a BlipTextModel (without pooler), and the MLP head. `vision_cfg`
    holds BLIP's VisionTransformer arguments (`VIT_LARGE` for the released model),
    `text_cfg` the `med_config.json`."""
    vision = vision_config(vision_cfg)
    text = text_config(text_cfg, vision.hidden_size)
    vision_names, text_names = vision_key_map(vision.num_hidden_layers), text_key_map(text)
    mlp_names = mlp_key_map()
    check_keys(state_dict, set(vision_names) | set(text_names) | set(mlp_names))
    mlp = aesthetic_head(renamed(state_dict, mlp_names))
    states = (renamed(state_dict, vision_names), renamed(state_dict, text_names))
    return (vision, text), states, mlp


def build_models(configs: Configs, states: States) -> tuple[BlipVisionModel, BlipTextModel]:
    """The HF modules holding the converted weights (shapes checked by a strict load)."""
    with torch.device("meta"):
        vision = BlipVisionModel(configs[0])
        text = BlipTextModel(configs[1], add_pooling_layer=False)
    vision.load_state_dict(states[0], strict=True, assign=True)
    text.load_state_dict(states[1], strict=True, assign=True)
    # a buffer outside the state dict, left on the meta device by the construction
    text.embeddings.position_ids = torch.arange(configs[1].max_position_embeddings)[None]
    return vision.eval(), text.eval()


def blip_tokenizer(source: str) -> BertTokenizer:
    """BERT's tokenizer from local files with BLIP's added tokens (`init_tokenizer`)."""
    tokenizer = from_local(BertTokenizer, source, "convert --tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def convert_files(
    checkpoint: Path, med_config: Path, tokenizer: str, out: Path, vision: dict[str, Any]
) -> None:
    """The directory the reward loads: `vision/`, `text/` and `tokenizer/` saved with
    save_pretrained, `mlp.safetensors` and `imagereward.json`."""
    blip = blip_tokenizer(tokenizer)
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    configs, states, mlp = convert_imagereward(
        state_dict, vision, json.loads(med_config.read_text())
    )
    if len(blip) != configs[1].vocab_size:
        raise ValueError(
            f"convert --tokenizer {tokenizer!r}: {len(blip)} tokens with BLIP's two, but the "
            f"text encoder embeds {configs[1].vocab_size}: not bert-base-uncased's vocabulary"
        )
    vision_model, text_model = build_models(configs, states)
    out.mkdir(parents=True, exist_ok=True)
    vision_model.save_pretrained(out / "vision")
    text_model.save_pretrained(out / "text")
    blip.save_pretrained(out / "tokenizer")
    head = {f"layers.{k}": v.contiguous() for k, v in mlp.state_dict().items()}
    save_file(head, out / "mlp.safetensors")  # the original file's names, as aesthetic_head takes
    info = {"mean": REWARD_MEAN, "std": REWARD_STD, "max_length": MAX_TOKENS}
    (out / "imagereward.json").write_text(json.dumps({**info, "source": checkpoint.name}) + "\n")


def load_part(root: Path, part: str, loader: Any, **kwargs: Any) -> Any:
    """`loader.from_pretrained(root / part)` from local files, or the reward's error
    naming the directory and how to write it again."""
    try:
        return loader.from_pretrained(root / part, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"reward {NAME!r}: options.path {str(root)!r}: cannot load a {loader.__name__} "
            f"from its {part}/ ({first_line(err)}). {HOW_TO_FETCH}"
        ) from None


def centre_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop offsets: rounded (half to even), not floored."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


def crop_normalise(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """CenterCrop(size) then Normalize(CLIP mean, std) of NCHW floats in [0, 1]."""
    top, left = centre_offsets(*pixels.shape[-2:], size)
    pixels = pixels[..., top : top + size, left : left + size]
    return normalize(pixels, OPENAI_MEAN, OPENAI_STD)


def pil_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's `preprocess` of the uint8 PIL images: PIL bicubic resize of the
    shortest edge, then ToTensor's /255, the crop and the normalisation."""
    out = []
    for image in to_pil(images):
        height, width = resized_shape(image.height, image.width, {"shortest_edge": size})
        resized = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))
        floats = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)
        out.append(crop_normalise(floats, size))
    return torch.stack(out)


def tensor_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """ReFL's preprocessing of float images: torchvision's tensor Resize (antialiased
    bicubic, not clamped), the crop and the normalisation; differentiable."""
    shape = resized_shape(*images.shape[-2:], {"shortest_edge": size})
    x = F.interpolate(
        images.float(), size=shape, mode="bicubic", align_corners=False, antialias=True
    )
    return crop_normalise(x, size)


@register_reward(NAME)
class ImageReward:
    """ImageReward's score: about −2..2 (zero-mean, unit-variance over its training set).
    `path` is a directory written by `python -m raydraft.rewards.imagereward convert`."""

    name = NAME

    def __init__(
        self,
        path: str | None = None,
        differentiable: bool = False,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if not path or not (Path(path) / "imagereward.json").is_file():
            raise FileNotFoundError(
                f"reward {NAME!r}: options.path {path!r} is not a converted ImageReward "
                f"directory (no imagereward.json). {HOW_TO_FETCH}"
            )
        root = Path(path)
        self.differentiable = differentiable
        self.device = reward_device(device)
        self.dtype = getattr(torch, dtype)
        self.info = json.loads((root / "imagereward.json").read_text())
        self.vision = load_part(root, "vision", BlipVisionModel)
        self.text = load_part(root, "text", BlipTextModel, add_pooling_layer=False)
        self.mlp = aesthetic_head(load_file(root / "mlp.safetensors"))
        for module in (self.vision, self.text, self.mlp):
            module.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = load_part(root, "tokenizer", AutoTokenizer)
        self.image_size = self.vision.config.image_size

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.differentiable:
            pixels = tensor_pixels(images.to(self.device), self.image_size)
        else:
            pixels = pil_pixels(images, self.image_size)
        return pixels.to(self.device, self.dtype)

    def tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.info["max_length"],
            return_tensors="pt",
        )
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def rewards(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """`score_gard`: the text's [CLS] state, attending to all image tokens, through the
        MLP, standardised."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.text(
            **tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts
        )
        raw = self.mlp(text.last_hidden_state[:, 0, :]).squeeze(1)
        return (raw - self.info["mean"]) / self.info["std"]

    def score(self, images, prompts, metadata) -> torch.Tensor:
        with grad_if(self.differentiable):
            rewards = self.rewards(self.pixels(images), self.tokens(prompts))
            return rewards.float().to(images.device)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raydraft.rewards.imagereward")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="ImageReward.pt -> a directory the reward loads")
    convert.add_argument("--checkpoint", type=Path, required=True, help="ImageReward.pt")
    convert.add_argument("--med-config", type=Path, required=True, help="med_config.json")
    convert.add_argument("--tokenizer", required=True, help="bert-base-uncased (dir or cache)")
    convert.add_argument("--out", type=Path, required=True)
    convert.add_argument(
        "--vision-config", type=Path, help="ViT arguments as JSON (default: ViT-L/16 at 224)"
    )
    args = parser.parse_args(argv)
    vision = json.loads(args.vision_config.read_text()) if args.vision_config else VIT_LARGE
    convert_files(args.checkpoint, args.med_config, args.tokenizer, args.out, vision)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
