"""SD3Policy against the real StableDiffusion3Pipeline code paths, on a tiny random model.

The reference for every check is diffusers itself (a second pipeline loaded from the same
directory), so a wrong timestep scale, CFG order, latent normalisation or seed convention
fails here; the last test runs a whole sampling loop against `pipe(...)`.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from tiny_models import PROMPTS, SEEDS, check_lora_export, pipeline_images, save_tiny_sd3

from raydraft.config import LoraConfig, ModelConfig, SamplerConfig
from raydraft.models.base import Policy
from raydraft.models.sd3 import SD3Policy
from raydraft.models.trainable import JOINT_ATTENTION_LORA_TARGETS
from raydraft.sampling.loop import sample_images
from raydraft.sampling.samplers import build_sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture
def pipe(model_dir) -> StableDiffusion3Pipeline:
    """The untouched reference pipeline (the policy's own transformer gets LoRA layers)."""
    return StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)


def make_policy(model_dir, keep_reference: bool = False, **lora) -> SD3Policy:
    lora = {"rank": 2, "alpha": 2.0, **lora}
    cfg = ModelConfig(family="sd3", path=str(model_dir), lora=LoraConfig(**lora))
    return SD3Policy.from_pretrained(cfg, keep_reference)


def transformer_call(pipe, x, t, embeds, pooled) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=x,
            timestep=t * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


def inputs(policy: SD3Policy) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(
        (len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(5)
    )
    return x, torch.tensor([0.3, 0.8])


def base_velocity(pipe, policy, x, t, cond) -> torch.Tensor:
    return transformer_call(pipe, x, t, cond.embeds, cond.pooled)


def lora_b(policy: SD3Policy) -> list[torch.nn.Parameter]:
    return [p for n, p in policy.transformer.named_parameters() if "lora_B" in n]


def test_loads_from_saved_dir(model_dir):
    policy = make_policy(model_dir)
    assert isinstance(policy, Policy)
    assert policy.prediction_type == "flow"
    assert policy.latent_shape == (16, 8, 8)  # 16×16 pixels, VAE scale 2
    assert policy.device == torch.device("cpu")
    pipe = policy.pipe
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        assert not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())


def test_missing_weights_give_one_clear_error(model_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*present locally"):
        make_policy(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*model_index.json"):
        make_policy(empty)
    with pytest.raises(FileNotFoundError, match="present locally"):
        make_policy("someone/not-in-the-cache")
    with pytest.raises(ValueError, match=r"model.path is required"):
        SD3Policy.from_pretrained(ModelConfig(family="sd3"))


def test_initial_noise_is_the_pipelines(model_dir, pipe):
    policy = make_policy(model_dir)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    expected = pipe.prepare_latents(
        len(SEEDS), 16, 16, 16, torch.float32, torch.device("cpu"), generators
    )
    noise = policy.initial_noise(SEEDS)
    assert noise.shape == (len(SEEDS), *policy.latent_shape)
    assert torch.equal(noise, expected)


def test_encode_is_the_pipelines(model_dir, pipe):
    policy = make_policy(model_dir)
    with torch.no_grad():  # as in pipe(...): grad mode picks other attention kernels
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None)
    cond = policy.encode(PROMPTS)
    for got, want in [
        (cond.embeds, embeds),
        (cond.negative_embeds, neg),
        (cond.pooled, pooled),
        (cond.negative_pooled, neg_pooled),
    ]:
        assert torch.equal(got, want)
    assert cond.embeds.shape == (2, 16 + 256, 32)  # CLIP tokens then T5 tokens
    assert not torch.equal(cond.embeds[0], cond.embeds[1])

    negatives = ["blurry", "ugly"]
    own = policy.encode(PROMPTS, negative_prompts=negatives)
    with torch.no_grad():
        _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=negatives)
    assert torch.equal(own.negative_embeds, neg) and torch.equal(own.negative_pooled, neg_pooled)
    assert not torch.equal(own.negative_embeds, cond.negative_embeds)

    policy.cfg.negative_prompt = "blurry"
    default = policy.encode(PROMPTS)
    assert torch.equal(default.negative_embeds[0], own.negative_embeds[0])


