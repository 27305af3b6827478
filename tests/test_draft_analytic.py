"""DRaFT, DRaFT-K, DRaFT-LV, AlignProp and ReFL against closed forms on a linear DDIM chain.

The policy is ε_θ(x, i) = W_i·x + θ and the sampler a real 4-step `DDIMSampler` (η = 0),
so every step is affine, x_{i+1} = M_i·x_i + c_i·θ (see tests/analytic_policies.py), and
the reward r = -½‖x0 - y‖² has closed-form gradients (anchors §5 items 8 and 9). The
loss the algorithm minimises is -mean(r), so its θ-gradient is minus the mean ascent
direction. The samplers compute in fp32 whatever the latent dtype, so library-vs-closed-form
tolerances are fp32-sized; the closed forms themselves are checked in float64.
"""

from __future__ import annotations

import pytest
import torch
from analytic_policies import LinearChain, LinearPolicy, QuadraticReward, random_weights
from torch.testing import assert_close

from raydraft.algorithms.draft import DRaFT
from raydraft.config import DraftConfig
from raydraft.data.prompts import PromptBatch
from raydraft.sampling.samplers import DDIMSampler

DIM, STEPS = 3, 4
# ᾱ at the training timesteps 0..3; sampling runs 3 -> 2 -> 1 -> 0 -> clean (ᾱ = 1).
ALPHAS_CUMPROD = torch.tensor([0.8, 0.5, 0.25, 0.05], dtype=torch.float64)
TARGET = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
THETA0 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
SEEDS = [11, 12, 13, 14, 15]


def make_setup(weight_scale: float = 0.4, weight_seed: int = 0):
    sampler = DDIMSampler(
        ALPHAS_CUMPROD, torch.arange(STEPS - 1, -1, -1), 1, 1.0, "epsilon", eta=0.0
    )
    weights = random_weights(STEPS, DIM, weight_scale, weight_seed)
    times = [sampler.model_time(i) for i in range(STEPS)]
    policy = LinearPolicy(times, weights, "epsilon", theta=THETA0)
    chain = LinearChain.from_sampler(sampler, weights)
    return policy, sampler, chain, QuadraticReward(TARGET)


def prompt_batch(seeds) -> PromptBatch:
    seeds = list(seeds)
    return PromptBatch(
        prompts=[f"p{s}" for s in seeds],
        prompt_ids=torch.arange(len(seeds)),
        seeds=torch.tensor(seeds),
        metadata=[{} for _ in seeds],
    )


def run_draft(policy, algo, seeds=SEEDS, generator_seed: int = 0):
    """rollout -> loss -> backward; returns (θ.grad, batch, loss, stats)."""
    policy.theta.grad = None
    batch = algo.rollout(policy, prompt_batch(seeds), torch.Generator().manual_seed(generator_seed))
    loss, stats = algo.loss(policy, batch)
    loss.backward()
    return policy.theta.grad.clone(), batch, loss.detach(), stats


def chain_x0(policy, chain, seeds=SEEDS) -> torch.Tensor:
    x_T = policy.initial_noise(seeds).flatten(1)
    return chain.run(x_T, THETA0)


def reference_loss(chain: LinearChain, theta: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """The DRaFT loss on an independent float64 implementation of the chain."""
    x0 = chain.run(x_T, theta)
    return (0.5 * ((x0 - TARGET) ** 2).sum(1)).mean()


def test_closed_form_matches_float64_finite_differences():
    """The closed form g = Σ_k c_k P_kᵀ(y - x0) itself (anchors item 8), in float64."""
    policy, _, chain, _ = make_setup()
    x_T = policy.initial_noise(SEEDS).flatten(1)
    theta = THETA0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda th: reference_loss(chain, th, x_T), (theta,))
    fd = torch.zeros(DIM, dtype=torch.float64)
    for d in range(DIM):
        e = torch.zeros(DIM, dtype=torch.float64)
        e[d] = 1e-6
        fd[d] = (
            reference_loss(chain, THETA0 + e, x_T) - reference_loss(chain, THETA0 - e, x_T)
        ) / 2e-6
    expected = chain.draft_loss_grad(chain.run(x_T, THETA0), TARGET)
    assert_close(fd, expected, rtol=1e-7, atol=1e-9)


