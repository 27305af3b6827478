"""The same config trained a few steps by the single-process trainer and through Ray (the
caller's local Ray instance): the sync-equivalence tests compare the two."""

from dataclasses import dataclass
from pathlib import Path

import torch

from raydraft.config import ExperimentConfig
from raydraft.trainer import Trainer


@dataclass
class BothRuns:
    local: Trainer
    expected: list[dict]  # the single-process trainer's metrics per step
    got: list[dict]  # the Ray run's
    ray_weights: dict[str, torch.Tensor]  # the Ray run's trainable state at the end
    swaps: bool  # whether the Ray run swapped colocated roles


def train_both_engines(cfg: ExperimentConfig, run_dir: Path, steps: int = 2) -> BothRuns:
    from raydraft_ray.engine import RayEngine

    local = Trainer(cfg, run_dir / "local")
    expected = [local.train_step() for _ in range(steps)]
    engine = RayEngine(cfg)
    try:
        distributed = Trainer(cfg, run_dir / "ray", engine=engine)
        got = [distributed.train_step() for _ in range(steps)]
        with engine.inference_weights():
            weights = engine.policy.trainable_state()
    finally:
        engine.close()
    return BothRuns(local, expected, got, weights, engine.swaps)
