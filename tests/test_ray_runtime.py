"""The Ray runtime against a real local Ray cluster (one per module) and real Ray Serve."""

import json
import math
import os
import re
import signal
import sys
import time
import urllib.request

import numpy as np
import pytest
import ray
import torch
from both_engines import train_both_engines
from overrides import RAY_SMALL
from ray import serve
from text_images import as_batch, render_text
from tiny_models import save_tiny_clip, save_tiny_sd

from raydraft.config import RewardsConfig, load_config
from raydraft.data.shapes import split_specs
from raydraft.rewards.registry import build_reward
from raydraft.rollout import generate
from raydraft.trainer import LocalEngine, Trainer
from raydraft_ray.cluster import connect
from raydraft_ray.engine import RayEngine
from raydraft_ray.learner import LearnerGroup
from raydraft_ray.reward_serving import deploy_rewards, remote_reward


@pytest.fixture(scope="module", autouse=True)
def cluster():
    started = connect(None, num_cpus=4)
    yield
    if started:
        serve.shutdown()  # stops the driver-side handle routers too, which would re-init Ray
        ray.shutdown()


# Full fine-tuning, its weights broadcast over a gloo group in 1 MiB buckets (about 11).
COLLECTIVE = [
    "model.lora.enabled=false",
    "ray.weight_sync=collective",
    "ray.weight_bucket_mb=1",
    "ray.weight_sync_timeout_s=30",
]
# The default suite keeps within 15 minutes on 2 cores: a few variants whose code paths
# another default test already runs are slow (`python -m pytest -m slow` runs them).
SLOW = pytest.mark.slow
SHARDED = ["model.lora.enabled=false", "learner.fsdp=true"]
FSDP = [*COLLECTIVE, *SHARDED, "ray.learners=2"]


def config(*overrides, name="toy-flowgrpo"):
    groups = ["algorithm.group_size=4"] if name in ("toy-flowgrpo", "toy-nft") else []
    return load_config(name, [*RAY_SMALL, *groups, *overrides])


@pytest.mark.parametrize(
    ("name", "transport"),
    [
        ("toy-flowgrpo", []),
        # collective: in the worker-death tests too; FSDP: in the sharded-state test;
        # explore: in test_explore.py's one-process run and this test's fp8 case.
        pytest.param("toy-flowgrpo", COLLECTIVE, marks=SLOW),
        pytest.param("toy-flowgrpo", FSDP, marks=SLOW),
        ("toy-flowgrpo", ["ray.placement=colocated", "ray.rollout_workers=1"]),
        ("toy-nft", []),  # rollouts sample the trailing old policy
        # on-policy, v_old from the learner (tested in one process in test_nft_analytic.py)
        pytest.param(
            "toy-nft",
            ["learner.old_policy_decay_rate=0", "learner.old_policy_decay_max=0"],
            marks=SLOW,
        ),
        ("toy-flowgrpo", ["rollout.precision=fp8"]),
        pytest.param(
            "toy-nft", ["rollout.precision=fp8", "rollout.explore={candidates: 6}"], marks=SLOW
        ),
    ],
    ids=[
        "object-store-lora",
        "collective-full",
        "fsdp-2-learners",
        "colocated-swapping",
        "diffusion-nft",
        "nft-on-policy",
        "fp8-rollouts",
        "fp8-explore-regenerate",
    ],
)
def test_sync_mode_equals_the_single_process_trainer(tmp_path, name, transport):
    """The single-process trainer samples each rollout worker's part of the batch on its
    own, as the workers do, and the actors run one torch thread like this process: with one
    learner every kernel sees the same shapes on both sides, so the runs must agree bit for
    bit (on CPUs whose kernels round differently per batch size too)."""
    torch.set_num_threads(1)
    # Live weights on both sides: an EMA would shrink the differences this test looks for.
    cfg = config(
        "algorithm.kl_beta=0.1",
        "ray.rollout_workers=2",
        "learner.ema_decay=null",
        *transport,
        name=name,
    )
    runs = train_both_engines(cfg, tmp_path)
    expected, got, weights = runs.expected, runs.got, runs.ray_weights
    state_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    assert [m["weight_sync_bytes"] for m in got] == [state_bytes] * 2
    assert all((m["swap_s"] > 0) == runs.swaps for m in got)
    keys = ["policy_loss", "kl_ref", "reward_mean", "grad_norm"]
    keys += [] if name == "toy-nft" else ["ratio_mean"]  # DiffusionNFT has no likelihood ratio
    low_precision = ("mismatch_log_ratio_max", "is_ess", "explore_reward_mean")
    keys += [key for key in low_precision if key in expected[0]]
    assert (cfg.rollout.precision == "full") == (len(keys) == 4 + (name != "toy-nft"))
    local_weights = runs.local.policy.trainable_state()
    if cfg.ray.learners == 1:
        for key in keys:
            assert [m[key] for m in got] == [m[key] for m in expected], key
        for key, value in local_weights.items():
            assert torch.equal(weights[key], value), key
        return
    # Two ranks each take half of every micro-batch and sum their gradients: other batch
    # shapes and another summation order, so float32 rounding differs (relative 1e-7 per
    # operation). Losses and statistics agree to that rounding; Adam's normalised step
    # (up to lr) turns rounding in a near-zero gradient into a visible weight difference.
    # Measured after 2 steps, FSDP and plain data parallel alike: 0.2% of elements off by
    # > 1e-6, none by more than 1e-4 (lr 1e-3). A wrong shard would move most by far more.
    for key in keys:
        assert [m[key] for m in got] == pytest.approx([m[key] for m in expected], abs=1e-6), key
    diffs = torch.cat([(weights[k] - v).abs().flatten() for k, v in local_weights.items()])
    assert (diffs > 1e-6).float().mean() < 0.01
    assert diffs.max() < 0.5 * cfg.learner.lr


