"""CLIP-family rewards: PickScore, CLIPScore and the LAION aesthetic predictor, each with its
reference implementation's formula and scale, on local weights.

- `pickscore` (flow_grpo's and DiffusionNFT's `pickscore_scorer.py`):
  exp(logit_scale)·cos(image, text) / 26; `raw: true` without the /26.
- `clipscore` (DiffusionNFT's `clip_scorer.py`): the logits_per_image diagonal / 100;
  `raw: true` without the /100.
- `aesthetic` (LAION's improved aesthetic predictor, `simple_inference.py`, as flow_grpo
  runs it): its MLP on the L2-normalised CLIP image embedding.

Options: `path` (a CLIPModel directory saved with its processor and tokenizer, or a hub id
already in the cache), `processor_path` (PickScore takes its processor from the LAION
CLIP-ViT-H-14 repository, not from `yuvalkirstain/PickScore_v1`), `differentiable`
(PickScore and aesthetic: tensor preprocessing so DRaFT's gradient reaches the pixels,
instead of the references' uint8 + PIL processor path), `device`, `dtype`. CLIPScore's
reference already preprocesses the float images with tensor ops (bilinear, antialiased),
so it is differentiable as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel

try:  # the PIL processor by name (transformers 5); in transformers 4 the default class is it
    from transformers import CLIPImageProcessorPil
except ImportError:
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

from raydraft.local_weights import from_local
from raydraft.rewards.base import grad_if, reward_device
from raydraft.rewards.preprocess import processor_pixels, tensor_pixels
from raydraft.rewards.registry import register_reward

MAX_TOKENS = 77  # CLIP's text context


def load_local(reward: str, loader: Any, path: str, option: str = "path") -> Any:
    """`loader.from_pretrained(path)` from local files only, or one error naming the
    reward, the option, the path and how to fetch the weights."""
    return from_local(loader, path, f"reward {reward!r}: options.{option}")


def projected(features: Any) -> torch.Tensor:
    """CLIP's projected embedding: `get_*_features` returns it in transformers 4 and as the
    `pooler_output` of a model output in transformers 5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def unit(embeds: torch.Tensor) -> torch.Tensor:
    return embeds / embeds.norm(p=2, dim=-1, keepdim=True)


class LocalClip:
    """A CLIPModel with its PIL image processor and tokenizer from local files, frozen, on
    one device: what the CLIP rewards and GenEval's colour classifier share. `option` names
    the setting that gave `path` in errors (the processor's is `processor_path` when it
    comes from elsewhere)."""

    def __init__(
        self,
        reward: str,
        path: str,
        processor_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        option: str = "path",
    ) -> None:
        self.device = reward_device(device)
        self.dtype = getattr(torch, dtype)
        processor_path = processor_path or path
        processor_option = "processor_path" if processor_path != path else option
        self.model = load_local(reward, CLIPModel, path, option).to(self.device, self.dtype)
        self.model.eval().requires_grad_(False)
        self.image_processor = load_local(
            reward, CLIPImageProcessorPil, processor_path, processor_option
        )
        self.tokenizer = load_local(reward, AutoTokenizer, processor_path, processor_option)

    def tokens(self, prompts: Sequence[str], padding: bool | str) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts),
            padding=padding,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in tokens.items()}

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit projected image embeddings of processed pixels."""
        pixels = pixels.to(self.device, self.dtype)
        return unit(projected(self.model.get_image_features(pixel_values=pixels)))

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit projected text embeddings, padded to the batch's longest."""
        return unit(projected(self.model.get_text_features(**self.tokens(texts, padding=True))))


class ClipReward(LocalClip):
    """A CLIP reward: its pixels (black-box or differentiable) and its score."""

    def __init__(
        self,
        name: str,
        path: str | None,
        processor_path: str | None = None,
        differentiable: bool = False,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if not path:
            raise ValueError(f"reward {name!r} needs options.path (a CLIP model directory)")
        super().__init__(name, path, processor_path, device, dtype)
        self.name = name
        self.differentiable = differentiable

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.differentiable:
            pixels = tensor_pixels(self.image_processor, images.to(self.device))
        else:
            pixels = processor_pixels(self.image_processor, images)
        return pixels.to(self.device, self.dtype)

    def score(self, images, prompts, metadata) -> torch.Tensor:
        with grad_if(self.differentiable):
            return self._score(images, prompts).float().to(images.device)

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


@register_reward("pickscore")
class PickScore(ClipReward):
    """Human preference (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic choices.
    Divided by 26 as flow_grpo and DiffusionNFT train on it (about 0.8–0.9 for good images);
    `raw: true` gives exp(logit_scale)·cos itself (about 21–23)."""

    def __init__(self, path: str | None = None, raw: bool = False, **options: Any) -> None:
        super().__init__("pickscore", path, **options)
        self.divisor = 1.0 if raw else 26.0

    def _score(self, images, prompts):
        image = self.image_embeddings(self.pixels(images))
        text = self.text_embeddings(prompts)
        return self.model.logit_scale.exp() * (text * image).sum(-1) / self.divisor


@register_reward("clipscore")
class ClipScore(ClipReward):
    """Prompt–image agreement of CLIP (DiffusionNFT's multi-reward term): the model's
    logit exp(logit_scale)·cos / 100, the cosine for OpenAI's weights. Tensor preprocessing
    on the float images as the reference (torchvision's bilinear antialiased resize), text
    padded to 77 tokens."""

    def __init__(self, path: str | None = None, raw: bool = False, **options: Any) -> None:
        super().__init__("clipscore", path, **{"differentiable": True, **options})
        self.divisor = 1.0 if raw else 100.0

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        pixels = tensor_pixels(self.image_processor, images.to(self.device), mode="bilinear")
        return pixels.to(self.dtype)

    def _score(self, images, prompts):
        out = self.model(pixel_values=self.pixels(images), **self.tokens(prompts, "max_length"))
        return out.logits_per_image.diagonal() / self.divisor


def aesthetic_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The improved aesthetic predictor's MLP with the original file's layer indices
    (Linear at 0, 2, 4, 6, 7, dropout between, no activations), sized from the file."""
    linear = {i: nn.Linear(*reversed(state[f"layers.{i}.weight"].shape)) for i in (0, 2, 4, 6, 7)}
    layers = nn.Sequential(*(linear.get(i, nn.Dropout()) for i in range(8)))
    layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return layers


@register_reward("aesthetic")
class Aesthetic(ClipReward):
    """The LAION improved aesthetic predictor (about 1–10): an MLP on the L2-normalised
    CLIP ViT-L/14 image embedding. `mlp_path` is the original weight file
    (`sac+logos+ava1-l14-linearMSE.pth`, keys `layers.{0,2,4,6,7}.*`)."""

    def __init__(
        self, path: str | None = None, mlp_path: str | None = None, **options: Any
    ) -> None:
        super().__init__("aesthetic", path, **options)
        if not mlp_path or not Path(mlp_path).is_file():
            raise FileNotFoundError(
                f"reward 'aesthetic': options.mlp_path {mlp_path!r} is not a file (the "
                "predictor's sac+logos+ava1-l14-linearMSE.pth)"
            )
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        self.head = aesthetic_head(state).to(self.device, self.dtype).eval()
        self.head.requires_grad_(False)

    def _score(self, images, prompts):
        return self.head(self.image_embeddings(self.pixels(images))).squeeze(1)
