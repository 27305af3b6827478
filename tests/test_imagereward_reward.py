"""The `imagereward` port against the real ImageReward package: a tiny ImageReward built by
the package itself (scripts/fixtures/make_imagereward_fixture.py, in a side venv) gave the
checkpoint, configs, vocabulary, images and expected rewards in tests/fixtures/imagereward;
here the project's converter turns the checkpoint into transformers' BLIP modules and the
reward, loaded by name, must give the package's numbers."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydraft.rewards import imagereward
from raydraft.rewards.preprocess import OPENAI_MEAN, OPENAI_STD
from raydraft.rewards.registry import make_reward

FIXTURE = Path(__file__).parent / "fixtures" / "imagereward"
CASES = torch.load(FIXTURE / "cases.pt", weights_only=True)
PROMPTS = CASES["prompts"]
IMAGES = range(len(CASES["pixel_sha256"]))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_png(name: str) -> torch.Tensor:
    """A fixture PNG as CHW floats in [0, 1] (exactly k/255)."""
    pixels = np.array(Image.open(FIXTURE / name).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)


def sha256(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.contiguous().float().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("imagereward")
    imagereward.main(
        [
            "convert",
            f"--checkpoint={FIXTURE / 'ImageReward.pt'}",
            f"--med-config={FIXTURE / 'med_config.json'}",
            f"--vision-config={FIXTURE / 'vision_config.json'}",
            f"--tokenizer={FIXTURE}",  # the tiny vocab.txt, as bert-base-uncased's
            f"--out={out}",
        ]
    )
    return str(out)


@pytest.fixture(scope="module")
def reward(converted):
    return make_reward("imagereward", {"path": converted, "device": "cpu"})


def batch(index: int) -> torch.Tensor:
    """Fixture image `index` once per prompt."""
    return load_png(f"image_{index}.png")[None].expand(len(PROMPTS), -1, -1, -1)


def test_tokens_are_the_reference_tokenizers(reward):
    tokens = reward.tokens(PROMPTS)
    assert torch.equal(tokens["input_ids"], CASES["input_ids"])
    assert torch.equal(tokens["attention_mask"], CASES["attention_mask"])


@pytest.mark.parametrize("index", IMAGES)
def test_black_box_pixels_are_the_references_exactly(reward, index):
    """The package's PIL preprocessing, bit for bit: the digest of its float pixels, and
    (for a readable failure) the pixels normalised from its uint8 crop."""
    pixels = reward.pixels(load_png(f"image_{index}.png")[None])[0]
    crop = load_png(f"crop_{index}.png")
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    reference = crop.sub(mean).div(std)
    assert sha256(reference) == CASES["pixel_sha256"][index]
    assert (pixels - reference).abs().max().item() == 0
    assert sha256(pixels) == CASES["pixel_sha256"][index]


@pytest.mark.parametrize("index", IMAGES)
def test_rewards_are_the_packages_score(reward, index):
    """The package's `score` (one image, one prompt) and `inference_rank` (one prompt, all
    images) against this reward on a batch of one image with every prompt."""
    scores = reward.score(batch(index), PROMPTS, [{}] * len(PROMPTS)).double()
    torch.testing.assert_close(scores, CASES["score"][index], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, CASES["inference_rank"][index], rtol=0, atol=1e-5)


@pytest.mark.parametrize("index", IMAGES)
def test_the_differentiable_path_is_score_gard_and_reaches_the_pixels(converted, index):
    options = {"path": converted, "differentiable": True, "device": "cpu"}
    reward = make_reward("imagereward", options)
    images = batch(index).clone().requires_grad_(True)
    scores = reward.score(images, PROMPTS, [])
    torch.testing.assert_close(
        scores.detach().double(), CASES["score_gard"][index], rtol=0, atol=1e-5
    )
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_a_missing_path_names_the_reward_the_path_and_how_to_fetch_it(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"reward 'imagereward': options.path '.*no-weights'.*hf download THUDM/ImageReward",
    ):
        make_reward("imagereward", {"path": str(tmp_path / "no-weights")})
    with pytest.raises(FileNotFoundError, match=r"options.path None"):
        make_reward("imagereward")


def test_a_broken_converted_directory_names_the_part(converted, tmp_path):
    (tmp_path / "imagereward.json").write_text(Path(converted, "imagereward.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"BlipVisionModel from its vision/"):
        make_reward("imagereward", {"path": str(tmp_path)})


def fixture_checkpoint() -> tuple[dict[str, torch.Tensor], dict, dict]:
    state = torch.load(FIXTURE / "ImageReward.pt", weights_only=True)
    vision = json.loads((FIXTURE / "vision_config.json").read_text())
    return state, vision, json.loads((FIXTURE / "med_config.json").read_text())


def test_the_converter_rejects_missing_and_unexpected_keys():
    state, vision, med = fixture_checkpoint()
    missing = "blip.visual_encoder.blocks.1.norm2.bias"
    with pytest.raises(KeyError, match=rf"missing keys \['{missing}'\] \(1\)"):
        imagereward.convert_imagereward(
            {k: v for k, v in state.items() if k != missing}, vision, med
        )
    extra = {**state, "blip.itm_head.weight": torch.zeros(2, 32)}
    with pytest.raises(KeyError, match=r"unexpected keys \['blip.itm_head.weight'\] \(1\)"):
        imagereward.convert_imagereward(extra, vision, med)
    deeper = {**vision, "depth": vision["depth"] + 1}
    with pytest.raises(KeyError, match=r"missing keys \['blip.visual_encoder.blocks.2.attn"):
        imagereward.convert_imagereward(state, deeper, med)
