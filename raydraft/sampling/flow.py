"""Flow-matching steps: Euler ODE, the Flow-GRPO SDE and the CPS step, with log-probs.

Convention: t runs from 1 (noise) to 0 (data), x_t = (1 - t)·x0 + t·ε, and the model
predicts the velocity v = ε - x0, so dt = t_next - t < 0 and the ODE step is x + v·dt.
Each stochastic step is Gaussian, x_next ~ N(mean, std²); log-probs are the Gaussian
log-density averaged over all non-batch dimensions, in fp32 (bf16 overflows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class StepOutput(NamedTuple):
    x_next: torch.Tensor
    log_prob: torch.Tensor  # (batch,), fp32; zeros for deterministic steps
    mean: torch.Tensor
    std: torch.Tensor  # broadcastable to x


def as_batch_time(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (batch,) time as fp32, shaped to broadcast against x."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return value.reshape(-1, *([1] * (x.dim() - 1))) if value.dim() else value


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std²) averaged over non-batch dims; 0 where std == 0."""
    std = std.expand_as(mean)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    density = -((sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    return torch.where(std > 0, density, torch.zeros_like(density)).flatten(1).mean(1)


def sample_and_score(mean, std, x, noise, prev_sample) -> StepOutput:
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample.to(x.dtype), log_prob, mean, std)


def euler_step(velocity: torch.Tensor, x: torch.Tensor, t, t_next) -> torch.Tensor:
    """The probability-flow ODE step x + v·(t_next - t)."""
    dt = as_batch_time(t_next, x) - as_batch_time(t, x)
    return (x.float() + velocity.float() * dt).to(x.dtype)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO's reverse SDE step (Liu et al. 2025, eq. 8), same marginals as the ODE.

    σ_t = a·sqrt(t / (1 - t)); because x + (1 - t)·v = E[ε | x_t] = -t·∇log p_t, the drift
    v + σ_t²/(2t)·(x + (1 - t)·v) is v - (σ_t²/2)·∇log p_t, the reverse SDE of the ODE:
        mean = x + [v + σ_t²/(2t)·(x + (1 - t)·v)]·dt,   std = σ_t·sqrt(-dt).
    At t = 1, σ_t is infinite; as in flow_grpo the denominator then uses the next time.
    With a = 0 this is exactly the Euler step. Given `prev_sample`, scores it instead of
    drawing one (the learner's recomputation).
    """
    t_b, t_next_b = as_batch_time(t, x), as_batch_time(t_next, x)
    v, xf = velocity.float(), x.float()
    dt = t_next_b - t_b
    denom = torch.where(t_b >= 1, 1 - t_next_b, 1 - t_b)
    sigma_t = noise_level * torch.sqrt(t_b / denom)
    mean = xf + (v + sigma_t**2 / (2 * t_b) * (xf + (1 - t_b) * v)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return sample_and_score(mean, std, x, noise, prev_sample)


def cps_step_with_logprob(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Coefficients-preserving sampling (CPS, used by Flow-GRPO-Fast), a ∈ [0, 1).

    With x̂0 = x - t·v and ε̂ = x + (1 - t)·v, and σ = t_next·sin(aπ/2):
        mean = (1 - t_next)·x̂0 + sqrt(t_next² - σ²)·ε̂,   std = σ,
    so the noise coefficient stays exactly t_next (exact for point-mass data). Unlike
    flow_grpo, which drops constants, the log-prob here is the exact Gaussian density.
    """
    t_b, t_next_b = as_batch_time(t, x), as_batch_time(t_next, x)
    v, xf = velocity.float(), x.float()
    x0_hat = xf - t_b * v
    eps_hat = xf + (1 - t_b) * v
    std = t_next_b * math.sin(noise_level * math.pi / 2)
    mean = (1 - t_next_b) * x0_hat + torch.sqrt(t_next_b**2 - std**2) * eps_hat
    return sample_and_score(mean, std, x, noise, prev_sample)
