"""Config -> core objects. The single-process trainer and the Ray actors both build here."""

from __future__ import annotations

from raydraft.algorithms.draft import DRaFT
from raydraft.algorithms.flow_grpo import FlowGRPO
from raydraft.config import DraftConfig, ExperimentConfig, ModelConfig
from raydraft.models.base import Policy
from raydraft.rewards.base import Reward
from raydraft.sampling.samplers import Sampler, build_sampler


def build_policy(cfg: ModelConfig, keep_reference: bool = False) -> Policy:
    if cfg.family == "toy":
        from raydraft.models.toy import ToyPolicy

        return ToyPolicy.from_pretrained(cfg, keep_reference)
    if cfg.family == "sd":
        from raydraft.models.sd import SDPolicy

        return SDPolicy.from_pretrained(cfg, keep_reference)
    if cfg.family == "sdxl":
        from raydraft.models.sdxl import SDXLPolicy

        return SDXLPolicy.from_pretrained(cfg, keep_reference)
    if cfg.family == "sd3":
        from raydraft.models.sd3 import SD3Policy

        return SD3Policy.from_pretrained(cfg, keep_reference)
    raise ValueError(f"model.family {cfg.family!r} has no adapter")


def needs_reference(cfg: ExperimentConfig) -> bool:
    """Whether the algorithm evaluates the frozen base model (Flow-GRPO's KL term)."""
    return not isinstance(cfg.algorithm, DraftConfig) and cfg.algorithm.kl_beta > 0


def build_algorithm(
    cfg: ExperimentConfig,
    policy: Policy,
    reward: Reward | None,
    sampler: Sampler | None = None,
) -> DRaFT | FlowGRPO:
    sampler = sampler or build_sampler(
        cfg.sampler, policy.prediction_type, ddim_scheduler=getattr(policy, "scheduler", None)
    )
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
    return FlowGRPO(cfg.algorithm, sampler, cfg.sampler, guidance)
