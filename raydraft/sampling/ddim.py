"""DDIM steps for epsilon / v-prediction models, with DDPO's per-step Gaussian log-probs.

Song et al. 2021, eq. 12: with ᾱ_t the cumulative alpha at t and ᾱ_p at the previous
(less noisy) timestep,
    x̂0   = (x_t - sqrt(1 - ᾱ_t)·ε) / sqrt(ᾱ_t)
    σ_t  = η·sqrt((1 - ᾱ_p)/(1 - ᾱ_t))·sqrt(1 - ᾱ_t/ᾱ_p)
    mean = sqrt(ᾱ_p)·x̂0 + sqrt(1 - ᾱ_p - σ_t²)·ε,   x_p ~ N(mean, σ_t²).
η = 0 is the deterministic DDIM step of diffusers' DDIMScheduler (clip_sample off).
"""

from __future__ import annotations

import torch

from raydraft.models.base import PredictionType
from raydraft.sampling.flow import StepOutput, as_batch_time, sample_and_score


def to_epsilon(
    model_output: torch.Tensor, x: torch.Tensor, alpha_bar, prediction_type: PredictionType
):
    """(ε, x̂0) from an epsilon or v prediction (Salimans & Ho 2022 for v)."""
    a = as_batch_time(alpha_bar, x)
    out, xf = model_output.float(), x.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (xf - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    elif prediction_type == "v_prediction":
        x0 = torch.sqrt(a) * xf - torch.sqrt(1 - a) * out
        eps = torch.sqrt(a) * out + torch.sqrt(1 - a) * xf
    else:
        raise ValueError(f"DDIM needs an epsilon or v_prediction model, not {prediction_type!r}")
    return eps, x0


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    alpha_bar_prev: torch.Tensor | float,
    eta: float,
    prediction_type: PredictionType = "epsilon",
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    eps, x0 = to_epsilon(model_output, x, alpha_bar, prediction_type)
    a, a_prev = as_batch_time(alpha_bar, x), as_batch_time(alpha_bar_prev, x)
    std = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1 - a_prev - std**2, min=0)) * eps
    return sample_and_score(mean, std, x, noise, prev_sample)
