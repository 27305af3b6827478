"""RayEngine: the controller that runs training iterations on Ray actors.

Per iteration: split the prompt batch (whole groups) across the rollout workers, which
sample it and have it scored by the Serve reward deployments; join the parts; send the
rollout (one object-store copy; a single worker's own object) to every learner rank;
publish the new weights.

`sync` samples each iteration with the newest weights (strictly on-policy). `async`
keeps `max_staleness` further batches in flight, so sampling overlaps the update; a batch
dispatched when version v was published is trained at version <= v + max_staleness, and
the losses use the recorded behaviour log-probs. A worker that dies is restarted by Ray
(or replaced) and its unfinished parts are sent again; only collected parts reach the
rollout log, so each prompt batch is logged exactly once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raydraft.build import build_policy, prompt_stream
from raydraft.config import ExperimentConfig, reward_serving_for
from raydraft.data.prompts import PromptBatch
from raydraft.models.base import Policy
from raydraft.rollout import RolloutResult
from raydraft_ray.cluster import WORKER_FAILURES, failed_calls, wait_for_start
from raydraft_ray.learner import LearnerActor, LearnerGroup
from raydraft_ray.reward_serving import deploy_rewards, rewards_on_serve, wait_until_running
from raydraft_ray.rollout_worker import RolloutWorker
from raydraft_ray.weight_sync import (
    WEIGHTS_GROUP,
    BroadcastFailed,
    from_message,
    unresponsive,
    weight_sync_for,
)

MAX_REISSUES = 5


@dataclass
class InFlight:
    """One dispatched iteration: its parts, who samples them, where the results land."""

    iteration: int
    parts: list[PromptBatch]
    workers: list[int]
    refs: list[ray.ObjectRef]
    min_version: int
    prompts_after: dict[str, int]  # the prompt stream's state once this batch was drawn


def required_cpus(cfg: ExperimentConfig) -> int:
    """Logical CPUs the roles reserve (a local instance declares at least this many)."""
    r = cfg.ray
    rewards = 0.0
    if rewards_on_serve(cfg):
        for component in cfg.rewards.components:
            settings = reward_serving_for(r.reward_serving, component)
            rewards += settings.max_replicas * settings.num_cpus
    total = r.learners * r.learner_cpus + r.rollout_workers * r.worker_cpus + rewards
    return math.ceil(total - 1e-9)  # Serve's controller reserves none


class RayEngine:
    def __init__(
        self,
        cfg: ExperimentConfig,
        worker_class: type = RolloutWorker,
        learner_class: type = LearnerActor,
    ) -> None:
        """`worker_class` / `learner_class`: the role implementations (subclasses let the
        system benchmark give stages chosen costs)."""
        self.cfg = cfg
        self.worker_class = ray.remote(concurrency_groups={WEIGHTS_GROUP: 1})(worker_class)
        self.learner_class = learner_class
        self.ray_cfg = cfg.ray
        self.cfg_dict = cfg.model_dump(mode="json")
        self.prompts = prompt_stream(cfg)
        self.trained_prompts = self.prompts.state_dict()
        self.reward_apps: dict[str, str] = {}
        self.learners: LearnerGroup | None = None
        self.workers: list = []
        self.weights = weight_sync_for(cfg)
        self.swaps = cfg.ray.placement == "colocated" and cfg.ray.colocated_swap
        self.in_flight: deque[InFlight] = deque()
        self.reissued_parts = 0
        try:
            self._start_roles()
        except BaseException:
            self.close()  # nothing of a failed start stays on the cluster
            raise

    # -- roles ------------------------------------------------------------------------
    def _start_roles(self) -> None:
        """All roles start at once: reward replicas, learners and workers each import torch
        and load a model, and their waits overlap (the default's roles were ready 2 s
        sooner on a 2-core laptop: 13 s instead of 15 s)."""
        r = self.ray_cfg
        if rewards_on_serve(self.cfg):
            self.reward_apps = deploy_rewards(
                self.cfg.rewards, r.reward_serving, r.startup_timeout_s, wait=False
            )
        self.learners = LearnerGroup(self.cfg, self.learner_class)
        if self.swaps:  # out of the device before the workers load onto it; they sample first
            self.learners.offload()
        self.workers = [self._start_worker(i) for i in range(r.rollout_workers)]
        # The driver's copy (sample grids, evaluation), loaded while the roles load theirs.
        self.policy: Policy = build_policy(self.cfg.model)
        wait_until_running(list(self.reward_apps.values()), r.startup_timeout_s)
        what = f"{r.rollout_workers} rollout worker(s) of {r.worker_cpus} CPU, {r.worker_gpus} GPU"
        wait_for_start([w.pid.remote() for w in self.workers], what, r.startup_timeout_s)
        leader = self.learners.leader
        ray.get(self.weights.open(leader, self.workers))
        ray.get(self.weights.publish(leader, self.workers))

    def _start_worker(self, index: int):
        r = self.ray_cfg
        placement = {}
        if r.placement == "colocated":  # beside learner rank `index`, in its bundle
            placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.learners.placement, index
            )
        return self.worker_class.options(
            num_cpus=r.worker_cpus,
            num_gpus=r.worker_gpus,
            max_restarts=r.worker_max_restarts,
            max_task_retries=0,
            **placement,
        ).remote(self.cfg_dict, index)

    def _publish(self) -> None:
        try:
            acks = self.weights.publish(self.learners.leader, self.workers)
        except BroadcastFailed:  # the group is closed: restart the dead, rebuild, resend
            self._revive(unresponsive(self.workers, self.ray_cfg.weight_sync_timeout_s))
            return
        if self.ray_cfg.mode == "sync":
            self._await_workers(acks)

    def _await_workers(self, calls: list[ray.ObjectRef]) -> None:
        """Wait for one call per worker; the workers that died under it are revived (with
        the newest weights, on the device)."""
        dead = failed_calls(calls)
        if dead:
            self._revive(dead)

    def _revive(self, dead: list[int]) -> None:
        """Workers that failed: restart them and bring every worker to the newest weights
        (collective: the group is rebuilt, so a worker failing meanwhile joins the list;
        an error no dead worker explains is raised)."""
        for _ in range(MAX_REISSUES + 1):
            for index in dead:
                self._restart(index)
            dead = self.weights.catch_up(self.learners.leader, self.workers, dead)
            if not dead:
                return
        raise RuntimeError(f"rollout workers {dead} kept failing while receiving weights")

    def _restart(self, index: int, wait_s: float = 60.0) -> None:
        """Wait for Ray's restart of a failed worker; replace it when it is gone for good
        (out of restarts) or not back within `wait_s`."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.workers[index].version.remote(), timeout=wait_s)
                return
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                time.sleep(0.5)
            except (*WORKER_FAILURES, ray.exceptions.GetTimeoutError):
                break
        self.workers[index] = self._start_worker(index)

    # -- iterations -------------------------------------------------------------------
    def _depth(self) -> int:
        return 1 if self.ray_cfg.mode == "sync" else self.ray_cfg.max_staleness + 1

    def _dispatch(self) -> None:
        batch = self.prompts.next_batch()
        parts = batch.split(len(self.workers))
        staleness = 0 if self.ray_cfg.mode == "sync" else self.ray_cfg.max_staleness
        min_version = max(0, batch.iteration - staleness)
        workers = list(range(len(parts)))
        refs = [
            self.workers[w].generate.remote(part, min_version)
            for w, part in zip(workers, parts, strict=True)
        ]
        self.in_flight.append(
            InFlight(batch.iteration, parts, workers, refs, min_version, self.prompts.state_dict())
        )

    def _collect(self, job: InFlight) -> tuple[RolloutResult, ray.ObjectRef]:
        """The joined rollout and a ref to it for the learners: the worker's own object
        when one worker sampled the whole batch (no second copy through the driver)."""
        results, refs = [], []
        for part, w, ref in zip(job.parts, job.workers, job.refs, strict=True):
            for attempt in range(MAX_REISSUES + 1):
                try:
                    results.append(ray.get(ref))
                    refs.append(ref)
                    break
                except WORKER_FAILURES:
                    if attempt == MAX_REISSUES:
                        raise
                    self._revive([w])
                    self.reissued_parts += 1
                    ref = self.workers[w].generate.remote(part, job.min_version)
        if len(results) == 1:
            return results[0], refs[0]
        result = RolloutResult.concat(results)
        return result, ray.put(result)

    def iterate(self) -> tuple[RolloutResult, dict[str, float]]:
        while len(self.in_flight) < self._depth():
            self._dispatch()
        job = self.in_flight.popleft()
        result, shared = self._collect(job)
        swap_s = self._swap(to_learners=True)
        metrics = self.learners.update(shared)
        self.trained_prompts = job.prompts_after
        swap_s += self._swap(to_learners=False)
        start = time.perf_counter()
        self._publish()
        return result, metrics | {
            "swap_s": swap_s,
            "weight_sync_bytes": float(self.weights.last_bytes),
            "weight_sync_s": time.perf_counter() - start,
            "reissued_parts": float(self.reissued_parts),
            "rollouts_in_flight": float(len(self.in_flight)),
        }

    def _swap(self, to_learners: bool) -> float:
        """Colocated roles take turns on the device: seconds spent moving them."""
        if not self.swaps:
            return 0.0
        start = time.perf_counter()
        if to_learners:
            self._await_workers([w.offload.remote() for w in self.workers])
            self.learners.onload()
        else:
            self.learners.offload()
            self._await_workers([w.onload.remote() for w in self.workers])
        return time.perf_counter() - start

    # -- state ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The learner's state and the prompt cursor of the last trained batch: batches
        still in flight are drawn and sampled again after a resume."""
        tensors, optimizer, version = ray.get(self.learners.leader.state.remote())
        return tensors, optimizer, {"prompts": self.trained_prompts, "policy_version": version}

    def load_state(
        self, tensors: dict[str, Any], optimizer: dict[str, Any], state: dict[str, Any]
    ) -> None:
        if self.in_flight:
            raise RuntimeError("load_state only before the first iteration")
        self.learners.load_state(tensors, optimizer, state["policy_version"])
        self.prompts.load_state_dict(state["prompts"])
        self.trained_prompts = state["prompts"]
        self._publish()

    @contextmanager
    def inference_weights(self) -> Iterator[None]:
        message = ray.get(self.learners.leader.inference_weights.remote())
        self.policy.load_trainable(from_message(message), message.version)
        yield

    def close(self) -> None:
        self.in_flight.clear()  # killing the workers ends the batches still in flight
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if self.learners is not None:
            self.learners.shutdown()
        for app in self.reward_apps.values():
            serve.delete(app)
