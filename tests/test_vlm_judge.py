"""The `vlm-judge` reward: P(Yes) on a tiny random Qwen2-VL against an independent forward,
greedy answers against `model.generate`, the answer parsers, and the vLLM backend's
requests and output parsing on stand-ins shaped like vLLM's objects."""

import logging
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_tokenizers import QWEN_TEXT_SPECIAL, QWEN_VISION_SPECIAL, yes_no_tokenizer
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from raydraft.rewards.base import checked_score
from raydraft.rewards.registry import make_reward
from raydraft.rewards.vlm_judge import (
    TEMPLATES,
    VllmEngine,
    chat_prompt,
    local_model_dir,
    logprobs_from_outputs,
    parse_final_score,
    parse_score_tag,
)

SPECIAL = QWEN_TEXT_SPECIAL + QWEN_VISION_SPECIAL
PROMPTS = ["a cat", 'a sign that says "hello world"', "two dogs and a red ball on the grass"]
LOGIT_SCALE = 30.0
MERGED_TOKENS = 16  # a 32×32 image: 8×8 patches of 4 pixels, merged 2×2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return yes_no_tokenizer(SPECIAL)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, one_torch_thread) -> str:
    """A tiny random Qwen2VLForConditionalGeneration with its PIL image processor and
    tokenizer in one directory."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in [*SPECIAL, "Yes", "No"]}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32, "max_position_embeddings": 512, "bos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6],
                                "rope_theta": 10000.0},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2, "embed_dim": 64, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # P(Yes), P(No) far from 1/vocab and apart per input
        model.lm_head.weight[[ids["Yes"], ids["No"]]] *= LOGIT_SCALE
    model.save_pretrained(path)
    processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64
    )
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def qwen_text(question: str, image_tokens: int) -> str:
    """Qwen2-VL's chat format, written out: system turn, user turn [image, question]."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{'<|image_pad|>' * image_tokens}<|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


class Oracle:
    """The model loaded directly; inputs built one sample at a time, with no padding."""

    def __init__(self, path: str) -> None:
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def inputs(self, image: torch.Tensor, question: str) -> dict[str, torch.Tensor]:
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        vision = self.processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        assert int(vision["image_grid_thw"].prod()) // 4 == MERGED_TOKENS
        ids = self.tokenizer(qwen_text(question, MERGED_TOKENS), return_tensors="pt").input_ids
        image_id = self.model.config.image_token_id
        return {"input_ids": ids, "mm_token_type_ids": (ids == image_id).int(), **vision}

    @torch.no_grad()
    def probs(self, image: torch.Tensor, question: str) -> torch.Tensor:
        logits = self.model(**self.inputs(image, question)).logits[0, -1]
        return torch.softmax(logits.double(), -1)

    @torch.no_grad()
    def answer(self, image: torch.Tensor, question: str, max_new_tokens: int) -> str:
        inputs = self.inputs(image, question)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )


@pytest.fixture(scope="module")
def oracle(vlm_dir) -> Oracle:
    return Oracle(vlm_dir)


