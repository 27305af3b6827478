"""FluxPolicy against the real FluxPipeline code paths, on tiny random FLUX.1-dev and
-schnell models saved and loaded back.

The reference is diffusers itself (a second pipeline loaded from the same directory): a
wrong packing, position id, guidance embedding, timestep scale or shifted schedule fails
the image parity below.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import FluxPipeline
from tiny_models import PROMPTS, SEEDS, check_lora_export, pipeline_images, save_tiny_flux

from raydraft.build import build_policy
from raydraft.config import LoraConfig, ModelConfig, SamplerConfig
from raydraft.models.base import Policy
from raydraft.models.flux import FluxPolicy
from raydraft.sampling.loop import sample_images
from raydraft.sampling.samplers import build_sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"), "dev")


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), "schnell")


def load_pipe(model_dir) -> FluxPipeline:
    """The untouched reference pipeline (the policy's own transformer gets LoRA layers)."""
    return FluxPipeline.from_pretrained(model_dir, local_files_only=True)


def make_policy(model_dir, **model) -> FluxPolicy:
    lora = {"rank": 2, "alpha": 2.0, **model.pop("lora", {})}
    model = {"resolution": 16, **model}
    cfg = ModelConfig(family="flux", path=str(model_dir), lora=LoraConfig(**lora), **model)
    policy = build_policy(cfg)
    assert isinstance(policy, FluxPolicy)
    return policy


def ode_images(policy: FluxPolicy, steps: int, guidance: float) -> torch.Tensor:
    sampler = build_sampler(SamplerConfig(kind="ode", num_steps=steps), policy)
    return sample_images(policy, sampler, PROMPTS, SEEDS, guidance)


def test_loads_as_a_flow_policy(dev_dir):
    policy = make_policy(dev_dir)
    assert isinstance(policy, Policy)
    assert policy.prediction_type == "flow"
    assert policy.latent_shape == (16, 8, 8)  # 16×16 pixels, VAE scale 2, unpacked
    assert policy.guidance_embeds
    for frozen in (policy.vae, *policy.text_encoders()):
        assert not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
    assert len(policy.text_encoders()) == 2
    with pytest.raises(ValueError, match="divisible by 4"):
        make_policy(dev_dir, resolution=18)


def test_initial_noise_is_the_pipelines_unpacked(dev_dir):
    pipe, policy = load_pipe(dev_dir), make_policy(dev_dir)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    packed, _ = pipe.prepare_latents(2, 16, 16, 16, torch.float32, torch.device("cpu"), generators)
    noise = policy.initial_noise(SEEDS)
    assert torch.equal(pipe._pack_latents(noise, 2, 16, 8, 8), packed)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flow_sigmas_are_the_pipelines(variant, dev_dir, schnell_dir):
    model_dir = {"dev": dev_dir, "schnell": schnell_dir}[variant]
    pipe, policy = load_pipe(model_dir), make_policy(model_dir)
    seen = []
    pipe(
        PROMPTS[:1],
        num_inference_steps=5,
        height=16,
        width=16,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kwargs: seen.append(p.scheduler.sigmas) or {},
    )
    expected = seen[-1]
    assert torch.equal(policy.flow_sigmas(5), expected)
    uniform = torch.linspace(1, 0, 6)
    assert torch.equal(expected, uniform) == (variant == "schnell")  # dev's shift is dynamic


@pytest.mark.parametrize(("variant", "guidance"), [("dev", 1.0), ("dev", 3.5), ("schnell", 1.0)])
def test_ode_sampler_is_the_pipeline(variant, guidance, dev_dir, schnell_dir):
    model_dir = {"dev": dev_dir, "schnell": schnell_dir}[variant]
    images = ode_images(make_policy(model_dir), 4, guidance)
    expected = pipeline_images(load_pipe(model_dir), PROMPTS, SEEDS, 4, guidance)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert images.std() > 0.01  # not a saturated, trivially equal image


def test_guidance_embedding_changes_the_images(dev_dir):
    policy = make_policy(dev_dir)
    assert (ode_images(policy, 3, 1.0) - ode_images(policy, 3, 5.0)).abs().max() > 1e-4


def test_true_cfg_with_a_negative_prompt_is_the_pipelines(dev_dir):
    policy = make_policy(dev_dir, true_cfg_scale=3.0, negative_prompt="blurry")
    images = ode_images(policy, 3, 3.5)
    expected = load_pipe(dev_dir)(
        PROMPTS,
        negative_prompt=["blurry"] * 2,
        true_cfg_scale=3.0,
        guidance_scale=3.5,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="pt",
        height=16,
        width=16,
    ).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    plain = ode_images(make_policy(dev_dir), 3, 3.5)
    assert (plain - images).abs().max() > 1e-3


def test_schnell_refuses_a_guidance_scale(schnell_dir):
    policy = make_policy(schnell_dir)
    with pytest.raises(ValueError, match="no guidance embedding"):
        ode_images(policy, 2, 3.5)


def test_true_cfg_is_a_flux_option():
    with pytest.raises(ValueError, match="true_cfg_scale"):
        ModelConfig(family="sd3", true_cfg_scale=2.0)


def test_fresh_lora_is_the_base_and_reference_switches_a_trained_one_off(dev_dir):
    pipe, policy = load_pipe(dev_dir), make_policy(dev_dir, lora={"init": "gaussian"})
    base = pipeline_images(pipe, PROMPTS, SEEDS, 3, 3.5)
    torch.testing.assert_close(ode_images(policy, 3, 3.5), base, rtol=0, atol=1e-5)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (ode_images(policy, 3, 3.5) - base).abs().max() > 1e-3
    with policy.reference():
        torch.testing.assert_close(ode_images(policy, 3, 3.5), base, rtol=0, atol=1e-5)
    state = policy.trainable_state()
    fresh = make_policy(dev_dir)
    fresh.load_trainable(state, version=3)
    assert fresh.version == 3
    for key, value in fresh.trainable_state().items():
        assert torch.equal(value, state[key])


def test_exported_lora_loads_into_the_pipeline_and_changes_it_as_ours(dev_dir, tmp_path):
    policy = make_policy(dev_dir, lora={"rank": 4, "alpha": 8.0})  # the scale must survive
    ours = partial(ode_images, policy)
    check_lora_export(policy, load_pipe(dev_dir), tmp_path / "lora", ours, 3, 3.5)


def test_a_full_fine_tune_exports_a_diffusers_directory(dev_dir, tmp_path):
    policy = make_policy(dev_dir, lora={"enabled": False})
    with torch.no_grad():
        for p in policy.trainable_parameters()[:4]:
            p.add_(0.05)
    policy.export(tmp_path / "full")
    images = pipeline_images(load_pipe(tmp_path / "full"), PROMPTS, SEEDS, 3, 3.5)
    torch.testing.assert_close(ode_images(policy, 3, 3.5), images, rtol=0, atol=1e-5)


def test_decode_is_differentiable_and_the_pipelines(dev_dir):
    pipe, policy = load_pipe(dev_dir), make_policy(dev_dir)
    latents = torch.randn(2, *policy.latent_shape, requires_grad=True)
    images = policy.decode(latents)
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with torch.no_grad():
        config = pipe.vae.config
        raw = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        expected = pipe.image_processor.postprocess(raw, output_type="pt")
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_bfloat16_runs_with_float32_samplers(dev_dir):
    """bf16 weights and embeddings; the sampler's latents and log-probs stay float32."""
    policy = make_policy(dev_dir, dtype="bf16")
    assert policy.transformer.dtype == torch.bfloat16
    cond = policy.encode(PROMPTS)
    assert cond.embeds.dtype == cond.pooled.dtype == torch.bfloat16
    x = torch.randn(2, *policy.latent_shape)
    velocity = policy.predict(x, torch.tensor([0.9, 0.4]), cond, guidance=3.5)
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    sampler = build_sampler(SamplerConfig(kind="sde", noise_level=0.7, num_steps=3), policy)
    step = sampler.step(velocity, x, 0, stochastic=True)
    assert step.log_prob.dtype == torch.float32 and torch.isfinite(step.log_prob).all()
