"""The training loop and its run directory: progress, metrics, samples, evaluation,
checkpoints and exact resume.

An engine runs the iterations: `LocalEngine` does both halves (`rollout.generate`, then
`Learner.update`) in this process, for debugging and as the speed baseline;
`raydraft_ray.engine.RayEngine` drives rollout workers, reward deployments and learner actors
and presents the same interface, so this loop is the same for both.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from raydraft.build import (
    build_algorithm,
    build_policy,
    eval_sampler,
    explorer,
    prompt_stream,
    rollout_copy,
)
from raydraft.checkpoint import load_checkpoint, newest_checkpoint, save_checkpoint
from raydraft.config import ExperimentConfig
from raydraft.data.prompts import load_prompts_with_metadata
from raydraft.evaluation import EVAL_BATCH, evaluate, format_table
from raydraft.evaluation_cache import cached_table, evaluation_key, store_table
from raydraft.learner import Learner
from raydraft.metrics import MetricsExporter
from raydraft.models.base import Policy
from raydraft.report.page import write_report
from raydraft.report.panels import reward_chart
from raydraft.rewards.registry import build_reward
from raydraft.rollout import RolloutResult, generate
from raydraft.run_dir import RunDirectory
from raydraft.sample_grids import captioned_grid, grid_prompts
from raydraft.sampling.loop import sample_images
from raydraft.threads import CoreShare, own_stat
from raydraft.trackers import Trackers, open_trackers

SAMPLE_GRID_SIZE = 12  # the shapes world's 6 categories twice
IMPORTED_AT = time.time()


class Engine(Protocol):
    """What the loop needs from whatever runs the iterations."""

    policy: Policy  # a local policy for sample grids and evaluation

    def iterate(self) -> tuple[RolloutResult, dict[str, float]]:
        """Sample, score and train one iteration: (its rollout, the update's metrics)."""
        ...

    def state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(tensors, optimizer state, JSON state) of everything a resume needs."""
        ...

    def load_state(
        self, tensors: dict[str, Any], optimizer: dict[str, Any], state: dict[str, Any]
    ) -> None: ...

    def inference_weights(self) -> AbstractContextManager[None]:
        """Within this context `policy` holds the newest weights (EMA ones if kept)."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """Both halves of every iteration in this process."""

    def __init__(self, cfg: ExperimentConfig, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.policy = policy or build_policy(cfg.model, cfg.algorithm.needs_reference)
        self.reward = build_reward(cfg.rewards)
        self.algorithm = build_algorithm(cfg, self.policy, self.reward)
        self.prompts = prompt_stream(cfg)
        self.low_precision = rollout_copy(cfg)
        self.explorer = explorer(cfg)
        self.learner = Learner(cfg, self.policy, self.algorithm)
        self.threads = CoreShare.for_setting(cfg.torch_threads)

    def iterate(self) -> tuple[RolloutResult, dict[str, float]]:
        """Sample the batch in the parts a Ray run of this config splits it into (one per
        rollout worker, whole groups): CPU and GPU kernels may round differently for other
        batch sizes, and with the same parts `--local` reproduces a sync Ray run exactly."""
        batch = self.prompts.next_batch()
        drop = self.cfg.rewards.on_bad_reward == "drop"
        args = (self.cfg.seed, drop, self.low_precision, self.explorer)
        with self.threads.working() as threads:
            with self.learner.sampling_weights():
                parts = [
                    generate(self.algorithm, self.policy, self.reward, part, *args)
                    for part in batch.split(self.cfg.ray.rollout_workers)
                ]
            result = RolloutResult.concat(parts)
            result.seconds = {k: sum(p.seconds[k] for p in parts) for k in result.seconds}
            update = self.learner.update(result)
        return result, update | {"torch_threads": float(threads)}

    def state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        tensors, optimizer = self.learner.state()
        state = {"prompts": self.prompts.state_dict(), "policy_version": self.policy.version}
        return tensors, optimizer, state

    def load_state(
        self, tensors: dict[str, Any], optimizer: dict[str, Any], state: dict[str, Any]
    ) -> None:
        self.learner.load_state(tensors, optimizer, state["policy_version"])
        self.prompts.load_state_dict(state["prompts"])

    def inference_weights(self) -> AbstractContextManager[None]:
        return self.learner.inference_weights()

    def close(self) -> None:
        pass


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        policy: Policy | None = None,
        engine: Engine | None = None,
    ) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.run = RunDirectory(run_dir)
        self.run.write_config(cfg.to_yaml())
        self.engine = engine or LocalEngine(cfg, policy)
        self.sample_grid = grid_prompts(
            *load_prompts_with_metadata(cfg.data.prompts), SAMPLE_GRID_SIZE
        )
        self.trackers = Trackers([])  # opened by `fit`
        self.step = 0
        self.launched = False  # this process has run an iteration
        self.exporter: MetricsExporter | None = None
        self.metrics_url: str | None = None
        if cfg.logging.metrics_port is not None:
            self.exporter = MetricsExporter(cfg.name, max_staleness=cfg.ray.max_staleness)
            host = cfg.logging.metrics_host
            port = self.exporter.serve(host, cfg.logging.metrics_port)
            self.metrics_url = f"http://{host}:{port}/metrics"
            print(f"Prometheus metrics: {self.metrics_url}")

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    # -- one iteration ---------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        since_launch = seconds_since_launch()
        result, update = self.engine.iterate()
        self.step += 1
        self.run.add_rollouts([r | {"step": self.step} for r in result.records])
        metrics = iteration_metrics(result, update, self.step, start)
        if not self.launched:  # how long the command took to reach its first iteration
            metrics["time_to_first_iteration_s"] = since_launch
            self.launched = True
        rho, floor = result.stats.get("fidelity_spearman_rho"), self.cfg.rollout.fidelity_floor
        if rho is not None and rho < floor:
            warnings.warn(
                f"step {self.step}: the {self.cfg.rollout.precision} rollout copy ranks samples "
                f"unlike full precision (within-group Spearman {rho:.3f} < rollout.fidelity_floor "
                f"{floor}); consider a wider format or keeping more layers in full precision",
                stacklevel=2,
            )
        if self.exporter is not None:
            self.exporter.observe(metrics, len(result))
        return metrics

    # -- the loop --------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> list[dict[str, float]]:
        """Train to `max_steps` total iterations (resumed runs continue their count), then
        checkpoint, evaluate if asked, and write report.html (its path is printed)."""
        total = max_steps or self.cfg.max_steps
        evaluating = self.cfg.logging.eval_per_category > 0
        self.trackers = open_trackers(
            self.cfg.logging, self.run.root, self.cfg.name, self.cfg.model_dump(mode="json"),
            self.step,
        )  # fmt: skip
        try:
            if self.step == 0:
                self.save_samples()
                if evaluating:
                    self.record_eval("base")
            history = self.train_until(total)
            self.save_checkpoint()
            self.save_reward_curve()
            if evaluating:
                report = self.record_eval("final")
                print(format_table({k: report[k] for k in ("base", "final") if k in report}))
        finally:
            self.trackers.close()
        print(f"report: {write_report(self.run.root)}")
        return history

    def train_until(self, total: int) -> list[dict[str, float]]:
        """Iterate to step `total`: log, checkpoint and sample on schedule; on Ctrl-C (or
        SIGTERM) checkpoint before re-raising."""
        history: list[dict[str, float]] = []
        every = self.cfg.checkpoint.every
        bar = tqdm(
            total=total, initial=self.step, disable=not self.cfg.logging.progress_bar,
            desc=self.cfg.name, unit="it",
        )  # fmt: skip
        try:
            while self.step < total:
                metrics = self.train_step()
                history.append(metrics)
                self.run.log_metrics(metrics)
                self.trackers.log(metrics, self.step)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics.get('reward_mean', math.nan):.4f}",
                    img_s=f"{metrics['images_per_s']:.1f}",
                )
                if every and self.step % every == 0:
                    self.save_checkpoint()
                sample_every = self.cfg.logging.sample_every
                if sample_every and self.step % sample_every == 0:
                    self.save_samples()
        except KeyboardInterrupt:
            bar.write(f"interrupted at step {self.step}: checkpointing before exit")
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        return history

    def record_eval(self, which: str) -> dict[str, Any]:
        """Evaluate now as `which` ("base" or "final") into eval.json and the trackers; the
        base's table is reused when one was kept for the same weights and settings."""
        table, source = self.evaluate_base() if which == "base" else (self.evaluate(), "evaluated")
        if source != "evaluated":
            print(f"{which}: the {source} table of these weights and evaluation settings")
        report = self.run.read_eval() if which == "final" else {}
        report |= {which: table, f"{which}_step": self.step, f"{which}_source": source}
        self.run.write_eval(report)
        self.trackers.log({f"eval/{c}": v["strict"] for c, v in table.items()}, self.step)
        if self.exporter is not None:
            self.exporter.observe_eval(table)
        return report

    def save_reward_curve(self) -> Path:
        """reward_curve.png: the report's reward chart, for a glance without a browser."""
        reward = "+".join(c.name for c in self.cfg.rewards.components)
        path = self.run.root / "reward_curve.png"
        reward_chart(self.run.read_metrics(), f"{self.cfg.name}: reward_mean ({reward})").save(path)
        return path

    def evaluate(self) -> dict[str, dict[str, float]]:
        """GenEval-style table on the held-out shapes prompts (EMA weights if kept)."""
        self.policy.train(False)
        with self.engine.inference_weights():
            return evaluate(
                self.policy,
                eval_sampler(self.cfg, self.policy),
                self.cfg.sampler.guidance_scale,
                self.cfg.logging.eval_per_category,
            )

    def evaluate_base(self) -> tuple[dict[str, dict[str, float]], str]:
        """`evaluate` before training, and where the table came from: one kept for the same
        weights, sampler and code ("shipped" or "cached"), or "evaluated" now (then cached)."""
        self.policy.train(False)
        guidance, per_category = self.cfg.sampler.guidance_scale, self.cfg.logging.eval_per_category
        with self.engine.inference_weights():  # one fetch of the weights (Ray) for both
            sampler = eval_sampler(self.cfg, self.policy)
            key = evaluation_key(self.policy, sampler, guidance, per_category, EVAL_BATCH)
            found = cached_table(key)
            if found is not None:
                return found
            table = evaluate(self.policy, sampler, guidance, per_category, EVAL_BATCH)
        store_table(key, table)
        return table, "evaluated"

    def sample_images(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Deterministic samples at the evaluation step count (EMA weights if kept)."""
        policy, sampler = self.policy, eval_sampler(self.cfg, self.policy)
        policy.train(False)
        with self.engine.inference_weights():
            return sample_images(policy, sampler, prompts, seeds, self.cfg.sampler.guidance_scale)

    def save_samples(self) -> Path | None:
        """samples/step-N.png and the trackers' "samples" image: the same prompts (every
        category) and seeds at every step, each image captioned with its prompt."""
        if not self.cfg.logging.sample_every:
            return None
        grid = self.sample_grid
        images = self.sample_images(grid.prompts, list(range(len(grid.prompts))))
        headers = grid.categories if any(grid.categories) else None
        picture = captioned_grid(images, grid.prompts, grid.columns, headers)
        self.trackers.log_image("samples", picture, self.step)
        return self.run.save_samples(picture, self.step)

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.run.flush_rollouts()
        tensors, optimizer, state = self.engine.state()
        tensors["rng"] = {"torch": torch.get_rng_state()}
        state["step"] = self.step
        return save_checkpoint(
            self.run.checkpoints, self.step, tensors, optimizer, state,
            self.cfg.checkpoint.keep,
        )  # fmt: skip

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest checkpoint of this run (or `checkpoint`); returns its step."""
        path = Path(checkpoint) if checkpoint else newest_checkpoint(self.run.checkpoints)
        tensors, optimizer, state = load_checkpoint(path)
        self.engine.load_state(tensors, optimizer, state)
        torch.set_rng_state(tensors["rng"]["torch"])
        self.step = state["step"]
        self.run.truncate_after(self.step)
        return self.step


def seconds_since_launch() -> float:
    """Seconds since this process started (Linux; elsewhere since raydraft was imported)."""
    try:
        start_ticks = int(own_stat()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, StopIteration, ValueError):
        return time.time() - IMPORTED_AT


def iteration_metrics(
    result: RolloutResult, update: dict[str, float], step: int, start: float
) -> dict[str, float]:
    """One metrics.jsonl row: the update's statistics and the iteration's timings."""
    now = time.perf_counter()
    return (
        update
        | result.reward_stats()
        | result.stats
        | {
            "step": step,
            "images_per_s": len(result) / (now - start),
            "time_rollout_s": result.seconds.get("rollout", 0.0),
            "time_reward_s": result.seconds.get("reward", 0.0),
            "time_step_s": now - start,
        }
        | {
            f"time_{stage}_s": result.seconds[stage]
            for stage in ("requantize", "explore")
            if stage in result.seconds
        }
    )