def test_full_draft_gradient_is_the_closed_form():
    policy, sampler, chain, reward = make_setup()
    algo = DRaFT(DraftConfig(name="draft"), sampler, reward, guidance=1.0)
    grad, batch, loss, stats = run_draft(policy, algo)
    assert (batch.mode, batch.start) == ("chain", 0)
    assert stats["grad_steps"] == STEPS
    x0 = chain_x0(policy, chain)
    # Forward: the final latent and the loss are the chain's.
    assert_close(algo.final_samples(policy, batch).detach().flatten(1), x0, rtol=1e-5, atol=1e-5)
    assert_close(float(loss), float(0.5 * ((x0 - TARGET) ** 2).sum(1).mean()), rtol=1e-5, atol=0)
    # Backward: the gradient of -mean(r) is minus the mean ascent direction.
    expected = chain.draft_loss_grad(x0, TARGET)
    assert expected.norm() > 0.1
    assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_full_draft_gradient_matches_finite_differences_of_the_library_loss():
    """gradcheck on θ ↦ DRaFT loss. The loss is exactly quadratic in θ, so central
    differences with a large step are exact up to the fp32 arithmetic of the sampler."""
    policy, sampler, _, reward = make_setup()
    algo = DRaFT(DraftConfig(name="draft"), sampler, reward, guidance=1.0)
    batch = algo.rollout(policy, prompt_batch(SEEDS), torch.Generator().manual_seed(0))
    param = policy.theta

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        policy.theta = theta
        try:
            # A fresh rollout too: the prefix (here empty) must follow θ as well.
            fresh = algo.rollout(policy, prompt_batch(SEEDS), torch.Generator().manual_seed(0))
            return algo.loss(policy, fresh)[0]
        finally:
            policy.theta = param

    assert batch.start == 0
    theta = THETA0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (theta,), eps=0.1, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_draft_k_keeps_only_the_last_k_steps(k):
    policy, sampler, chain, reward = make_setup()
    full = DRaFT(DraftConfig(name="draft"), sampler, reward, guidance=1.0)
    trunc = DRaFT(DraftConfig(name="draft", truncation_steps=k), sampler, reward, guidance=1.0)
    g_full, b_full, _, _ = run_draft(policy, full)
    g_k, b_k, _, stats = run_draft(policy, trunc)
    assert (b_k.mode, b_k.start, stats["grad_steps"]) == ("chain", STEPS - k, k)
    # Same x0: truncation changes the gradient, never the sample.
    x_full = full.final_samples(policy, b_full).detach()
    assert torch.equal(trunc.final_samples(policy, b_k).detach(), x_full)
    x0 = chain_x0(policy, chain)
    # The state the gradient steps start from is the chain's x_K, detached.
    assert not b_k.x_start.requires_grad
    assert_close(
        b_k.x_start.flatten(1),
        chain.run(policy.initial_noise(SEEDS).flatten(1), THETA0, 0, STEPS - k),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_close(g_k, chain.draft_loss_grad(x0, TARGET, first_step=STEPS - k), rtol=1e-5, atol=1e-6)
    # Biased: the dropped terms are not negligible here.
    assert (g_k - g_full).norm() > 0.05 * g_full.norm()


def test_draft_k_with_k_equal_to_all_steps_is_full_draft():
    policy, sampler, _, reward = make_setup()
    full = DRaFT(DraftConfig(name="draft"), sampler, reward, guidance=1.0)
    all_k = DRaFT(DraftConfig(name="draft", truncation_steps=STEPS), sampler, reward, 1.0)
    g_full, *_ = run_draft(policy, full)
    g_all, *_ = run_draft(policy, all_k)
    assert torch.equal(g_full, g_all)


@pytest.mark.parametrize(
    "cfg",
    [
        DraftConfig(name="draft"),
        DraftConfig(name="draft", truncation_steps=2),
        DraftConfig(name="draft", truncation_steps=1, lv_samples=2),
        DraftConfig(name="draft", refl_stop_range=(1, 2)),
    ],
    ids=["full", "k2", "lv2", "refl"],
)
def test_gradient_checkpointing_gives_identical_gradients(cfg):
    policy, sampler, _, reward = make_setup()
    plain = DRaFT(cfg, sampler, reward, guidance=1.0, checkpoint=False)
    ckpt = DRaFT(cfg, sampler, reward, guidance=1.0, checkpoint=True)
    g_plain, _, loss_plain, _ = run_draft(policy, plain, generator_seed=3)
    plain_calls = policy.predict_calls
    g_ckpt, _, loss_ckpt, _ = run_draft(policy, ckpt, generator_seed=3)
    assert torch.equal(loss_plain, loss_ckpt)
    assert torch.equal(g_plain, g_ckpt)
    assert g_plain.abs().sum() > 0
    if cfg.refl_stop_range is None and not cfg.lv_samples:
        # Checkpointing did happen: steps whose input needs a gradient re-ran the model in
        # backward. (One-step LV/ReFL from a detached state save nothing to recompute.)
        assert policy.predict_calls - plain_calls > plain_calls


def lv_expected(chain, batch):
    """x0^i = M_1(√ᾱ_1·x0 + √(1-ᾱ_1)·ε^i) + c_1·θ and the LV loss gradient with x0 constant."""
    last = STEPS - 1
    ab = chain_alpha(last)
    x0 = batch.x_start.flatten(1)  # (B, D)
    eps = batch.lv_noise.flatten(2)  # (B, n, D)
    x1 = ab.sqrt() * x0[:, None] + (1 - ab).sqrt() * eps
    x0_i = x1 @ chain.M(last).T + chain.c[last] * THETA0  # (B, n, D)
    grad = -(chain.c[last] * (TARGET - x0_i)).mean((0, 1))  # mean over the n·B rewards
    return x0_i, grad


def chain_alpha(i: int) -> torch.Tensor:
    return ALPHAS_CUMPROD[STEPS - 1 - i].float().double()


@pytest.mark.parametrize("n", [1, 3])
def test_draft_lv_gradient_is_the_closed_form_with_x0_detached(n):
    policy, sampler, chain, reward = make_setup()
    cfg = DraftConfig(name="draft", truncation_steps=1, lv_samples=n)
    algo = DRaFT(cfg, sampler, reward, guidance=1.0)
    grad, batch, _, _ = run_draft(policy, algo)
    assert (batch.mode, batch.start) == ("lv", STEPS - 1)
    assert batch.lv_noise.shape == (len(SEEDS), n, DIM, 1, 1)
    # The re-noised state is the *final* sample of the full chain, detached.
    assert not batch.x_start.requires_grad
    x0 = chain_x0(policy, chain)
    assert_close(batch.x_start.flatten(1), x0, rtol=1e-5, atol=1e-5)
    x0_i, expected = lv_expected(chain, batch)
    # Rows i·B + b of the one-step denoisings are re-noising i of sample b.
    lib_x0_i = algo.final_samples(policy, batch).detach().flatten(1)
    assert_close(lib_x0_i, x0_i.transpose(0, 1).flatten(0, 1), rtol=1e-5, atol=1e-5)
    assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    # The match is discriminating: a gradient leaking through x0 would add
    # (∂x0^i/∂x0 · ∂x0/∂θ)ᵀ(y - x0^i) = (√ᾱ_1 M_1 J)ᵀ(y - x0^i), J = Σ_k P_k c_k.
    last = STEPS - 1
    jac = sum(chain.c[i] * chain.P(i) for i in range(STEPS))
    leak = -((TARGET - x0_i) @ (chain_alpha(last).sqrt() * chain.M(last) @ jac)).mean((0, 1))
    assert leak.norm() > 0.05 * expected.norm()


def test_draft_lv_variance_falls_like_one_over_n():
    """Anchors item 9: given x0, the mean-of-n LV gradient has covariance
    c_1²(1 - ᾱ_1)·M_1M_1ᵀ / n per sample (and /B for a batch mean)."""
    policy, sampler, chain, reward = make_setup()
    last, batch_size, batches = STEPS - 1, 4, 400
    cov_one = chain.c[last] ** 2 * (1 - chain_alpha(last)) * chain.M(last) @ chain.M(last).T
    traces = {}
    for n in (1, 4):
        cfg = DraftConfig(name="draft", truncation_steps=1, lv_samples=n)
        algo = DRaFT(cfg, sampler, reward, guidance=1.0)
        residuals = []
        for j in range(batches):
            seeds = range(1000 + j * batch_size, 1000 + (j + 1) * batch_size)
            grad, batch, _, _ = run_draft(policy, algo, seeds)
            # E[grad | x0]: the closed form with the re-noising noise at its mean, 0.
            x0 = batch.x_start.flatten(1)
            mean_x0_i = chain_alpha(last).sqrt() * x0 @ chain.M(last).T + chain.c[last] * THETA0
            residuals.append(grad + (chain.c[last] * (TARGET - mean_x0_i)).mean(0))
        residuals = torch.stack(residuals)
        mean_sd = (cov_one.diagonal().max() / (n * batch_size * batches)) ** 0.5
        assert residuals.mean(0).abs().max() < 4 * mean_sd  # E[residual] = 0
        traces[n] = float(torch.cov(residuals.T).trace())
        expected = float(cov_one.trace()) / (n * batch_size)
        assert traces[n] == pytest.approx(expected, rel=0.2), n
    assert 3.0 < traces[1] / traces[4] < 5.3


def test_alignprop_truncation_range_draws_every_k_in_the_range_and_nothing_else():
    policy, sampler, chain, reward = make_setup()
    for lo, hi in [(2, 3), (1, STEPS), (2, 2)]:
        algo = DRaFT(DraftConfig(name="draft", truncation_range=(lo, hi)), sampler, reward, 1.0)
        gen = torch.Generator().manual_seed(0)
        plans = {algo.plan(gen) for _ in range(300)}
        assert plans == {(STEPS - k, "chain") for k in range(lo, hi + 1)}
    # And each iteration's gradient is the DRaFT-K closed form for the K it drew.
    algo = DRaFT(DraftConfig(name="draft", truncation_range=(1, STEPS)), sampler, reward, 1.0)
    x0 = chain_x0(policy, chain)
    seen = set()
    for g in range(12):
        grad, batch, _, _ = run_draft(policy, algo, generator_seed=g)
        seen.add(batch.start)
        expected = chain.draft_loss_grad(x0, TARGET, first_step=batch.start)
        assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert len(seen) > 1


def test_refl_rewards_the_one_step_x0_prediction():
    policy, sampler, chain, reward = make_setup()
    lo, hi = 1, 2
    algo = DRaFT(DraftConfig(name="draft", refl_stop_range=(lo, hi)), sampler, reward, 1.0)
    gen = torch.Generator().manual_seed(0)
    assert {algo.plan(gen) for _ in range(200)} == {(k, "refl") for k in range(lo, hi + 1)}
    seen = set()
    for g in range(8):
        grad, batch, loss, stats = run_draft(policy, algo, generator_seed=g)
        k = batch.start
        seen.add(k)
        assert batch.mode == "refl" and stats["grad_steps"] == 1
        x_k = chain.run(policy.initial_noise(SEEDS).flatten(1), THETA0, 0, k)
        assert_close(batch.x_start.flatten(1), x_k, rtol=1e-5, atol=1e-5)
        ab = chain_alpha(k)
        eps = x_k @ chain.weights[k].T + THETA0
        x0_hat = (x_k - (1 - ab).sqrt() * eps) / ab.sqrt()
        lib = algo.final_samples(policy, batch).detach().flatten(1)
        assert_close(lib, x0_hat, rtol=1e-5, atol=1e-5)
        rewards = -0.5 * ((x0_hat - TARGET) ** 2).sum(1)
        assert stats["reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-5)
        assert float(loss) == pytest.approx(-float(rewards.mean()), rel=1e-5)
        # ∂x̂0/∂θ = -√((1-ᾱ)/ᾱ)·I, so ∂(-mean r)/∂θ = mean_b √((1-ᾱ)/ᾱ)·(y - x̂0_b).
        expected = ((1 - ab) / ab).sqrt() * (TARGET - x0_hat).mean(0)
        assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert seen == {lo, hi}


def test_draft_rejects_a_non_differentiable_reward():
    _, sampler, _, _ = make_setup()
    blackbox = QuadraticReward(TARGET, differentiable=False)
    with pytest.raises(ValueError, match=r"differentiable.*quadratic-blackbox"):
        DRaFT(DraftConfig(name="draft"), sampler, blackbox, guidance=1.0)
