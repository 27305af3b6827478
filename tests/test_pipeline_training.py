"""One end-to-end step of each algorithm on tiny pipelines of every diffusers family,
through the real loaders: only the LoRA weights change."""

import pytest
import torch
from overrides import SMALL
from tiny_models import save_tiny_flux, save_tiny_sd, save_tiny_sd3, save_tiny_sdxl

from raydraft.config import load_config
from raydraft.trainer import Trainer

STEPS = [
    *SMALL,
    "model.lora.enabled=true",
    "model.lora.rank=4",
    "data.prompts=toy-colors",
    "rewards.components=[{name: toy-color}]",
]
# family: (tiny model writer, sampler for Flow-GRPO, sampler for DRaFT, denoiser, frozen parts)
FAMILIES = {
    "sd3": (  # on the model's own schedule (its scheduler's shift 3)
        save_tiny_sd3,
        [],
        [],
        "transformer",
        ["vae", "text_encoder", "text_encoder_3"],
    ),
    "flux": (  # FLUX.1-dev: the guidance scale is the transformer's guidance embedding
        save_tiny_flux,
        ["model.resolution=16"],
        ["model.resolution=16"],
        "transformer",
        ["vae", "text_encoder", "text_encoder_2"],
    ),
    "sd": (
        save_tiny_sd,
        ["sampler.kind=ddim", "sampler.noise_level=1.0"],  # DDPO's eta 1
        ["sampler.kind=ddim", "sampler.noise_level=0.0"],
        "unet",
        ["vae", "text_encoder"],
    ),
    "sdxl": (
        save_tiny_sdxl,
        ["sampler.kind=ddim", "sampler.noise_level=1.0"],
        ["sampler.kind=ddim", "sampler.noise_level=0.0"],
        "unet",
        ["vae", "text_encoder", "text_encoder_2"],
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    torch.set_num_threads(1)
    save, *rest = FAMILIES[request.param]
    return request.param, save(tmp_path_factory.mktemp(request.param)), *rest


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        (
            "toy-flowgrpo",
            ["algorithm.group_size=4", "algorithm.kl_beta=0.04", "sampler.guidance_scale=4.5"],
        ),
        ("toy-draft-k", ["algorithm.truncation_steps=2", "algorithm.checkpoint_each_step=true"]),
        ("toy-draft-lv", []),
    ],
)
def test_one_step_trains_only_the_lora_weights(tmp_path, family, config, extra):
    name, model_dir, grpo_sampler, draft_sampler, denoiser_name, frozen_names = family
    sampler = grpo_sampler if config == "toy-flowgrpo" else draft_sampler
    model = [f"model.family={name}", f"model.path={model_dir}"]
    cfg = load_config(config, [*STEPS, *model, *sampler, *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    pipe = trainer.policy.pipe
    denoiser = getattr(pipe, denoiser_name)
    frozen = {
        part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
        for part in frozen_names
    }
    base = {k: v.clone() for k, v in denoiser.state_dict().items() if "lora" not in k}
    lora_before = trainer.policy.trainable_state()

    metrics = trainer.train_step()

    assert metrics["optimizer_steps"] >= 1 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    lora_after = trainer.policy.trainable_state()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for k, v in denoiser.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    for part in frozen_names:
        for k, v in getattr(pipe, part).state_dict().items():
            assert torch.equal(v, frozen[part][k]), f"{part}.{k}"
