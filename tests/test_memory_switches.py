"""The memory switches of the pipeline adapters: text-embedding cache, text encoders kept in
host memory, VAE slicing and tiling. Each must save memory or time without changing what
the policy computes (tiling excepted: it blends tile seams, by design)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_sd3, save_tiny_sdxl

from raydraft.build import build_policy
from raydraft.config import ModelConfig
from raydraft.models.base import Conditioning
from raydraft.offload import move_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def policy_for(model_dir, family: str = "sd3", **switches):
    return build_policy(ModelConfig(family=family, path=str(model_dir), **switches))


def assert_same_conditioning(got: Conditioning, want: Conditioning) -> None:
    for name in ("embeds", "pooled", "negative_embeds", "negative_pooled"):
        assert (getattr(got, name) is None) == (getattr(want, name) is None), name
        if getattr(want, name) is not None:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.extra.keys() == want.extra.keys()
    for key, value in want.extra.items():
        assert torch.equal(got.extra[key], value), key


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_text_embedding_cache_returns_the_encoders_embeddings(family, sd3_dir, sdxl_dir):
    model_dir = {"sd3": sd3_dir, "sdxl": sdxl_dir}[family]
    plain = policy_for(model_dir, family)
    cached = policy_for(model_dir, family, text_embedding_cache=3)
    calls = []
    encode = cached._encode
    cached._encode = lambda prompts, negatives: (
        calls.append((list(prompts), negatives)) or encode(prompts, negatives)
    )

    def rows(prompts, negatives):
        return list(zip(prompts, negatives or [None] * len(prompts), strict=True))

    # Each row must be exactly what the plain encoder gives for the batch the cache encoded
    # it in (the encoders may round differently for another batch size).
    reference = {}

    def expected(prompts, negatives=None):
        for batch, batch_negatives in calls:
            encoded = plain.encode(batch, batch_negatives)
            for i, key in enumerate(rows(batch, batch_negatives)):
                reference.setdefault(key, encoded.select([i]))
        return Conditioning.concat([reference[key] for key in rows(prompts, negatives)])

    batches = [["a red cat", "the blue dog"], ["the blue dog", "a cat", "a red cat", "a cat"]]
    for prompts in batches:
        assert_same_conditioning(cached.encode(prompts), expected(prompts))
    assert [batch for batch, _ in calls] == [["a red cat", "the blue dog"], ["a cat"]]
    assert (cached.text_cache.hits, cached.text_cache.misses) == (3, 3)  # only unseen rows

    negatives = ["blurry"] * 2  # another negative prompt is another row
    got = cached.encode(["a red cat", "a cat"], negatives)
    assert_same_conditioning(got, plain.encode(["a red cat", "a cat"], negatives))
    assert calls[-1] == (["a red cat", "a cat"], negatives)
    assert len(cached.text_cache.rows) == 3  # least recently used rows evicted


def test_a_batch_larger_than_the_cache_still_encodes(sd3_dir):
    cached = policy_for(sd3_dir, text_embedding_cache=1)
    prompts = ["a", "b", "c"]
    assert_same_conditioning(cached.encode(prompts), policy_for(sd3_dir).encode(prompts))
    assert list(cached.text_cache.rows) == [("c", None)]


def test_offloaded_text_encoders_stay_in_host_memory(sd3_dir):
    """`meta` stands in for an accelerator: whatever reaches it loses its weights, so an
    encoder that moved there could not encode any more."""
    policy = policy_for(sd3_dir, offload_text_encoders=True)
    expected = policy.encode(["a red cat"])
    move_policy(policy, "meta")  # what colocated swapping does with policy.modules()
    assert policy.transformer.device.type == "meta"
    for encoder in policy.text_encoders():
        assert encoder.device.type == "cpu"
    assert_same_conditioning(policy.encode(["a red cat"]), expected)

    kept = policy_for(sd3_dir)
    move_policy(kept, "meta")
    assert all(encoder.device.type == "meta" for encoder in kept.text_encoders())


def test_vae_slicing_decodes_the_same_and_stays_differentiable(sd3_dir):
    whole, sliced = policy_for(sd3_dir), policy_for(sd3_dir, vae_slicing=True)
    assert sliced.vae.use_slicing and not whole.vae.use_slicing
    latents = torch.randn(3, *whole.latent_shape, requires_grad=True)
    images = sliced.decode(latents)
    # Slicing decodes one image at a time: exactly the whole model's single-image decodes
    # (a batched decode may round differently for another batch size).
    one_by_one = torch.cat([whole.decode(latents[i : i + 1]) for i in range(len(latents))])
    assert torch.equal(images, one_by_one)
    images.sum().backward()
    assert latents.grad.abs().sum() > 0


def test_vae_tiling_decodes_large_images_in_tiles(sd3_dir):
    """64×64 pixels against the tiny VAE's 16-pixel tiles: the tiled path runs (its seams
    blend, so it is close to the whole decode, not equal) and gradients reach the latents."""
    whole = policy_for(sd3_dir, resolution=64)
    tiled = policy_for(sd3_dir, resolution=64, vae_tiling=True)
    assert tiled.vae.use_tiling
    latents = torch.randn(1, *tiled.latent_shape, requires_grad=True)
    images = tiled.decode(latents)
    reference = whole.decode(latents)
    assert images.shape == reference.shape == (1, 3, 64, 64)
    assert 0 < (images - reference).abs().max() < 0.5
    images.sum().backward()
    assert latents.grad.abs().sum() > 0


def test_memory_switches_are_for_pipelines():
    with pytest.raises(ValueError, match="not the toy model"):
        ModelConfig(family="toy", text_embedding_cache=8)
