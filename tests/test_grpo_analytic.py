"""Flow-GRPO against closed forms: score-function learning, ratio, clipping and KL.

The policy is a linear flow model v_θ(x, t) = W_t·x + θ (tests/analytic_policies.py) on
a real 4-step `FlowSampler` SDE (a = 0.7). Each SDE step is then Gaussian with mean
    μ = x + [v + u·(x + (1 - t)·v)]·dt,  u = σ_t²/(2t),  std s = σ_t·√|dt|,
so ∂μ/∂θ = (1 + u(1 - t))·dt·I and the final-sample mean is affine in θ (anchors §5).
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic_policies import LinearPolicy, QuadraticReward, grouped_batch, random_weights
from torch.testing import assert_close

from raydraft.algorithms.flow_grpo import FlowGRPO, clipped_surrogate, gaussian_kl
from raydraft.algorithms.group_relative import group_advantages
from raydraft.config import FlowGRPOConfig, SamplerConfig
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.sampling.flow import sde_step_with_logprob
from raydraft.sampling.samplers import FlowSampler

DIM, STEPS, NOISE_LEVEL = 2, 4, 0.7
TARGET = torch.tensor([1.0, -0.5], dtype=torch.float64)


def make_setup(theta=None, weight_scale: float = 0.3, **cfg):
    sampler = FlowSampler(flow_sigmas(STEPS), "sde", NOISE_LEVEL)
    sampler_cfg = SamplerConfig(kind="sde", num_steps=STEPS, noise_level=NOISE_LEVEL)
    times = [sampler.model_time(i) for i in range(STEPS)]
    weights = random_weights(STEPS, DIM, weight_scale, seed=1)
    policy = LinearPolicy(times, weights, "flow", theta=theta)
    algo = FlowGRPO(FlowGRPOConfig(name="flow_grpo", **cfg), sampler, sampler_cfg, guidance=1.0)
    # r = -(x0 - c)², a black box: scores come without gradients.
    reward = QuadraticReward(TARGET, scale=1.0, differentiable=False)
    return policy, sampler, algo, reward


def sde_coeffs(sampler: FlowSampler, j: int) -> tuple[float, float, float, float]:
    """(t, dt, σ_t, std) of step j per anchors §5 item 2 (σ_t at t = 1 uses the next time)."""
    t, t_next = float(sampler.sigmas[j]), float(sampler.sigmas[j + 1])
    sigma = NOISE_LEVEL * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    dt = t_next - t
    return t, dt, sigma, sigma * math.sqrt(-dt)


def step_mean(policy, sampler, j, x: torch.Tensor) -> torch.Tensor:
    """μ of step j from x (B, D) in float64, with the policy's current θ."""
    t, dt, sigma, _ = sde_coeffs(sampler, j)
    v = x @ policy.weights[j].T + policy.theta.detach()
    u = sigma**2 / (2 * t)
    return x + (v + u * (x + (1 - t) * v)) * dt


def mean_map(policy, sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, b0) with E[x0] = B·θ + b0 (b0 = 0 as E[x_T] = 0): the mean path is affine."""

    def final_mean(theta: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(1, DIM, dtype=torch.float64)
        for j in range(STEPS):
            t, dt, sigma, _ = sde_coeffs(sampler, j)
            v = x @ policy.weights[j].T + theta
            x = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
        return x[0]

    b0 = final_mean(torch.zeros(DIM, dtype=torch.float64))
    cols = [final_mean(e) - b0 for e in torch.eye(DIM, dtype=torch.float64)]
    return torch.stack(cols, 1), b0


def grpo_iteration(policy, algo, reward, batch, generator, optimizer=None):
    """rollout -> rewards -> plan_updates -> (loss, backward, step) per optimizer step,
    averaging each step's micro-batch losses as the trainer does."""
    rollout = algo.rollout(policy, batch, generator)
    images = rollout.trajectory.images
    rewards = reward.score(images, batch.prompts, batch.metadata)
    valid = torch.ones(len(batch), dtype=torch.bool)
    updates, _ = algo.plan_updates(rollout, rewards, valid, len(batch), 1, generator)
    all_stats = []
    for micro_batches in updates:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches:
            loss, stats = algo.loss(policy, micro)
            (loss / len(micro_batches)).backward()
            all_stats.append(stats)
        if optimizer is not None:
            optimizer.step()
    return rollout, rewards, updates, all_stats


