"""The single-process trainer: end-to-end steps, exact resume, the run directory contract."""

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from overrides import SMALL

from raydraft.build import build_policy
from raydraft.checkpoint import load_for_inference
from raydraft.cli import main
from raydraft.config import DEFAULT_CONFIG, ConfigError, load_config
from raydraft.data.shapes import CATEGORIES
from raydraft.learner import scheduled_lr
from raydraft.rewards.base import CompositeReward
from raydraft.rewards.registry import make_reward
from raydraft.rollout import generate
from raydraft.trainer import Trainer

GRPO = ["algorithm.group_size=4", *SMALL]
GROUPED = ("toy-flowgrpo", "toy-nft")  # configs whose prompts come in groups


def small_overrides(config: str, *extra: str) -> list[str]:
    return [*(GRPO if config in GROUPED else SMALL), *extra]


def trainer(tmp_path, name, overrides, config="toy-flowgrpo") -> Trainer:
    return Trainer(load_config(config, overrides), tmp_path / name)


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("toy-flowgrpo", ["algorithm.kl_beta=0.1"]),
        ("toy-flowgrpo", ["model.lora.enabled=true", "algorithm.kl_beta=0.1"]),
        (
            "toy-flowgrpo",
            ["sampler.kind=cps", "sampler.noise_level=0.8", "sampler.sde_window_size=1"],
        ),
        ("toy-nft", []),
        ("toy-nft", ["model.lora.enabled=true", "algorithm.kl_beta=0"]),
        ("toy-draft-k", []),
        ("toy-draft-lv", []),
        ("toy-draft-k", ["algorithm.truncation_steps=null", "algorithm.truncation_range=[1, 3]"]),
        ("toy-draft-k", ["algorithm.truncation_steps=null", "algorithm.refl_stop_range=[0, 2]"]),
    ],
)
def test_one_step_of_each_algorithm_updates_only_trainable_weights(tmp_path, config, extra):
    t = trainer(tmp_path, "run", small_overrides(config, *extra), config)
    unet = t.policy.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in t.policy.text_encoder.state_dict().items()}
    metrics = t.train_step()
    assert metrics["policy_version"] == 1 and metrics["optimizer_steps"] >= 1
    assert torch.isfinite(torch.tensor(metrics["reward_mean"]))
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert changed and changed <= {k.replace(".default", "") for k in trainable} | trainable
    for k, v in t.policy.text_encoder.state_dict().items():
        assert torch.equal(v, text_before[k])
    if "kl_beta=0.1" in extra:
        assert metrics["kl_ref"] >= 0


def test_flow_grpo_fast_trains_only_inside_the_sde_window(tmp_path):
    t = trainer(tmp_path, "run", [*GRPO, "sampler.kind=cps", "sampler.sde_window_size=1"])
    engine, generator = t.engine, torch.Generator().manual_seed(0)
    rollout = engine.algorithm.rollout(t.policy, engine.prompts.next_batch(), generator)
    traj = rollout.trajectory
    (window,) = traj.sde_mask.nonzero().flatten().tolist()
    assert (traj.log_probs[:, window] != 0).all() and (
        traj.log_probs.sum(1) == traj.log_probs[:, window]
    ).all()
    updates, _ = engine.algorithm.plan_updates(
        rollout, torch.rand(8), torch.ones(8, dtype=torch.bool), 4, 1, generator
    )
    assert {micro.step for step in updates for micro in step} == {window}


def test_an_iteration_whose_groups_all_tie_trains_nothing(tmp_path):
    """Equal rewards in every group carry no signal: no step, the weights stay, and the
    version still advances (an easy prompt set makes this common, not a corner case)."""
    t = trainer(tmp_path, "run", GRPO)
    engine = t.engine
    batch = engine.prompts.next_batch()
    result = generate(engine.algorithm, t.policy, engine.reward, batch, 0, True)
    result = replace(result, rewards=torch.full_like(result.rewards, 0.5))
    before = t.policy.trainable_state()
    metrics = engine.learner.update(result)
    assert metrics["optimizer_steps"] == 0 and metrics["samples_trained"] == 0
    assert metrics["zero_std_fraction"] == 1.0 and metrics["grad_norm"] == 0.0
    assert metrics["policy_version"] == 1
    for name, value in t.policy.trainable_state().items():
        assert torch.equal(value, before[name])


