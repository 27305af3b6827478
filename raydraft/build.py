"""Config -> core objects. The single-process trainer and the Ray actors both build here."""

from __future__ import annotations

import importlib

from raydraft.algorithms.base import Algorithm
from raydraft.config import ALGORITHMS, ExperimentConfig, ModelConfig
from raydraft.data.prompts import PromptStream, load_prompts_with_metadata, repeat_categories
from raydraft.explore import Explorer
from raydraft.models.base import Policy
from raydraft.precision.rollout_copy import RolloutCopy
from raydraft.rewards.base import Reward
from raydraft.sampling.samplers import Sampler, build_sampler

# model.family → the adapter class, imported on use (diffusers is slow to import).
ADAPTERS = {
    "toy": ("raydraft.models.toy", "ToyPolicy"),
    "sd": ("raydraft.models.sd", "SDPolicy"),
    "sdxl": ("raydraft.models.sdxl", "SDXLPolicy"),
    "sd3": ("raydraft.models.sd3", "SD3Policy"),
    "flux": ("raydraft.models.flux", "FluxPolicy"),
}


def build_policy(cfg: ModelConfig, keep_reference: bool = False) -> Policy:
    if cfg.family not in ADAPTERS:
        raise ValueError(f"model.family {cfg.family!r} has no adapter")
    module, name = ADAPTERS[cfg.family]
    return getattr(importlib.import_module(module), name).from_pretrained(cfg, keep_reference)


def algorithm_class(cfg: ExperimentConfig) -> type[Algorithm]:
    """The class `config.ALGORITHMS` names for `algorithm.name`."""
    module, _, name = ALGORITHMS[cfg.algorithm.name][1].partition(":")
    return getattr(importlib.import_module(module), name)


def build_algorithm(
    cfg: ExperimentConfig,
    policy: Policy,
    reward: Reward | None,
    sampler: Sampler | None = None,
) -> Algorithm:
    """`reward`: the differentiable reward of an algorithm that does not score its rollouts
    (None where only `rollout` runs)."""
    sampler = sampler or build_sampler(cfg.sampler, policy)
    return algorithm_class(cfg).build(cfg, sampler, reward)


def prompt_stream(cfg: ExperimentConfig) -> PromptStream:
    """The run's prompt batches: `data.prompts_per_step` prompts, each repeated for the
    algorithm's group."""
    prompts, metadata = load_prompts_with_metadata(cfg.data.prompts)
    if cfg.data.category_repeats:
        prompts, metadata = repeat_categories(prompts, metadata, cfg.data.category_repeats)
    return PromptStream(
        prompts, cfg.data.prompts_per_step, cfg.algorithm.group_size, cfg.seed,
        cfg.data.shuffle, metadata,
    )  # fmt: skip


def eval_sampler(cfg: ExperimentConfig, policy: Policy) -> Sampler:
    """The deterministic sampler (ODE / DDIM eta 0) at the evaluation step count."""
    kind = {"kind": "ode"} if policy.prediction_type == "flow" else {"noise_level": 0.0}
    sampler_cfg = cfg.sampler.model_copy(update=kind)
    return build_sampler(sampler_cfg, policy, cfg.sampler.eval_num_steps)


def rollout_copy(cfg: ExperimentConfig) -> RolloutCopy | None:
    """The rollouts' low-precision copy of the denoiser; None in full precision."""
    return None if cfg.rollout.precision == "full" else RolloutCopy(cfg.rollout, cfg.model.family)


def explorer(cfg: ExperimentConfig) -> Explorer | None:
    """Explore-select-regenerate for the rollouts (`rollout.explore`); None without it."""
    explore = cfg.rollout.explore
    return None if explore is None else Explorer(explore, cfg.sampler, cfg.rollout.fidelity_k)
