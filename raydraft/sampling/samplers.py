"""Samplers: a time grid plus one step rule, behind one interface for every loop.

A sampler owns `num_steps` steps; step i goes from time `times[i]` to `times[i + 1]`.
`model_time(i)` is what the policy's `predict` receives (flow: t in [0, 1]; DDIM: the
integer training timestep). `add_noise` is the forward process q(x_{t_i} | x0), used by
DRaFT-LV to re-noise; `predict_x0` is the one-step estimate used by ReFL.
"""

from __future__ import annotations

from typing import Protocol

import torch

from raydraft.config import SamplerConfig
from raydraft.models.base import Policy, PredictionType
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.sampling.ddim import ddim_step_with_logprob, to_epsilon
from raydraft.sampling.flow import (
    StepOutput,
    as_batch_time,
    cps_step_with_logprob,
    euler_step,
    sde_step_with_logprob,
)


class Sampler(Protocol):
    num_steps: int
    stochastic: bool  # whether `step(..., stochastic=True)` draws noise at all

    def model_time(self, i: int) -> float: ...

    def step(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        i: int,
        stochastic: bool,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput: ...

    def add_noise(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor: ...

    def predict_x0(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor: ...


class FlowSampler:
    """Flow matching on `sigmas` (num_steps + 1 times from 1 to 0) with an ODE/SDE/CPS rule."""

    def __init__(self, sigmas: torch.Tensor, kind: str = "ode", noise_level: float = 0.0) -> None:
        if kind not in ("ode", "sde", "cps"):
            raise ValueError(f"flow sampler kind must be ode, sde or cps, not {kind!r}")
        self.sigmas = sigmas.float().cpu()
        self.num_steps = len(sigmas) - 1
        self.kind = kind
        self.noise_level = noise_level
        self.stochastic = kind != "ode" and noise_level > 0

    def model_time(self, i: int) -> float:
        return float(self.sigmas[i])

    def step(self, model_output, x, i, stochastic, noise=None, prev_sample=None) -> StepOutput:
        t, t_next = self.sigmas[i], self.sigmas[i + 1]
        if not (stochastic and self.stochastic):
            x_next = euler_step(model_output, x, t, t_next)
            zeros = torch.zeros(x.shape[0], device=x.device)
            return StepOutput(x_next, zeros, x_next.float(), torch.zeros((), device=x.device))
        rule = sde_step_with_logprob if self.kind == "sde" else cps_step_with_logprob
        return rule(model_output, x, t, t_next, self.noise_level, noise, prev_sample)

    def add_noise(self, x0, i, noise):
        t = as_batch_time(self.sigmas[i], x0)
        return ((1 - t) * x0.float() + t * noise.float()).to(x0.dtype)

    def predict_x0(self, model_output, x, i):
        t = as_batch_time(self.sigmas[i], x)
        return (x.float() - t * model_output.float()).to(x.dtype)


class DDIMSampler:
    """DDIM over a discrete schedule; `eta` > 0 makes steps stochastic with log-probs (DDPO)."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor,
        step_ratio: int,
        final_alpha_cumprod: float,
        prediction_type: PredictionType,
        eta: float = 0.0,
    ) -> None:
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.timesteps = timesteps.long().cpu()
        self.num_steps = len(timesteps)
        prev = self.timesteps - step_ratio
        self.alpha = self.alphas_cumprod[self.timesteps].float()
        self.alpha_prev = torch.where(
            prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], torch.tensor(final_alpha_cumprod)
        ).float()
        self.prediction_type = prediction_type
        self.eta = eta
        self.stochastic = eta > 0

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float = 0.0) -> DDIMSampler:
        """Same timesteps and alphas as a diffusers DDIMScheduler after set_timesteps."""
        if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
            raise ValueError("DDIMSampler supports clip_sample=False and thresholding=False only")
        scheduler.set_timesteps(num_steps)
        return cls(
            scheduler.alphas_cumprod,
            scheduler.timesteps,
            scheduler.config.num_train_timesteps // num_steps,
            float(scheduler.final_alpha_cumprod),
            scheduler.config.prediction_type,
            eta,
        )

    def model_time(self, i: int) -> float:
        return float(self.timesteps[i])

    def step(self, model_output, x, i, stochastic, noise=None, prev_sample=None) -> StepOutput:
        eta = self.eta if stochastic else 0.0
        return ddim_step_with_logprob(
            model_output, x, self.alpha[i], self.alpha_prev[i], eta, self.prediction_type,
            noise, prev_sample,
        )  # fmt: skip

    def add_noise(self, x0, i, noise):
        a = as_batch_time(self.alpha[i], x0)
        return (torch.sqrt(a) * x0.float() + torch.sqrt(1 - a) * noise.float()).to(x0.dtype)

    def predict_x0(self, model_output, x, i):
        return to_epsilon(model_output, x, self.alpha[i], self.prediction_type)[1].to(x.dtype)


def build_sampler(cfg: SamplerConfig, policy: Policy, num_steps: int | None = None) -> Sampler:
    """The sampler a config asks for, on the policy's own noise schedule: DDIM over an
    epsilon/v policy's `scheduler`, flow steps over a flow policy's `flow_sigmas` (its
    pipeline's times) unless `sampler.shift` sets a plain shifted schedule. `num_steps`
    overrides the config (evaluation uses more steps)."""
    steps = num_steps or cfg.num_steps
    if policy.prediction_type == "flow":
        if cfg.kind == "ddim":
            raise ValueError(
                "sampler.kind: ddim needs an epsilon/v model; this policy is a flow model"
            )
        sigmas = policy.flow_sigmas(steps) if cfg.shift is None else flow_sigmas(steps, cfg.shift)
        return FlowSampler(sigmas, cfg.kind, cfg.noise_level)
    if cfg.kind != "ddim":
        raise ValueError(
            f"sampler.kind: {cfg.kind} needs a flow model; "
            f"this policy predicts {policy.prediction_type}"
        )
    return DDIMSampler.from_scheduler(policy.scheduler, steps, cfg.noise_level)
