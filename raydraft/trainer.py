"""The single-process training loop: debugging, exact-resume tests and the speed baseline.

One iteration: a prompt batch -> `algorithm.rollout` (no grad) -> rewards (black-box
algorithms) -> `algorithm.plan_updates` -> for each optimizer step, the mean of
`algorithm.loss` over its micro-batches, gradient clipping, AdamW, EMA. The Ray
controller drives the same objects across processes.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from raydraft.build import build_algorithm, build_policy, needs_reference
from raydraft.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from raydraft.config import DraftConfig, ExperimentConfig
from raydraft.data.prompts import PromptStream, load_prompts
from raydraft.ema import EMA
from raydraft.evaluation import evaluate, format_table
from raydraft.models.base import Policy
from raydraft.report import reward_curve
from raydraft.rewards.base import score_or_drop
from raydraft.rewards.registry import build_reward
from raydraft.run_dir import RunDirectory
from raydraft.sampling.loop import denoise
from raydraft.sampling.samplers import Sampler, build_sampler

SAMPLE_GRID_SIZE = 8


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, policy: Policy | None = None):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.run = RunDirectory(run_dir)
        self.run.write_config(cfg.to_yaml())
        self.policy = policy or build_policy(cfg.model, needs_reference(cfg))
        self.reward = build_reward(cfg.rewards)
        self.algorithm = build_algorithm(cfg, self.policy, self.reward)
        group_size = 1 if isinstance(cfg.algorithm, DraftConfig) else cfg.algorithm.group_size
        prompts = load_prompts(cfg.data.prompts)
        self.prompts = PromptStream(
            prompts, cfg.data.prompts_per_step, group_size, cfg.seed, cfg.data.shuffle
        )
        self.sample_prompts = [prompts[i % len(prompts)] for i in range(SAMPLE_GRID_SIZE)]
        self.params = self.policy.trainable_parameters()
        learner = cfg.learner
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner.lr, betas=learner.betas, weight_decay=learner.weight_decay
        )
        self.ema = EMA(self.params, learner.ema_decay) if learner.ema_decay else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

    # -- one iteration ---------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, algorithm, policy = self.cfg, self.algorithm, self.policy
        start = time.perf_counter()
        batch = self.prompts.next_batch()
        policy.train(False)
        rollout = algorithm.rollout(policy, batch, self.generator)
        rollout_s = time.perf_counter() - start
        stats: dict[str, list[float]] = defaultdict(list)
        if algorithm.scores_rollouts:
            traj = rollout.trajectory
            rewards, valid = score_or_drop(
                self.reward, traj.images, traj.prompts, batch.metadata,
                cfg.rewards.on_bad_reward == "drop",
            )  # fmt: skip
            updates, plan_stats = algorithm.plan_updates(
                rollout, rewards, valid, cfg.learner.minibatch_size,
                cfg.learner.grad_accum_steps, self.generator,
            )  # fmt: skip
            kept = rewards[valid]
            stats["reward_mean"].append(float(kept.mean()) if kept.numel() else math.nan)
            stats["reward_std"].append(float(kept.std()) if kept.numel() > 1 else 0.0)
            self._log_rollouts(traj.records(), rewards, valid)
        else:
            updates, plan_stats = algorithm.plan_updates(
                rollout, cfg.learner.minibatch_size, cfg.learner.grad_accum_steps
            )
        update_start = time.perf_counter()
        policy.train(True)
        for micro_batches in updates:
            self.optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches:
                loss, loss_stats = algorithm.loss(policy, micro)
                (loss / len(micro_batches)).backward()
                for key, value in loss_stats.items():
                    stats[key].append(value)
            max_norm = cfg.learner.max_grad_norm or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            stats["grad_norm"].append(float(grad_norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        self.step += 1
        policy.version = self.step
        now = time.perf_counter()
        metrics = {key: sum(v) / len(v) for key, v in stats.items()}
        metrics |= plan_stats
        metrics |= {
            "step": self.step,
            "policy_version": policy.version,
            "images_per_s": len(batch) / (now - start),
            "optimizer_steps": len(updates),
            "time_rollout_s": rollout_s,
            "time_update_s": now - update_start,
            "time_step_s": now - start,
        }
        return metrics

    def _log_rollouts(self, records, rewards: torch.Tensor, valid: torch.Tensor) -> None:
        for record, reward, ok in zip(records, rewards.tolist(), valid.tolist(), strict=True):
            record.update(step=self.step + 1, reward=reward if ok else None)
        self.run.add_rollouts(records)

    # -- the loop --------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> list[dict[str, float]]:
        """Train to `max_steps` total iterations (resumed runs continue their count)."""
        total = max_steps or self.cfg.max_steps
        history: list[dict[str, float]] = []
        every = self.cfg.checkpoint.every
        bar = tqdm(
            total=total, initial=self.step, disable=not self.cfg.logging.progress_bar,
            desc=self.cfg.name, unit="it",
        )  # fmt: skip
        evaluating = self.cfg.logging.eval_per_category > 0
        if self.step == 0:
            self.save_samples()
            if evaluating:
                self.run.write_eval({"base": self.evaluate(), "base_step": 0})
        try:
            while self.step < total:
                metrics = self.train_step()
                history.append(metrics)
                self.run.log_metrics(metrics)
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
        self.save_checkpoint()
        self.save_reward_curve()
        if evaluating:
            report = self.run.read_eval()
            report |= {"final": self.evaluate(), "final_step": self.step}
            self.run.write_eval(report)
            print(format_table({k: report[k] for k in ("base", "final") if k in report}))
        return history

    def save_reward_curve(self) -> Path:
        rows = self.run.read_metrics()
        return reward_curve(
            [r["step"] for r in rows],
            [r.get("reward_mean", math.nan) for r in rows],
            self.run.root / "reward_curve.png",
            f"{self.cfg.name}: reward_mean ({self.reward.name})",
        )

    def evaluate(self) -> dict[str, dict[str, float]]:
        """GenEval-style table on the held-out shapes prompts (EMA weights if kept)."""
        self.policy.train(False)
        with self.ema.applied() if self.ema else nullcontext():
            return evaluate(
                self.policy,
                eval_sampler(self.cfg, self.policy),
                self.cfg.sampler.guidance_scale,
                self.cfg.logging.eval_per_category,
            )

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Deterministic samples at the evaluation step count (EMA weights if kept)."""
        policy, sampler = self.policy, eval_sampler(self.cfg, self.policy)
        policy.train(False)
        with self.ema.applied() if self.ema else nullcontext():
            cond = policy.encode(prompts)
            x = policy.initial_noise(seeds)
            steps = range(sampler.num_steps)
            x = denoise(policy, cond, x, sampler, steps, self.cfg.sampler.guidance_scale).x
            return policy.decode(x)

    def save_samples(self) -> Path | None:
        if not self.cfg.logging.sample_every:
            return None
        images = self.sample_images(self.sample_prompts, list(range(SAMPLE_GRID_SIZE)))
        return self.run.save_samples(images, self.step)

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.run.flush_rollouts()
        tensors = {
            "trainable": self.policy.trainable_state(),
            "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
        }
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        state = {
            "step": self.step,
            "policy_version": self.policy.version,
            "prompts": self.prompts.state_dict(),
        }
        return save_checkpoint(
            self.run.checkpoints, self.step, tensors, self.optimizer.state_dict(), state,
            self.cfg.checkpoint.keep,
        )  # fmt: skip

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest checkpoint of this run (or `checkpoint`); returns its step."""
        path = Path(checkpoint) if checkpoint else _newest(self.run.checkpoints)
        tensors, optimizer, state = load_checkpoint(path)
        self.policy.load_trainable(tensors["trainable"], state["policy_version"])
        self.optimizer.load_state_dict(optimizer)
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
        self.generator.set_state(tensors["rng"]["generator"])
        torch.set_rng_state(tensors["rng"]["torch"])
        self.prompts.load_state_dict(state["prompts"])
        self.step = state["step"]
        self.run.truncate_metrics(self.step)
        return self.step


def eval_sampler(cfg: ExperimentConfig, policy: Policy) -> Sampler:
    """The deterministic sampler (ODE / DDIM eta 0) at the evaluation step count."""
    kind = {"kind": "ode"} if policy.prediction_type == "flow" else {"noise_level": 0.0}
    sampler_cfg = cfg.sampler.model_copy(update=kind)
    return build_sampler(sampler_cfg, policy.prediction_type, cfg.sampler.eval_num_steps)


def load_for_inference(policy: Policy, run_dir: str | Path) -> int:
    """The newest checkpoint's weights into `policy` (its EMA weights when it kept them)."""
    tensors, _, state = load_checkpoint(_newest(Path(run_dir) / "checkpoints"))
    policy.load_trainable(tensors["trainable"], state["policy_version"])
    if "ema" in tensors:
        ema = EMA(policy.trainable_parameters(), decay=0.5)
        ema.load_state_dict(tensors["ema"])
        ema.copy_to_parameters()
    return state["step"]


def _newest(root: Path) -> Path:
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"{root}: no checkpoint to resume from")
    return found[-1]
