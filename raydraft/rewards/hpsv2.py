"""HPSv2 (v2.0 and v2.1), the human preference score: open_clip's CLIP ViT-H/14 fine-tuned on
human choices, score = cosine of the normalised image and text features (about 0.2–0.35
for real images; HPSv2.1 ≈ 0.25–0.33).

The reference runs open_clip, which needs torchvision; raydraft runs the same network as a
transformers `CLIPModel`. `convert_open_clip` maps an open_clip state dict (such as
`HPS_v2.1_compressed.pt`) onto it, and

    python -m raydraft.rewards.hpsv2 convert --checkpoint HPS_v2.1_compressed.pt \\
        --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K --out DIR

writes the directory that `options.path` names: the model, the tokenizer of LAION's
CLIP-ViT-H-14 (open_clip's ViT-H-14 vocabulary) and `hpsv2.json`, which names the HPS version
and the source files. Parity with the reference packages is tested against a fixture that
they computed (scripts/fixtures/make_hpsv2_fixture.py).

Preprocessing, both from the references:
- black-box (default), hpsv2's `preprocess_val` as `hpsv2.score` runs it: the uint8 image
  (raydraft's `to_uint8_hwc`) to floats in [0, 1] (ToTensor), the longest edge resized to 224
  by torchvision's tensor resize (bicubic, antialiased since torchvision 0.17; the HPS
  authors' older torchvision did not antialias tensors), zero padding to 224×224 centred,
  OpenAI's normalisation;
- `differentiable: true`, DiffusionNFT's `HPSv2Scorer`: the same steps on the float images,
  without the uint8 step, so the gradient reaches the pixels.

Text follows open_clip's `tokenize`: start token, BPE tokens, end token (the largest id),
zero padding to 77, long prompts cut to 77 with the end token last; the end token's feature
is pooled (`argmax` of the ids). Its text cleaning (HTML unescaping, whitespace, lower case,
curly quotes made straight) is restated; ftfy's other repairs (mojibake, ligatures, full-width
characters) are not, so such prompts may tokenize differently.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from raydraft.local_weights import from_local
from raydraft.rewards.base import grad_if, reward_device, to_uint8_hwc
from raydraft.rewards.clip_rewards import MAX_TOKENS, load_local, projected, unit
from raydraft.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, normalize
from raydraft.rewards.registry import register_reward

# open_clip's model_configs/ViT-H-14.json, the architecture of both HPSv2 checkpoints
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                 "layers": 24},
}  # fmt: skip
CHECKPOINTS = {"HPS_v2_compressed.pt": "v2.0", "HPS_v2.1_compressed.pt": "v2.1"}
INFO_FILE = "hpsv2.json"
HOW_TO_CONVERT = (
    "For hpsv2 that directory is made from the original files: `hf download xswu/HPSv2 "
    "HPS_v2.1_compressed.pt` (or HPS_v2_compressed.pt), `hf download "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (its tokenizer), then `python -m "
    "raydraft.rewards.hpsv2 convert --checkpoint FILE --tokenizer DIR_OR_ID --out DIR`."
)
# What convert_open_clip supports of open_clip's config; anything else changes the network.
CFG_KEYS = {
    "top": {"embed_dim", "vision_cfg", "text_cfg"},
    "vision_cfg": {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
}
BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}


def clip_config(cfg: dict[str, Any]) -> CLIPConfig:
    """The transformers config of an open_clip CLIP config: exact GELU (open_clip's nn.GELU,
    not transformers' quick_gelu default), LayerNorm eps 1e-5, and `eos_token_id` 2, which
    makes transformers pool the text at `input_ids.argmax(-1)` as open_clip does."""
    check_supported(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": cfg["embed_dim"]}
    return CLIPConfig(
        text_config={
            "vocab_size": text["vocab_size"],
            "hidden_size": text["width"],
            "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"],
            "bos_token_id": text["vocab_size"] - 2,
            "eos_token_id": 2,
            "pad_token_id": 0,
            **common,
        },
        vision_config={
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "hidden_size": vision["width"],
            "intermediate_size": int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision["width"] // vision["head_width"],
            **common,
        },
        projection_dim=cfg["embed_dim"],
    )


def check_supported(cfg: dict[str, Any]) -> None:
    """Refuse open_clip options that change the network (QuickGELU, layer scale, pooling
    variants, timm or HF towers): the mapping would load but compute something else."""
    extra = set(cfg) - CFG_KEYS["top"]
    for tower in ("vision_cfg", "text_cfg"):
        extra |= {f"{tower}.{k}" for k in set(cfg.get(tower, {})) - CFG_KEYS[tower]}
    if extra:
        raise ValueError(f"hpsv2: unsupported open_clip config entries {sorted(extra)}")


def towers(cfg: dict[str, Any]) -> tuple[tuple[str, str, int], ...]:
    """(open_clip prefix, transformers prefix, layers) of the image and the text tower."""
    return (
        ("visual.transformer", "vision_model", cfg["vision_cfg"]["layers"]),
        ("transformer", "text_model", cfg["text_cfg"]["layers"]),
    )


def key_map(cfg: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(open_clip key, transformers key) of every tensor copied as it is."""
    yield from TOP_RENAMES.items()
    for source, target, layers in towers(cfg):
        for i in range(layers):
            for old, new in BLOCK_RENAMES.items():
                for kind in ("weight", "bias"):
                    yield (f"{source}.resblocks.{i}.{old}.{kind}",
                           f"{target}.encoder.layers.{i}.{new}.{kind}")  # fmt: skip


def fused_attention_keys(cfg: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(open_clip key of a fused q/k/v projection, transformers prefix of its layer)."""
    for source, target, layers in towers(cfg):
        for i in range(layers):
            for kind in ("weight", "bias"):
                yield (f"{source}.resblocks.{i}.attn.in_proj_{kind}",
                       f"{target}.encoder.layers.{i}.self_attn.{{}}_proj.{kind}")  # fmt: skip


def convert_open_clip(
    state_dict: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """An open_clip CLIP state dict as a transformers CLIPModel's: renamed, the fused
    attention projections split into q, k and v, the two projection matrices transposed
    (open_clip multiplies `x @ proj`, nn.Linear `x @ weight.T`)."""
    config = clip_config(cfg)
    copies, fused = dict(key_map(cfg)), dict(fused_attention_keys(cfg))
    expected = {*copies, *fused, *TRANSPOSED}
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise KeyError(
            "hpsv2: the open_clip state dict does not fit the config: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    converted = {new: state_dict[old] for old, new in copies.items()}
    converted |= {new: state_dict[old].T.contiguous() for old, new in TRANSPOSED.items()}
    for old, pattern in fused.items():
        for name, part in zip("qkv", state_dict[old].chunk(3), strict=True):
            converted[pattern.format(name)] = part.clone()
    return config, converted


def save_converted(
    state_dict: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    out: str | Path,
    tokenizer: Any,
    info: dict[str, Any],
) -> Path:
    """The directory the reward loads: the converted CLIPModel (tensors in their stored
    dtype), the tokenizer and `hpsv2.json` (`info` plus the open_clip config)."""
    config, converted = convert_open_clip(state_dict, cfg)
    model = CLIPModel(config)
    model.load_state_dict(converted, strict=True, assign=True)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps({**info, "open_clip_cfg": cfg}, indent=2) + "\n")
    return out


def clean(text: str) -> str:
    """open_clip's `basic_clean` and `whitespace_clean` (lower case is the tokenizer's), with
    ftfy's straightening of curly quotes in place of all of `ftfy.fix_text`."""
    text = html.unescape(html.unescape(text)).strip()
    text = re.sub("[\u02bc\u2018-\u201b]", "'", re.sub("[\u201c-\u201f]", '"', text))
    return " ".join(text.split())


def open_clip_token_ids(
    tokenizer: Any, prompts: Sequence[str], context_length: int = MAX_TOKENS
) -> torch.Tensor:
    """Ids as open_clip's `tokenize` lays them out: start, body, end, zeros; a prompt too
    long keeps the first `context_length - 2` body tokens."""
    bodies = tokenizer(
        [clean(p) for p in prompts],
        add_special_tokens=False,
        truncation=True,
        max_length=context_length - 2,
    )["input_ids"]
    ids = torch.zeros(len(bodies), context_length, dtype=torch.long)
    for row, body in zip(ids, bodies, strict=True):
        tokens = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        row[: len(tokens)] = torch.tensor(tokens)
    return ids


def resize_max_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's `ResizeMaxSize` on float NCHW images: the longest edge to `size` (Python's
    `round` for the other), torchvision's tensor bicubic resize (`F.interpolate`, antialiased,
    not clamped), zero padding centred (the odd pixel right and below)."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return images
    new_height, new_width = round(height * scale), round(width * scale)
    images = F.interpolate(
        images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
    )
    pad_h, pad_w = size - new_height, size - new_width
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def hps_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """ResizeMaxSize then OpenAI's normalisation, on float NCHW images in [0, 1]."""
    x = resize_max_size(images.float(), size)
    return normalize(x, OPENAI_MEAN, OPENAI_STD)