@pytest.mark.parametrize(
    "name,sharding",
    [
        ("toy-flowgrpo", []),
        ("toy-draft-lv", []),
        pytest.param("toy-flowgrpo", SHARDED, marks=SLOW),  # FSDP: in the sync test too
    ],
    ids=["flowgrpo", "draft-lv", "flowgrpo-fsdp"],
)
def test_two_learners_with_half_batches_give_the_full_batch_gradient(name, sharding):
    extra = ["learner.minibatch_size=8"] if name == "toy-flowgrpo" else []
    cfg = config(*extra, *sharding, name=name)
    local = LocalEngine(cfg)
    batch = local.prompts.next_batch()
    result = generate(local.algorithm, local.policy, local.reward, batch, cfg.seed, False)
    gradients = {}
    for n in (1, 2):
        group = LearnerGroup(
            cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"learners": n})})
        )
        try:
            metrics = group.update(ray.put(result))
            assert metrics["optimizer_steps"] == 1
            gradients[n] = ray.get(group.leader.last_gradients.remote())
            if n == 2 and not sharding:  # every rank applied the same update
                a, b = ray.get([g.weights.remote() for g in group.actors])
                assert all((a.state[k] == b.state[k]).all() for k in a.state)
        finally:
            group.shutdown()
    assert any(g.abs().sum() > 0 for g in gradients[1])
    # Two ranks each run half of every micro-batch and sum their gradients: other batch
    # shapes and another summation order, so float32 rounding differs. Rounding scales with
    # the model's gradients, not with each element (a near-zero element is a cancelling
    # sum of large terms), so each element must agree within 2^10 float32 roundings of the
    # largest gradient element; measured: at most 20. A wrong slice or weight is off by at
    # least one row's share of the gradient, about 2^21 roundings.
    scale = max(float(g.abs().max()) for g in gradients[1])
    for one, two in zip(gradients[1], gradients[2], strict=True):
        torch.testing.assert_close(two, one, rtol=0, atol=2**-14 * scale)


