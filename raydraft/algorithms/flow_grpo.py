"""Flow-GRPO: online RL for flow-matching models (Liu et al. 2025, arXiv 2505.05470).

1. Rollout: the ODE sampler turned into an SDE with the same marginals
   (`sde_step_with_logprob`), G samples per prompt, per-step log-probs recorded; with
   `same_initial_noise` a group shares its starting noise (a branch point with a window).
2. Group-relative advantages: Â_i = (R_i - mean_group R) / (std + 1e-4), clipped to
   ±A_max; groups whose rewards are all equal carry no signal and are dropped.
3. Update: for each recorded SDE step t (the first `timestep_fraction` of them), the
   log-prob of the recorded move under the current weights gives ρ = exp(logp - logp_old),
   and the PPO-clip surrogate -min(ρÂ, clip(ρ, 1 ± ε)Â) plus β·KL(π_θ || π_ref) per step,
   where the KL between two Gaussian steps of equal std is ‖μ_θ - μ_ref‖² / (2σ²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydraft.algorithms.common import plan_minibatches
from raydraft.algorithms.group_relative import reference_penalty, trainable_rows
from raydraft.config import ExperimentConfig, FlowGRPOConfig, SamplerConfig
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Conditioning, Policy
from raydraft.rewards.base import Reward
from raydraft.rows import Rows
from raydraft.sampling.loop import StepNoise, denoise, predict
from raydraft.sampling.samplers import Sampler
from raydraft.sampling.trajectory import Trajectory
from raydraft.seeds import SDE_NOISE


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PPO-clip loss, ratio, clipped mask), per sample; the loss is to be minimised."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std²) || N(ref_mean, std²)) per dimension, averaged like the log-probs."""
    return ((mean - ref_mean) ** 2 / (2 * std.expand_as(mean) ** 2)).flatten(1).mean(1)


def sde_window_mask(cfg: SamplerConfig, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Which steps are stochastic: all, or a random window (Flow-GRPO-Fast)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    if cfg.sde_window_size is None:
        return mask
    lo, hi = cfg.window_starts()
    start = int(torch.randint(lo, hi, (1,), generator=generator))
    mask[:] = False
    mask[start : start + cfg.sde_window_size] = True
    return mask


@dataclass
class GRPOBatch(Rows):
    """One minibatch at one recorded step: everything the ratio and KL need."""

    shared = ("step",)

    cond: Conditioning
    x: torch.Tensor  # latents before the step
    x_next: torch.Tensor  # the recorded move
    old_log_prob: torch.Tensor  # (b,) behaviour log-prob (full precision)
    advantages: torch.Tensor  # (b,)
    step: int
    # (b,) truncated importance weights of a low-precision rollout: the full-precision
    # over the sampling copy's probability of the move; None in full precision.
    is_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.advantages)


@dataclass
class GRPORollout(Rows):
    trajectory: Trajectory
    cond: Conditioning
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.trajectory)

    @property
    def prompts(self) -> list[str]:
        return self.trajectory.prompts

    @property
    def images(self) -> torch.Tensor | None:
        return self.trajectory.images


