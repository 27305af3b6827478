"""The denoising loop shared by rollouts, DRaFT's gradient steps and evaluation.

Gradients flow or not according to the caller's autograd mode; `checkpoint=True` wraps
each model call in activation checkpointing (DRaFT: memory O(1) in the number of steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from raydraft.models.base import Conditioning, Policy
from raydraft.sampling.samplers import Sampler
from raydraft.seeds import sample_generator


class StepNoise:
    """Per-sample noise generators, so a sample's noise depends only on its own seed.

    Batching a sample with others (or on another worker) never changes its noise:
    rollouts are reproducible from (prompt, seed, policy version).
    """

    def __init__(self, seeds: Sequence[int], stream: int) -> None:
        """`stream`: the draw's entry in `raydraft.seeds`."""
        self.generators = [sample_generator(s, stream) for s in seeds]

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        shape = (1, *like.shape[1:])
        rows = [torch.randn(shape, generator=g) for g in self.generators]
        return torch.cat(rows).to(like.device, torch.float32)


@dataclass
class DenoiseResult:
    x: torch.Tensor
    latents: list[torch.Tensor]  # states before each step, then the final state
    log_probs: list[torch.Tensor]  # one (B,) per step


def predict(policy: Policy, x, t: float, cond: Conditioning, guidance: float, checkpoint: bool):
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if checkpoint and torch.is_grad_enabled():
        return activation_checkpoint(
            policy.predict, x, t_batch, cond, guidance, use_reentrant=False
        )
    return policy.predict(x, t_batch, cond, guidance)


def denoise(
    policy: Policy,
    cond: Conditioning,
    x: torch.Tensor,
    sampler: Sampler,
    steps: range,
    guidance: float,
    noise: StepNoise | None = None,
    sde_mask: torch.Tensor | None = None,
    record: bool = False,
    checkpoint: bool = False,
) -> DenoiseResult:
    """Run sampler steps `steps` from state `x`; stochastic where `sde_mask` says so."""
    latents, log_probs = [x] if record else [], []
    for i in steps:
        stochastic = bool(sde_mask[i]) if sde_mask is not None else False
        out = predict(policy, x, sampler.model_time(i), cond, guidance, checkpoint)
        step_noise = noise.draw(x) if (stochastic and noise is not None) else None
        if stochastic and step_noise is None:
            raise ValueError("a stochastic step needs a StepNoise source (determinism)")
        x, log_prob, _, _ = sampler.step(out, x, i, stochastic, noise=step_noise)
        if record:
            latents.append(x)
            log_probs.append(log_prob)
    return DenoiseResult(x, latents, log_probs)


@torch.no_grad()
def sample_images(
    policy: Policy, sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int], guidance: float
) -> torch.Tensor:
    """Decoded images from every step of `sampler` without noise: sample grids, evaluation
    and `raydraft sample`."""
    cond = policy.encode(list(prompts))
    x = policy.initial_noise(list(seeds))
    x = denoise(policy, cond, x, sampler, range(sampler.num_steps), guidance).x
    return policy.decode(x)
