"""`raydraft bench system`: the Ray runtime against the single-process trainer.

Four tables, each measured side by side in one run:
0. the default: `raydraft train` of the shipped default config as a user runs it, through
   Ray and with --local, on the idle machine and beside a process that keeps one core busy:
   seconds per iteration, and seconds from the command to its first iteration;
1. overhead: images/s of the Ray system in sync mode over the single-process trainer,
   same toy work and thread budget (real sampling, reward serving and updates), on one
   local Ray instance (as are tables 2 and 3);
2. async vs sync: learner busy fraction and images/s with stage costs in chosen
   proportions (the real toy work plus sleeps), for 1, 2, 4, 8 rollout workers;
3. weight sync: seconds to publish a state of a given size to N workers and have each
   hold it as tensors, through the object store and through the broadcast group.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import ray
import torch

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options
from raydraft.config import load_config
from raydraft.data.prompts import PromptBatch
from raydraft.rollout import RolloutResult
from raydraft.run_dir import RunDirectory
from raydraft.trainer import Trainer
from raydraft_ray.broadcast_group import BroadcastGroup, plan_buckets
from raydraft_ray.cluster import connect, rendezvous_address
from raydraft_ray.engine import RayEngine
from raydraft_ray.learner import LearnerActor
from raydraft_ray.rollout_worker import RolloutWorker
from raydraft_ray.weight_sync import (
    WEIGHTS_GROUP,
    CollectiveSync,
    ObjectStoreSync,
    WeightsMessage,
    from_message,
)

DEFAULTS = {
    "steps": 6,
    # stage seconds per iteration (the whole batch on one worker): sampling dominates,
    # as in Flow-GRPO on SD3.5; the update is a third of it, scoring a tenth.
    "rollout_s": 3.0,
    "reward_s": 0.3,
    "update_s": 1.0,
    "workers": "1,2,4,8",
    "sizes_mb": "1,16,128,512",
    "sync_workers": "1,4",
    "parts": "default,overhead,schedule,sync",
    "default_steps": 8,
}
# The embedded default's own work (64 images of 10 steps per iteration), minus its logging.
QUIET = [
    "logging.progress_bar=false",
    "logging.sample_every=0",
    "logging.eval_per_category=0",
    "checkpoint.every=0",
]
TOY = [
    *QUIET,
    "sampler.num_steps=4",
    "data.prompts_per_step=4",
    "algorithm.group_size=4",
    "learner.minibatch_size=16",
]


def train_command(engine: str, steps: int, run_dir: str, busy_core: bool) -> dict[str, float]:
    """`raydraft train` of the default in a fresh process (beside a bounded busy loop when
    `busy_core`): median seconds per iteration after the first, and the first's latency."""
    command = [sys.executable, "-m", "raydraft", "train", "--max-steps", str(steps)]
    command += ["--run-dir", run_dir, *(["--local"] if engine == "local" else [])]
    burner = None
    if busy_core:  # another program's busy loop, at the user's priority, ended below
        burner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err.stderr[-3000:]}") from None
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    rows = RunDirectory(run_dir).read_metrics()
    return {
        "iteration_s": statistics.median(r["time_step_s"] for r in rows[1:]),
        "time_to_first_iteration_s": rows[0]["time_to_first_iteration_s"],
    }


BUSY_LOOP = "import time\nend = time.time() + 900\nwhile time.time() < end: pass"


def default_config(steps: int, run_root: str) -> dict[tuple[str, bool], dict[str, float]]:
    """{(engine, busy_core): train_command's figures}, each engine idle, then loaded."""
    shutil.rmtree(run_root, ignore_errors=True)
    return {
        (engine, busy): train_command(
            engine, steps, f"{run_root}/{engine}-{'busy' if busy else 'idle'}", busy
        )
        for busy in (False, True)
        for engine in ("ray", "local")
    }


def _images_per_s(trainer: Trainer, steps: int) -> float:
    trainer.train_step()  # warm-up: first calls, allocations, replica start
    start = time.perf_counter()
    images = sum(len(trainer.engine.iterate()[0]) for _ in range(steps))
    return images / (time.perf_counter() - start)


def overhead(steps: int, threads: int, run_root: str) -> dict[str, float]:
    """Same config, same thread budget: sync mode never overlaps roles, so each uses all."""
    cfg = load_config("toy-flowgrpo", [*QUIET, f"torch_threads={threads}"])
    torch.set_num_threads(threads)
    local = _images_per_s(Trainer(cfg, f"{run_root}/local"), steps)
    engine = RayEngine(cfg)
    try:
        distributed = _images_per_s(Trainer(cfg, f"{run_root}/ray", engine=engine), steps)
    finally:
        engine.close()
    return {"local_images_per_s": local, "ray_images_per_s": distributed}