def test_a_sharded_learner_state_is_full_and_loads_sharded_or_whole():
    """Checkpoints of an FSDP group hold full tensors: they load into a fresh sharded group
    or a single rank and come back out unchanged (weights, Adam moments, EMA)."""
    cfg = config(*SHARDED, "learner.ema_decay=0.9", "learner.minibatch_size=8")
    local = LocalEngine(cfg)
    result = generate(local.algorithm, local.policy, local.reward, local.prompts.next_batch(),
                      cfg.seed, False)  # fmt: skip

    def group(n):
        return LearnerGroup(
            cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"learners": n})})
        )

    sharded = group(2)
    try:
        sharded.update(ray.put(result))
        tensors, optimizer, version = ray.get(sharded.leader.state.remote())
    finally:
        sharded.shutdown()
    assert (
        version == 1
        and optimizer["state"][0]["exp_avg"].shape == optimizer["state"][0]["exp_avg_sq"].shape
    )
    full_shapes = {k: v.shape for k, v in local.policy.trainable_state().items()}
    assert {k: v.shape for k, v in tensors["trainable"].items()} == full_shapes
    for n in (2, 1):
        fresh = group(n)
        try:
            fresh.load_state(tensors, optimizer, version)
            again, optimizer_again, _ = ray.get(fresh.leader.state.remote())
        finally:
            fresh.shutdown()
        for part in ("trainable", "ema"):
            for key, value in tensors[part].items():
                assert torch.equal(again[part][key], value), (n, part, key)
        for index, moments in optimizer["state"].items():
            for key, value in moments.items():
                assert torch.equal(optimizer_again["state"][index][key], value), (n, key)


@pytest.mark.parametrize(
    "transport",
    [[], pytest.param(COLLECTIVE, marks=SLOW)],  # collective: in the worker-death test too
    ids=["object-store-lora", "collective-full"],
)
def test_async_mode_never_trains_on_rollouts_older_than_max_staleness(tmp_path, transport):
    cfg = config(
        "ray.mode=async",
        "ray.max_staleness=1",
        "ray.rollout_workers=2",
        "logging.metrics_port=0",
        *transport,
    )
    engine = RayEngine(cfg)
    try:
        trainer = Trainer(cfg, tmp_path / "run", engine=engine)
        metrics = [trainer.train_step() for _ in range(4)]
    finally:
        engine.close()
    exported = urllib.request.urlopen(trainer.metrics_url, timeout=10).read().decode()
    assert re.search(r"raydraft_weight_sync_bytes\{.*\} [1-9]", exported)
    assert re.search(r"raydraft_rollouts_in_flight\{.*\} 1\.0", exported)
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["staleness"] <= 1 for m in metrics)
    assert any(m["staleness"] == 1 for m in metrics)  # the overlap did happen
    trainer.run.flush_rollouts()
    rows = [r for p in (tmp_path / "run/rollouts").glob("*.parquet") for r in _rows(p)]
    for row in rows:  # the version each sample was drawn with, within the bound
        assert row["iteration"] - 1 <= row["policy_version"] <= row["iteration"]


def _rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize(
    ("how", "transport"),
    [
        pytest.param("ray.kill", [], marks=SLOW),  # a restart re-syncs: collective's is harder
        ("SIGKILL", COLLECTIVE),
        pytest.param("SIGKILL", [], marks=SLOW),
        pytest.param("ray.kill", COLLECTIVE, marks=SLOW),
    ],
    ids=[
        "ray.kill-object-store-lora",
        "SIGKILL-collective-full",
        "SIGKILL-object-store-lora",
        "ray.kill-collective-full",
    ],
)
def test_a_dead_rollout_worker_is_restarted_and_its_batch_sampled_once(tmp_path, how, transport):
    """`ray.kill` is a death Ray knows of; SIGKILL is a crash it learns of afterwards
    (like `os._exit` in the worker: the process is gone without a word)."""
    cfg = config("ray.rollout_workers=2", *transport)
    engine = RayEngine(cfg)
    try:
        trainer = Trainer(cfg, tmp_path / "run", engine=engine)
        trainer.train_step()
        victim = engine.workers[1]
        old_pid = ray.get(victim.pid.remote())
        engine._dispatch()  # iteration 2 is in flight on both workers ...
        if how == "ray.kill":
            ray.kill(victim, no_restart=False)
        else:
            os.kill(old_pid, signal.SIGKILL)
        metrics = trainer.train_step()  # ... and one of them dies under it
        assert metrics["reissued_parts"] >= 1
        assert ray.get(engine.workers[1].pid.remote()) != old_pid
        trainer.train_step()
        trainer.run.flush_rollouts()
    finally:
        engine.close()
    rows = [r for p in (tmp_path / "run/rollouts").glob("*.parquet") for r in _rows(p)]
    per_iteration = {}
    for row in rows:
        per_iteration.setdefault(row["iteration"], []).append((row["prompt"], row["seed"]))
    assert sorted(per_iteration) == [0, 1, 2]
    for samples in per_iteration.values():
        assert len(samples) == 8 and len(set(samples)) == 8


