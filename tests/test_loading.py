"""Where model weights come from: a hub id resolved from the local cache (offline), a
single-file denoiser beside its pipeline, and the errors a missing id, directory or file
or a wrong dtype name give."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from ldm_layout import sd_single_file
from PIL import Image
from safetensors.torch import save_file
from tiny_models import (
    PROMPTS,
    build_tiny_sd_pipeline,
    pipeline_images,
    save_tiny_flux,
    save_tiny_sd,
)

from raydraft.build import build_policy
from raydraft.config import ConfigError, LoraConfig, ModelConfig, SamplerConfig, load_config
from raydraft.sample_grids import image_grid
from raydraft.sampling.loop import sample_images
from raydraft.sampling.samplers import build_sampler


def put_in_hub_cache(model_dir, cache, repo_id: str) -> None:
    """The layout `hf download` leaves: a snapshot per commit and refs/main naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_a_hub_id_in_the_local_cache_samples_offline(tmp_path):
    """`raydraft sample` in a fresh process that sees only the cache (HF_HUB_OFFLINE), on
    FLUX.1-dev: the images are the pipeline's."""
    model_dir = save_tiny_flux(tmp_path / "flux")
    put_in_hub_cache(model_dir, tmp_path / "cache", "tiny-org/flux-dev")
    out = tmp_path / "grid.png"
    overrides = [
        "model.family=flux", "model.path=tiny-org/flux-dev", "model.resolution=16",
        "model.lora.enabled=false", "sampler.eval_num_steps=3",
        "sampler.guidance_scale=3.5",
    ]  # fmt: skip
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "raydraft", "sample", "--config", "toy-flowgrpo"]
    command += ["--seed", "3", "--out", str(out), *prompts, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    torch.set_num_threads(1)
    pipe = FluxPipeline.from_pretrained(model_dir, local_files_only=True)
    expected = image_grid(pipeline_images(pipe, PROMPTS, [3, 4], 3, 3.5), 2)
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_missing_hub_id_and_directory_say_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached'.*hf download someone/not"):
        build_policy(ModelConfig(family="flux", path="someone/not-cached"))
    missing = tmp_path / "models" / "flux-dev"
    with pytest.raises(FileNotFoundError, match=rf"never downloads.*--local-dir {missing}"):
        build_policy(ModelConfig(family="flux", path=str(missing)))


def test_dtype_names():
    assert load_config("toy-flowgrpo", ["model.dtype=bf16"]).model.dtype == "bfloat16"
    assert ModelConfig(dtype="fp16").dtype == "float16"
    with pytest.raises(ConfigError, match=r"model.dtype: Input should be 'float32', 'bfloat16'"):
        load_config("toy-flowgrpo", ["model.dtype=fp64"])


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_a_single_file_denoiser_loads_with_the_rest_of_its_pipeline(family, tmp_path):
    """A fine-tuned denoiser shipped as one .safetensors file (diffusers layout here: the
    original layouts are diffusers' conversion) beside the base model's directory."""
    save, denoiser = {"flux": (save_tiny_flux, "transformer"), "sd": (save_tiny_sd, "unet")}[family]
    base_dir = save(tmp_path / "base")
    tuned = getattr(DiffusionPipeline.from_pretrained(base_dir, local_files_only=True), denoiser)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    file = tmp_path / f"{family}-tuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, file)

    cfg = ModelConfig(family=family, path=str(file), pipeline_path=str(base_dir))
    loaded = build_policy(cfg)
    # The LoRA wraps the file's weights: without the adapters' own tensors they are the file.
    merged = {
        k.replace(".base_layer", ""): v
        for k, v in getattr(loaded.pipe, denoiser).state_dict().items()
        if "lora_" not in k
    }
    assert merged.keys() == tuned.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in tuned.state_dict().items())

    with pytest.raises(ValueError, match=r"set model\.pipeline_path"):
        ModelConfig(family=family, path=str(file))
    with pytest.raises(ValueError, match=r"completes a single-file model\.path"):
        ModelConfig(family=family, path=str(base_dir), pipeline_path=str(base_dir))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        build_policy(cfg.model_copy(update={"path": str(tmp_path / "gone.safetensors")}))


def test_a_whole_pipeline_single_file_loads_in_the_original_layout(tmp_path):
    """An SD 1.x checkpoint as one file in the original (LDM) layout, UNet + VAE + text
    encoder, e.g. a community fine-tune: every component comes from the file (here other
    weights than the base directory's), the configs and tokenizer from model.pipeline_path."""
    base_dir = save_tiny_sd(tmp_path / "base")
    tuned = build_tiny_sd_pipeline(seed=1)
    save_file(sd_single_file(tuned), tmp_path / "tuned.safetensors")
    cfg = ModelConfig(
        family="sd", path=str(tmp_path / "tuned.safetensors"), pipeline_path=str(base_dir)
    )
    policy = build_policy(cfg.model_copy(update={"lora": LoraConfig(enabled=False)}))
    for name in ("unet", "vae", "text_encoder"):
        loaded, expected = (
            getattr(policy.pipe, name).state_dict(),
            getattr(tuned, name).state_dict(),
        )
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k].reshape(v.shape), v) for k, v in expected.items()), name

    sampler = build_sampler(SamplerConfig(kind="ddim", noise_level=0.0, num_steps=3), policy)
    images = sample_images(policy, sampler, PROMPTS, [3, 4], 7.5)
    torch.testing.assert_close(
        images, pipeline_images(tuned, PROMPTS, [3, 4], 3, 7.5), rtol=0, atol=1e-5
    )
