"""The `ocr` reward: its formula on known cases, and the real shipped PP-OCRv4 weights on
rendered text."""

import logging
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from text_images import as_batch, render_text

from raydraft.rewards.base import checked_score
from raydraft.rewards.ocr import OcrReward, edit_distance, ocr_score, quoted_text
from raydraft.rewards.registry import make_reward


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0),
        ("abc", "abc", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("abc", "axc", 1),  # substitution
        ("abc", "abxc", 1),  # insertion
        ("abc", "ac", 1),  # deletion
        ("ab", "ba", 2),  # a transposition is two edits in Levenshtein
    ],
)
def test_edit_distance(a, b, expected):
    assert edit_distance(a, b) == expected
    assert edit_distance(b, a) == expected


@pytest.mark.parametrize(
    ("recognized", "target", "expected"),
    [
        ("hello world", "hello world", 1.0),
        ("OPEN 24 hours, welcome", "open 24 hours", 1.0),  # substring contained
        ("hellp", "hello", 0.8),  # one substitution
        ("helxlo", "hello", 0.8),  # one insertion
        ("helo", "hello", 0.8),  # one deletion
        ("raydraft", "hello", 0.0),  # distance 7 capped at len 5
        ("a much longer unrelated sentence", "cat", 0.0),  # cap, not negative
        ("Hello   World", "helloworld", 1.0),  # spaces and case ignored
        ("HELLOWORLD", "hello world", 1.0),
        ("", "hello", 0.0),  # nothing recognized
        ("hel", "hello", 0.6),  # two deletions
    ],
)
def test_ocr_score(recognized, target, expected):
    assert ocr_score(recognized, target) == pytest.approx(expected)


def test_quoted_text():
    assert quoted_text('a sign that says "Hello World" in neon') == "Hello World"
    assert quoted_text('a "first" and a "second"') == "first"
    assert quoted_text('an unclosed "quote here') == "quote here"  # as split('"')[1]
    for bad in ["a sign with no quotes", 'empty ""', 'spaces "   " only']:
        with pytest.raises(ValueError, match="ocr") as info:
            quoted_text(bad)
        assert repr(bad) in str(info.value)


@pytest.fixture(scope="module")
def reward():
    return make_reward("ocr")


def test_registry_and_engine_info(reward):
    assert isinstance(reward, OcrReward)
    assert reward.name == "ocr" and reward.differentiable is False
    info = reward.engine_info
    assert info["engine"] == "rapidocr-onnxruntime" and info["version"] == "1.4.4"
    assert info["det_model"] == "ch_PP-OCRv4_det_infer.onnx"
    assert info["rec_model"] == "ch_PP-OCRv4_rec_infer.onnx"
    assert info["cls_model"] == "ch_ppocr_mobile_v2.0_cls_infer.onnx" and info["use_cls"] is False
    # The files named are the ones the engine's sessions loaded, with one thread each.
    engine = reward.engine
    sessions = {
        "det_model": engine.text_det.infer.session,
        "rec_model": engine.text_rec.session.session,
    }
    for key, session in sessions.items():
        assert Path(session._model_path).name == info[key]
        assert session.get_session_options().intra_op_num_threads == 1
    assert engine.use_cls is False
    clone = pickle.loads(pickle.dumps(reward))  # e.g. shipped to a Ray actor: no live session
    assert clone._engine is None and clone.engine_info == info
    with pytest.raises(TypeError, match="ocr"):
        make_reward("ocr", {"path": "x"})


def test_real_weights_on_rendered_text(reward):
    hello, raydraft = render_text("hello world"), render_text("raydraft")
    blank = Image.new("RGB", (512, 256), "white")
    images = as_batch([hello, raydraft, hello, raydraft, blank])
    prompts = [
        'a sign that says "hello world"',
        'a logo reading "RayDraft"',
        'a sign that says "raydraft"',
        'a shop front with the words "good morning"',
        'a sign that says "hello world"',
    ]
    scores = checked_score(reward, images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores[0] >= 0.9 and scores[1] >= 0.9, scores
    assert scores[2] <= 0.5 and scores[3] <= 0.5, scores
    assert scores[4] == 0, scores
    assert reward.failures == 0 and reward.last_details["failed"].tolist() == [0.0] * 5


def test_engine_failure_scores_zero_and_is_counted(caplog):
    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("onnxruntime exploded")

    reward = OcrReward()
    reward._engine = Broken()
    with caplog.at_level(logging.WARNING, logger="raydraft.rewards.ocr"):
        scores = reward.score(torch.ones(2, 3, 32, 32), ['say "a"', 'say "b"'], [{}, {}])
    assert scores.tolist() == [0.0, 0.0]
    assert reward.failures == 2 and reward.last_details["failed"].tolist() == [1.0, 1.0]
    assert "'say \"b\"'" in caplog.text and "exploded" in caplog.text
    with pytest.raises(ValueError, match="no quotes"):
        reward.score(torch.ones(1, 3, 32, 32), ["no quotes"], [{}])