def test_grpo_moves_the_sample_mean_toward_the_reward_optimum():
    """Anchors item 7: with r = -‖x0 - c‖², ∇_θ E[r] = 2Bᵀ(c - Bθ); GRPO's score-function
    estimate has the right sign and SGD drives the sample mean Bθ to c."""
    policy, sampler, algo, reward = make_setup(clip_range=0.2)
    jac, b0 = mean_map(policy, sampler)
    assert b0.abs().max() < 1e-12 and torch.linalg.det(jac).abs() > 0.1
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=2.0)
    generator = torch.Generator().manual_seed(0)
    distances = [float((jac @ policy.theta.detach() - TARGET).norm())]
    for it in range(12):
        before = policy.theta.detach().clone()
        true_ascent = 2 * jac.T @ (TARGET - jac @ before)
        grpo_iteration(policy, algo, reward, grouped_batch(8, 8, 1000 * it), generator, optimizer)
        update = policy.theta.detach() - before
        if it == 0:
            cos = float(update @ true_ascent / (update.norm() * true_ascent.norm()))
            assert cos > 0.5, f"first GRPO update points away from the reward gradient: {cos}"
        distances.append(float((jac @ policy.theta.detach() - TARGET).norm()))
    # Normalised advantages keep the step size constant, so θ ends up jittering around
    # the optimum at a noise floor well below the starting distance.
    assert max(distances[-4:]) < 0.3 * distances[0], distances
    assert distances[3] < distances[0]


def test_rollout_log_probs_are_the_gaussian_density_of_the_recorded_moves():
    policy, sampler, algo, _ = make_setup(theta=torch.tensor([0.4, -0.3]))
    rollout = algo.rollout(policy, grouped_batch(2, 4, 7), torch.Generator().manual_seed(0))
    traj = rollout.trajectory
    assert traj.sde_mask.all() and traj.latents.shape == (8, STEPS + 1, DIM, 1, 1)
    for j in range(STEPS):
        x, x_next = traj.latents[:, j].flatten(1), traj.latents[:, j + 1].flatten(1)
        _, _, _, std = sde_coeffs(sampler, j)
        mean = step_mean(policy, sampler, j, x)
        expected = torch.distributions.Normal(mean, std).log_prob(x_next).mean(1)
        assert_close(traj.log_probs[:, j].double(), expected, rtol=1e-4, atol=1e-4)


def test_on_policy_ratio_is_exactly_one_and_the_gradient_is_minus_a_grad_logp():
    policy, sampler, algo, reward = make_setup(theta=torch.tensor([0.4, -0.3]))
    batch = grouped_batch(4, 4, 50)
    rollout, rewards, updates, stats = grpo_iteration(
        policy, algo, reward, batch, torch.Generator().manual_seed(0)
    )
    assert len(updates) == 1
    micro_batches = updates[0]
    trained = algo.train_steps(rollout.trajectory.sde_mask)
    assert trained == [0, 1, 2]  # int(4 · 0.99) = 3 of the 4 steps
    assert [m.step for m in micro_batches] == trained
    for s in stats:
        assert s["ratio_mean"] == 1.0 and s["ratio_std"] == 0.0
        assert s["clipfrac"] == 0.0 and s["approx_kl"] == 0.0
    # At ρ = 1 the PPO gradient is -A·∇logp, averaged over samples and micro-batches:
    # ∂logp/∂θ = (1/D)·(x' - μ)/s²·(1 + u(1 - t))·dt.
    expected = torch.zeros(DIM, dtype=torch.float64)
    for micro in micro_batches:
        t, dt, sigma, std = sde_coeffs(sampler, micro.step)
        x, x_next = micro.x.flatten(1), micro.x_next.flatten(1)
        mean = step_mean(policy, sampler, micro.step, x)
        dlogp = (x_next - mean) / std**2 * (1 + sigma**2 / (2 * t) * (1 - t)) * dt / DIM
        per_step = -(micro.advantages.double()[:, None] * dlogp).mean(0)
        expected += per_step / len(micro_batches)
    advantages, _ = group_advantages(rewards, batch.prompt_ids)
    assert_close(micro_batches[0].advantages.sort().values, advantages.sort().values)
    assert expected.norm() > 1e-2
    assert_close(policy.theta.grad, expected, rtol=1e-4, atol=1e-6)
    # Off-policy after an update: the ratio is no longer 1, so the check above can fail.
    with torch.no_grad():
        policy.theta += 0.05
    _, moved = algo.loss(policy, micro_batches[0])
    assert moved["ratio_std"] > 0 and abs(moved["ratio_mean"] - 1) > 1e-4