class FlowGRPO:
    scores_rollouts = True  # black-box rewards score the rollout's images

    def __init__(
        self, cfg: FlowGRPOConfig, sampler: Sampler, sampler_cfg: SamplerConfig, guidance: float
    ) -> None:
        if not sampler.stochastic:
            raise ValueError("Flow-GRPO needs a stochastic sampler (noise_level > 0)")
        self.cfg = cfg
        self.sampler = sampler
        self.sampler_cfg = sampler_cfg
        self.guidance = guidance

    @classmethod
    def build(cls, cfg: ExperimentConfig, sampler: Sampler, reward: Reward | None) -> FlowGRPO:
        return cls(cfg.algorithm, sampler, cfg.sampler, cfg.sampler.guidance_scale)

    @torch.no_grad()
    def rollout(
        self, policy: Policy, batch: PromptBatch, generator: torch.Generator
    ) -> GRPORollout:
        sde_mask = sde_window_mask(self.sampler_cfg, self.sampler.num_steps, generator)
        cond = policy.encode(batch.prompts)
        seeds = batch.seeds.tolist()
        x = policy.initial_noise(
            batch.group_first_seeds() if self.cfg.same_initial_noise else seeds
        )
        result = denoise(
            policy, cond, x, self.sampler, range(self.sampler.num_steps), self.guidance,
            noise=StepNoise(seeds, SDE_NOISE), sde_mask=sde_mask, record=True,
        )  # fmt: skip
        trajectory = Trajectory(
            prompts=list(batch.prompts),
            prompt_ids=batch.prompt_ids,
            latents=torch.stack(result.latents, dim=1),
            log_probs=torch.stack(result.log_probs, dim=1),
            sde_mask=sde_mask,
            images=policy.decode(result.x).float(),
        )
        return GRPORollout(trajectory, cond, batch.metadata)

    def train_steps(self, sde_mask: torch.Tensor) -> list[int]:
        """The stochastic steps trained on: the first `timestep_fraction` of them, at least one."""
        steps = sde_mask.nonzero().flatten().tolist()
        return steps[: max(1, int(len(steps) * self.cfg.timestep_fraction))]

    @torch.no_grad()
    def recompute_behaviour(
        self, policy: Policy, micro_batches: list[GRPOBatch], truncation: float
    ) -> dict[str, float]:
        """Each micro-batch's old log-probs recomputed in full precision, and the
        importance weight of the full-precision over the sampling copy's probability of
        each move, truncated (TIS, per step, in the per-dimension mean convention)."""
        if not micro_batches:
            return {}
        log_ratios = []
        for micro in micro_batches:
            t = self.sampler.model_time(micro.step)
            out = predict(policy, micro.x, t, micro.cond, self.guidance, checkpoint=False)
            full = self.sampler.step(
                out, micro.x, micro.step, stochastic=True, prev_sample=micro.x_next
            ).log_prob.float()
            log_ratios.append(full - micro.old_log_prob)
            micro.is_weight = log_ratios[-1].exp().clamp(max=truncation)
            micro.old_log_prob = full
        log_ratio = torch.cat(log_ratios)
        weights = torch.cat([micro.is_weight for micro in micro_batches]).double()
        # Effective sample size over N (Kish): 1 when the weights are equal, at most 1.
        ess = min(1.0, float(weights.sum() ** 2 / (len(weights) * (weights**2).sum())))
        return {
            "mismatch_log_ratio_mean": float(log_ratio.mean()),
            "mismatch_log_ratio_std": float(log_ratio.std()) if len(log_ratio) > 1 else 0.0,
            "mismatch_log_ratio_max": float(log_ratio.abs().max()),
            "is_truncated_fraction": float((log_ratio.exp() > truncation).float().mean()),
            "is_ess": ess,
        }

    def plan_updates(
        self,
        rollout: GRPORollout,
        rewards: torch.Tensor,
        valid: torch.Tensor,
        minibatch_size: int,
        grad_accum_steps: int,
        generator: torch.Generator,
    ) -> tuple[list[list[GRPOBatch]], dict[str, float]]:
        """Optimizer steps over (shuffled minibatch × trained step) micro-batches; groups
        whose rewards all tie carry no signal and are left out."""
        traj = rollout.trajectory
        advantages, keep, stats = trainable_rows(
            rewards, traj.prompt_ids, valid, self.cfg.global_std, self.cfg.adv_clip_max,
            keep_ties=False,
        )  # fmt: skip
        steps = self.train_steps(traj.sde_mask)

        def micro_batches(index: torch.Tensor) -> list[GRPOBatch]:
            return [
                GRPOBatch(
                    cond=rollout.cond.select(index),
                    x=traj.latents[index, j],
                    x_next=traj.latents[index, j + 1],
                    old_log_prob=traj.log_probs[index, j],
                    advantages=advantages[index],
                    step=j,
                )
                for j in steps
            ]

        updates = plan_minibatches(
            keep, minibatch_size, grad_accum_steps, self.cfg.num_inner_epochs, generator,
            micro_batches,
        )  # fmt: skip
        return updates, stats

    def loss(self, policy: Policy, batch: GRPOBatch) -> tuple[torch.Tensor, dict[str, float]]:
        j, sampler = batch.step, self.sampler
        t = sampler.model_time(j)
        out = predict(policy, batch.x, t, batch.cond, self.guidance, checkpoint=False)
        step = sampler.step(out, batch.x, j, stochastic=True, prev_sample=batch.x_next)
        per_sample, ratio, clipped = clipped_surrogate(
            step.log_prob, batch.old_log_prob, batch.advantages, self.cfg.clip_range
        )
        if batch.is_weight is not None:
            per_sample = per_sample * batch.is_weight
        loss = per_sample.mean()
        log_ratio = (step.log_prob - batch.old_log_prob).detach()
        stats = {
            "policy_loss": float(loss.detach()),
            "ratio_mean": float(ratio.detach().mean()),
            "ratio_std": float(ratio.detach().std()) if ratio.numel() > 1 else 0.0,
            "clipfrac": float(clipped.float().mean()),
            "approx_kl": float(0.5 * (log_ratio**2).mean()),
        }

        def reference_step():
            out = predict(policy, batch.x, t, batch.cond, self.guidance, checkpoint=False)
            return sampler.step(out, batch.x, j, stochastic=True, prev_sample=batch.x_next)

        loss = reference_penalty(
            loss, stats, self.cfg.kl_beta, policy, reference_step,
            lambda ref: gaussian_kl(step.mean, ref.mean, step.std),
        )  # fmt: skip
        return loss, stats
