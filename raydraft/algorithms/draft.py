"""DRaFT: Directly fine-tuning diffusion models on differentiable rewards (Clark et al. 2024).

Objective: maximise E_{c, x_T}[r(decode(sample_θ(x_T, c)), c)] by backpropagating the
reward through the sampler. One code path covers the family:
- DRaFT: gradients through every step (`truncation_steps: null`);
- DRaFT-K: stop-gradient on x_K, backprop through the last K steps only;
- DRaFT-LV: K = 1; the final x0 is detached and re-noised n times,
  x1^i = forward(sg(x0), ε^i), and the n one-step denoisings are rewarded;
- AlignProp: K ~ U[a, b] drawn per iteration (`truncation_range`);
- ReFL: stop at a random step k and reward the one-step estimate x̂0(x_k).
The gradient-free prefix runs in `rollout` (no_grad, a rollout worker can run it); `loss`
replays the steps with gradients from the detached state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydraft.algorithms.common import optimizer_steps, split_minibatches
from raydraft.config import DraftConfig, ExperimentConfig
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Conditioning, Policy
from raydraft.rewards.base import Reward, component_scores, score_or_drop
from raydraft.rows import Rows
from raydraft.sampling.loop import StepNoise, denoise, predict
from raydraft.sampling.samplers import Sampler
from raydraft.seeds import DRAFT_LV_NOISE


@dataclass
class DraftBatch(Rows):
    shared = ("start", "mode")  # the iteration's plan, the same in every part

    prompts: list[str]
    metadata: list[dict]
    cond: Conditioning
    x_start: torch.Tensor  # detached: the state before step `start` (LV: the final x0)
    start: int  # first step that carries gradients
    mode: str  # "chain" | "refl" | "lv"
    lv_noise: torch.Tensor | None = None  # (B, n, *latent) re-noising draws for DRaFT-LV

    def __len__(self) -> int:
        return len(self.prompts)


class DRaFT:
    scores_rollouts = False  # the reward is part of the loss

    def __init__(
        self,
        cfg: DraftConfig,
        sampler: Sampler,
        reward: Reward | None,
        guidance: float,
        checkpoint: bool = False,
        drop_bad_rewards: bool = False,
    ) -> None:
        """`reward` may be None where only `rollout` runs (a rollout worker)."""
        if reward is not None and not reward.differentiable:
            raise ValueError(f"DRaFT needs a differentiable reward; {reward.name!r} is not")
        self.cfg = cfg
        self.sampler = sampler
        self.reward = reward
        self.guidance = guidance
        self.checkpoint = checkpoint
        self.drop_bad_rewards = drop_bad_rewards

    @classmethod
    def build(cls, cfg: ExperimentConfig, sampler: Sampler, reward: Reward | None) -> DRaFT:
        algorithm = cfg.algorithm
        drop_bad = cfg.rewards.on_bad_reward == "drop"
        return cls(algorithm, sampler, reward, cfg.sampler.guidance_scale,
                   algorithm.checkpoint_each_step, drop_bad)  # fmt: skip

    def plan(self, generator: torch.Generator) -> tuple[int, str]:
        """(first gradient step, mode) for this iteration."""
        steps, cfg = self.sampler.num_steps, self.cfg
        if cfg.refl_stop_range is not None:
            lo, hi = cfg.refl_stop_range
            return int(torch.randint(lo, hi + 1, (1,), generator=generator)), "refl"
        if cfg.truncation_range is not None:
            lo, hi = cfg.truncation_range
            k = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            return steps - k, "chain"
        if cfg.lv_samples:
            return steps - 1, "lv"
        return steps - (cfg.truncation_steps or steps), "chain"

    @torch.no_grad()
    def rollout(self, policy: Policy, batch: PromptBatch, generator: torch.Generator) -> DraftBatch:
        start, mode = self.plan(generator)
        cond = policy.encode(batch.prompts)
        x = policy.initial_noise(batch.seeds.tolist())
        stop = self.sampler.num_steps if mode == "lv" else start
        x = denoise(policy, cond, x, self.sampler, range(stop), self.guidance).x
        lv_noise = None
        if mode == "lv":
            noise = StepNoise(batch.seeds.tolist(), DRAFT_LV_NOISE)
            lv_noise = torch.stack([noise.draw(x) for _ in range(self.cfg.lv_samples)], dim=1)
        return DraftBatch(batch.prompts, batch.metadata, cond, x, start, mode, lv_noise)

    def final_samples(self, policy: Policy, batch: DraftBatch) -> torch.Tensor:
        """The latents the reward sees, with gradients: (B, *latent), or (n·B, ...) for LV."""
        sampler = self.sampler
        if batch.mode == "chain":
            steps = range(batch.start, sampler.num_steps)
            return denoise(
                policy, batch.cond, batch.x_start, sampler, steps, self.guidance,
                checkpoint=self.checkpoint,
            ).x  # fmt: skip
        if batch.mode == "refl":
            t = sampler.model_time(batch.start)
            out = predict(policy, batch.x_start, t, batch.cond, self.guidance, self.checkpoint)
            return sampler.predict_x0(out, batch.x_start, batch.start)
        last = sampler.num_steps - 1
        n = batch.lv_noise.shape[1]
        x1 = sampler.add_noise(
            batch.x_start.repeat(n, *[1] * (batch.x_start.dim() - 1)),
            last,
            batch.lv_noise.transpose(0, 1).flatten(0, 1),
        )
        cond = batch.cond.tile(n)
        return denoise(
            policy, cond, x1, sampler, range(last, last + 1), self.guidance,
            checkpoint=self.checkpoint,
        ).x  # fmt: skip

    def loss(self, policy: Policy, batch: DraftBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if self.reward is None:
            raise RuntimeError("this DRaFT was built without a reward: it can only roll out")
        latents = self.final_samples(policy, batch)
        repeats = latents.shape[0] // len(batch)
        images = policy.decode(latents)
        rewards, valid = score_or_drop(
            self.reward,
            images,
            batch.prompts * repeats,
            batch.metadata * repeats,
            self.drop_bad_rewards,
        )
        if not valid.any():
            raise RuntimeError(
                f"every sample in the minibatch had a bad {self.reward.name!r} reward"
            )
        kept = rewards[valid]
        stats = {
            "reward_mean": float(kept.detach().mean()),
            "reward_std": float(kept.detach().std()) if kept.numel() > 1 else 0.0,
            "grad_steps": float(self.sampler.num_steps - batch.start)
            if batch.mode == "chain"
            else 1.0,
            "bad_reward_dropped": float((~valid).sum()),
        } | {
            f"reward_mean/{name}": float(scores[valid].mean())
            for name, scores in component_scores(self.reward).items()
        }
        return -kept.mean(), stats

    def recompute_behaviour(
        self, policy: Policy, micro_batches: list[DraftBatch], truncation: float
    ) -> dict[str, float]:
        """Never called: the config refuses low-precision rollouts for DRaFT, whose
        gradient runs through the sampler from the rollout's state."""
        return {}

    def plan_updates(
        self,
        rollout: DraftBatch,
        rewards: torch.Tensor | None,
        valid: torch.Tensor | None,
        minibatch_size: int,
        grad_accum_steps: int,
        generator: torch.Generator,
    ) -> tuple[list[list[DraftBatch]], dict[str, float]]:
        """Optimizer steps over the rollout in order (its reward is in the loss: `rewards`
        is None, and nothing is shuffled)."""
        parts = split_minibatches(len(rollout), minibatch_size, None)
        return optimizer_steps([rollout.select(i) for i in parts], grad_accum_steps), {}