def test_a_weighted_sum_of_rewards_logs_each_component(tmp_path):
    mix = "rewards.components=[{name: toy-geneval}, {name: toy-clipscore, weight: 0.5}]"
    t = trainer(tmp_path, "run", [*GRPO, mix])
    batch = t.engine.prompts.next_batch()
    result = generate(t.engine.algorithm, t.policy, t.engine.reward, batch, 0, True)
    for record, total in zip(result.records, result.rewards.tolist(), strict=True):
        parts = record["reward/toy-geneval"] + 0.5 * record["reward/toy-clipscore"]
        assert parts == pytest.approx(total, abs=1e-6)
    stats = result.reward_stats()
    checker = [r["reward/toy-geneval"] for r in result.records]
    assert stats["reward_mean/toy-geneval"] == pytest.approx(sum(checker) / len(checker))
    assert "reward_mean/toy-clipscore" in stats
    alone = generate(t.engine.algorithm, t.policy, make_reward("toy-geneval"), batch, 0, True)
    assert "reward/toy-geneval" not in alone.records[0] and len(alone.reward_stats()) == 2


def test_a_group_with_same_initial_noise_differs_only_by_its_sde_noise(tmp_path):
    t = trainer(tmp_path, "run", [*GRPO, "algorithm.same_initial_noise=true"])
    batch = t.engine.prompts.next_batch()
    whole = generate(
        t.engine.algorithm, t.policy, t.engine.reward, batch, 0, True
    ).rollout.trajectory
    ids = batch.prompt_ids.tolist()
    assert len(set(ids)) == 2
    start, end = whole.latents[:, 0], whole.latents[:, -1]
    for i in range(len(ids)):
        for j in range(i):
            assert torch.equal(start[i], start[j]) == (ids[i] == ids[j])
            assert not torch.equal(end[i], end[j])
    parts = [
        generate(t.engine.algorithm, t.policy, t.engine.reward, p, 0, True) for p in batch.split(2)
    ]
    split = torch.cat([p.rollout.trajectory.latents for p in parts])
    assert torch.equal(split[:, 0], start)  # the initial noise comes from the seeds alone
    # Later latents went through the network in half batches, which CPU kernels may round
    # differently (float32, 3 steps: 2e-6 measured on AVX-512); a draw from another seed
    # moves them by order 1 (rows of one group differ by more than 2 at every step).
    torch.testing.assert_close(split, whole.latents, rtol=0, atol=1e-4)


def test_the_cosine_schedule_sets_each_iterations_lr_from_its_number(tmp_path):
    cfg = load_config("toy-nft", [*GRPO, "learner.lr_schedule=cosine", "max_steps=4"])
    lr = cfg.learner.lr
    assert [scheduled_lr(cfg, i) for i in (0, 2, 4, 9)] == pytest.approx([lr, lr / 2, 0, 0])
    t = Trainer(cfg, tmp_path / "run")
    assert [t.train_step()["lr"] for _ in range(2)] == pytest.approx([lr, scheduled_lr(cfg, 1)])
    assert t.engine.learner.optimizer.param_groups[0]["lr"] == scheduled_lr(cfg, 1)
    constant = load_config("toy-nft", [*GRPO, "max_steps=4"])
    assert scheduled_lr(constant, 3) == lr


def test_first_grpo_minibatch_is_exactly_on_policy(tmp_path):
    t = trainer(tmp_path, "run", [*GRPO, "learner.minibatch_size=8"])
    metrics = t.train_step()  # one minibatch of all 8 samples: nothing changed before it
    assert metrics["optimizer_steps"] == 1
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clipfrac"] == 0.0