def test_predict_without_guidance_is_the_transformer(model_dir, pipe):
    policy = make_policy(model_dir)
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    batches = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: batches.append(len(kwargs["hidden_states"])), with_kwargs=True
    )
    v = policy.predict(x, t, cond, guidance=1.0)
    hook.remove()
    assert batches == [len(x)]  # no wasted unconditional branch
    torch.testing.assert_close(v, base_velocity(pipe, policy, x, t, cond), rtol=0, atol=1e-6)
    # A scalar time broadcasts to the batch.
    v_scalar = policy.predict(x, torch.tensor(0.3), cond, guidance=1.0)
    t_batch = torch.full((len(x),), 0.3)
    assert torch.equal(v_scalar, transformer_call(pipe, x, t_batch, cond.embeds, cond.pooled))


def test_predict_with_guidance_is_the_pipelines_cfg(model_dir, pipe):
    policy = make_policy(model_dir)
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    # The pipeline's CFG: one call on [unconditional, conditional], then the blend.
    uncond, text = transformer_call(
        pipe,
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([cond.negative_embeds, cond.embeds]),
        torch.cat([cond.negative_pooled, cond.pooled]),
    ).chunk(2)
    v = policy.predict(x, t, cond, guidance=4.5)
    assert torch.equal(v, uncond + 4.5 * (text - uncond))
    assert (v - text).abs().max() > 1e-3
    # Bfloat16-safe contract: the velocity comes back in the caller's dtype.
    assert policy.predict(x.double(), t, cond, guidance=4.5).dtype == torch.float64


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_fresh_lora_is_the_base_model(model_dir, pipe, init):
    policy = make_policy(model_dir, init=init)
    assert lora_b(policy) and all(torch.count_nonzero(b) == 0 for b in lora_b(policy))
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    v = policy.predict(x, t, cond, guidance=1.0)
    torch.testing.assert_close(v, base_velocity(pipe, policy, x, t, cond), rtol=0, atol=1e-6)


def test_lora_changes_output_and_reference_switches_it_off(model_dir, pipe):
    policy = make_policy(model_dir)
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    base = base_velocity(pipe, policy, x, t, cond)
    with torch.no_grad():
        for b in lora_b(policy):
            b.normal_(std=0.5)
    tuned = policy.predict(x, t, cond, guidance=4.5)
    assert (tuned - policy.predict(x, t, cond, 1.0)).abs().max() > 1e-3
    assert (policy.predict(x, t, cond, 1.0) - base).abs().max() > 1e-3
    with policy.reference():
        torch.testing.assert_close(policy.predict(x, t, cond, 1.0), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.predict(x, t, cond, 4.5), tuned, rtol=0, atol=0)

    other = make_policy(model_dir)
    other.load_trainable(policy.trainable_state(), version=7)
    assert other.version == 7 and policy.version == 0
    torch.testing.assert_close(other.predict(x, t, cond, 4.5), tuned, rtol=0, atol=0)


def test_lora_trains_only_the_adapter(model_dir):
    policy = make_policy(model_dir)
    named = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert named and all("lora_" in n for n in named)
    assert {id(p) for p in policy.trainable_parameters()} == {
        id(p) for p in policy.transformer.parameters() if p.requires_grad
    }
    flow_grpo = {"to_q", "to_k", "to_v", "to_out.0"} | {
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }  # Flow-GRPO's SD3 set: image-stream and text-stream (joint) attention
    assert set(JOINT_ATTENTION_LORA_TARGETS) == flow_grpo
    for target in flow_grpo:
        assert any(f".{target}.lora_A" in n for n in named), target
    assert any(".attn2." in n for n in named)  # SD3.5's dual attention too
    frozen = (policy.vae, policy.pipe.text_encoder, policy.pipe.text_encoder_3)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())

    state = policy.trainable_state()
    full = sum(v.numel() for v in policy.transformer.state_dict().values())
    assert 0 < sum(v.numel() for v in state.values()) < 0.05 * full

    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    with torch.no_grad():
        for b in lora_b(policy):
            b.normal_(std=0.1)
    policy.predict(x, t, cond, guidance=4.5).square().mean().backward()
    moved = {n for n, p in policy.transformer.named_parameters() if p.grad is not None}
    assert {n for n in moved if policy.transformer.get_parameter(n).grad.abs().sum() > 0} == {
        n for n in named if not n.startswith("transformer_blocks.1.attn.add_q_proj.")
    }  # the last block drops the text stream's output, so its text queries get no gradient


