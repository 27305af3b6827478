"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117).

1. Rollout: any sampler (the deterministic ODE by default: no log-probs are needed), G
   samples per prompt; only the final latents x0 are kept. For each sample, K of the
   sampler's times are drawn (`timestep_fraction` of them) with fresh noise ε, the
   forward process gives x_t = q(x_t | x0, ε), and the sampling policy's prediction
   there, v_old, is recorded with the rollout: the weights that drew a sample are its
   "old" policy wherever the rollout ran (a worker, a stale version in async mode). When
   the learner holds those very weights at the update (sync mode, full precision) the
   rollout leaves v_old out and the learner predicts it for the rows it trains (tied groups
   skipped); when the sampling weights are the trained ones (no trailing old policy) the
   first optimizer step's own forward pass is v_old for its rows.
2. Group-relative advantages as Flow-GRPO's, clipped to ±A_max and mapped to an
   optimality probability r = A / (2 A_max) + 1/2 in [0, 1].
3. Update: the implicit positive policy v⁺ = β v_θ + (1 - β) v_old and negative policy
   v⁻ = (1 + β) v_old - β v_θ; the loss A_max / β · [r L(v⁺) + (1 - r) L(v⁻)], where L
   is the x0 error of a prediction, ‖x̂0 - x0‖² normalised by its own mean absolute error
   (the paper's adaptive weight). At v_θ = v_old the gradient is A_max (2r - 1) times the
   flow-matching gradient toward the sample: high-reward samples pull v_θ toward their
   x0, low ones push it away, a tie adds nothing; no likelihood or ratio is needed.
   Optionally kl_beta · ‖v_θ - v_ref‖² to the frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydraft.algorithms.common import plan_minibatches
from raydraft.algorithms.group_relative import reference_penalty, trainable_rows
from raydraft.config import DiffusionNFTConfig, ExperimentConfig
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Conditioning, Policy
from raydraft.rewards.base import Reward
from raydraft.rows import Rows
from raydraft.sampling.loop import StepNoise, denoise
from raydraft.sampling.samplers import Sampler
from raydraft.seeds import NFT_TRAIN_POINTS, SDE_NOISE, sample_generator


def learner_holds_sampling_weights(cfg: ExperimentConfig) -> bool:
    """Whether the learner holds, at the update, the very weights that sampled the rollout
    (the trained weights or its trailing old policy): sync iterations (or the single-process
    trainer) with full-precision rollouts."""
    sync = cfg.runtime == "local" or cfg.ray.mode == "sync"
    return sync and cfg.rollout.precision == "full"


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """r in [0, 1]: the advantage clipped to ±clip, 1/2 for the group's mean."""
    return (advantages.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def adaptive_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per sample ‖x̂0 - x0‖² / mean |x̂0 - x0| (the weight held constant): every sample
    and time contributes on one scale, whatever its noise level."""
    error = x0_pred.float() - x0.float()
    with torch.no_grad():
        weight = error.abs().flatten(1).mean(1).clamp(min=1e-5)
    return (error**2).flatten(1).mean(1) / weight


@dataclass
class NFTBatch(Rows):
    """One minibatch at one of its training points."""

    shared = ("first_step",)

    cond: Conditioning
    x0: torch.Tensor  # the sampled final latents
    x_t: torch.Tensor  # x0 noised to the point's time
    steps: torch.Tensor  # (b,) sampler step index of each row's time
    # the sampling policy's output at x_t; None: the loss's own forward pass at the sampling
    # weights (the first optimizer step of an on-policy update)
    old_prediction: torch.Tensor | None
    optimality: torch.Tensor  # (b,) r
    first_step: bool = False  # of the update: the weights are still the sampling ones

    def __len__(self) -> int:
        return len(self.optimality)


@dataclass
class NFTRollout(Rows):
    """Final samples and their training points (K per sample)."""

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B,)
    cond: Conditioning
    metadata: list[dict]
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], for the reward
    x0: torch.Tensor  # (B, *latent_shape)
    steps: torch.Tensor  # (B, K) sampler step indices
    x_t: torch.Tensor  # (B, K, *latent_shape)
    old_predictions: torch.Tensor | None  # (B, K, *latent_shape); None: the learner's

    def __len__(self) -> int:
        return len(self.prompts)


class DiffusionNFT:
    scores_rollouts = True  # black-box rewards score the rollout's images

    def __init__(
        self,
        cfg: DiffusionNFTConfig,
        sampler: Sampler,
        guidance: float,
        behaviour_in_rollout: bool = True,
    ) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.guidance = guidance
        self.behaviour_in_rollout = behaviour_in_rollout
        self.num_points = max(1, int(sampler.num_steps * cfg.timestep_fraction))
        self.model_times = torch.tensor(
            [sampler.model_time(i) for i in range(sampler.num_steps)], dtype=torch.float32
        )

    @classmethod
    def build(cls, cfg: ExperimentConfig, sampler: Sampler, reward: Reward | None) -> DiffusionNFT:
        in_rollout = not learner_holds_sampling_weights(cfg)
        return cls(cfg.algorithm, sampler, cfg.sampler.guidance_scale, in_rollout)

    @torch.no_grad()
    def rollout(self, policy: Policy, batch: PromptBatch, generator: torch.Generator) -> NFTRollout:
        cond = policy.encode(batch.prompts)
        seeds = batch.seeds.tolist()
        sampler = self.sampler
        noise = StepNoise(seeds, SDE_NOISE) if sampler.stochastic else None
        sde_mask = torch.full((sampler.num_steps,), sampler.stochastic)
        x = policy.initial_noise(seeds)
        x0 = denoise(
            policy, cond, x, sampler, range(sampler.num_steps), self.guidance,
            noise=noise, sde_mask=sde_mask,
        ).x  # fmt: skip
        steps, forward_noise = self._training_points(seeds, x0)
        x_t = torch.stack(
            [
                sampler.add_noise(x0, steps[:, k], forward_noise[:, k])
                for k in range(self.num_points)
            ],
            dim=1,
        )
        old = None
        if self.behaviour_in_rollout:
            old = torch.stack(
                [
                    policy.predict(x_t[:, k], self._times(steps[:, k], x0), cond, self.guidance)
                    for k in range(self.num_points)
                ],
                dim=1,
            )
        return NFTRollout(
            prompts=list(batch.prompts),
            prompt_ids=batch.prompt_ids,
            cond=cond,
            metadata=batch.metadata,
            images=policy.decode(x0).float(),
            x0=x0,
            steps=steps,
            x_t=x_t,
            old_predictions=old,
        )

    def _times(self, steps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The policy's time input for per-row step indices."""
        return self.model_times[steps.cpu()].to(like.device)

    def _training_points(
        self, seeds: list[int], like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) distinct step indices and (B, K, ...) forward noise, each row from its own
        seed: the same wherever and with whatever else the sample is drawn."""
        steps, noise = [], []
        for seed in seeds:
            g = sample_generator(seed, NFT_TRAIN_POINTS)
            steps.append(torch.randperm(self.sampler.num_steps, generator=g)[: self.num_points])
            noise.append(torch.randn((self.num_points, *like.shape[1:]), generator=g))
        return torch.stack(steps), torch.stack(noise).to(like.device, like.dtype)

    @torch.no_grad()
    def recompute_behaviour(
        self, policy: Policy, micro_batches: list[NFTBatch], truncation: float
    ) -> dict[str, float]:
        """Each micro-batch's old predictions recomputed in full precision: the implicit
        positive and negative policies sit around the full-precision sampling policy, and
        the final samples stay what the low-precision copy drew (no likelihood, so no
        importance weight: `truncation` is unused)."""
        deviations = []
        for micro in micro_batches:
            times = self._times(micro.steps, micro.x_t)
            full = policy.predict(micro.x_t, times, micro.cond, self.guidance)
            if micro.old_prediction is not None:
                error = (micro.old_prediction.float() - full.float()).flatten(1).norm(dim=1)
                deviations.append(error / full.float().flatten(1).norm(dim=1).clamp(min=1e-12))
            micro.old_prediction = full
        if not deviations:
            return {}
        deviation = torch.cat(deviations)
        return {
            "mismatch_prediction_rel_mean": float(deviation.mean()),
            "mismatch_prediction_rel_max": float(deviation.max()),
        }

    def plan_updates(
        self,
        rollout: NFTRollout,
        rewards: torch.Tensor,
        valid: torch.Tensor,
        minibatch_size: int,
        grad_accum_steps: int,
        generator: torch.Generator,
    ) -> tuple[list[list[NFTBatch]], dict[str, float]]:
        """Optimizer steps over (shuffled minibatch × training point) micro-batches. Groups
        whose rewards tie (r = 1/2) stay in, as in the paper, unless `train_tied_groups` is
        off: no gradient at v_old, but their loss weighs on the policy once it has moved."""
        advantages, keep, stats = trainable_rows(
            rewards, rollout.prompt_ids, valid, self.cfg.global_std, self.cfg.adv_clip_max,
            keep_ties=self.cfg.train_tied_groups,
        )  # fmt: skip
        r = optimality(advantages, self.cfg.adv_clip_max)
        old = rollout.old_predictions

        def micro_batches(index: torch.Tensor) -> list[NFTBatch]:
            return [
                NFTBatch(
                    cond=rollout.cond.select(index),
                    x0=rollout.x0[index],
                    x_t=rollout.x_t[index, k],
                    steps=rollout.steps[index, k],
                    old_prediction=None if old is None else old[index, k],
                    optimality=r[index],
                )
                for k in range(self.num_points)
            ]

        updates = plan_minibatches(
            keep, minibatch_size, grad_accum_steps, self.cfg.num_inner_epochs, generator,
            micro_batches,
        )  # fmt: skip
        for micro in updates[0] if updates else []:
            micro.first_step = True
        return updates, stats

    def loss(self, policy: Policy, batch: NFTBatch) -> tuple[torch.Tensor, dict[str, float]]:
        beta, r = self.cfg.beta, batch.optimality
        times = self._times(batch.steps, batch.x_t)
        out = policy.predict(batch.x_t, times, batch.cond, self.guidance)
        old = batch.old_prediction
        if old is None:
            if not batch.first_step:
                raise RuntimeError(
                    "DiffusionNFT: a later optimizer step without the sampling policy's "
                    "predictions (the learner computes them when the rollout leaves them out)"
                )
            old = out.detach()
        positive = beta * out + (1 - beta) * old
        negative = (1 + beta) * old - beta * out
        x0_positive = self.sampler.predict_x0(positive, batch.x_t, batch.steps)
        x0_negative = self.sampler.predict_x0(negative, batch.x_t, batch.steps)
        per_sample = (
            r * adaptive_x0_error(x0_positive, batch.x0)
            + (1 - r) * adaptive_x0_error(x0_negative, batch.x0)
        ) / beta
        loss = self.cfg.adv_clip_max * per_sample.mean()
        stats = {
            "policy_loss": float(loss.detach()),
            "old_deviation": float(((out.detach() - old) ** 2).mean()),
        }
        loss = reference_penalty(
            loss, stats, self.cfg.kl_beta, policy,
            lambda: policy.predict(batch.x_t, times, batch.cond, self.guidance),
            lambda ref: ((out.float() - ref.float()) ** 2).flatten(1).mean(1),
        )  # fmt: skip
        return loss, stats
