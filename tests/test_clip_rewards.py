"""PickScore, CLIPScore and the aesthetic predictor on a tiny random CLIPModel of the real
class, saved with its processor and tokenizer and loaded through the rewards' own loader,
against their reference formulas recomputed here on the same weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import save_tiny_clip
from transformers import AutoModel, AutoProcessor

from raydraft.bench.reward_models import save_aesthetic_mlp
from raydraft.rewards.preprocess import processor_pixels, tensor_pixels
from raydraft.rewards.registry import make_reward

PROMPTS = ["a red cat on a sofa", "a photo of a blue dog", "sunset", "text that says hi"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def images():
    """Non-square, larger than 224 (reward models downscale generated images), with detail
    a resize must average."""
    generator = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(4, 3, 16, 20, generator=generator), size=(256, 320))
    return (smooth + 0.2 * torch.rand(4, 3, 256, 320, generator=generator)).clamp(0, 1)


def reference_pil(images):
    """flow_grpo's quantisation before its PIL processors."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_pickscore(clip_dir, images, prompts):
    """pickscore_scorer.py's lines on the same weights."""
    processor, model = AutoProcessor.from_pretrained(clip_dir), AutoModel.from_pretrained(clip_dir)
    kwargs = {"padding": True, "truncation": True, "max_length": 77, "return_tensors": "pt"}
    with torch.no_grad():
        image_embs = features(
            model.get_image_features(**processor(images=reference_pil(images), **kwargs))
        )
        image_embs = image_embs / image_embs.norm(p=2, dim=-1, keepdim=True)
        text_embs = features(model.get_text_features(**processor(text=prompts, **kwargs)))
        text_embs = text_embs / text_embs.norm(p=2, dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (text_embs @ image_embs.T)).diag() / 26


def test_black_box_pixels_are_the_processors_exactly(clip_dir, images):
    reward = make_reward("pickscore", {"path": clip_dir})
    expected = AutoProcessor.from_pretrained(clip_dir)(
        images=reference_pil(images), return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(processor_pixels(reward.image_processor, images), expected)


def test_pickscore_is_the_reference_formula(clip_dir, images):
    reward = make_reward("pickscore", {"path": clip_dir})
    expected = reference_pickscore(clip_dir, images, PROMPTS)
    torch.testing.assert_close(reward.score(images, PROMPTS, [{}] * 4), expected, rtol=0, atol=1e-5)
    raw = make_reward("pickscore", {"path": clip_dir, "raw": True}).score(images, PROMPTS, [])
    torch.testing.assert_close(raw, 26 * expected, rtol=1e-6, atol=0)


def test_the_differentiable_path_is_close_to_the_pil_path_and_reaches_the_pixels(clip_dir, images):
    black_box = make_reward("pickscore", {"path": clip_dir})
    reward = make_reward("pickscore", {"path": clip_dir, "differentiable": True})
    assert reward.differentiable and not black_box.differentiable
    # PIL resizes the uint8 image in two passes, rounding and clipping each to uint8; the
    # tensor path keeps floats. On these noisy, blocky images: at most 4/255 per pixel
    # (at sharp edges), 0.34/255 on average, before normalisation.
    pil, tensor = (processor_pixels(reward.image_processor, images),
                   tensor_pixels(reward.image_processor, images))  # fmt: skip
    std = torch.tensor(reward.image_processor.image_std).view(1, 3, 1, 1)
    assert pil.shape == tensor.shape == (4, 3, 224, 224)
    difference = ((pil - tensor) * std).abs()
    assert difference.max() <= 5 / 255 and difference.mean() <= 0.5 / 255
    x = images.clone().requires_grad_(True)
    scores = reward.score(x, PROMPTS, [])
    # The scores moved by 5e-5 (measured): allow 10 times that.
    torch.testing.assert_close(
        scores.detach(), black_box.score(images, PROMPTS, []), rtol=0, atol=5e-4
    )
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # a black-box caller gets no graph
        assert not black_box.score(x, PROMPTS, []).requires_grad


def test_clipscore_is_the_reference_formula_and_differentiable(clip_dir, images):
    """clip_scorer.py: torchvision's Resize(224) (bilinear, antialiased on tensors, which
    is F.interpolate with antialias), CenterCrop(224), Normalize, text padded to 77."""
    processor, model = AutoProcessor.from_pretrained(clip_dir), AutoModel.from_pretrained(clip_dir)
    resized = F.interpolate(images, size=(224, 280), mode="bilinear", antialias=True)
    cropped = resized[..., :, 28 : 28 + 224]
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    text = processor(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=(cropped - mean) / std, **text)
    expected = out.logits_per_image.diagonal() / 100
    reward = make_reward("clipscore", {"path": clip_dir})
    x = images.clone().requires_grad_(True)
    scores = reward.score(x, PROMPTS, [])
    torch.testing.assert_close(scores.detach(), expected, rtol=0, atol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_is_the_predictor_on_the_normalised_embedding(clip_dir, images, tmp_path):
    mlp_path = save_aesthetic_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 16, seed=2)
    state = torch.load(mlp_path, weights_only=True)
    reward = make_reward("aesthetic", {"path": clip_dir, "mlp_path": mlp_path})
    processor, model = AutoProcessor.from_pretrained(clip_dir), AutoModel.from_pretrained(clip_dir)
    with torch.no_grad():  # aesthetic_scorer.py: processor, image features, L2, the MLP
        embed = features(
            model.get_image_features(**processor(images=reference_pil(images), return_tensors="pt"))
        )
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        x = embed
        for index in (0, 2, 4, 6, 7):  # dropout is the identity at inference
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(reward.score(images, PROMPTS, []), x.squeeze(1), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"'aesthetic'.*mlp_path"):
        make_reward("aesthetic", {"path": clip_dir, "mlp_path": str(tmp_path / "missing.pth")})


def test_missing_weights_name_the_reward_the_path_and_how_to_fetch_them(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"reward 'pickscore': options.path .*no-clip.*hf download"
    ):
        make_reward("pickscore", {"path": str(tmp_path / "no-clip")})
    with pytest.raises(
        FileNotFoundError,
        match=r"options.path 'someone/not-cached'.*hf download someone/not-cached",
    ):
        make_reward("clipscore", {"path": "someone/not-cached"})
    with pytest.raises(ValueError, match=r"reward 'pickscore' needs options.path"):
        make_reward("pickscore")