def clip_grad(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    old = torch.randn(len(ratio), generator=torch.Generator().manual_seed(0))
    log_prob = (old + ratio.log()).requires_grad_(True)
    loss, rho, clipped = clipped_surrogate(log_prob, old, advantages, clip_range)
    loss.mean().backward()
    return log_prob.grad, rho.detach(), clipped


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_gradient_is_zero_where_the_clip_binds(sign):
    eps = 0.2
    ratio = torch.tensor([1.3, 1.5, 2.0, 1.21]) if sign > 0 else torch.tensor([0.7, 0.5, 0.1, 0.79])
    advantages = sign * torch.tensor([0.5, 1.0, 2.0, 0.1])
    grad, _, clipped = clip_grad(ratio, advantages, eps)
    assert clipped.all()
    assert torch.equal(grad, torch.zeros_like(grad))


def test_clip_gradient_is_minus_a_rho_over_n_where_it_does_not_bind():
    eps, n = 0.2, 8
    # Binding: (A>0, ρ>1+ε) and (A<0, ρ<1-ε). Not binding: the opposite sides and inside.
    ratio = torch.tensor([1.5, 0.6, 0.6, 1.5, 1.1, 0.9, 1.0, 1.3])
    advantages = torch.tensor([1.0, -2.0, 1.0, -2.0, 0.7, -0.4, 1.5, 0.3])
    binds = torch.tensor([True, True, False, False, False, False, False, True])
    grad, rho, clipped = clip_grad(ratio, advantages, eps)
    assert torch.equal(clipped, binds)
    assert_close(rho, ratio)
    expected = torch.where(binds, torch.zeros(n), -advantages * rho / n)
    assert_close(grad, expected, rtol=1e-6, atol=0)
    assert (grad[~binds] != 0).all()


def test_gaussian_kl_is_the_exact_kl_between_equal_std_gaussians_averaged_over_dims():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 3, 4, 4, generator=gen)
    ref = torch.randn(5, 3, 4, 4, generator=gen)
    for std in (torch.tensor(0.3), torch.rand(5, 1, 1, 1, generator=gen) + 0.1):
        normal = torch.distributions.Normal
        exact = torch.distributions.kl_divergence(
            normal(mean, std.expand_as(mean)), normal(ref, std.expand_as(ref))
        )
        got = gaussian_kl(mean, ref, std)
        assert got.shape == (5,)
        assert_close(got, exact.flatten(1).mean(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t, t_next", [(1.0, 0.75), (0.75, 0.5), (0.5, 0.3), (0.2, 0.1)])
def test_sde_step_kl_is_the_closed_form_in_the_velocity_gap(t, t_next):
    """Anchors item 5: KL = (|dt|/2)(1/σ_t + σ_t(1 - t)/(2t))²(v_θ - v_ref)² per dim."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 2, 2, generator=gen)
    v, v_ref = torch.randn(6, 3, 2, 2, generator=gen), torch.randn(6, 3, 2, 2, generator=gen)
    zero = torch.zeros_like(x)
    step = sde_step_with_logprob(v, x, t, t_next, NOISE_LEVEL, noise=zero)
    ref = sde_step_with_logprob(v_ref, x, t, t_next, NOISE_LEVEL, noise=zero)
    assert torch.equal(step.std, ref.std)
    dt = t_next - t
    sigma = NOISE_LEVEL * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    coef = (abs(dt) / 2) * (1 / sigma + sigma * (1 - t) / (2 * t)) ** 2
    expected = (coef * (v - v_ref) ** 2).flatten(1).mean(1)
    assert_close(gaussian_kl(step.mean, ref.mean, step.std), expected, rtol=1e-4, atol=1e-6)


def test_kl_penalty_uses_the_reference_policy_and_adds_beta_kl():
    theta = torch.tensor([0.4, -0.3])
    beta = 0.25
    policy, sampler, plain, reward = make_setup(theta=theta)
    _, _, with_kl, _ = make_setup(theta=theta, kl_beta=beta)
    batch = grouped_batch(2, 4, 5)
    generator = torch.Generator().manual_seed(0)
    rollout = plain.rollout(policy, batch, generator)
    rewards = reward.score(rollout.trajectory.images, batch.prompts, batch.metadata)
    updates, _ = plain.plan_updates(
        rollout, rewards, torch.ones(8, dtype=torch.bool), 8, 1, generator
    )
    for micro in updates[0]:
        policy.theta.grad = None
        calls = policy.reference_calls
        loss0, _ = plain.loss(policy, micro)
        loss0.backward()
        grad0 = policy.theta.grad.clone()
        assert policy.reference_calls == calls  # β = 0: no reference pass
        policy.theta.grad = None
        loss_kl, stats = with_kl.loss(policy, micro)
        loss_kl.backward()
        assert policy.reference_calls == calls + 1 and not policy.in_reference
        # v_θ - v_ref = θ - θ_ref = θ (same W), at every x: KL_d = coef·θ_d², mean over d.
        t, dt, sigma, _ = sde_coeffs(sampler, micro.step)
        coef = (abs(dt) / 2) * (1 / sigma + sigma * (1 - t) / (2 * t)) ** 2
        kl = float((coef * policy.theta.detach() ** 2).mean())
        assert stats["kl_ref"] == pytest.approx(kl, rel=1e-4)
        assert float(loss_kl.detach() - loss0.detach()) == pytest.approx(beta * kl, rel=1e-4)
        # The reference side is constant: ∂(β·KL)/∂θ_d = β·2·coef·θ_d / D.
        kl_grad = beta * 2 * coef * policy.theta.detach() / DIM
        assert_close(policy.theta.grad - grad0, kl_grad, rtol=1e-4, atol=1e-7)
