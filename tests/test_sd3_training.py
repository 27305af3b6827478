"""One end-to-end step of each algorithm on a tiny SD3 pipeline, through the real loader."""

import pytest
import torch
from tiny_models import save_tiny_sd3

from raydraft.config import load_config
from raydraft.trainer import Trainer

STEPS = [
    "sampler.num_steps=3",
    "sampler.eval_num_steps=3",
    "sampler.shift=3.0",
    "data.prompts_per_step=2",
    "learner.minibatch_size=4",
    "logging.progress_bar=false",
    "logging.sample_every=0",
    "checkpoint.every=0",
    "model.lora.enabled=true",
    "model.lora.rank=4",
    "data.prompts=toy-colors",
    "rewards.components=[{name: toy-color}]",
    "logging.eval_per_category=0",
]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3"))


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
def test_one_step_trains_only_the_lora_weights(tmp_path, sd3_dir, config, extra):
    model = ["model.family=sd3", f"model.path={sd3_dir}"]
    cfg = load_config(config, [*STEPS, *model, *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    pipe = trainer.policy.pipe
    frozen = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in [
            ("vae", pipe.vae),
            ("text_encoder", pipe.text_encoder),
            ("text_encoder_3", pipe.text_encoder_3),
        ]
    }
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "lora" not in k}
    lora_before = trainer.policy.trainable_state()

    metrics = trainer.train_step()

    assert metrics["optimizer_steps"] >= 1 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    lora_after = trainer.policy.trainable_state()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for k, v in pipe.transformer.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    for name, module in [
        ("vae", pipe.vae),
        ("text_encoder", pipe.text_encoder),
        ("text_encoder_3", pipe.text_encoder_3),
    ]:
        for k, v in module.state_dict().items():
            assert torch.equal(v, frozen[name][k]), f"{name}.{k}"
