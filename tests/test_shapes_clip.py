"""`toy-clipscore`: the shipped tiny CLIP-like reward of the shapes world."""

import numpy as np
import pytest
import torch

import raydraft.rewards.shapes_clip  # noqa: F401  (registers toy-clipscore)
from raydraft.data.shapes import CATEGORIES, all_specs, layout, render, to_tensor
from raydraft.rewards.base import checked_score
from raydraft.rewards.registry import make_reward
from raydraft.rewards.shapes_checker import clauses
from raydraft.rewards.shapes_clip import TRAIN_COMMAND, hard_negatives

SEED_BASE = 10**10  # far from the training seeds (< 2**31)


@pytest.fixture(scope="module")
def reward():
    return make_reward("toy-clipscore")


@pytest.fixture(scope="module")
def scenes():
    """Per category 8 scenes of fresh seeds: (spec, objects)."""
    rng = np.random.default_rng(0)
    specs = all_specs()
    out = []
    for category in CATEGORIES:
        pool = [s for s in specs if s.category == category]
        for k in range(8):
            spec = pool[rng.integers(len(pool))]
            out.append((spec, layout(spec, SEED_BASE + 100 * len(out) + k)))
    return out


def _pairs(scenes):
    """(image index, prompt, exact label, is the scene's own prompt) for the own prompt and
    every hard negative of each scene."""
    rows = []
    for i, (spec, objects) in enumerate(scenes):
        for k, p in enumerate([spec, *hard_negatives(spec)]):
            rows.append((i, p.text, all(clauses(p, objects)), k == 0))
    return rows


def test_scores_match_exact_labels_and_rank_positives_first(reward, scenes):
    images = to_tensor(np.stack([render(o) for _, o in scenes]))
    rows = _pairs(scenes)
    index = torch.tensor([r[0] for r in rows])
    with torch.no_grad():
        scores = checked_score(reward, images[index], [r[1] for r in rows])
    assert ((scores > 0) & (scores < 1)).all()
    labels = torch.tensor([r[2] for r in rows])
    assert labels[[r[3] for r in rows]].all()  # a scene shows its own prompt
    accuracy = ((scores > 0.5) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy
    own = {r[0]: s for r, s in zip(rows, scores, strict=True) if r[3]}
    wins = [bool(own[r[0]] > s) for r, s in zip(rows, scores, strict=True) if not r[2]]
    assert np.mean(wins) >= 0.9, np.mean(wins)


def test_gradients_reach_the_images_and_are_finite(reward, scenes):
    images = to_tensor(np.stack([render(o) for _, o in scenes[:12]])).requires_grad_(True)
    scores = reward.score(images, [s.text for s, _ in scenes[:12]], [{}] * 12)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # the reward stays frozen


def test_noise_images_score_low_for_most_prompts(reward):
    g = torch.Generator().manual_seed(0)
    prompts = [s.text for s in all_specs()]
    noise = torch.rand(len(prompts), 3, 32, 32, generator=g)
    grey = (0.5 + 0.2 * torch.randn(len(prompts), 3, 32, 32, generator=g)).clamp(0, 1)
    with torch.no_grad():
        scores = torch.cat([reward.score(x, prompts, [{}] * len(prompts)) for x in (noise, grey)])
    assert (scores < 0.5).float().mean() >= 0.9


def test_text_embeddings_are_cached_and_order_matters(reward):
    a, b = "a red circle and a blue square", "a blue circle and a red square"
    image = to_tensor(render(layout(all_specs()[0], 1))[None])
    reward.score(image, [a], [{}])
    assert any(key[0] == a for key in reward._text_cache)
    ea, eb = reward.model.encode_texts([a, b])
    assert not torch.allclose(ea, eb, atol=1e-3)


def test_unknown_words_and_missing_weights_are_clear_errors(reward, tmp_path):
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="shapes world"):
        reward.score(image, ["a photo of a cat"], [{}])
    with pytest.raises(FileNotFoundError, match="train_clipscore"):
        make_reward("toy-clipscore", {"path": str(tmp_path / "nowhere")})
    assert "train_clipscore" in TRAIN_COMMAND
