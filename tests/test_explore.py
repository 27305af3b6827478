"""Explore, select, regenerate (`raydraft.explore`): the selection rules, candidate seeds
that do not depend on how a batch is split, and on the toy model that what reaches the
learner is exactly a full-precision rollout of the selected seeds."""

import math

import pytest
import torch
from overrides import SMALL

from raydraft.config import ConfigError, load_config
from raydraft.data.prompts import PromptBatch
from raydraft.explore import candidates_of, select
from raydraft.rewards.base import score_or_drop
from raydraft.rollout import generate
from raydraft.seeds import ROLLOUT, iteration_generator
from raydraft.trainer import LocalEngine, Trainer


def test_best_worst_and_top_k_keep_exactly_their_sets():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.9, 0.2, 0.6])
    valid = torch.ones(8, dtype=torch.bool)
    # best 2: 0.9 (1), 0.9 (5: the tie goes to the lower index first); worst 2: 0.1, 0.2
    assert select(rewards, valid, 4, "best_worst").tolist() == [1, 2, 5, 6]
    assert select(rewards, valid, 3, "best_worst").tolist() == [1, 2, 5]  # ceil / floor
    assert select(rewards, valid, 3, "top_k").tolist() == [1, 3, 5]
    dropped = valid.clone()
    dropped[2] = False  # a dropped reward is chosen by neither end
    assert select(rewards, dropped, 4, "best_worst").tolist() == [1, 4, 5, 6]


def test_candidate_seeds_are_the_groups_own():
    batch = PromptBatch(
        prompts=["a", "a", "b", "b"], prompt_ids=torch.tensor([0, 0, 1, 1]),
        seeds=torch.tensor([11, 12, 21, 22]), metadata=[{}] * 4, iteration=3,
    )  # fmt: skip
    whole = candidates_of(batch, 5)
    parts = [candidates_of(part, 5) for part in batch.split(2)]
    assert torch.equal(whole.seeds, torch.cat([p.seeds for p in parts]))
    assert whole.prompts == ["a"] * 5 + ["b"] * 5 and whole.iteration == 3
    assert len(set(whole.seeds.tolist())) == 10 and (whole.seeds >= 0).all()


def explored(name, *overrides):
    cfg = load_config(name, [*SMALL, "rollout.precision=fp8", *overrides])
    engine = LocalEngine(cfg)
    batch = engine.prompts.next_batch()
    result = generate(engine.algorithm, engine.policy, engine.reward, batch, cfg.seed, True,
                      engine.low_precision, engine.explorer)  # fmt: skip
    return cfg, engine, batch, result


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("toy-nft", ["algorithm.group_size=4", "rollout.explore={candidates: 8}"]),
        ("toy-flowgrpo", ["algorithm.group_size=4",
                          "rollout.explore={candidates: 6, preview_steps: 2}"]),
        ("toy-draft-lv", ["rollout.explore={candidates: 4, select: top_k}"]),
    ],
    ids=["nft-best-worst", "flowgrpo-best-worst", "draft-best-of-n"],
)  # fmt: skip
def test_regenerated_samples_are_full_precision_rollouts_of_the_selected_seeds(name, overrides):
    cfg, engine, batch, result = explored(name, *overrides)
    assert result.precision == "full"  # the learner never gets a low-precision sample
    seeds = torch.tensor([r["seed"] for r in result.records])
    assert len(seeds) == len(batch) and not set(seeds.tolist()) & set(batch.seeds.tolist())
    selected = batch.select(torch.arange(len(batch)))
    selected.seeds = seeds
    generator = iteration_generator(cfg.seed, batch.iteration, ROLLOUT)
    again = engine.algorithm.rollout(engine.policy, selected, generator)
    if name == "toy-draft-lv":
        assert torch.equal(again.x_start, result.rollout.x_start)
        return
    assert torch.equal(again.images, result.rollout.images)
    rewards, _ = score_or_drop(engine.reward, again.images, again.prompts, batch.metadata, True)
    assert torch.equal(result.rewards, rewards)  # full-precision rewards, not the preview's
    preview = torch.tensor([r["preview_reward"] for r in result.records])
    assert not torch.equal(preview, result.rewards)
    assert not math.isnan(result.stats["explore_reward_mean"])


def test_explore_needs_more_candidates_than_the_group():
    with pytest.raises(ConfigError, match="must exceed the group"):
        load_config("toy-nft", ["rollout.explore={candidates: 16}"])


def test_an_explore_run_trains(tmp_path):
    cfg = load_config("toy-nft", [*SMALL, "algorithm.group_size=4", "rollout.precision=nvfp4",
                                  "rollout.explore={candidates: 8, preview_steps: 2}"])  # fmt: skip
    metrics = Trainer(cfg, tmp_path).train_step()
    assert metrics["time_explore_s"] > 0 and math.isfinite(metrics["policy_loss"])
    assert "mismatch_prediction_rel_mean" not in metrics  # nothing to correct