def test_full_fine_tuning(model_dir, pipe):
    policy = make_policy(model_dir, keep_reference=True, enabled=False)
    assert set(policy.trainable_state()) == set(pipe.transformer.state_dict())
    assert all(p.requires_grad for p in policy.transformer.parameters())
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    base = base_velocity(pipe, policy, x, t, cond)
    with torch.no_grad():
        policy.transformer.proj_out.weight.add_(0.1)
    tuned = policy.predict(x, t, cond, 1.0)
    assert (tuned - base).abs().max() > 1e-3
    with policy.reference():
        torch.testing.assert_close(policy.predict(x, t, cond, 1.0), base, rtol=0, atol=1e-6)

    other = make_policy(model_dir, enabled=False)
    other.load_trainable(policy.trainable_state(), version=3)
    assert other.version == 3
    torch.testing.assert_close(other.predict(x, t, cond, 1.0), tuned, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="keep_reference"), other.reference():
        pass


def test_decode_is_differentiable_and_the_pipelines(model_dir, pipe):
    policy = make_policy(model_dir)
    latents = policy.initial_noise(SEEDS).requires_grad_(True)
    images = policy.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with torch.no_grad():
        scaled = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        raw = pipe.vae.decode(scaled, return_dict=False)[0]
    expected = pipe.image_processor.postprocess(raw, output_type="pt")
    torch.testing.assert_close(images.detach(), expected, rtol=0, atol=1e-6)


def test_train_mode_and_checkpointing_touch_only_the_transformer(model_dir):
    policy = make_policy(model_dir)
    cond = policy.encode(PROMPTS)
    x, t = inputs(policy)
    with torch.no_grad():
        for b in lora_b(policy):
            b.normal_(std=0.1)
    plain = policy.predict(x, t, cond, guidance=4.5)
    policy.train()
    assert policy.transformer.training
    assert not policy.pipe.text_encoder_3.training and not policy.vae.training
    policy.set_gradient_checkpointing(True)
    assert policy.transformer.gradient_checkpointing
    v = policy.predict(x, t, cond, guidance=4.5)
    torch.testing.assert_close(v, plain, rtol=0, atol=1e-6)
    v.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    policy.set_gradient_checkpointing(False)
    policy.train(False)
    assert not policy.transformer.training and not policy.transformer.gradient_checkpointing


def test_bfloat16_dtype_plumbing(model_dir, pipe):
    cfg = ModelConfig(family="sd3", path=str(model_dir), dtype="bfloat16")
    policy = SD3Policy.from_pretrained(cfg)
    assert policy.transformer.dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    expected = pipe.prepare_latents(2, 16, 16, 16, torch.bfloat16, torch.device("cpu"), generators)
    assert torch.equal(policy.initial_noise(SEEDS), expected)
    cond = policy.encode(PROMPTS)
    assert cond.embeds.dtype == torch.bfloat16
    x, t = inputs(policy)
    assert policy.predict(x, t, cond, guidance=4.5).dtype == torch.float32


def test_flow_sigmas_are_the_pipelines(model_dir, pipe):
    policy = make_policy(model_dir)
    pipe.scheduler.set_timesteps(6)
    assert torch.equal(policy.flow_sigmas(6), pipe.scheduler.sigmas)
    assert torch.equal(
        build_sampler(SamplerConfig(num_steps=6), policy).sigmas, pipe.scheduler.sigmas
    )
    plain = build_sampler(SamplerConfig(num_steps=6, shift=3.0), policy).sigmas  # an override
    assert not torch.equal(plain, pipe.scheduler.sigmas)


def ode_images(policy: SD3Policy, steps: int, guidance: float) -> torch.Tensor:
    """Our deterministic sampler on the policy's own schedule, decoded."""
    sampler = build_sampler(SamplerConfig(kind="ode", num_steps=steps), policy)
    return sample_images(policy, sampler, PROMPTS, SEEDS, guidance)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_sampler_is_the_pipeline(model_dir, pipe, guidance):
    images = ode_images(make_policy(model_dir), 4, guidance)
    expected = pipeline_images(pipe, PROMPTS, SEEDS, 4, guidance)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert images.std() > 0.01  # not a saturated, trivially equal image


def test_exported_lora_loads_into_the_pipeline_and_changes_it_as_ours(model_dir, pipe, tmp_path):
    policy = make_policy(model_dir, rank=4, alpha=8.0)  # alpha != rank: the scale must survive
    check_lora_export(policy, pipe, tmp_path / "lora", partial(ode_images, policy), 4, 4.5)
