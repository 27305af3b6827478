"""Rewards over HTTP, for reward servers outside the training cluster: the wire format,
its validation, and the `http` reward that calls a `raydraft serve-rewards` endpoint.

POST /v1/rewards/NAME/score with a JSON body
    {"prompts": [str, ...], "metadata": [dict, ...] (optional),
     "images": {"format": "png", "data": [base64 PNG, ...]}
             | {"format": "npy", "data": base64 .npy}}
answers {"reward": NAME, "scores": [float | null, ...], "details": {key: [float, ...]}}
(null: a non-finite score, which the caller's checks name; details: the reward's per-sample
extras, e.g. GenEval's strict correctness). PNGs are 8-bit RGB, one per prompt, all the
same size: the uint8 pixels black-box rewards see anyway. A .npy holds uint8 (N, H, W, 3) or float32
(N, 3, H, W) in [0, 1] and is read without pickle. GET /v1/rewards lists the rewards.
Malformed input answers 4xx with {"error": message}; `Authorization: Bearer TOKEN` when
the server has a token.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from raydraft.rewards.base import to_pil
from raydraft.rewards.registry import register_reward

IMAGE_FORMATS = ("png", "npy")


class PayloadError(ValueError):
    """A request the server refuses: its HTTP status and the reason, for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PayloadLimits:
    max_bytes: int
    max_images: int
    max_image_side: int


def encode_request(
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
    image_format: str = "png",
) -> bytes:
    """The JSON body for `images` (float NCHW in [0, 1]) and their prompts."""
    if image_format == "png":
        data: Any = [_b64(_png(image)) for image in to_pil(images)]
    elif image_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, images.detach().float().cpu().numpy(), allow_pickle=False)
        data = _b64(buffer.getvalue())
    else:
        raise ValueError(f"image format {image_format!r}: expected one of {IMAGE_FORMATS}")
    images_field = {"format": image_format, "data": data}
    return json.dumps(
        {"prompts": list(prompts), "metadata": list(metadata), "images": images_field}
    ).encode()


