"""Explore, select, regenerate (Sol-RL, arXiv 2604.06916): rank many candidate seeds per
prompt cheaply, then spend full-precision sampling only on the ones worth training on.

1. Explore: each prompt's group gets `candidates` seeds (`seeds.candidate_seeds`),
   sampled by the rollout copy (`precision.rollout_copy`, low precision if configured)
   with a deterministic preview sampler (the flow ODE or DDIM at `preview_steps`) and
   scored by the reward.
2. Select: per group, `best_worst` keeps the ceil(G/2) best and floor(G/2) worst
   candidates, `top_k` the G best. Ties go to the lower candidate index (a stable sort),
   and candidates whose reward was dropped (NaN) come last for both ends.
3. Regenerate: the selected seeds form the batch that the algorithm's own rollout samples
   in full precision; `generate` scores that and only that reaches the learner.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from raydraft.config import ExploreConfig, SamplerConfig
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Policy
from raydraft.precision.rollout_copy import RolloutCopy
from raydraft.rewards.base import Reward, score_or_drop
from raydraft.sampling.loop import sample_images
from raydraft.sampling.samplers import build_sampler
from raydraft.seeds import candidate_seeds


def candidates_of(batch: PromptBatch, count: int) -> PromptBatch:
    """Each group of `batch` as `count` rows of its prompt with its candidate seeds."""
    rows = torch.cat([run[:1].repeat(count) for run in batch.groups()])
    candidates = batch.select(rows)
    candidates.seeds = torch.cat(
        [candidate_seeds(int(batch.seeds[run[0]]), count) for run in batch.groups()]
    )
    return candidates


def select(rewards: torch.Tensor, valid: torch.Tensor, keep: int, rule: str) -> torch.Tensor:
    """Indices (ascending) of the `keep` candidates of one group that `rule` keeps."""
    order = torch.arange(len(rewards))
    best_first = sorted(order.tolist(), key=lambda i: (not valid[i], -float(rewards[i]), i))
    worst_first = sorted(order.tolist(), key=lambda i: (not valid[i], float(rewards[i]), i))
    if rule == "top_k":
        chosen = best_first[:keep]
    else:
        chosen = best_first[: (keep + 1) // 2]
        chosen += [i for i in worst_first if i not in chosen][: keep // 2]
    return torch.tensor(sorted(chosen))


class Explorer:
    def __init__(self, cfg: ExploreConfig, sampler_cfg: SamplerConfig, fidelity_k: int) -> None:
        """`fidelity_k`: the top/bottom-k of the preview-against-regenerated agreement
        that `generate` logs for every explored batch."""
        self.cfg, self.sampler_cfg, self.fidelity_k = cfg, sampler_cfg, fidelity_k

    def select_batch(
        self,
        policy: Policy,
        reward: Reward,
        batch: PromptBatch,
        low_precision: RolloutCopy | None,
    ) -> tuple[PromptBatch, torch.Tensor, dict[str, float]]:
        """(the batch of selected seeds, in the groups' order, each row's preview reward,
        statistics of the exploration)."""
        cfg, sampler_cfg = self.cfg, self.sampler_cfg
        candidates = candidates_of(batch, cfg.candidates)
        steps = cfg.preview_steps or sampler_cfg.num_steps
        deterministic = sampler_cfg.model_copy(update={"noise_level": 0.0})
        preview = build_sampler(deterministic, policy, steps)
        copy = low_precision.sampling(policy) if low_precision else nullcontext()
        with torch.no_grad(), copy:
            images = sample_images(
                policy, preview, candidates.prompts, candidates.seeds.tolist(),
                sampler_cfg.guidance_scale,
            ).float()  # fmt: skip
        rewards, valid = score_or_drop(
            reward, images, candidates.prompts, candidates.metadata, True
        )
        chosen = []
        for g, run in enumerate(batch.groups()):
            rows = torch.arange(g * cfg.candidates, (g + 1) * cfg.candidates)
            chosen.append(rows[select(rewards[rows], valid[rows], len(run), cfg.select)])
        index = torch.cat(chosen)
        selected = candidates.select(index)
        kept = rewards[index][valid[index]]
        return (
            selected,
            rewards[index],
            {
                "explore_reward_mean": float(rewards[valid].mean()) if valid.any() else math.nan,
                "explore_selected_reward_mean": float(kept.mean()) if len(kept) else math.nan,
            },
        )
