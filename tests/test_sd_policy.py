"""SDPolicy (SD 1.x / 2.x) and SDXLPolicy against the real StableDiffusionPipeline and
StableDiffusionXLPipeline on tiny random models.

The reference is diffusers itself: a second pipeline loaded from the same directory with
its DDIMScheduler, so a wrong timestep, CFG order, latent scaling, added conditioning or
seed convention fails.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tiny_models import (
    PROMPTS,
    SEEDS,
    check_lora_export,
    pipeline_images,
    save_tiny_sd,
    save_tiny_sd3,
    save_tiny_sdxl,
)

from raydraft.build import build_policy
from raydraft.cli import main
from raydraft.config import LoraConfig, ModelConfig
from raydraft.models.base import Policy
from raydraft.models.sd import SDPolicy
from raydraft.models.sd3 import SD3Policy
from raydraft.sample_grids import image_grid
from raydraft.sampling.samplers import DDIMSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


WRITERS = {"sd": save_tiny_sd, "sdxl": save_tiny_sdxl}
PIPELINES = {
    "sd": lambda path: StableDiffusionPipeline.from_pretrained(path),
    "sdxl": lambda path: StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False),
}


@pytest.fixture(
    scope="module",
    params=[("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon")],
    ids=["sd-epsilon", "sd-v", "sdxl"],
)
def model_dir(request, tmp_path_factory):
    family, prediction_type = request.param
    path = WRITERS[family](tmp_path_factory.mktemp(f"tiny-{family}"), prediction_type)
    return family, path


def make_policy(model_dir, **lora) -> SDPolicy:
    family, path = model_dir
    return build_policy(ModelConfig(family=family, path=str(path), lora=LoraConfig(**lora)))


def test_loads_as_a_policy_with_its_prediction_type(model_dir):
    family, path = model_dir
    policy = make_policy(model_dir)
    assert isinstance(policy, Policy)
    pipe = PIPELINES[family](path)
    assert policy.prediction_type == pipe.scheduler.config.prediction_type
    assert policy.latent_shape == (4, 8, 8)


def ddim_images(policy: SDPolicy, steps: int, guidance: float) -> torch.Tensor:
    """Our sampler's deterministic DDIM loop over `policy.predict`, decoded."""
    sampler = DDIMSampler.from_scheduler(policy.scheduler, steps)
    cond = policy.encode(PROMPTS)
    x = policy.initial_noise(SEEDS)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((len(x),), sampler.model_time(i))
            x = sampler.step(policy.predict(x, t, cond, guidance), x, i, stochastic=False).x_next
        return policy.decode(x)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddim_loop_over_predict_is_the_pipeline(model_dir, guidance):
    images = ddim_images(make_policy(model_dir), 4, guidance)
    expected = pipeline_images(PIPELINES[model_dir[0]](model_dir[1]), PROMPTS, SEEDS, 4, guidance)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert images.std() > 0.01  # not a saturated, trivially equal image


def test_exported_lora_loads_into_the_pipeline_and_changes_it_as_ours(model_dir, tmp_path):
    policy = make_policy(model_dir, rank=4, alpha=8.0)  # alpha != rank: the scale must survive
    pipe = PIPELINES[model_dir[0]](model_dir[1])
    check_lora_export(policy, pipe, tmp_path / "lora", partial(ddim_images, policy), 4, 7.5)


def test_a_full_fine_tune_exports_a_diffusers_directory(model_dir, tmp_path):
    policy = make_policy(model_dir, enabled=False)
    with torch.no_grad():
        policy.unet.conv_out.bias.add_(0.1)
    policy.export(tmp_path / "full")
    pipe = PIPELINES[model_dir[0]](tmp_path / "full")
    expected = pipeline_images(pipe, PROMPTS, SEEDS, 4, 7.5)
    torch.testing.assert_close(ddim_images(policy, 4, 7.5), expected, rtol=0, atol=1e-5)


def test_fresh_lora_is_the_base_model_and_reference_switches_it_off(model_dir):
    base, lora = make_policy(model_dir), make_policy(model_dir, init="default")
    cond = base.encode(PROMPTS)
    x, t = base.initial_noise(SEEDS), torch.tensor([500, 500])
    with torch.no_grad():
        torch.testing.assert_close(lora.predict(x, t, cond, 7.5), base.predict(x, t, cond, 7.5))
        for p in lora.trainable_parameters():
            p.add_(0.05)
        changed = lora.predict(x, t, cond, 7.5)
        with lora.reference():
            reference = lora.predict(x, t, cond, 7.5)
    assert (changed - reference).abs().max() > 1e-4
    torch.testing.assert_close(reference, base.predict(x, t, cond, 7.5))


def test_missing_weights_and_another_family_give_clear_errors(tmp_path):
    cfg = ModelConfig(family="sd", path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*never downloads"):
        SDPolicy.from_pretrained(cfg)
    sd3_dir = save_tiny_sd3(tmp_path / "sd3")
    with pytest.raises(ValueError, match=r"holds a StableDiffusion3Pipeline.*model.family=sd3"):
        SDPolicy.from_pretrained(ModelConfig(family="sd", path=str(sd3_dir)))
    sd_dir = save_tiny_sd(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"holds a StableDiffusionPipeline.*model.family=sd$"):
        SD3Policy.from_pretrained(ModelConfig(family="sd3", path=str(sd_dir)))


def test_sample_command_writes_the_pipelines_images(model_dir, tmp_path):
    family, path = model_dir
    out = tmp_path / "grid.png"
    overrides = [
        f"model.family={family}", f"model.path={path}", "model.lora.enabled=false",
        "sampler.kind=ddim", "sampler.eval_num_steps=4", "sampler.guidance_scale=7.5",
    ]  # fmt: skip
    argv = ["sample", "--config", "toy-draft-lv", "--seed", "3", "--out", str(out)]
    assert main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *overrides]) == 0
    expected = pipeline_images(PIPELINES[family](path), PROMPTS, [3, 4], 4, 7.5)
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (16, 32, 3)
    assert np.abs(got - np.asarray(image_grid(expected, 2), dtype=np.int16)).max() <= 1