def test_a_worker_dead_at_a_weight_sync_is_restarted_and_the_group_rebuilt(tmp_path):
    cfg = config("ray.rollout_workers=2", *COLLECTIVE)
    engine = RayEngine(cfg)
    try:
        trainer = Trainer(cfg, tmp_path / "run", engine=engine)
        trainer.train_step()
        old_pid = ray.get(engine.workers[0].pid.remote())
        os.kill(old_pid, signal.SIGKILL)
        engine._publish()  # the sync after an update, with a dead member in the group
        assert ray.get(engine.workers[0].pid.remote()) != old_pid
        metrics = trainer.train_step()
        assert metrics["policy_version"] == 2 and metrics["staleness"] == 0
        trainer.run.flush_rollouts()
    finally:
        engine.close()
    rows = [r for p in (tmp_path / "run/rollouts").glob("*.parquet") for r in _rows(p)]
    assert {(r["iteration"], r["policy_version"]) for r in rows} == {(0, 0), (1, 1)}


@SLOW  # test_reward_serving.py kills a model reward's replica under load
def test_a_killed_reward_replica_is_replaced_and_the_request_retried(tmp_path):
    from raydraft_ray.reward_serving import app_name

    cfg = config()
    engine = RayEngine(cfg)
    try:
        trainer = Trainer(cfg, tmp_path / "run", engine=engine)
        trainer.train_step()
        handle = serve.get_deployment_handle("toy-geneval", app_name("toy-geneval"))
        pid = handle.pid.remote().result()
        os.kill(pid, 9)
        metrics = trainer.train_step()
        assert metrics["policy_version"] == 2
        assert handle.pid.remote().result() != pid
    finally:
        engine.close()


@SLOW  # colocated roles also run in the sync test's colocated-swapping case
def test_colocated_workers_share_their_learner_ranks_bundles(tmp_path):
    cfg = config("ray.placement=colocated", "ray.rollout_workers=2", "ray.learners=2")
    engine = RayEngine(cfg)
    try:
        metrics = Trainer(cfg, tmp_path / "run", engine=engine).train_step()
        placement = engine.learners.placement.id.hex()

        def group_of(actor):  # sent by value: the workers cannot import this module
            return ray.get_runtime_context().get_placement_group_id()

        for role in (engine.workers, engine.learners.actors):
            assert ray.get([a.__ray_call__.remote(group_of) for a in role]) == [placement] * 2
        # Each bundle holds one learner rank and one worker (0.5 + 0.5 CPU): all used.
        for i in range(2):
            bundle = f"CPU_group_{i}_{placement}"
            assert ray.cluster_resources()[bundle] == 1.0
            assert ray.available_resources().get(bundle, 0.0) == 0.0
    finally:
        engine.close()
    assert metrics["policy_version"] == 1


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [  # DRaFT keeps its reward in the learner: the workers are the first role to wait for
        ("toy-draft-lv", "ray.worker_cpus=64", r"rollout worker\(s\) of 64.0 CPU.*ray.worker_cpus"),
        (
            "toy-flowgrpo",
            "ray.reward_serving.num_cpus=64",
            r"raydraft-reward-toy-geneval did not start.*ray.reward_serving.num_cpus",
        ),
    ],
    ids=["rollout-worker", "reward-replica"],
)
def test_roles_the_cluster_cannot_place_fail_with_the_shortfall_named(name, override, message):
    cfg = config(override, "ray.startup_timeout_s=5", name=name)
    with pytest.raises(RuntimeError, match=message):
        RayEngine(cfg)
    deadline = time.monotonic() + 10  # ray.kill and placement group removal are asynchronous
    while time.monotonic() < deadline and free_cpus() != ray.cluster_resources()["CPU"]:
        time.sleep(0.2)
    assert free_cpus() == ray.cluster_resources()["CPU"]  # nothing kept