OLD_POLICY = ["learner.old_policy_decay_rate=0.25", "learner.old_policy_decay_max=0.6"]


@pytest.mark.parametrize(
    ("config", "extra"),
    [("toy-flowgrpo", []), ("toy-nft", OLD_POLICY), ("toy-draft-lv", [])],
)
def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path, config, extra):
    overrides = small_overrides(config, "learner.ema_decay=0.9", *extra)
    straight = trainer(tmp_path, "straight", overrides, config)
    expected = straight.fit(4)

    first = trainer(tmp_path, "resumed", overrides, config)
    head = first.fit(2)
    second = trainer(tmp_path, "resumed", overrides, config)
    assert second.resume() == 2
    tail = second.fit(4)

    keys = [k for k in expected[0] if not k.startswith("time_") and k != "images_per_s"]
    assert [[m[k] for k in keys] for m in head + tail] == [[m[k] for k in keys] for m in expected]
    for name, value in straight.policy.trainable_state().items():
        assert torch.equal(value, second.policy.trainable_state()[name]), name
    averages = ["ema", "old_policy"] if extra else ["ema"]
    for average in averages:
        a, b = (getattr(t.engine.learner, average).shadow for t in (straight, second))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), average
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_rollouts_sample_the_trailing_old_policy(tmp_path, monkeypatch):
    """With `learner.old_policy_decay_*` each rollout samples old_v = η_v·old_{v-1} +
    (1 - η_v)·θ_v, η_v = min(0.25 v, 0.6), and DiffusionNFT's v_old is that policy's
    prediction (made by the learner, which holds it, for every row it trains); the
    trained weights move on their own."""
    t = trainer(tmp_path, "run", small_overrides("toy-nft", *OLD_POLICY), "toy-nft")
    engine, policy, algorithm = t.engine, t.policy, t.engine.algorithm
    trained = []  # every micro-batch the loss sees: its v_old was made before any step
    loss = algorithm.loss
    monkeypatch.setattr(algorithm, "loss", lambda p, b: (trained.append(b), loss(p, b))[1])
    old = [p.detach().clone() for p in engine.learner.params]  # old_0 = θ_0
    for version in (1, 2, 3):
        trained.clear()
        result, update = engine.iterate()
        assert result.rollout.old_predictions is None  # the learner holds the old policy
        assert trained and all(micro.old_prediction is not None for micro in trained)
        live = policy.trainable_state()
        with torch.no_grad():
            for p, value in zip(engine.learner.params, old, strict=True):
                p.copy_(value)
            for micro in trained:
                times = algorithm._times(micro.steps, micro.x_t)
                behaviour = policy.predict(micro.x_t, times, micro.cond, algorithm.guidance)
                assert torch.equal(behaviour, micro.old_prediction), version
        policy.load_trainable(live, policy.version)
        eta = min(0.25 * version, 0.6)
        assert update["old_policy_decay"] == eta
        for shadow, p in zip(old, engine.learner.params, strict=True):
            shadow.lerp_(p.detach(), 1 - eta)
        assert all(
            torch.equal(a, b) for a, b in zip(old, engine.learner.old_policy.shadow, strict=True)
        )
        assert not all(
            torch.equal(a, b.detach()) for a, b in zip(old, engine.learner.params, strict=True)
        )


