"""The optimizer half of an iteration: plan the updates a rollout calls for and run them.

The single-process trainer owns one `Learner`; the Ray runtime runs one per learner
rank. With `world_size > 1` (torch.distributed already initialised by the caller) each
rank takes its slice of every micro-batch and the gradients are summed across ranks
before clipping, so N ranks take exactly the optimizer steps of one rank with the
whole batch (the per-sample loss terms are means, weighted here by slice size).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from raydraft.algorithms.common import UPDATE_STREAM, iteration_generator
from raydraft.algorithms.draft import DRaFT
from raydraft.algorithms.flow_grpo import FlowGRPO
from raydraft.config import ExperimentConfig
from raydraft.ema import EMA
from raydraft.models.base import Policy
from raydraft.rollout import RolloutResult


class Learner:
    def __init__(
        self,
        cfg: ExperimentConfig,
        policy: Policy,
        algorithm: DRaFT | FlowGRPO,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.algorithm = algorithm
        self.rank = rank
        self.world_size = world_size
        self.params = policy.trainable_parameters()
        learner = cfg.learner
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner.lr, betas=learner.betas, weight_decay=learner.weight_decay
        )
        self.ema = EMA(self.params, learner.ema_decay) if learner.ema_decay else None

    def update(self, result: RolloutResult) -> dict[str, float]:
        """Train on one iteration's rollout; the policy's version advances by one."""
        cfg, algorithm, policy = self.cfg, self.algorithm, self.policy
        start = time.perf_counter()
        if algorithm.scores_rollouts:
            generator = iteration_generator(cfg.seed, result.iteration, UPDATE_STREAM)
            updates, plan_stats = algorithm.plan_updates(
                result.rollout, result.rewards, result.valid, cfg.learner.minibatch_size,
                cfg.learner.grad_accum_steps, generator,
            )  # fmt: skip
        else:
            updates, plan_stats = algorithm.plan_updates(
                result.rollout, cfg.learner.minibatch_size, cfg.learner.grad_accum_steps
            )
        policy.train(True)
        stats: dict[str, list[float]] = defaultdict(list)
        for micro_batches in updates:
            self.optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches:
                part = self._my_rows(micro)
                if part is None:
                    continue
                loss, loss_stats = algorithm.loss(policy, part)
                (loss * (len(part) / len(micro)) / len(micro_batches)).backward()
                for key, value in loss_stats.items():
                    stats[key].append(value)
            self._sum_gradients_across_ranks()
            max_norm = cfg.learner.max_grad_norm or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            stats["grad_norm"].append(float(grad_norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        policy.version += 1
        metrics = {key: sum(v) / len(v) for key, v in stats.items()}
        return (
            metrics
            | plan_stats
            | {
                "optimizer_steps": len(updates),
                "policy_version": policy.version,
                "time_update_s": time.perf_counter() - start,
                "staleness": policy.version - 1 - result.policy_version,
            }
        )

    def _my_rows(self, micro: Any) -> Any:
        if self.world_size == 1:
            return micro
        rows = torch.tensor_split(torch.arange(len(micro)), self.world_size)[self.rank]
        return micro.select(rows) if len(rows) else None

    def _sum_gradients_across_ranks(self) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)

    # -- checkpoint state -----------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, optimizer state) for `raydraft.checkpoint.save_checkpoint`."""
        tensors: dict[str, Any] = {"trainable": self.policy.trainable_state()}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        return tensors, self.optimizer.state_dict()

    def load_state(self, tensors: dict[str, Any], optimizer: dict[str, Any], version: int) -> None:
        self.policy.load_trainable(tensors["trainable"], version)
        self.optimizer.load_state_dict(optimizer)
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
