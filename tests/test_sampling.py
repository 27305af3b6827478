"""Samplers against closed forms (anchors §5) and against diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from raydraft.models.flow_schedule import flow_sigmas
from raydraft.sampling.flow import (
    cps_step_with_logprob,
    euler_step,
    gaussian_log_prob,
    sde_step_with_logprob,
)
from raydraft.sampling.samplers import DDIMSampler, FlowSampler

MU, S = 1.5, 0.5  # per-dimension data x0 ~ N(MU, S²)


def exact_moments(t: float) -> tuple[float, float]:
    """Mean and variance of x_t = (1 - t)·x0 + t·ε."""
    return (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2


def exact_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """E[ε - x0 | x_t] for Gaussian data: -MU + k_t·(x - m_t)."""
    m, var = exact_moments(t)
    k = (t - (1 - t) * S**2) / var
    return -MU + k * (x - m)


def propagate(grid: torch.Tensor, noise_level: float) -> float:
    """Push (mean, variance) of x exactly through our SDE steps (each step is affine in x)."""
    m, var = exact_moments(float(grid[0]))
    err = 0.0
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        xs = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        _, _, mean, std = sde_step_with_logprob(
            exact_velocity(xs, t), xs, t, t_next, noise_level, noise=torch.zeros_like(xs)
        )
        a, b = float(mean[1] - mean[0]), float(mean[0])
        m, var = a * m + b, a * a * var + float(std.flatten()[0]) ** 2
        m_exact, var_exact = exact_moments(t_next)
        err = max(err, abs(m - m_exact), abs(var - var_exact))
    return err


def test_sde_preserves_ode_marginals_with_first_order_error():
    errors = [propagate(torch.linspace(0.95, 0.0, n + 1), 0.7) for n in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2]
    assert 5 < errors[1] / errors[2] < 20  # about 10x per 10x steps: first order
    assert errors[2] < 2e-3


def test_noise_level_zero_is_the_euler_step_exactly():
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    for t, t_next in [(1.0, 0.9), (0.6, 0.45), (0.1, 0.0)]:
        x_next, log_prob, _, _ = sde_step_with_logprob(
            v, x, t, t_next, 0.0, noise=torch.randn_like(x)
        )
        assert torch.equal(x_next, euler_step(v, x, t, t_next))
        assert torch.equal(log_prob, torch.zeros(4))


def test_log_prob_is_the_gaussian_density_averaged_over_dims():
    x, v = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    x_next, log_prob, mean, std = sde_step_with_logprob(v, x, 0.7, 0.6, 0.7)
    expected = (
        torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean((1, 2, 3))
    )
    assert log_prob.dtype == torch.float32 and log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, expected, rtol=1e-6, atol=1e-6)
    # Scoring a given sample reproduces the drawn sample's log-prob.
    rescored = sde_step_with_logprob(v, x, 0.7, 0.6, 0.7, prev_sample=x_next).log_prob
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=1e-6)


def test_log_prob_is_fp32_for_bf16_inputs():
    x, v = torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    x_next, log_prob, mean, _ = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7)
    assert x_next.dtype == torch.bfloat16 and log_prob.dtype == mean.dtype == torch.float32


def test_sde_sigma_at_t_one_uses_the_next_time():
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    std = sde_step_with_logprob(v, x, 1.0, 0.9, 0.7).std
    assert torch.allclose(std.flatten(), torch.tensor(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1)))


def test_cps_is_exact_for_point_mass_data():
    """Point-mass data x0: v = ε - x0 is exact, so x' ~ N((1 - t')x0, t'²) for any step."""
    x0 = torch.full((20000, 1), 0.8)
    eps = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    t, t_next = 0.9, 0.3
    x = (1 - t) * x0 + t * eps
    x_next, *_ = cps_step_with_logprob(eps - x0, x, t, t_next, 0.8)
    assert abs(float(x_next.mean()) - (1 - t_next) * 0.8) < 0.01
    assert abs(float(x_next.std()) - t_next) < 0.01


def test_flow_sigmas_match_rectified_flow_and_sd3_shift():
    torch.testing.assert_close(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow_sigmas(10, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > flow_sigmas(10)[1:-1]).all()


def test_flow_sampler_add_noise_and_x0_prediction_invert_each_other():
    sampler = FlowSampler(flow_sigmas(5), "sde", 0.7)
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    x = sampler.add_noise(x0, 2, eps)
    torch.testing.assert_close(sampler.predict_x0(eps - x0, x, 2), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_equals_diffusers_ddim_scheduler(prediction_type, eta):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    sampler = DDIMSampler.from_scheduler(scheduler, 10, eta)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        ours = sampler.step(out, x, i, stochastic=eta > 0, noise=noise)
        theirs = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.x_next, theirs, rtol=1e-5, atol=1e-5)
        if eta > 0:
            expected = gaussian_log_prob(ours.x_next, ours.mean, ours.std)
            torch.testing.assert_close(ours.log_prob, expected)
        x = theirs


def test_sde_window_is_a_random_run_of_stochastic_steps_inside_its_range():
    from raydraft.algorithms.flow_grpo import sde_window_mask
    from raydraft.config import SamplerConfig

    cfg = SamplerConfig(num_steps=10, sde_window_size=3, sde_window_range=(1, 4))
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        mask = sde_window_mask(cfg, 10, generator)
        steps = mask.nonzero().flatten().tolist()
        assert len(steps) == 3 and steps == list(range(steps[0], steps[0] + 3))
        starts.add(steps[0])
    assert starts == {1, 2, 3}
    assert sde_window_mask(SamplerConfig(num_steps=10), 10, generator).all()
    with pytest.raises(ValueError, match="does not fit"):
        SamplerConfig(num_steps=4, sde_window_size=3, sde_window_range=(0, 2))
    with pytest.raises(ValueError, match="does not fit"):  # the default may not reach the last step
        SamplerConfig(num_steps=3, sde_window_size=3)
