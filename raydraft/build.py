"""Config -> core objects. The single-process trainer and the Ray actors both build here."""

from __future__ import annotations

import importlib

from raydraft.algorithms.diffusion_nft import DiffusionNFT
from raydraft.algorithms.draft import DRaFT
from raydraft.algorithms.flow_grpo import FlowGRPO
from raydraft.config import DiffusionNFTConfig, DraftConfig, ExperimentConfig, ModelConfig
from raydraft.models.base import Policy
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


def needs_reference(cfg: ExperimentConfig) -> bool:
    """Whether the algorithm evaluates the frozen base model (a KL term to it)."""
    return not isinstance(cfg.algorithm, DraftConfig) and cfg.algorithm.kl_beta > 0


def build_algorithm(
    cfg: ExperimentConfig,
    policy: Policy,
    reward: Reward | None,
    sampler: Sampler | None = None,
) -> DRaFT | FlowGRPO | DiffusionNFT:
    sampler = sampler or build_sampler(cfg.sampler, policy)
    guidance = cfg.sampler.guidance_scale
    if isinstance(cfg.algorithm, DraftConfig):
        return DRaFT(
            cfg.algorithm,
            sampler,
            reward,
            guidance,
            checkpoint=cfg.algorithm.checkpoint_each_step,
            drop_bad_rewards=cfg.rewards.on_bad_reward == "drop",
        )
    if isinstance(cfg.algorithm, DiffusionNFTConfig):
        return DiffusionNFT(cfg.algorithm, sampler, guidance)
    return FlowGRPO(cfg.algorithm, sampler, cfg.sampler, guidance)