def free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


@pytest.mark.parametrize(
    "resume_step", [1, pytest.param(2, marks=SLOW)], ids=["mid-epoch", "epoch-boundary"]
)
def test_after_a_learner_dies_resume_equals_the_uninterrupted_run(tmp_path, resume_step):
    """Four prompts, two per step: step 2 ends an epoch exactly."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(s.text for s in split_specs("train")[:4]))
    cfg = config(f"data.prompts={prompts}", "checkpoint.every=1", "checkpoint.keep=5")

    def run(name):
        engine = RayEngine(cfg)
        return engine, Trainer(cfg, tmp_path / name, engine=engine)

    engine, trainer = run("uninterrupted")
    try:
        trainer.fit(3)
        expected = ray.get(engine.learners.leader.weights.remote())
    finally:
        engine.close()

    engine, trainer = run("interrupted")
    try:
        trainer.fit(2)
        ray.kill(engine.learners.leader)
        with pytest.raises(ray.exceptions.RayActorError):
            trainer.train_step()
    finally:
        engine.close()

    engine, trainer = run("interrupted")
    try:
        checkpoint = tmp_path / f"interrupted/checkpoints/step-{resume_step:06d}"
        assert trainer.resume(checkpoint) == resume_step
        trainer.fit(3)
        got = ray.get(engine.learners.leader.weights.remote())
    finally:
        engine.close()
    assert got.version == expected.version == 3
    for key, value in expected.state.items():
        assert (got.state[key] == value).all(), key
    rows = [r for p in (tmp_path / "interrupted/rollouts").glob("*.parquet") for r in _rows(p)]
    steps = sorted(r["step"] for r in rows)
    assert steps == sorted([1] * 8 + [2] * 8 + [3] * 8)  # every step logged once
    lines = (tmp_path / "interrupted/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_served_differentiable_reward_gives_draft_the_local_gradient():
    """DRaFT-LV with toy-clipscore in the learner vs behind Serve (d score / d image)."""
    cfg = config(name="toy-draft-lv")
    local = LocalEngine(cfg)
    batch = local.prompts.next_batch()
    result = generate(local.algorithm, local.policy, None, batch, cfg.seed, False)
    gradients, rewards = {}, {}
    for served in (False, True):
        serving = cfg.ray.reward_serving.model_copy(update={"serve_draft_rewards": served})
        run_cfg = cfg.model_copy(
            update={"ray": cfg.ray.model_copy(update={"reward_serving": serving})}
        )
        apps = deploy_rewards(run_cfg.rewards, serving, 120) if served else {}
        group = LearnerGroup(run_cfg)
        try:
            rewards[served] = group.update(ray.put(result))["reward_mean"]
            gradients[served] = ray.get(group.leader.last_gradients.remote())
        finally:
            group.shutdown()
            for app in apps.values():
                serve.delete(app)
    # The replica gets the batch as one request (it fits one chunk) and runs one torch
    # thread, as the learner does: the same computation, so the same numbers exactly.
    assert len(batch) <= cfg.ray.reward_serving.images_per_request
    assert rewards[True] == rewards[False]
    assert any(g.abs().sum() > 0 for g in gradients[False])
    for here, served in zip(gradients[False], gradients[True], strict=True):
        assert torch.equal(served, here)


def test_model_rewards_served_score_as_in_process(tmp_path):
    """PickScore on a tiny CLIP and OCR on its real shipped weights as Serve deployments,
    each built in its replica from its name and options: one chunk each, the same
    computation, so the same scores exactly. A component's own settings and runtime_env
    reach its replicas only, its `py_executable` too (the way a reward runs in a venv of
    its own: here a launcher that marks the environment, then starts this interpreter)."""
    interpreter = tmp_path / "reward-python"
    interpreter.write_text(
        f'#!/bin/sh\nexport RAYDRAFT_INTERPRETER=launcher\nexec {sys.executable} "$@"\n'
    )
    interpreter.chmod(0o755)
    rewards = RewardsConfig(
        components=[
            {
                "name": "pickscore",
                "options": {"path": save_tiny_clip(tmp_path / "clip")},
                "serving": {"num_cpus": 0.2, "max_batch_size": 4},
                "runtime_env": {
                    "env_vars": {"RAYDRAFT_REWARD_ENV": "pickscore's own"},
                    "py_executable": str(interpreter),
                },
            },
            {"name": "ocr", "weight": 2.0},
        ]
    )
    images = as_batch([render_text("hello world"), render_text("raydraft")])
    prompts = ['a sign that says "hello world"', 'a sign that says "hello world"']
    serving = config().ray.reward_serving
    apps = deploy_rewards(rewards, serving, 120)
    try:
        served = remote_reward(rewards, serving)
        got = served.score(images, prompts, [{}, {}])
        environments = {
            name: serve.get_deployment_handle(name, app)
            .environment.remote(["RAYDRAFT_REWARD_ENV", "RAYDRAFT_INTERPRETER"])
            .result()
            for name, app in apps.items()
        }
    finally:
        for app in apps.values():
            serve.delete(app)
    assert environments["pickscore"]["RAYDRAFT_REWARD_ENV"] == "pickscore's own"
    assert environments["pickscore"]["RAYDRAFT_INTERPRETER"] == "launcher"
    assert environments["ocr"]["RAYDRAFT_REWARD_ENV"] is None
    assert environments["ocr"]["RAYDRAFT_INTERPRETER"] is None
    local = build_reward(rewards)
    assert torch.equal(got, local.score(images, prompts, [{}, {}]))
    assert served.last_components["ocr"].tolist() == [1.0, 0.0]
    for name, scores in local.last_components.items():
        assert torch.equal(served.last_components[name], scores), name
    assert served.last_details.keys() == local.last_details.keys() == {"ocr/failed"}
    assert torch.equal(served.last_details["ocr/failed"], local.last_details["ocr/failed"])


def test_draft_lv_through_a_served_pickscore_trains_only_the_lora_weights(tmp_path):
    """DRaFT-LV on a tiny SD pipeline whose differentiable reward, PickScore on a tiny CLIP,
    lives in a Serve deployment: the gradient comes back from the replica."""
    reward = {"path": save_tiny_clip(tmp_path / "clip"), "differentiable": True}

    def frozen_weights(policy):  # defined in the test: sent to the learner by value
        pipe = policy.pipe
        weights = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
        for part in ("vae", "text_encoder"):
            weights |= {f"{part}.{k}": v for k, v in getattr(pipe, part).state_dict().items()}
        return {k: v.detach().clone() for k, v in weights.items()}

    cfg = config(
        "model.family=sd",
        f"model.path={save_tiny_sd(tmp_path / 'sd')}",
        "model.lora.rank=4",
        "sampler.kind=ddim",
        "sampler.noise_level=0.0",
        "data.prompts=toy-colors",
        f"rewards.components=[{{name: pickscore, options: {json.dumps(reward)}}}]",
        "ray.reward_serving.serve_draft_rewards=true",
        name="toy-draft-lv",
    )
    engine = RayEngine(cfg)
    try:
        before = ray.get(engine.learners.leader.weights.remote()).state
        metrics = Trainer(cfg, tmp_path / "run", engine=engine).train_step()
        after = ray.get(engine.learners.leader.weights.remote()).state
        frozen = ray.get(
            engine.learners.actors[0].__ray_call__.remote(
                lambda actor: frozen_weights(actor.learner.policy)
            )
        )
    finally:
        engine.close()
    assert list(engine.reward_apps) == ["pickscore"]
    assert metrics["optimizer_steps"] == 1 and math.isfinite(metrics["grad_norm"])
    assert metrics["grad_norm"] > 0
    assert all("lora" in key for key in after)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    base = frozen_weights(engine.policy)  # the driver's copy never trained
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)