class TimedWorker(RolloutWorker):
    """The real toy rollout plus sleeps standing in for a large model's sampling and reward."""

    def __init__(self, cfg: dict, index: int, rollout_s: float, reward_s: float, n: int) -> None:
        super().__init__(cfg, index)
        self.per_image = (rollout_s + reward_s) / n

    def generate(self, batch: PromptBatch, min_version: int) -> RolloutResult:
        result = super().generate(batch, min_version)
        time.sleep(self.per_image * len(batch.prompts))
        return result


class TimedLearner(LearnerActor):
    """The real toy update plus a sleep; reports the whole as its update time."""

    def __init__(self, cfg: dict, rank: int, world_size: int, update_s: float) -> None:
        super().__init__(cfg, rank, world_size)
        self.update_s = update_s

    def update(self, result: RolloutResult) -> dict[str, float]:
        start = time.perf_counter()
        metrics = super().update(result)
        time.sleep(self.update_s)
        return metrics | {"time_update_s": time.perf_counter() - start}


def _bound(cls: type, *extra) -> type:
    """`cls` with extra constructor arguments fixed (Ray instantiates the actor class)."""

    class Bound(cls):
        def __init__(self, *args) -> None:
            super().__init__(*args, *extra)

    Bound.__name__ = Bound.__qualname__ = cls.__name__
    return Bound


def schedule(
    mode: str, workers: int, steps: int, rollout_s: float, reward_s: float, update_s: float
) -> dict[str, float]:
    cfg = load_config(
        "toy-flowgrpo",
        [
            *TOY, f"ray.mode={mode}", f"ray.rollout_workers={workers}",
            "torch_threads=1", "ray.worker_cpus=0.1", "ray.learner_cpus=0.1",
            "ray.reward_serving.num_cpus=0.1",
        ],
    )  # fmt: skip
    n = cfg.data.prompts_per_step * cfg.algorithm.group_size
    engine = RayEngine(
        cfg,
        worker_class=_bound(TimedWorker, rollout_s, reward_s, n),
        learner_class=_bound(TimedLearner, update_s),
    )
    try:
        engine.iterate()  # warm-up
        start = time.perf_counter()
        busy = images = 0.0
        for _ in range(steps):
            result, metrics = engine.iterate()
            busy += metrics["time_update_s"]
            images += len(result)
        wall = time.perf_counter() - start
    finally:
        engine.close()
    return {"images_per_s": images / wall, "learner_busy": busy / wall}


@ray.remote(num_cpus=0.1, concurrency_groups={WEIGHTS_GROUP: 1})
class Receiver:
    """Takes published weights as tensors, as a rollout worker does (both transports)."""

    def set_weights(self, message: WeightsMessage) -> int:
        state = from_message(message)
        return sum(t.numel() for t in state.values())

    def open_weight_group(self, host, port, rank, world_size, buckets, timeout_s) -> None:
        self.buckets = buckets
        self.group = BroadcastGroup(host, port, rank, world_size, torch.device("cpu"), timeout_s)

    def receive_weights(self) -> int:
        return self.group.receive(self.buckets)[0]


