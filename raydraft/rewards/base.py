"""The Reward protocol, its validation, and weighted composites.

A reward maps images in [0, 1] (NCHW) and their prompts to one score per image, higher is
better. A NaN, an inf or a wrong shape is an error naming the reward and the samples,
never a silent zero; the config may instead ask to drop and count such samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


class BadRewardError(ValueError):
    def __init__(self, reward: str, message: str, bad_indices: list[int] | None = None) -> None:
        super().__init__(f"reward {reward!r}: {message}")
        self.reward = reward
        self.bad_indices = bad_indices or []


@runtime_checkable
class Reward(Protocol):
    name: str
    differentiable: bool

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor: ...


def reward_device(device: str | torch.device | None) -> torch.device:
    """Where a reward model runs: `device`, else the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def grad_if(differentiable: bool) -> torch.set_grad_enabled:
    """Gradients for a differentiable reward when the caller records them (DRaFT's loss);
    none for a black-box one, whatever the caller records."""
    return torch.set_grad_enabled(differentiable and torch.is_grad_enabled())


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """NCHW floats in [0, 1] -> NHWC uint8, the pixels a black-box reward (or a PNG) sees."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """The uint8 pixels of `to_uint8_hwc` as PIL images, what the references' processors
    and engines take."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8_hwc(images)]


def check_shape(name: str, scores: Any, batch: int) -> None:
    if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise BadRewardError(name, f"expected scores of shape ({batch},), got {shape}")


def _nonfinite(scores: torch.Tensor) -> list[int]:
    return (~torch.isfinite(scores.detach())).nonzero().flatten().tolist()


def score_or_drop(
    reward: Reward,
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None,
    drop_bad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, valid mask). With `drop_bad` (config `on_bad_reward: drop`) non-finite
    samples are masked out (score 0, valid False) for the caller to count."""
    metadata = metadata if metadata is not None else [{} for _ in prompts]
    scores = reward.score(images, prompts, metadata)
    check_shape(reward.name, scores, images.shape[0])
    bad = _nonfinite(scores)
    if bad and not drop_bad:
        culprits = getattr(reward, "bad_components", None) or [reward.name]
        examples = ", ".join(f"#{i} {prompts[i]!r}={float(scores[i])}" for i in bad[:3])
        raise BadRewardError(
            "+".join(culprits), f"non-finite score for {len(bad)} sample(s): {examples}", bad
        )
    valid = torch.isfinite(scores.detach())
    return torch.where(valid, scores, torch.zeros_like(scores)).float(), valid


def component_scores(reward: Reward) -> dict[str, torch.Tensor]:
    """The last batch's per-sample values beside the total, for the logs: each component's
    score when there are two or more (so a weighted sum can be read apart), and the details
    its rewards report (`last_details`, named `reward/key`: GenEval's strict correctness,
    the OCR engine's failures, the VLM judge's unparsed answers)."""
    components = getattr(reward, "last_components", {})
    return (components if len(components) > 1 else {}) | getattr(reward, "last_details", {})


def reward_details(reward: Reward) -> dict[str, torch.Tensor]:
    """A reward's per-sample details of its last call, (B,) each; {} if it reports none."""
    return {k: v.detach().float() for k, v in getattr(reward, "last_details", {}).items()}


def checked_score(
    reward: Reward,
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
) -> torch.Tensor:
    """`reward.score`, checked: shape (B,), all finite, fp32."""
    return score_or_drop(reward, images, prompts, metadata, drop_bad=False)[0]


class CompositeReward:
    """A weighted sum of rewards; each component's scores are kept for logging."""

    def __init__(self, components: Sequence[tuple[Reward, float]]) -> None:
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.components = list(components)
        self.name = "+".join(r.name for r, _ in self.components)
        self.differentiable = all(r.differentiable for r, _ in self.components)
        self.last_components: dict[str, torch.Tensor] = {}
        self.last_details: dict[str, torch.Tensor] = {}
        self.bad_components: list[str] = []

    def score(self, images, prompts, metadata) -> torch.Tensor:
        total = torch.zeros(images.shape[0], device=images.device)
        self.last_components, self.last_details, self.bad_components = {}, {}, []
        for reward, weight in self.components:
            scores = reward.score(images, prompts, metadata)
            check_shape(reward.name, scores, images.shape[0])
            if _nonfinite(scores):
                self.bad_components.append(reward.name)
            self.last_components[reward.name] = scores.detach().float()
            for key, values in reward_details(reward).items():
                self.last_details[f"{reward.name}/{key}"] = values
            total = total + weight * scores.float()
        return total
