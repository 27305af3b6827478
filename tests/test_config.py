"""Config errors name their key; extends and overrides compose."""

import pytest

from raydraft.config import PACKAGE_CONFIGS, ConfigError, load_config, reward_serving_for
from raydraft.rewards.registry import reward_names


def error_of(overrides, config="toy-flowgrpo") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("learner.lrr=1e-4", "learner.lrr"),
        ("learner.lr=-1", "learner.lr"),
        ("learner.lr=fast", "learner.lr"),
        ("algorithm.clip_range=0", "algorithm.clip_range"),
        ("algorithm.group_size=1", "algorithm.group_size"),
        ("model.lora.rank=0", "model.lora.rank"),
        ("sampler.kind=euler", "sampler.kind"),
        ("algorithm.name=ppo", "algorithm"),
        ("learner.old_policy_decay_max=1", "learner.old_policy_decay_max"),
    ],
)
def test_bad_values_fail_with_their_key_path(override, path):
    assert f"\n  {path}" in error_of([override])


def test_truncation_beyond_the_sampler_steps_is_rejected():
    message = error_of(["algorithm.truncation_steps=9", "sampler.num_steps=8"], "toy-draft-k")
    assert "truncation_steps=9" in message and "num_steps=8" in message


def test_draft_lv_needs_k_equal_one():
    assert "truncation_steps: 1" in error_of(["algorithm.truncation_steps=2"], "toy-draft-lv")


def test_flow_grpo_needs_a_stochastic_sampler():
    assert "stochastic sampler" in error_of(["sampler.kind=ode"])
    assert "stochastic sampler" in error_of(["sampler.noise_level=0"])


def test_diffusion_nft_takes_the_ode_sampler_and_names_its_keys():
    assert load_config("toy-nft").sampler.kind == "ode"
    assert "\n  algorithm.beta" in error_of(["algorithm.beta=0"], "toy-nft")
    assert "\n  algorithm.clip_range" in error_of(["algorithm.clip_range=0.1"], "toy-nft")


def test_a_trailing_old_policy_needs_its_rate_and_its_ceiling():
    for overrides, config in [
        (["learner.old_policy_decay_rate=0.001"], "toy-flowgrpo"),
        (["learner.old_policy_decay_rate=0"], "toy-nft"),
    ]:
        message = error_of(overrides, config)
        assert "learner.old_policy_decay_rate" in message and "old_policy_decay_max" in message


def test_ray_roles_that_cannot_work_together_are_rejected():
    colocated = "ray.placement=colocated"
    assert "must equal ray.learners=1" in error_of([colocated, "ray.rollout_workers=2"])
    assert "use ray.mode=sync" in error_of([colocated, "ray.mode=async"])
    gpus = ["ray.worker_gpus=0.5", "ray.learner_gpus=0.5"]
    assert "one rank per GPU" in error_of([colocated, "ray.weight_sync=collective", *gpus])
    assert "model.lora.enabled=false" in error_of(["learner.fsdp=true"])


def test_a_reward_components_serving_keys_are_checked_over_the_shared_section():
    def component(serving: str) -> str:
        return f"rewards.components=[{{name: toy-geneval, serving: {serving}}}]"

    assert "rewards.components[0].serving.num_gpu:" in error_of([component("{num_gpu: 1}")])
    shared = "ray.reward_serving.max_replicas=4"
    message = error_of([shared, component("{min_replicas: 5}")])
    assert (
        "rewards.components[0].serving:" in message and "min_replicas=5 > max_replicas=4" in message
    )
    cfg = load_config(
        "toy-flowgrpo",
        [
            shared,
            "rewards.components=[{name: toy-geneval, serving: {num_gpus: 0.25, "
            "max_batch_size: 4}, runtime_env: {pip: [rapidocr-onnxruntime==1.4.4]}}]",
        ],
    )
    spec = cfg.rewards.components[0]
    settings = reward_serving_for(cfg.ray.reward_serving, spec)
    assert (settings.num_gpus, settings.max_batch_size, settings.max_replicas) == (0.25, 4, 4)
    assert spec.runtime_env == {"pip": ["rapidocr-onnxruntime==1.4.4"]}


def test_extends_merges_and_a_new_algorithm_replaces_its_section():
    cfg = load_config("toy-draft-lv")
    assert cfg.name == "toy-draft-lv" and cfg.algorithm.lv_samples == 2
    assert cfg.model.family == "toy" and cfg.rewards.components[0].name == "toy-clipscore"
    assert cfg.sampler.kind == "ode"  # from toy-draft-k, which extends toy-flowgrpo


def test_overrides_parse_yaml_values(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: toy-flowgrpo\nname: child\nlearner: {lr: 1.0e-5}\n")
    cfg = load_config(child, ["learner.betas=[0.8, 0.9]", "learner.max_grad_norm=null"])
    assert cfg.name == "child" and cfg.learner.lr == 1e-5
    assert cfg.learner.betas == (0.8, 0.9) and cfg.learner.max_grad_norm is None
    assert cfg.algorithm.group_size == load_config("toy-flowgrpo").algorithm.group_size  # inherited


def test_extends_cycle_and_missing_file_are_clear(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    with pytest.raises(ConfigError, match="no-such"):
        load_config(tmp_path / "no-such.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("toy-draft-k", ["learner.lr=2e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted(PACKAGE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).name == path.stem


RECIPES = sorted(p for p in PACKAGE_CONFIGS.glob("*.yaml") if not p.stem.startswith("toy-"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_ask_for_the_gpus_their_models_run_on_and_name_their_weights(path):
    cfg = load_config(path)
    assert cfg.model.device == "cuda" and cfg.model.path
    assert cfg.ray.worker_gpus > 0 and cfg.ray.learner_gpus > 0
    for component in cfg.rewards.components:
        assert component.name in reward_names()
        if component.name != "ocr":  # the OCR engine's weights ship in its wheel
            assert component.options.get("path"), component.name


def test_the_recipes_cover_the_rewards_and_model_families_the_field_trains_on():
    configs = [load_config(p) for p in RECIPES]
    rewards = {c.name for cfg in configs for c in cfg.rewards.components}
    assert {"pickscore", "ocr", "geneval", "aesthetic", "hpsv2", "clipscore"} <= rewards
    assert {"sd", "sd3", "flux"} <= {cfg.model.family for cfg in configs}
    assert {"draft", "flow_grpo", "diffusion_nft"} <= {cfg.algorithm.name for cfg in configs}
