"""DiffusionNFT against closed forms: the gradient at the sampling policy, the trust region
of a tie, reward ascent, and training points that depend only on each sample's seed.

The policy is a linear flow model v_θ(x, t) = W_t·x + θ (tests/analytic_policies.py) on a
real 4-step ODE `FlowSampler` (and an epsilon model on DDIM for the gradient identity); the
final sample is then affine in θ.
"""

from __future__ import annotations

import pytest
import torch
from analytic_policies import LinearPolicy, QuadraticReward, grouped_batch, random_weights
from torch.testing import assert_close

from raydraft.algorithms.diffusion_nft import (
    DiffusionNFT,
    NFTRollout,
    adaptive_x0_error,
    optimality,
)
from raydraft.config import DiffusionNFTConfig
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.sampling.samplers import DDIMSampler, FlowSampler

DIM, STEPS = 2, 4
TARGET = torch.tensor([1.0, -0.5], dtype=torch.float64)


def make_setup(prediction: str = "flow", **cfg):
    """A flow policy on the ODE, or an epsilon policy on deterministic DDIM."""
    if prediction == "flow":
        sampler = FlowSampler(flow_sigmas(STEPS), "ode")
    else:
        alphas = torch.tensor([0.8, 0.5, 0.25, 0.05], dtype=torch.float64)
        sampler = DDIMSampler(alphas, torch.arange(STEPS - 1, -1, -1), 1, 1.0, prediction)
    times = [sampler.model_time(i) for i in range(STEPS)]
    policy = LinearPolicy(times, random_weights(STEPS, DIM, 0.3, seed=1), prediction)
    algo = DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", **cfg), sampler, guidance=1.0)
    return policy, sampler, algo, QuadraticReward(TARGET, scale=1.0, differentiable=False)


def planned(policy, algo, reward, batch, rewards=None):
    rollout = algo.rollout(policy, batch, torch.Generator().manual_seed(0))
    if rewards is None:
        rewards = reward.score(rollout.images, batch.prompts, batch.metadata)
    valid = torch.ones(len(batch), dtype=torch.bool)
    updates, stats = algo.plan_updates(
        rollout, rewards, valid, len(batch), 1, torch.Generator().manual_seed(0)
    )
    return rollout, rewards, updates, stats


def gradient(policy, loss: torch.Tensor) -> torch.Tensor:
    policy.theta.grad = None
    loss.backward()
    return policy.theta.grad.clone()


def test_optimality_maps_clipped_advantages_onto_the_unit_interval():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert optimality(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize(("prediction", "beta"), [("flow", 0.1), ("flow", 1.0), ("epsilon", 1.0)])
def test_gradient_at_the_sampling_policy_is_advantage_weighted_flow_matching(prediction, beta):
    """At v_θ = v_old, ∂/∂θ of A_max/β·[r L(v⁺) + (1 - r) L(v⁻)] is A_max·(2r - 1)·∂L(v_θ)/∂θ
    for every β: the negative branch mirrors the positive one, so a tie adds nothing. x̂0 is
    linear in the model output for flow and epsilon models alike, so the same holds on DDIM."""
    policy, sampler, algo, reward = make_setup(prediction, beta=beta, timestep_fraction=1.0)
    _, _, updates, _ = planned(policy, algo, reward, grouped_batch(2, 4, 0))
    for micro in updates[0]:
        nft = gradient(policy, algo.loss(policy, micro)[0])
        out = policy.predict(micro.x_t, algo._times(micro.steps, micro.x_t), micro.cond, 1.0)
        x0_pred = sampler.predict_x0(out, micro.x_t, micro.steps)
        weights = algo.cfg.adv_clip_max * (2 * micro.optimality - 1)
        expected = gradient(policy, (weights * adaptive_x0_error(x0_pred, micro.x0)).mean())
        assert_close(nft, expected, rtol=1e-5, atol=1e-7)  # x̂0 and L are fp32
        assert nft.abs().sum() > 0


def test_tied_groups_stay_in_the_plan_and_add_no_gradient_at_the_sampling_policy():
    policy, _, algo, reward = make_setup()
    batch = grouped_batch(2, 4, 0)
    _, _, updates, stats = planned(policy, algo, reward, batch, torch.zeros(len(batch)))
    assert stats["zero_std_fraction"] == 1.0 and stats["samples_trained"] == len(batch)
    for micro in updates[0]:
        assert (micro.optimality == 0.5).all()
        assert gradient(policy, algo.loss(policy, micro)[0]).abs().max() < 1e-12


def test_tied_groups_leave_the_plan_when_not_trained():
    policy, _, algo, reward = make_setup(train_tied_groups=False)
    batch = grouped_batch(2, 4, 0)
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])  # group 0 ties
    _, _, updates, stats = planned(policy, algo, reward, batch, rewards)
    assert stats["zero_std_fraction"] == 0.5 and stats["samples_trained"] == 4
    assert len(updates) == 1
    for micro in updates[0]:  # only the untied group's four rows, at every training point
        assert len(micro) == 4 and (micro.optimality != 0.5).all()


