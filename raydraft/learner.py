"""The optimizer half of an iteration: plan the updates a rollout calls for and run them.

The single-process trainer owns one `Learner`; the Ray runtime runs one per learner
rank. With `world_size > 1` (torch.distributed already initialised by the caller) each
rank takes its slice of every micro-batch and the gradients are summed across ranks
before clipping, so N ranks take exactly the optimizer steps of one rank with the
whole batch (the per-sample loss terms are means, weighted here by slice size). With
`learner.fsdp` the ranks also shard weights, gradients and optimizer state
(`raydraft.sharding`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from raydraft.algorithms.base import Algorithm
from raydraft.config import ExperimentConfig
from raydraft.ema import EMA
from raydraft.models.base import Policy
from raydraft.offload import move_optimizer_state, move_policy, release_cached_memory
from raydraft.rollout import RolloutResult
from raydraft.seeds import UPDATE, iteration_generator
from raydraft.sharding import gather, scatter_like, scatter_optimizer_state


def scheduled_lr(cfg: ExperimentConfig, iteration: int) -> float:
    """The learning rate of an iteration under `learner.lr_schedule`."""
    if cfg.learner.lr_schedule == "constant":
        return cfg.learner.lr
    progress = min(iteration / cfg.max_steps, 1.0)
    return cfg.learner.lr * 0.5 * (1 + math.cos(math.pi * progress))


class Learner:
    def __init__(
        self,
        cfg: ExperimentConfig,
        policy: Policy,
        algorithm: Algorithm,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.algorithm = algorithm
        self.rank = rank
        self.world_size = world_size
        self.sharded = cfg.learner.fsdp and world_size > 1
        if self.sharded:
            policy.shard()  # before the optimizer sees the parameters: they become shards
        self.params = policy.trainable_parameters()
        learner = cfg.learner
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner.lr, betas=learner.betas, weight_decay=learner.weight_decay
        )
        self.ema = EMA(self.params, learner.ema_decay) if learner.ema_decay else None
        # The trailing old policy that rollouts sample (`learner.old_policy_decay_*`).
        self.old_policy = EMA(self.params, 0.0) if learner.trails_old_policy else None
        # The trainable states of the versions whose low-precision rollouts may still
        # arrive (async mode), so that they are corrected at the version that sampled them.
        self.kept_states: dict[int, dict[str, torch.Tensor]] = {}
        self._keep_state()

    def update(self, result: RolloutResult) -> dict[str, float]:
        """Train on one iteration's rollout; the policy's version advances by one."""
        cfg, algorithm, policy = self.cfg, self.algorithm, self.policy
        start = time.perf_counter()
        generator = iteration_generator(cfg.seed, result.iteration, UPDATE)
        updates, plan_stats = algorithm.plan_updates(
            result.rollout, result.rewards, result.valid, cfg.learner.minibatch_size,
            cfg.learner.grad_accum_steps, generator,
        )  # fmt: skip
        # This rank's part of each micro-batch, with its share of the micro-batch.
        parts = [[self._my_rows(micro) for micro in micro_batches] for micro_batches in updates]
        lr = scheduled_lr(cfg, result.iteration)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        policy.train(True)
        # What the loss takes from the sampling policy, recomputed at the rollout's version
        # before any step: after a low-precision rollout, for every step (in full precision);
        # when the rollout left it out because the learner holds its sampling weights, for
        # every step with a trailing old policy, and for all but the first when the trained
        # weights sampled (that step's own forward pass is the behaviour of its rows).
        first_step = None
        if result.precision != "full":
            first_step = 0
        elif not getattr(algorithm, "behaviour_in_rollout", True):
            first_step = 0 if self.old_policy is not None else 1
        if first_step is not None:
            with self._at_version(result.policy_version):
                plan_stats |= algorithm.recompute_behaviour(
                    policy, [p for step in parts[first_step:] for p, _ in step if p is not None],
                    cfg.rollout.is_truncation,
                )  # fmt: skip
        weighted: dict[str, float] = defaultdict(float)  # sum over micro-batches of share * stat
        grad_norms = []
        for step_parts in parts:
            self.optimizer.zero_grad(set_to_none=True)
            for part, share in step_parts:
                if part is None:
                    continue
                loss, loss_stats = algorithm.loss(policy, part)
                (loss * share / len(step_parts)).backward()
                for key, value in loss_stats.items():
                    weighted[key] += value * share
            if not self.sharded:  # FSDP reduce-scatters the gradient sums in backward
                self._sum_gradients_across_ranks()
            max_norm = cfg.learner.max_grad_norm or math.inf
            grad_norm = gather(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            grad_norms.append(float(grad_norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        policy.version += 1
        if self.old_policy is not None:
            decay = cfg.learner.old_policy_decay(policy.version)
            self.old_policy.update(decay)
            plan_stats["old_policy_decay"] = decay
        self._keep_state()
        # No updates when every group's rewards tie (the same plan on every rank): the
        # weights stay, the version still advances, and the metrics say nothing trained.
        micros = sum(len(micro_batches) for micro_batches in updates)
        sums = self._sum_across_ranks(weighted) if micros else {}
        metrics = {key: value / micros for key, value in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        return (
            metrics
            | plan_stats
            | {
                "optimizer_steps": len(updates),
                "lr": lr,
                "policy_version": policy.version,
                "time_update_s": time.perf_counter() - start,
                "staleness": policy.version - 1 - result.policy_version,
            }
        )

    def sampling_weights(self) -> AbstractContextManager[None]:
        """Within this context the policy holds the weights rollouts sample with: the
        trailing old policy when kept, else the trained weights themselves."""
        return self.old_policy.applied() if self.old_policy is not None else nullcontext()

    def inference_weights(self) -> AbstractContextManager[None]:
        """Within this context the policy holds the weights to evaluate: the EMA when kept."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def _keep_state(self) -> None:
        r = self.cfg.ray
        keep = r.max_staleness + 1 if r.mode == "async" else 1
        if self.cfg.rollout.precision == "full" or keep == 1:
            return  # nothing to correct, or rollouts always come from the current version
        with self.sampling_weights():
            state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.policy.trainable_state().items()
            }
        self.kept_states[self.policy.version] = state
        for version in sorted(self.kept_states)[:-keep]:
            del self.kept_states[version]

    @contextmanager
    def _at_version(self, version: int) -> Iterator[None]:
        """The policy's sampling weights as they were at `version` inside the block."""
        policy = self.policy
        if version == policy.version:
            with self.sampling_weights():
                yield
            return
        if version not in self.kept_states:
            raise RuntimeError(
                f"a low-precision rollout of policy version {version} cannot be corrected: "
                f"the learner keeps versions {sorted(self.kept_states)} (ray.max_staleness)"
            )
        current, current_version = policy.trainable_state(), policy.version
        policy.load_trainable(self.kept_states[version], version)
        try:
            yield
        finally:
            policy.load_trainable(current, current_version)

    def _my_rows(self, micro: Any) -> tuple[Any, float]:
        """This rank's slice of `micro` and its share of the micro-batch. A sharded rank
        with no rows still runs one row at share 0: its forward and backward are part of
        the collectives."""
        if self.world_size == 1:
            return micro, 1.0
        rows = torch.tensor_split(torch.arange(len(micro)), self.world_size)[self.rank]
        if len(rows):
            return micro.select(rows), len(rows) / len(micro)
        return (micro.select(torch.arange(1)), 0.0) if self.sharded else (None, 0.0)

    def _sum_across_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-key sums over the ranks: the whole batch's statistics, on every rank."""
        if self.world_size == 1:
            return stats
        every_rank: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(every_rank, dict(stats))
        keys = {k for rank_stats in every_rank for k in rank_stats}
        return {k: sum(rank_stats.get(k, 0.0) for rank_stats in every_rank) for k in keys}

    def _sum_gradients_across_ranks(self) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)

    def move_to(self, device: torch.device | str) -> None:
        """Weights, EMA and optimizer state to `device` (host memory while a colocated
        rollout worker samples; `policy.device` to train)."""
        move_policy(self.policy, device)
        move_optimizer_state(self.optimizer, device)
        for average in (self.ema, self.old_policy):
            if average is not None:
                average.to(device)
        release_cached_memory()

    # -- checkpoint state -----------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, optimizer state) for `raydraft.checkpoint.save_checkpoint`: full
        tensors, also when sharded (then a collective: every rank calls it)."""
        tensors: dict[str, Any] = {"trainable": self.policy.trainable_state()}
        if self.ema is not None:
            tensors["ema"] = gather(self.ema.state_dict())
        if self.old_policy is not None:
            tensors["old_policy"] = gather(self.old_policy.state_dict())
        return tensors, gather(self.optimizer.state_dict())

    def load_state(self, tensors: dict[str, Any], optimizer: dict[str, Any], version: int) -> None:
        self.policy.load_trainable(tensors["trainable"], version)
        self.optimizer.load_state_dict(scatter_optimizer_state(optimizer, self.params))
        for key, average in (("ema", self.ema), ("old_policy", self.old_policy)):
            if average is not None:
                if key not in tensors:
                    raise ValueError(
                        f"the checkpoint has no {key} weights, which this config keeps "
                        "(learner.ema_decay, learner.old_policy_decay_*): it was written "
                        "by a run without them"
                    )
                shadows = average.state_dict()
                average.load_state_dict(
                    {k: scatter_like(v, shadows[k]) for k, v in tensors[key].items()}
                )
        self.kept_states.clear()
        self._keep_state()