def yes_no(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")


@pytest.mark.parametrize("normalize", [False, True])
def test_p_yes_is_the_softmax_of_the_models_own_logits(vlm_dir, oracle, normalize):
    reward = make_reward("vlm-judge", {"path": vlm_dir, "normalize": normalize, "batch_size": 2})
    assert type(reward.engine.model) is Qwen2VLForConditionalGeneration
    batch = images(3)
    scores = reward.score(batch, PROMPTS, [{}] * 3)  # padded batches of 2 + 1
    yes, no = yes_no(oracle.tokenizer)
    expected = []
    for image, prompt in zip(batch, PROMPTS, strict=True):
        probs = oracle.probs(image, f'Does this image show "{prompt}"?')
        expected.append(probs[yes] / (probs[yes] + probs[no]) if normalize else probs[yes])
    expected = torch.stack(expected).float()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert expected.std() > 1e-3  # far above the tolerance: inputs matter


def test_transformers_generation_is_greedy_and_an_unparsed_answer_scores_zero(
    vlm_dir, oracle, caplog
):
    reward = make_reward(
        "vlm-judge",
        {"path": vlm_dir, "scoring": "parsed", "max_new_tokens": 5, "batch_size": 1},
    )
    batch = images(2, seed=1)
    with caplog.at_level(logging.WARNING, logger="raydraft.rewards.vlm_judge"):
        scores = reward.score(batch, PROMPTS[:2], [{}, {}])
    expected = [
        oracle.answer(image, TEMPLATES["unifiedreward"].question.replace("{prompt}", p), 5)
        for image, p in zip(batch, PROMPTS[:2], strict=True)
    ]
    assert reward.last_answers == expected
    assert all(expected)  # random weights still say something
    assert scores.tolist() == [0.0, 0.0]  # ... and it is no score
    assert reward.unparsed == 2
    assert any(PROMPTS[1] in r.getMessage() for r in caplog.records)


def test_parsed_scores_and_the_unparsed_counter(vlm_dir, monkeypatch, caplog):
    reward = make_reward("vlm-judge", {"path": vlm_dir, "scoring": "parsed", "template": "qwenvl"})
    answers = ["<Thought>fine</Thought>\n<Score>4</Score>", "I cannot tell.", "<Score>5</Score>"]
    monkeypatch.setattr(reward.engine, "generate", lambda images, texts, n: answers[: len(texts)])
    with caplog.at_level(logging.WARNING, logger="raydraft.rewards.vlm_judge"):
        scores = checked_score(reward, images(3), PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.0, 1.0]))
    assert reward.unparsed == 1
    assert reward.last_details["unparsed"].tolist() == [0.0, 1.0, 0.0]  # logged per sample
    [record] = caplog.records
    assert PROMPTS[1] in record.getMessage() and "I cannot tell." in record.getMessage()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Final Score: 4", 0.8),
        ("The image matches.\nFinal Score:3.5", 0.7),
        ("Final Score: 1", 0.2),
        ("Final Score: 5.", 1.0),  # a full stop is not a decimal
        ("Final Score: 2 ... on reflection, Final Score: 5", 0.4),  # the first one counts
        ("Score: 3 out of 5, rated 4", None),  # several numbers, no "Final Score:"
        ("final score: 4", None),  # case matters, as in the reference
        ("Final Score: 0", None),
        ("Final Score: 6", None),
        ("Final Score: 55", None),  # not 5 (the reference's regex would read 5)
        ("Final Score: four", None),
        ("", None),
    ],
)
def test_unifiedreward_parser(answer, expected):
    assert parse_final_score(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("<Thought>sharp, vivid</Thought>\n<Score>4</Score>", 0.8),
        ("<Score>1</Score>", 0.2),
        ("<Score>5</Score>", 1.0),
        ("<Score>2</Score> then <Score>5</Score>", 0.4),  # the first tag counts
        ("<Score>0</Score>", None),  # out of range (flow_grpo would give 0)
        ("<Score>7</Score>", None),  # out of range (flow_grpo would give 1.4)
        ("<Score>3.5</Score>", None),  # the reference's tag holds an integer
        ("<Score>X</Score>", None),  # the template's own placeholder echoed back
        ("Score: 4", None),
        ("<score>4</score>", None),
    ],
)
def test_qwenvl_parser(answer, expected):
    assert parse_score_tag(answer) == expected


def test_the_tokenizers_chat_template_is_used_when_it_has_one():
    tokenizer = tiny_tokenizer()
    assert chat_prompt("Q?", tokenizer) == qwen_text("Q?", 1)  # no template: Qwen2-VL's
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
        "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    expected = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
    assert chat_prompt("Q?", tokenizer) == expected + "<|im_start|>assistant\n"
    tokenizer.chat_template = "{{ messages[0].content[1].text }}"  # drops the image
    with pytest.raises(ValueError, match="image_pad"):
        chat_prompt("Q?", tokenizer)


# vLLM stand-ins, shaped like vllm.LLM, SamplingParams, RequestOutput, CompletionOutput and
# Logprob: `outputs[0].text`, `outputs[0].logprobs[position][token_id].logprob`.
def request_output(text: str = "", top: dict[int, float] | None = None) -> SimpleNamespace:
    logprobs = [{t: SimpleNamespace(logprob=lp, rank=1) for t, lp in (top or {}).items()}]
    completion = SimpleNamespace(text=text, token_ids=[], logprobs=logprobs if top else None)
    return SimpleNamespace(outputs=[completion], prompt="", request_id="0")


