"""HPSv2 against the reference packages themselves: tests/fixtures/hpsv2 holds a tiny open_clip
CLIP of ViT-H-14's structure and what hpsv2 (PIL path) and DiffusionNFT (tensor path)
computed with it (made by scripts/fixtures/make_hpsv2_fixture.py in a side venv). Here the
state dict goes through raydraft's converter into a transformers CLIPModel, is loaded by the
reward and must give the same pixels, features and scores."""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from raydraft.models.tokenizers import byte_clip_tokenizer
from raydraft.rewards import hpsv2
from raydraft.rewards.registry import make_reward

FIXTURE = Path(__file__).parent / "fixtures" / "hpsv2"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases():
    return torch.load(FIXTURE / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def state():
    return torch.load(FIXTURE / "open_clip_state.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def cfg():
    return json.loads((FIXTURE / "open_clip_cfg.json").read_text())


@pytest.fixture(scope="module")
def converted(state, cfg, tmp_path_factory):
    """The fixture's weights converted, with a byte-level CLIP tokenizer whose ids fit the
    tiny vocabulary (start 512, end 513: the largest, as in open_clip's)."""
    out = tmp_path_factory.mktemp("hpsv2-tiny")
    return str(hpsv2.save_converted(state, cfg, out, byte_clip_tokenizer(), {"source": "test"}))


@pytest.fixture(scope="module")
def black_box(converted):
    return make_reward("hpsv2", {"path": converted, "device": "cpu"})


@pytest.fixture(scope="module")
def differentiable(converted):
    return make_reward("hpsv2", {"path": converted, "device": "cpu", "differentiable": True})


def test_black_box_pixels_are_hpsv2s_preprocess_val_exactly(black_box, cases):
    """hpsv2 saw the fixture's float images quantised to uint8 (as `to_uint8_hwc` does)."""
    pixels = black_box.pixels(cases["float_images"])
    assert pixels.shape == (3, 3, 56, 56)
    assert torch.equal(pixels, cases["pil_pixels"])


def test_differentiable_pixels_are_diffusionnfts_exactly(differentiable, cases):
    """NFT feeds the float images straight in: no uint8 step, so other pixels than hpsv2's."""
    assert torch.equal(differentiable.pixels(cases["float_images"]), cases["tensor_pixels"])
    assert not torch.equal(cases["tensor_pixels"], cases["pil_pixels"])


@pytest.mark.parametrize("path", ["pil", "tensor"])
def test_features_and_scores_are_the_references(black_box, differentiable, cases, path):
    reward = {"pil": black_box, "tensor": differentiable}[path]
    with torch.no_grad():
        image, text = reward.features(cases[f"{path}_pixels"], cases["token_ids"])
        scores = reward.score_tokens(cases["float_images"], cases["token_ids"])
    # Measured: features equal bit for bit, scores within 3e-8 (summation order).
    close = {"rtol": 0, "atol": 1e-5}
    torch.testing.assert_close(image, cases[f"{path}_image_features"], **close)
    torch.testing.assert_close(text, cases["text_features"], **close)
    torch.testing.assert_close(scores, cases[f"{path}_scores"], **close)


def test_the_differentiable_path_reaches_the_pixels(black_box, differentiable, cases):
    x = cases["float_images"].clone().requires_grad_(True)
    differentiable.score_tokens(x, cases["token_ids"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not black_box.score_tokens(x, cases["token_ids"]).requires_grad


def test_token_ids_are_open_clips(cases, black_box):
    """An excerpt of open_clip's real BPE vocabulary (what the fixture's prompts use, with
    the real ids) in transformers' CLIPTokenizer gives hpsv2's ids: HTML unescaped, curly
    quotes straightened, whitespace collapsed, zero padding, the long prompt cut to 77 with
    the end token last."""
    merges = [tuple(m.split()) for m in cases["real_merges_excerpt"]]
    tokenizer = CLIPTokenizer(vocab=cases["real_vocab_excerpt"], merges=merges)
    ids = hpsv2.open_clip_token_ids(tokenizer, cases["real_prompts"])
    assert torch.equal(ids, cases["real_token_ids"])
    tiny = black_box.token_ids(["ab", "x" * 100])
    assert tiny[0, :4].tolist() == [512, *black_box.tokenizer.encode("ab")[1:-1], 513]
    assert tiny[0, 4:].eq(0).all() and tiny[1, -1] == 513 and tiny.shape == (2, 77)


def test_score_tokenizes_the_prompts(black_box, cases):
    images, prompts = cases["float_images"], ["a red cat", "", "x" * 100]
    scores = black_box.score(images, prompts, [{}] * 3)
    expected = black_box.score_tokens(images, black_box.token_ids(prompts))
    assert scores.shape == (3,) and torch.equal(scores, expected)


def test_the_converter_refuses_a_state_dict_that_does_not_fit(state, cfg):
    missing = {k: v for k, v in state.items() if k != "visual.proj"}
    with pytest.raises(KeyError, match=r"missing \['visual.proj'\], unexpected \[\]"):
        hpsv2.convert_open_clip(missing, cfg)
    extra = {**state, "visual.attn_pool.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"unexpected \['visual.attn_pool.weight'\]"):
        hpsv2.convert_open_clip(extra, cfg)
    with pytest.raises(ValueError, match=r"unsupported .*'quick_gelu'"):
        hpsv2.convert_open_clip(state, {**cfg, "quick_gelu": True})


def test_missing_weights_name_the_reward_the_path_and_how_to_convert(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"reward 'hpsv2': options.path .*no-hps.*hf download xswu/HPSv2.*hpsv2 convert",
    ):
        make_reward("hpsv2", {"path": str(tmp_path / "no-hps")})
    with pytest.raises(ValueError, match=r"reward 'hpsv2' needs options.path"):
        make_reward("hpsv2")


def test_the_convert_command_writes_what_the_reward_loads(tmp_path, cases):
    tokenizer = byte_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "converted"
    hpsv2.main(["convert", "--checkpoint", str(FIXTURE / "open_clip_state.pt"),
                "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out),
                "--cfg", str(FIXTURE / "open_clip_cfg.json"), "--version", "v2.1"])  # fmt: skip
    reward = make_reward("hpsv2", {"path": str(out), "device": "cpu"})
    assert reward.version == "v2.1"
    assert reward.info["checkpoint"] == "open_clip_state.pt"
    assert len(reward.info["checkpoint_sha256"]) == 64
    scores = reward.score_tokens(cases["float_images"], cases["token_ids"])
    torch.testing.assert_close(scores, cases["pil_scores"], rtol=0, atol=1e-5)