def to_tensor(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor of the uint8 images the black-box path sees (the RGB PIL image
    holds exactly these bytes): NCHW floats, byte / 255."""
    uint8 = torch.from_numpy(to_uint8_hwc(images)).permute(0, 3, 1, 2)
    return uint8.to(torch.float32).div(255)


def read_info(path: str) -> dict[str, Any]:
    """`hpsv2.json` of a converted directory, or {} (a hub id, or a directory made elsewhere)."""
    file = Path(path) / INFO_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


@register_reward("hpsv2")
class HPSv2:
    """HPSv2 on a directory made by `python -m raydraft.rewards.hpsv2 convert` (options.path),
    or such a directory's hub id already in the cache. `version` is the HPS version that
    `hpsv2.json` names ("v2.0", "v2.1"), None without it."""

    def __init__(
        self,
        path: str | None = None,
        differentiable: bool = False,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if not path:
            raise ValueError(f"reward 'hpsv2' needs options.path. {HOW_TO_CONVERT}")
        self.name = "hpsv2"
        self.differentiable = differentiable
        self.device = reward_device(device)
        self.dtype = getattr(torch, dtype)
        try:
            model = load_local(self.name, CLIPModel, path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} {HOW_TO_CONVERT}") from None
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = load_local(self.name, AutoTokenizer, path)
        self.info = read_info(path)
        self.version = self.info.get("hps_version")
        self.image_size = self.model.config.vision_config.image_size
        self.context_length = self.model.config.text_config.max_position_embeddings

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input: hpsv2's preprocessing of the uint8 images, or NFT's of the
        float images when differentiable."""
        x = images if self.differentiable else to_tensor(images)
        return hps_pixels(x.to(self.device), self.image_size).to(self.dtype)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return open_clip_token_ids(self.tokenizer, prompts, self.context_length).to(self.device)

    def features(
        self, pixels: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text features, open_clip's `encode_*(normalize=True)`."""
        image = projected(self.model.get_image_features(pixel_values=pixels))
        text = projected(self.model.get_text_features(input_ids=token_ids.to(self.device)))
        return unit(image), unit(text)

    def score_tokens(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The scores of images and already tokenized prompts."""
        with grad_if(self.differentiable):
            image, text = self.features(self.pixels(images), token_ids)
            return (image * text).sum(-1).float().to(images.device)

    def score(self, images, prompts, metadata) -> torch.Tensor:
        return self.score_tokens(images, self.token_ids(prompts))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_files(
    checkpoint: str, tokenizer: str, out: str, version: str | None, cfg: str | None
) -> Path:
    """`save_converted` of an HPS checkpoint file (`{"state_dict": ...}` or a bare state
    dict), with the tokenizer from a directory or the hub cache."""
    path, hf_tokenizer = (
        Path(checkpoint),
        from_local(AutoTokenizer, tokenizer, "hpsv2 convert --tokenizer"),
    )
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded)
    info = {
        "hps_version": version or CHECKPOINTS.get(path.name),
        "checkpoint": path.name,
        "checkpoint_sha256": sha256(path),
        "tokenizer": tokenizer,
    }
    open_clip_cfg = json.loads(Path(cfg).read_text()) if cfg else VIT_H_14
    return save_converted(state, open_clip_cfg, out, hf_tokenizer, info)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raydraft.rewards.hpsv2")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="an HPS checkpoint to the reward's directory")
    convert.add_argument("--checkpoint", required=True, help="HPS_v2.1_compressed.pt or v2's")
    convert.add_argument(
        "--tokenizer",
        required=True,
        help="laion/CLIP-ViT-H-14-laion2B-s32B-b79K: a directory or a hub id in the cache",
    )
    convert.add_argument("--out", required=True, help="the directory to write")
    convert.add_argument("--version", help="the HPS version; by default from the file name")
    convert.add_argument("--cfg", help="an open_clip model config json (default: ViT-H-14)")
    args = parser.parse_args(argv)
    out = convert_files(args.checkpoint, args.tokenizer, args.out, args.version, args.cfg)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
