"""Test doubles with closed-form behaviour: a linear policy and quadratic rewards.

`LinearPolicy` predicts out(x, t) = W_t·x + θ on latents of shape (B, D, 1, 1) (NCHW
with D channels): W_t is a fixed matrix per sampler step, looked up by the sampler's model
time, and θ (shape (D,)) is the only trainable parameter. Inside `reference()` the
prediction uses θ_ref (zeros by default) instead, like a disabled LoRA adapter.

For a DDIM sampler (epsilon prediction, η = 0) step i is affine,
    x_{i+1} = a_i·x_i + c_i·(W_i·x_i + θ) = M_i·x_i + c_i·θ,
with a_i = sqrt(ᾱ_p/ᾱ) and c_i = sqrt(1 - ᾱ_p) - sqrt(ᾱ_p·(1 - ᾱ)/ᾱ)
(x̂0 = (x - sqrt(1 - ᾱ)·ε)/sqrt(ᾱ), mean = sqrt(ᾱ_p)·x̂0 + sqrt(1 - ᾱ_p)·ε).
`LinearChain` holds these coefficients in float64 and evaluates the chain and its
closed-form DRaFT gradients (anchors §5 item 8).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Conditioning, initial_noise


class LinearPolicy:
    """out(x, t) = W_t x + θ, with one fixed W per model time in `times`."""

    def __init__(
        self,
        times: Sequence[float],
        weights: torch.Tensor,  # (S, D, D), one matrix per sampler step
        prediction_type: str = "epsilon",
        theta: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        steps, dim, dim2 = weights.shape
        assert dim == dim2 and steps == len(times)
        self.prediction_type = prediction_type
        self.version = 0
        self.dtype = dtype
        self.dim = dim
        self.times = torch.tensor(list(times), dtype=torch.float32)
        self.weights = weights.to(dtype)
        start = torch.zeros(dim, dtype=dtype) if theta is None else theta.to(dtype)
        self.theta = torch.nn.Parameter(start.clone())
        self.theta_ref = torch.zeros(dim, dtype=dtype)
        self.in_reference = False
        self.reference_calls = 0
        self.predict_calls = 0
        self.gradient_checkpointing = False
        self.training = True

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.dim, 1, 1)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode(self, prompts, negative_prompts=None) -> Conditioning:
        return Conditioning(embeds=torch.zeros(len(prompts), 1, 1, dtype=self.dtype))

    def step_index(self, t: torch.Tensor) -> torch.Tensor:
        """Sampler step of each model time in `t` (which must be one of `times` exactly)."""
        match = t.float().reshape(-1, 1) == self.times.reshape(1, -1)
        assert bool(match.any(1).all()), f"unknown model time(s) {t.tolist()}"
        return match.float().argmax(1)

    def predict(self, x, t, cond, guidance) -> torch.Tensor:
        assert x.shape[1:] == self.latent_shape and len(cond) == x.shape[0] == t.shape[0]
        self.predict_calls += 1
        if self.in_reference:
            self.reference_calls += 1
        w = self.weights[self.step_index(t)]  # (B, D, D)
        bias = self.theta_ref if self.in_reference else self.theta
        out = torch.einsum("bij,bj->bi", w, x.flatten(1).to(self.dtype)) + bias
        return out.reshape(x.shape)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def initial_noise(self, seeds) -> torch.Tensor:
        return initial_noise(self.latent_shape, seeds, self.dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.theta]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta.detach().clone()}

    def load_trainable(self, state, version: int) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.version = version

    @contextmanager
    def reference(self) -> Iterator[None]:
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled

    def train(self, mode: bool = True) -> None:
        self.training = mode


class QuadraticReward:
    """r(x) = -scale·‖x - target‖² per sample (target broadcast over (D, 1, 1) latents)."""

    def __init__(self, target: torch.Tensor, scale: float = 0.5, differentiable: bool = True):
        self.name = "quadratic" if differentiable else "quadratic-blackbox"
        self.target = target
        self.scale = scale
        self.differentiable = differentiable
        self.calls = 0

    def score(self, images, prompts, metadata) -> torch.Tensor:
        self.calls += 1
        assert len(prompts) == len(metadata) == images.shape[0]
        if not self.differentiable:
            images = images.detach()
        diff = images.flatten(1) - self.target.to(images.dtype)
        return -self.scale * (diff**2).sum(1)


def grouped_batch(groups: int, size: int, first_seed: int) -> PromptBatch:
    """`groups` prompts of `size` samples each, seeds counting up from `first_seed`."""
    n = groups * size
    return PromptBatch(
        prompts=[f"prompt {g}" for g in range(groups) for _ in range(size)],
        prompt_ids=torch.arange(groups).repeat_interleave(size),
        seeds=torch.arange(first_seed, first_seed + n),
        metadata=[{} for _ in range(n)],
    )


def random_weights(steps: int, dim: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(steps, dim, dim, generator=gen, dtype=torch.float64) / dim**0.5


@dataclass
class LinearChain:
    """The deterministic DDIM chain of a LinearPolicy, x_{i+1} = M_i x_i + c_i θ, in float64.

    Index i is the sampler step (i = 0 is the noisiest; the anchors' k is S - i).
    """

    a: torch.Tensor  # (S,)
    c: torch.Tensor  # (S,)
    weights: torch.Tensor  # (S, D, D)

    @classmethod
    def from_sampler(cls, sampler, weights: torch.Tensor) -> LinearChain:
        ab = sampler.alpha.double()  # exactly the values the sampler uses
        ab_prev = sampler.alpha_prev.double()
        a = torch.sqrt(ab_prev / ab)
        c = torch.sqrt(1 - ab_prev) - torch.sqrt(ab_prev * (1 - ab) / ab)
        return cls(a, c, weights.double())

    @property
    def num_steps(self) -> int:
        return len(self.a)

    def M(self, i: int) -> torch.Tensor:
        dim = self.weights.shape[-1]
        return self.a[i] * torch.eye(dim, dtype=torch.float64) + self.c[i] * self.weights[i]

    def P(self, i: int) -> torch.Tensor:
        """∂x_final/∂x_{i+1}: the product of the M's of the steps after step i."""
        dim = self.weights.shape[-1]
        out = torch.eye(dim, dtype=torch.float64)
        for j in range(i + 1, self.num_steps):
            out = self.M(j) @ out
        return out

    def run(self, x: torch.Tensor, theta: torch.Tensor, start: int = 0, stop=None) -> torch.Tensor:
        """Steps start..stop-1 on rows of x (B, D)."""
        stop = self.num_steps if stop is None else stop
        for i in range(start, stop):
            x = x @ self.M(i).T + self.c[i] * theta
        return x

    def draft_loss_grad(
        self, x0: torch.Tensor, target: torch.Tensor, first_step: int = 0
    ) -> torch.Tensor:
        """∂/∂θ of -mean_b r_b for r = -½‖x0 - y‖², keeping only steps i >= first_step.

        Per sample, the reward-ascent direction is Σ_i c_i P_iᵀ (y - x0) (anchors item 8).
        """
        residual = (target - x0).mean(0)  # (D,)
        ascent = sum(self.c[i] * self.P(i).T @ residual for i in range(first_step, self.num_steps))
        return -ascent