@ray.remote(num_cpus=0.1)
class Sender:
    """A learner rank 0 that only holds a state of the chosen size and broadcasts it."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
        self.version = 0

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def weights(self) -> WeightsMessage:
        return WeightsMessage(self.version, {k: v.numpy() for k, v in self.state.items()})

    def weight_buckets(self, bucket_bytes: int):
        self.buckets = plan_buckets(self.state, bucket_bytes)
        return self.buckets

    def open_weight_group(self, host, port, world_size, timeout_s) -> None:
        self.group = BroadcastGroup(host, port, 0, world_size, torch.device("cpu"), timeout_s)

    def send_weights(self) -> int:
        return self.group.send(self.state, self.buckets, self.version)


def weight_sync(size_mb: int, workers: int, transport: str, repeats: int = 3) -> float:
    """Median seconds from publish to every worker holding the tensors."""
    per_tensor = 4 * 2**20  # 4 MiB tensors, as a model's state dict has many
    n_tensors = max(1, size_mb * 2**20 // per_tensor)
    numel = min(size_mb * 2**20, per_tensor) // 4
    state = {f"w{i}": np.ones(numel, np.float32) for i in range(n_tensors)}
    sender = Sender.remote(state)
    receivers = [Receiver.remote() for _ in range(workers)]
    sync = ObjectStoreSync() if transport == "object_store" else CollectiveSync(256, 60)
    ray.get(sync.open(sender, receivers))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(sync.publish(sender, receivers))
        times.append(time.perf_counter() - start)
    for actor in (sender, *receivers):
        ray.kill(actor)
    return statistics.median(times)


def run(options: list[str]) -> None:
    opts = parse_options("system", options, DEFAULTS)
    steps = opts["steps"]
    stage = {k: opts[k] for k in ("rollout_s", "reward_s", "update_s")}
    threads = os.cpu_count() or 1
    print(f"# raydraft bench system: {describe()}, ray {ray.__version__}")
    parts = opts["parts"].split(",")
    if "default" in parts:  # first: each command starts (and stops) a Ray instance of its own
        d = default_config(opts["default_steps"], "/tmp/raydraft-bench-default")
        ray_idle, local_idle = d["ray", False], d["local", False]
        print(
            f"\n## 0. The default (`raydraft train`, {opts['default_steps']} iterations; loaded: "
            "beside a busy loop on one core)"
        )
        print("| | Ray | --local | Ray / local |\n|---|---|---|---|")
        ratio = ray_idle["iteration_s"] / local_idle["iteration_s"]
        print(
            f"| s per iteration, idle | {ray_idle['iteration_s']:.2f} | "
            f"{local_idle['iteration_s']:.2f} | {ratio:.3f} |"
        )
        print(
            f"| s to the first iteration, idle | {ray_idle['time_to_first_iteration_s']:.1f} | "
            f"{local_idle['time_to_first_iteration_s']:.1f} | |"
        )
        loaded = {e: d[e, True]["iteration_s"] for e in ("ray", "local")}
        print(
            f"| s per iteration, loaded | {loaded['ray']:.2f} | {loaded['local']:.2f} | "
            f"{loaded['ray'] / loaded['local']:.3f} |"
        )
        print(
            f"| loaded / idle | {loaded['ray'] / ray_idle['iteration_s']:.2f} | "
            f"{loaded['local'] / local_idle['iteration_s']:.2f} | |"
        )
    connect(None, num_cpus=max(8, threads))
    if "overhead" in parts:
        o = overhead(steps, threads, "/tmp/raydraft-bench-system")
        ratio = o["ray_images_per_s"] / o["local_images_per_s"]
        print("\n## 1. Overhead (the embedded default's work: 64 images x 10 steps per "
              "iteration; sync, 1 worker, 1 learner)")  # fmt: skip
        print("| single process img/s | Ray sync img/s | ratio |\n|---|---|---|")
        print(f"| {o['local_images_per_s']:.2f} | {o['ray_images_per_s']:.2f} | {ratio:.3f} |")
    if "schedule" in parts:
        print(
            f"\n## 2. Async vs sync (stages: rollout {stage['rollout_s']} s, reward "
            f"{stage['reward_s']} s per batch on one worker; update {stage['update_s']} s)"
        )
        print("| workers | sync img/s | async img/s | async/sync | sync learner busy | "
              "async learner busy |\n|---|---|---|---|---|---|")  # fmt: skip
        for w in (int(x) for x in opts["workers"].split(",")):
            s = schedule("sync", w, steps, **stage)
            a = schedule("async", w, steps, **stage)
            print(
                f"| {w} | {s['images_per_s']:.2f} | {a['images_per_s']:.2f} | "
                f"{a['images_per_s'] / s['images_per_s']:.2f} | {s['learner_busy']:.0%} | "
                f"{a['learner_busy']:.0%} |"
            )
    if "sync" in parts:
        print("\n## 3. Weight sync, publish to every worker holding tensors (median of 3)")
        counts = [int(x) for x in opts["sync_workers"].split(",")]
        transports = ("object_store", "collective")
        header = " | ".join(f"{t} {n} worker(s) s" for t in transports for n in counts)
        print(f"| state MiB | {header} |\n|---|" + "---|" * (len(counts) * 2))
        for mb in (int(x) for x in opts["sizes_mb"].split(",")):
            cells = " | ".join(f"{weight_sync(mb, n, t):.3f}" for t in transports for n in counts)
            print(f"| {mb} | {cells} |")
    ray.shutdown()