def test_train_command_writes_the_run_directory_contract(tmp_path, monkeypatch):
    """The run directory is the engine's business of neither: single-process here (the
    command through Ray: tests/test_loopback.py, tests/test_ray_job.py)."""
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in GRPO if not o.startswith(("logging.sample", "checkpoint"))]
    code = main(
        ["train", "--local", "--max-steps", "2", *overrides, "logging.sample_every=1",
         "checkpoint.every=1"]
    )  # fmt: skip
    assert code == 0
    run = tmp_path / "runs" / DEFAULT_CONFIG
    assert load_config(run / "config.yaml").max_steps == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"step", "reward_mean", "images_per_s", "policy_version"} <= set(m)
    rows = pq.read_table(next((run / "rollouts").glob("*.parquet"))).to_pylist()
    assert len(rows) == 8 and {"prompt", "seed", "policy_version", "reward"} <= set(rows[0])
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "step-000000.png", "step-000001.png", "step-000002.png",
    ]  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (run / "report.html").is_file() and (run / "reward_curve.png").is_file()
    resume = ["train", "--local", "--resume", str(run), "--max-steps", "3"]
    assert main([*resume, "logging.progress_bar=false"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_config_exits_with_the_key_named(capsys):
    assert main(["train", "learner.lr=-1"]) == 2
    assert "learner.lr" in capsys.readouterr().err


def test_shapes_run_evaluates_base_and_final_and_draws_the_reward_curve(tmp_path, capsys):
    overrides = [
        *GRPO,
        "data.prompts=shapes-train",
        "rewards.components=[{name: toy-geneval}]",
        "logging.eval_per_category=2",
    ]
    t = trainer(tmp_path, "run", overrides)
    t.fit(1)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["base_step"] == 0 and report["final_step"] == 1
    for key in ("base", "final"):
        assert set(report[key]) == {*CATEGORIES, "overall"}
        assert all(0 <= v["strict"] <= v["clauses"] <= 1 for v in report[key].values())
    assert "overall" in capsys.readouterr().out
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 0


def test_a_second_run_from_the_same_base_reuses_its_base_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    overrides = [
        *GRPO,
        "data.prompts=shapes-train",
        "rewards.components=[{name: toy-geneval}]",
        "logging.eval_per_category=2",
    ]
    first = trainer(tmp_path, "first", overrides).record_eval("base")
    assert first["base_source"] == "evaluated"
    second = trainer(tmp_path, "second", overrides).record_eval("base")
    assert second["base_source"] == "cached" and second["base"] == first["base"]
    other = trainer(tmp_path, "other", [*overrides, "logging.eval_per_category=1"])
    assert other.record_eval("base")["base_source"] == "evaluated"  # other settings


def test_evaluation_is_only_for_the_shapes_world():
    with pytest.raises(ConfigError, match=r"logging\.eval_per_category"):
        load_config("toy-flowgrpo", ["data.prompts=toy-colors", "logging.eval_per_category=4"])


def test_eval_command_scores_a_runs_ema_weights_against_the_base(tmp_path, capsys):
    overrides = [*GRPO, "data.prompts=shapes-train", "rewards.components=[{name: toy-geneval}]"]
    t = trainer(tmp_path, "run", [*overrides, "learner.ema_decay=0.5"])
    t.fit(1)
    assert main(["eval", "--run-dir", str(tmp_path / "run"), "--per-category", "1"]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["final_step"] == 1 and report["per_category"] == 1
    assert "step 1" in capsys.readouterr().out
    policy = build_policy(t.cfg.model)
    load_for_inference(policy, tmp_path / "run")
    shadows, params = t.engine.learner.ema.shadow, t.engine.learner.params
    assert any(not torch.equal(s, p) for s, p in zip(shadows, params, strict=True))
    for p, shadow in zip(policy.trainable_parameters(), shadows, strict=True):
        assert torch.equal(p, shadow)


def test_a_rewards_per_sample_details_reach_the_rollout_log_and_the_metrics(tmp_path):
    class Judged:  # reports a per-sample detail beside its score, as GenEval's `strict`
        name, differentiable = "judged", False

        def score(self, images, prompts, metadata):
            self.last_details = {"strict": (torch.arange(len(prompts)) % 2).float()}
            return torch.ones(len(prompts))

    t = trainer(tmp_path, "run", GRPO)
    batch = t.engine.prompts.next_batch()
    reward = CompositeReward([(Judged(), 1.0)])
    result = generate(t.engine.algorithm, t.policy, reward, batch, 0, True)
    strict = [i % 2 for i in range(len(batch))]
    assert [r["reward/judged/strict"] for r in result.records] == strict
    assert result.reward_stats()["reward_mean/judged/strict"] == sum(strict) / len(strict)