def decode_request(
    body: bytes, limits: PayloadLimits
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """(images float NCHW in [0, 1], prompts, metadata) from a request body, or a
    PayloadError that says what is wrong with it."""
    if len(body) > limits.max_bytes:
        raise PayloadError(413, f"body of {len(body)} bytes exceeds {limits.max_bytes}")
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PayloadError(400, f"body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise PayloadError(400, "body must be a JSON object")
    unknown = set(request) - {"prompts", "metadata", "images"}
    if unknown:
        raise PayloadError(400, f"unknown fields {sorted(unknown)}")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError(400, "'prompts' must be a list of strings")
    if not 0 < len(prompts) <= limits.max_images:
        raise PayloadError(413 if prompts else 400,
                           f"{len(prompts)} prompts: send 1 to {limits.max_images}")  # fmt: skip
    metadata = request.get("metadata") or [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise PayloadError(400, "'metadata' must be a list of objects")
    if len(metadata) != len(prompts):
        raise PayloadError(400, f"{len(metadata)} metadata entries for {len(prompts)} prompts")
    images = _decode_images(request.get("images"), limits)
    if images.shape[0] != len(prompts):
        raise PayloadError(400, f"{images.shape[0]} images for {len(prompts)} prompts")
    return images, prompts, metadata


def encode_scores(reward: str, scores: torch.Tensor, details: dict[str, torch.Tensor]) -> bytes:
    """The answer: scores (null where non-finite) and the reward's per-sample details."""
    values = [float(s) if math.isfinite(s) else None for s in scores.tolist()]
    listed = {key: value.tolist() for key, value in details.items()}
    return json.dumps({"reward": reward, "scores": values, "details": listed}).encode()


def _decode_images(images: Any, limits: PayloadLimits) -> torch.Tensor:
    if not isinstance(images, dict) or images.get("format") not in IMAGE_FORMATS:
        raise PayloadError(400, '\'images\' must be {"format": "png" | "npy", "data": base64}')
    if images["format"] == "png":
        data = images.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise PayloadError(400, "png 'data' must be a list of base64 strings, one per image")
        pixels = [_png_pixels(_unb64(d, f"image {i}"), i, limits) for i, d in enumerate(data)]
        if len({p.shape for p in pixels}) > 1:
            raise PayloadError(400, f"images differ in size: {sorted({p.shape for p in pixels})}")
        array = np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    if not isinstance(images.get("data"), str):
        raise PayloadError(400, "npy 'data' must be one base64 string")
    return _npy_images(_unb64(images["data"], "images"), limits)


def _png_pixels(raw: bytes, index: int, limits: PayloadLimits) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError as err:
        raise PayloadError(413, f"image {index}: {err}") from None
    except OSError as err:
        raise PayloadError(400, f"image {index} is not a readable PNG: {err}") from None
    if image.format != "PNG":
        raise PayloadError(400, f"image {index} is {image.format}, not PNG")
    _check_side(image.height, image.width, limits, f"image {index}")
    if image.mode != "RGB":
        raise PayloadError(400, f"image {index} has mode {image.mode}: send 8-bit RGB")
    try:
        return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:  # a header whose data is cut or corrupt
        raise PayloadError(400, f"image {index} is not a readable PNG: {err}") from None


def _npy_images(raw: bytes, limits: PayloadLimits) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise PayloadError(400, f"images are not a readable .npy without pickle: {err}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 4:
        shape = getattr(array, "shape", None)
        raise PayloadError(400, f"npy images of shape {shape}: expected 4 dimensions")
    if array.dtype == np.uint8 and array.shape[3] == 3:
        _check_side(array.shape[1], array.shape[2], limits, "images")
        return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 255
    if array.dtype == np.float32 and array.shape[1] == 3:
        _check_side(array.shape[2], array.shape[3], limits, "images")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise PayloadError(400, "float32 images must be finite and within [0, 1]")
        return torch.from_numpy(array.copy())
    raise PayloadError(
        400,
        f"npy images of dtype {array.dtype} and shape {array.shape}: expected uint8 "
        "(N, H, W, 3) or float32 (N, 3, H, W) in [0, 1]",
    )


def _check_side(height: int, width: int, limits: PayloadLimits, what: str) -> None:
    if max(height, width) > limits.max_image_side or min(height, width) < 1:
        raise PayloadError(
            413 if max(height, width) > limits.max_image_side else 400,
            f"{what} is {height}x{width}: each side must be 1 to {limits.max_image_side}",
        )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(400, f"{what} is not base64: {err}") from None


@register_reward("http")
class HttpReward:
    """A reward served by `raydraft serve-rewards` elsewhere: black-box (no gradient over
    HTTP). Options: `url` (http://host:port), `reward` (its name there), `token_env` (the
    variable holding the bearer token, sent when set), `image_format` (png: the uint8
    pixels, smaller; npy: the float images), `images_per_request`, `timeout_s`, and
    `max_retries` for unreachable servers and 5xx answers; a 4xx is an error at once."""

    differentiable = False

    def __init__(
        self,
        url: str,
        reward: str,
        token_env: str = "RAYDRAFT_REWARD_TOKEN",
        image_format: str = "png",
        images_per_request: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 3,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format {image_format!r}: expected one of {IMAGE_FORMATS}")
        self.name = f"http:{reward}"
        self.endpoint = f"{url.rstrip('/')}/v1/rewards/{reward}/score"
        self.token_env = token_env
        self.image_format = image_format
        self.images_per_request = images_per_request
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.last_details: dict[str, torch.Tensor] = {}

    def score(self, images, prompts, metadata) -> torch.Tensor:
        metadata = list(metadata) or [{} for _ in prompts]
        step = self.images_per_request
        answers = []
        for i in range(0, len(prompts), step):
            chunk = (images[i : i + step], prompts[i : i + step], metadata[i : i + step])
            answers.append(self._post(encode_request(*chunk, self.image_format)))
        values = [math.nan if v is None else v for answer in answers for v in answer["scores"]]
        self.last_details = {
            key: torch.tensor([v for answer in answers for v in answer["details"][key]])
            for key in answers[0]["details"]
        }
        return torch.tensor(values, dtype=torch.float32)

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.token_env):
            headers["Authorization"] = f"Bearer {os.environ[self.token_env]}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.endpoint, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == self.max_retries:
                    raise RuntimeError(
                        f"reward {self.name!r}: {self.endpoint} answered {err.code}: "
                        f"{_error_message(err)}"
                    ) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if attempt == self.max_retries:
                    raise RuntimeError(
                        f"reward {self.name!r}: {self.endpoint} unreachable after "
                        f"{attempt + 1} tries: {err}"
                    ) from None
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except (ValueError, KeyError, TypeError):
        return err.reason
