"""`ocr`: Flow-GRPO's OCR reward (text rendering), 1 - normalized edit distance. Black-box.

The prompt quotes the text the image should show (`a sign that says "hello world"`). The
image is read by an OCR engine; the recognized text (spaces removed, lower-cased) is
compared with the quoted text (likewise): containing it scores 1, otherwise the score is
1 - min(Levenshtein distance, len(target)) / len(target), so 0 when nothing is read.
This restates flow_grpo/ocr.py, down to its quirks: texts are joined with no separator,
an OCR failure scores 0 (here also counted and logged), and the uint8 RGB array goes to
the engine as is, which (like PaddleOCR) takes an array for BGR. The reference crashes on
a prompt without quoted text; here that is a ValueError naming the prompt.

Engine: `rapidocr-onnxruntime` 1.4.4, PaddleOCR's PP-OCRv4 multilingual (Chinese +
English) detector and recognizer exported to ONNX and shipped inside the wheel, run on
onnxruntime (no torch, no download). Flow-GRPO used PaddleOCR 2.9.1 with its English
models, so scores are comparable to its numbers only in trend, not digit for digit;
`engine_info` says which engine and model files produced a score. Both drop recognized
boxes with confidence below 0.5 and run without the angle classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydraft.rewards.base import to_uint8_hwc
from raydraft.rewards.registry import register_reward

logger = logging.getLogger(__name__)

ENGINE = "rapidocr-onnxruntime"
_REQUIREMENT = 'rapidocr-onnxruntime==1.4.4 (pip install "raydraft[ocr]")'


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: fewest single-character insertions, deletions, substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalize(text: str) -> str:
    return text.replace(" ", "").lower()


def quoted_text(prompt: str) -> str:
    """The text after the prompt's first double quote, up to the next one (as the reference's
    `prompt.split('"')[1]`, so an unclosed quote runs to the end). ValueError if there is
    none or it is only spaces: the reward would be undefined."""
    parts = prompt.split('"')
    if len(parts) < 2:
        raise ValueError(f'reward "ocr": prompt has no text in double quotes: {prompt!r}')
    if not _normalize(parts[1]):
        raise ValueError(f'reward "ocr": prompt quotes an empty text: {prompt!r}')
    return parts[1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's formula: 1 if the target occurs in the recognized text, else
    1 - min(edit distance, len(target)) / len(target); spaces and case are ignored."""
    recognized, target = _normalize(recognized), _normalize(target)
    if not target:
        raise ValueError("ocr_score needs a non-empty target")
    distance = 0 if target in recognized else min(edit_distance(recognized, target), len(target))
    return 1 - distance / len(target)


def _rapidocr_config() -> dict[str, Any]:
    try:
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import read_yaml
    except ImportError as err:
        raise ImportError(f'reward "ocr" needs {_REQUIREMENT}: {err}') from err
    return read_yaml(DEFAULT_CFG_PATH)


@register_reward("ocr")
class OcrReward:
    """Flow-GRPO's OCR reward on rapidocr-onnxruntime (see the module docstring).

    `threads` caps onnxruntime's intra- and inter-op threads per session, so the reward
    keeps to its CPU share (rapidocr ignores a value above the machine's core count and
    then uses onnxruntime's default). The engine is built on first use, once per instance.
    """

    differentiable = False

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f'reward "ocr": threads must be >= 1, got {threads}')
        self.name = "ocr"
        self.threads = threads
        self.failures = 0
        self.last_details: dict[str, torch.Tensor] = {}  # failed: 1 where the engine raised
        self._engine: Any = None
        config = _rapidocr_config()
        self.engine_info: dict[str, Any] = {
            "engine": ENGINE,
            "version": importlib_metadata.version(ENGINE),
            "det_model": Path(config["Det"]["model_path"]).name,
            "rec_model": Path(config["Rec"]["model_path"]).name,
            "cls_model": Path(config["Cls"]["model_path"]).name,  # loaded by rapidocr, unused
            "use_cls": False,
            "text_score": config["Global"]["text_score"],
            "threads": threads,
        }

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            self._engine = RapidOCR(
                use_cls=False,
                intra_op_num_threads=self.threads,
                inter_op_num_threads=self.threads,
            )
        return self._engine

    def __getstate__(self) -> dict[str, Any]:
        # onnxruntime sessions do not pickle; a copy (e.g. sent to a Ray actor) rebuilds its own.
        return {**self.__dict__, "_engine": None}

    def recognize(self, image: np.ndarray) -> str:
        """The texts read in one uint8 HWC image, joined with no separator ('' if none)."""
        result, _ = self.engine(
            np.ascontiguousarray(image), use_det=True, use_cls=False, use_rec=True
        )
        return "".join(text for _box, text, confidence in result or [] if confidence > 0)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        targets = [quoted_text(p) for p in prompts]
        scores, failed = [], []
        for image, target, prompt in zip(to_uint8_hwc(images), targets, prompts, strict=True):
            try:
                scores.append(ocr_score(self.recognize(image), target))
                failed.append(0.0)
            except Exception as err:  # the reference's maximum penalty, but counted and logged
                self.failures += 1
                logger.warning("ocr reward: OCR failed on prompt %r (scored 0): %r", prompt, err)
                scores.append(0.0)
                failed.append(1.0)
        self.last_details = {"failed": torch.tensor(failed)}
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
