"""The learner's correction of low-precision rollouts on the toy model: Flow-GRPO's old
log-probs recomputed in full precision (the first micro-batch's ratio is exactly 1) with
truncated importance weights, and DiffusionNFT's old predictions recomputed."""

import pytest
import torch
from overrides import SMALL

from raydraft.config import load_config
from raydraft.rollout import generate
from raydraft.trainer import LocalEngine, Trainer


def planned(name, *overrides):
    """An engine and its first iteration's rollout through the FP8 copy, and the plan."""
    torch.manual_seed(0)
    cfg = load_config(name, [*SMALL, "rollout.precision=fp8", "learner.ema_decay=null", *overrides])
    engine = LocalEngine(cfg)
    batch = engine.prompts.next_batch()
    result = generate(engine.algorithm, engine.policy, engine.reward, batch, cfg.seed, True,
                      engine.low_precision)  # fmt: skip
    updates, _ = engine.algorithm.plan_updates(
        result.rollout, result.rewards, result.valid, cfg.learner.minibatch_size,
        cfg.learner.grad_accum_steps, torch.Generator().manual_seed(0),
    )  # fmt: skip
    engine.policy.train(True)
    return cfg, engine, result, [micro for step in updates for micro in step]


@pytest.mark.parametrize("precision", ["fp8", "mxfp4"])
def test_flow_grpo_ratios_start_at_one_after_the_correction(precision):
    cfg, engine, result, micro_batches = planned("toy-flowgrpo", f"rollout.precision={precision}")
    assert result.precision == precision
    assert {r["precision"] for r in result.records} == {precision}
    algorithm, policy, clip = engine.algorithm, engine.policy, cfg.algorithm.clip_range
    behaviour = torch.cat([micro.old_log_prob for micro in micro_batches])
    stats = algorithm.recompute_behaviour(policy, micro_batches, cfg.rollout.is_truncation)
    full = torch.cat([micro.old_log_prob for micro in micro_batches])
    # Uncorrected, the first update's ratios would be full / behaviour probabilities.
    # Measured on this config (3 SDE steps, noise level 1; 10 steps in brackets), the
    # share outside the clip: FP8 0 % (|log-ratio| ≤ 2.2e-4), NVFP4 0 % (1.9 %), MXFP4
    # 6.2 % (8.1 %).
    outside = ((full - behaviour).exp() - 1).abs() > clip
    print(f"{precision}: per-step ratios outside the clip ±{clip} without the correction: "
          f"{outside.float().mean():.1%} of {len(outside)}")  # fmt: skip
    assert (full != behaviour).any()
    assert outside.any() == (precision == "mxfp4")
    _, first = algorithm.loss(policy, micro_batches[0])
    assert first["ratio_mean"] == 1.0 and first["ratio_std"] == 0.0
    weights = torch.cat([micro.is_weight for micro in micro_batches])
    assert weights.max() <= cfg.rollout.is_truncation and weights.min() > 0
    assert stats["mismatch_log_ratio_max"] > 0 and 0 < stats["is_ess"] <= 1


def test_diffusion_nft_old_predictions_are_recomputed_in_full_precision():
    cfg, engine, _, micro_batches = planned("toy-nft", "algorithm.group_size=4")
    low = [micro.old_prediction.clone() for micro in micro_batches]
    stats = engine.algorithm.recompute_behaviour(engine.policy, micro_batches, 2.0)
    assert 0 < stats["mismatch_prediction_rel_mean"] < 0.2
    micro = micro_batches[0]
    times = engine.algorithm._times(micro.steps, micro.x_t)
    with torch.no_grad():
        full = engine.policy.predict(micro.x_t, times, micro.cond, cfg.sampler.guidance_scale)
    assert torch.equal(micro.old_prediction, full) and not torch.equal(low[0], full)


def test_a_low_precision_run_trains_and_logs_the_mismatch(tmp_path):
    overrides = ["rollout.precision=nvfp4", "rollout.lora=merge", "model.lora.enabled=true"]
    cfg = load_config("toy-flowgrpo", [*SMALL, *overrides, "rollout.fidelity_every=0"])
    metrics = Trainer(cfg, tmp_path).train_step()
    for key in ("mismatch_log_ratio_mean", "is_truncated_fraction", "is_ess", "policy_loss"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["time_requantize_s"] > 0  # the merged copy was built for this version