class FakeLLM:
    def __init__(self, tokenizer, outputs, **kwargs) -> None:
        self.tokenizer, self.outputs, self.kwargs = tokenizer, outputs, kwargs
        self.calls: list[tuple[list[dict], dict]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        return self.outputs[: len(requests)]


@pytest.fixture
def fake_vllm(vlm_dir, monkeypatch):
    """`import vllm` gives stand-ins; `.outputs` sets what the next engine answers."""
    module = SimpleNamespace(outputs=[], llms=[])

    def llm(**kwargs):
        module.llms.append(
            FakeLLM(AutoTokenizer.from_pretrained(vlm_dir), module.outputs, **kwargs)
        )
        return module.llms[-1]

    module.LLM, module.SamplingParams = llm, dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_p_yes_requests_and_logprobs(vlm_dir, fake_vllm):
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    yes, no = yes_no(tokenizer)
    fake_vllm.outputs[:] = [
        request_output("Yes", {yes: -0.25, no: -1.5, 7: -3.0}),
        request_output("No", {no: -0.5, 7: -1.0}),  # "Yes" outside the top-k
        request_output("x", {7: -0.1}),  # neither
    ]
    reward = make_reward(
        "vlm-judge",
        {"path": vlm_dir, "backend": "vllm", "logprobs": 5, "engine_options": {"seed": 3}},
    )
    [llm] = fake_vllm.llms
    assert llm.kwargs == {
        "model": vlm_dir, "max_logprobs": 5, "limit_mm_per_prompt": {"image": 1}, "seed": 3
    }  # fmt: skip
    batch = images(3)
    scores = reward.score(batch, PROMPTS, [{}] * 3)
    torch.testing.assert_close(scores, torch.tensor([math.exp(-0.25), 0.0, 0.0]))
    [(requests, params)] = llm.calls
    assert params == {"max_tokens": 1, "temperature": 0.0, "logprobs": 5}
    for request, image, prompt in zip(requests, batch, PROMPTS, strict=True):
        assert request["prompt"] == qwen_text(f'Does this image show "{prompt}"?', 1)
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        image_sent = np.asarray(request["multi_modal_data"]["image"])
        assert torch.equal(torch.from_numpy(image_sent.copy()), pixels)

    reward.normalize = True
    scores = reward.score(batch, PROMPTS, [{}] * 3)
    p_yes, p_no = math.exp(-0.25), math.exp(-1.5)
    assert scores[:2].tolist() == pytest.approx([p_yes / (p_yes + p_no), 0.0], abs=1e-6)
    assert math.isnan(scores[2])  # both outside the top-k: a bad sample, not a silent 0


def test_vllm_parsed_requests_and_text(vlm_dir, fake_vllm):
    fake_vllm.outputs[:] = [request_output("Fine.\nFinal Score: 4.5"), request_output("hmm")]
    reward = make_reward(
        "vlm-judge", {"path": vlm_dir, "backend": "vllm", "scoring": "parsed", "max_new_tokens": 64}
    )
    scores = reward.score(images(2), PROMPTS[:2], [{}, {}])
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.0]))
    assert reward.unparsed == 1
    [(requests, params)] = fake_vllm.llms[0].calls
    assert params == {"max_tokens": 64, "temperature": 0.0}
    question = TEMPLATES["unifiedreward"].question.replace("{prompt}", PROMPTS[1])
    assert requests[1]["prompt"] == qwen_text(question, 1)


def test_logprobs_from_outputs_by_hand():
    outputs = [request_output(top={3: -0.1, 4: -2.0}), request_output(top={4: -0.7})]
    table = logprobs_from_outputs(outputs, [3, 4])
    assert table.tolist() == [[pytest.approx(-0.1), -2.0], [-math.inf, pytest.approx(-0.7)]]
    assert logprobs_from_outputs([], [3, 4]).shape == (0, 2)


def test_vllm_backend_without_vllm_or_weights(vlm_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"'vlm-judge'.*vllm"):
        VllmEngine.load(vlm_dir)
    assert local_model_dir(vlm_dir) == vlm_dir
    with pytest.raises(FileNotFoundError, match=r"'vlm-judge': options\.path"):
        local_model_dir(str(tmp_path / "absent"))


def test_make_reward_end_to_end_and_missing_weights(vlm_dir, tmp_path):
    reward = make_reward("vlm-judge", {"path": vlm_dir, "device": "cpu"})
    assert reward.name == "vlm-judge" and not reward.differentiable
    scores = checked_score(reward, images(2), PROMPTS[:2])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert ((scores > 0) & (scores < 1)).all()
    with pytest.raises(FileNotFoundError, match=r"'vlm-judge'.*options\.path"):
        make_reward("vlm-judge", {})
    with pytest.raises(FileNotFoundError, match=r"'vlm-judge': options\.path"):
        make_reward("vlm-judge", {"path": str(tmp_path / "absent")})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"scoring": "logits"}, "scoring"),
        ({"scoring": "parsed", "template": "vqascore"}, "no score to parse"),
        ({"template": "hps"}, "template"),
        ({"backend": "sglang"}, "backend"),
        ({"answer": "Maybe"}, "one token"),
    ],
)
def test_bad_options(vlm_dir, options, match):
    with pytest.raises(ValueError, match=match):
        make_reward("vlm-judge", {"path": vlm_dir, **options})


def test_question_option_overrides_the_templates_text(vlm_dir, fake_vllm):
    fake_vllm.outputs[:] = [request_output("<Score>3</Score>")]
    options = {"scoring": "parsed", "template": "qwenvl", "question": "Rate «{prompt}»."}
    reward = make_reward("vlm-judge", {"path": vlm_dir, "backend": "vllm", **options})
    assert reward.score(images(1), ["a cat"], [{}]).tolist() == [pytest.approx(0.6)]
    [(requests, _)] = fake_vllm.llms[0].calls
    assert requests[0]["prompt"] == qwen_text("Rate «a cat».", 1)