def test_nft_moves_the_sample_mean_toward_the_reward_optimum():
    """r = -‖x0 - c‖²: the ODE's final sample is Aθ + (terms in x_T), and NFT's updates
    drive its mean toward c without any log-probability."""
    policy, _, algo, reward = make_setup(timestep_fraction=1.0)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=0.05)

    def mean_distance(seed: int) -> float:
        batch = grouped_batch(1, 256, seed)
        x0 = algo.rollout(policy, batch, torch.Generator()).x0
        return float((x0.flatten(1).mean(0) - TARGET).norm())

    start = mean_distance(10**6)
    for it in range(40):
        _, _, updates, _ = planned(policy, algo, reward, grouped_batch(4, 8, 100 * it))
        for micro_batches in updates:
            optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches:
                (algo.loss(policy, micro)[0] / len(micro_batches)).backward()
            optimizer.step()
    assert mean_distance(10**6) < 0.3 * start


def test_training_points_depend_only_on_each_samples_seed():
    """A batch split across workers gives the same rollout as the whole batch, and the
    recorded old predictions are the sampling policy's at the recorded points."""
    policy, sampler, algo, _ = make_setup(timestep_fraction=0.5)
    batch = grouped_batch(4, 4, 7)
    whole = algo.rollout(policy, batch, torch.Generator().manual_seed(0))
    parts = [algo.rollout(policy, p, torch.Generator().manual_seed(1)) for p in batch.split(2)]
    joined = NFTRollout.concat(parts)
    assert torch.equal(joined.steps, whole.steps)  # drawn from the seeds alone
    # The parts go through the policy in smaller batches, which BLAS kernels may round
    # differently: float64 values of order 1 after a few dozen operations agree to 1e-12,
    # the float32 images (x0 cast) to one float32 step (below 5e-7 under 4), while a
    # draw from another seed moves them by order 1.
    for key in ("x0", "x_t", "old_predictions"):
        assert_close(getattr(joined, key), getattr(whole, key), rtol=0, atol=1e-12)
    assert_close(joined.images, whole.images, rtol=0, atol=5e-7)
    assert whole.steps.shape == (len(batch), STEPS // 2)
    assert all(len(set(row)) == len(row) for row in whole.steps.tolist())
    for k in range(whole.steps.shape[1]):
        steps = whole.steps[:, k]
        noise = whole.x_t[:, k] - (1 - sampler.sigmas[steps].view(-1, 1, 1, 1)) * whole.x0
        assert noise.abs().sum() > 0  # fresh noise, not the sampling trajectory
        expected = policy.predict(whole.x_t[:, k], algo._times(steps, whole.x0), whole.cond, 1.0)
        assert_close(whole.old_predictions[:, k], expected)


def test_kl_penalty_uses_the_reference_policy():
    policy, _, algo, reward = make_setup(kl_beta=0.5)
    with torch.no_grad():
        policy.theta.fill_(0.2)
    _, _, updates, _ = planned(policy, algo, reward, grouped_batch(2, 4, 0))
    micro = updates[0][0]
    calls = policy.reference_calls
    loss, stats = algo.loss(policy, micro)
    assert policy.reference_calls == calls + 1
    assert stats["kl_ref"] == pytest.approx(0.04)  # (θ - θ_ref)² = 0.2² in every dimension
    without = DiffusionNFT(
        algo.cfg.model_copy(update={"kl_beta": 0.0}), algo.sampler, algo.guidance
    ).loss(policy, micro)[0]
    assert float((loss - without).detach()) == pytest.approx(0.5 * 0.04)


def test_an_on_policy_rollout_leaves_the_behaviour_to_the_learner_and_trains_the_same():
    """Without v_old in the rollout, the first step's loss takes its own forward pass and
    the later steps' predictions are made before any step (as `Learner.update` does): the
    same losses and the same θ as the rollout that recorded them; a later step whose
    predictions were not made is an error, not a silent on-policy loss."""

    def train(behaviour_in_rollout: bool) -> tuple[list[float], torch.Tensor]:
        policy, sampler, algo, reward = make_setup(timestep_fraction=0.5)
        algo = DiffusionNFT(algo.cfg, sampler, 1.0, behaviour_in_rollout)
        batch = grouped_batch(4, 4, 3)
        rollout = algo.rollout(policy, batch, torch.Generator().manual_seed(0))
        assert (rollout.old_predictions is None) != behaviour_in_rollout
        rewards = reward.score(rollout.images, batch.prompts, batch.metadata)
        updates, _ = algo.plan_updates(
            rollout, rewards, torch.ones(len(batch), dtype=torch.bool), 4, 1,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert len(updates) == 4 and all(m.first_step for m in updates[0])
        if not behaviour_in_rollout:
            with pytest.raises(RuntimeError, match="later optimizer step"):
                algo.loss(policy, updates[1][0])
            algo.recompute_behaviour(policy, [m for step in updates[1:] for m in step], 1.0)
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
        losses = []
        for micro_batches in updates:
            optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches:
                loss = algo.loss(policy, micro)[0]
                (loss / len(micro_batches)).backward()
                losses.append(float(loss.detach()))
            optimizer.step()
        return losses, policy.theta.detach().clone()

    recorded, theta_recorded = train(True)
    deferred, theta_deferred = train(False)
    assert deferred == pytest.approx(recorded, rel=1e-6)
    assert_close(theta_deferred, theta_recorded, rtol=1e-6, atol=1e-9)
    assert (theta_recorded - make_setup()[0].theta).abs().max() > 1e-3  # it trained
