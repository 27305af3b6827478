"""`raydraft export`: a run's weights in the form its model's own tools load, checked
against what `raydraft sample --run-dir` draws from the same run.

Both commands write through `load_for_inference` (EMA weights where kept; the runs here keep
them, so the live weights would draw other images). The sample command's images equal the
diffusers pipeline's within 1e-5 (tests/test_sd_policy.py), so after the PNG's rounding to
8 bits they differ by at most one level where a value sits on a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from overrides import SMALL
from PIL import Image
from tiny_models import PROMPTS, pipeline_images, save_tiny_sd

from raydraft.cli import main
from raydraft.sample_grids import image_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One DRaFT step on the color reward, with a learning rate that moves a fresh LoRA far
# enough to change 8-bit images, and an EMA that differs from the live weights.
ONE_STEP = [
    *SMALL,
    "data.prompts=toy-colors",
    "rewards.components=[{name: toy-color}]",
    "model.lora.rank=4",
    "learner.lr=0.02",
    "learner.ema_decay=0.5",
]
SEED = 3
PROMPT_ARGS = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]


def train_one_step(run_dir, *overrides: str) -> None:
    argv = ["train", "--local", "--max-steps", "1", "--run-dir", str(run_dir)]
    assert main([*argv, "--config", "toy-draft-lv", *ONE_STEP, *overrides]) == 0


def sample_png(out, *args: str) -> np.ndarray:
    """`raydraft sample` of the two test prompts from seed SEED, as int16 pixels."""
    assert main(["sample", "--seed", str(SEED), "--out", str(out), *PROMPT_ARGS, *args]) == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def grid(images: torch.Tensor) -> np.ndarray:
    return np.asarray(image_grid(images, columns=len(images)), dtype=np.int16)


def test_an_exported_lora_draws_in_diffusers_what_sample_draws(tmp_path):
    model_dir = save_tiny_sd(tmp_path / "tiny-sd")
    run = tmp_path / "run"
    sd = ["model.family=sd", f"model.path={model_dir}", "sampler.kind=ddim"]
    train_one_step(run, *sd, "sampler.noise_level=0.0")
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "lora")]) == 0

    eval_steps, guidance = 4, 7.5
    ours = sample_png(
        tmp_path / "ours.png", "--run-dir", str(run),
        f"sampler.eval_num_steps={eval_steps}", f"sampler.guidance_scale={guidance}",
    )  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    seeds = [SEED, SEED + 1]
    base = grid(pipeline_images(pipe, PROMPTS, seeds, eval_steps, guidance))
    pipe.load_lora_weights(tmp_path / "lora")
    tuned = grid(pipeline_images(pipe, PROMPTS, seeds, eval_steps, guidance))
    assert np.abs(ours - tuned).max() <= 1
    assert np.abs(ours - base).max() > 8  # the one step shows: a missing LoRA would fail


def test_an_exported_toy_model_is_a_model_path_that_draws_what_sample_draws(tmp_path, capsys):
    run = tmp_path / "run"
    train_one_step(run)
    out = tmp_path / "toy"
    assert main(["export", "--run-dir", str(run), "--step", "1", "--out", str(out)]) == 0
    assert f"{run} step 1 -> {out}" in capsys.readouterr().out

    ours = sample_png(tmp_path / "ours.png", "--run-dir", str(run))
    plain = ["--config", str(run / "config.yaml"), "model.lora.enabled=false"]  # same sampler
    exported = sample_png(tmp_path / "exported.png", *plain, f"model.path={out}")
    base = sample_png(tmp_path / "base.png", *plain)
    assert np.abs(ours - exported).max() <= 1  # the LoRA merged into the weights: rounding
    assert np.abs(ours - base).max() > 8


def test_a_step_without_a_checkpoint_names_the_steps_there_are(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("extends: toy-draft-lv\n")
    argv = ["export", "--run-dir", str(tmp_path / "run"), "--step", "7", "--out", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err  # after transformers' progress bar of the model loading
    assert err.splitlines()[-1].endswith("no checkpoint of step 7 (there are steps [4])")
    assert "Traceback" not in err
