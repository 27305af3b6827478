"""Black-box rewards as Ray Serve deployments, and the client that makes one look local.

One deployment per configured reward component: `@serve.batch` gathers single-image
requests from every rollout worker into model-sized batches, and Serve autoscales the
replicas. Rollout workers call them through `DeploymentHandle`s (no HTTP hop inside the
cluster); `RemoteReward` is a `raydraft.rewards.base.Reward`, so the composite, the NaN
checks and `on_bad_reward: drop` work unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from raydraft.config import RewardsConfig, RewardServingConfig
from raydraft.rewards.base import CompositeReward
from raydraft.rewards.registry import make_reward

APP_PREFIX = "raydraft-reward-"


def app_name(reward: str) -> str:
    return APP_PREFIX + reward


class RewardServer:
    """One reward model behind Serve; each request is one image, answered with one float."""

    def __init__(self, name: str, options: dict[str, Any], max_batch_size: int, wait_s: float):
        self.reward = make_reward(name, options)
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score(self, requests: list[tuple[np.ndarray, str, dict]]) -> list[float]:
        images = torch.from_numpy(np.stack([image for image, _, _ in requests]))
        prompts = [prompt for _, prompt, _ in requests]
        metadata = [meta for _, _, meta in requests]
        with torch.no_grad():
            scores = self.reward.score(images, prompts, metadata)
        # Shape and NaN checks belong to the caller, which names the reward and samples.
        return np.asarray(scores.detach().float().cpu(), dtype=np.float64).tolist()

    def pid(self) -> int:
        return os.getpid()


def deploy_rewards(
    cfg: RewardsConfig, serving: RewardServingConfig, timeout_s: float
) -> dict[str, str]:
    """Start (or update) one Serve application per reward component; {reward: app name}."""
    serve.start(proxy_location="Disabled")
    targets = []
    for component in cfg.components:
        deployment = serve.deployment(RewardServer).options(
            name=component.name,
            autoscaling_config={
                "min_replicas": serving.min_replicas,
                "max_replicas": serving.max_replicas,
                "target_ongoing_requests": serving.target_ongoing_requests,
                "upscale_delay_s": serving.upscale_delay_s,
                "downscale_delay_s": serving.downscale_delay_s,
            },
            max_ongoing_requests=serving.max_ongoing_requests,
            ray_actor_options={"num_cpus": serving.num_cpus, "num_gpus": serving.num_gpus},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        app = deployment.bind(
            component.name,
            component.options,
            serving.max_batch_size,
            serving.batch_wait_timeout_s,
        )
        targets.append(serve.RunTarget(app, name=app_name(component.name), route_prefix=None))
    serve.run_many(
        targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
    )
    for target in targets:
        _wait_until_running(target.name, timeout_s)
    return {c.name: app_name(c.name) for c in cfg.components}


def _wait_until_running(app: str, timeout_s: float) -> None:
    """Serve's own wait never gives up; this one names the failure or the shortfall."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"reward deployment {app} failed: {status.message}")
        time.sleep(0.2)
    free = ray.available_resources().get("CPU", 0.0)
    raise RuntimeError(
        f"reward deployment {app} did not start within {timeout_s:.0f} s ({free} CPUs free); "
        "lower ray.reward_serving.num_cpus or add nodes"
    )


class RemoteReward:
    """A reward component served by Serve, scored one request per image."""

    differentiable = False

    def __init__(self, name: str, max_retries: int) -> None:
        self.name = name
        self.max_retries = max_retries
        self.handle: DeploymentHandle = serve.get_deployment_handle(name, app_name(name))

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata) -> torch.Tensor:
        arrays = images.detach().float().cpu().numpy()
        pending = {i: self._send(arrays[i], prompts[i], metadata[i]) for i in range(len(arrays))}
        scores = [0.0] * len(arrays)
        for i, response in pending.items():
            scores[i] = self._result(response, arrays[i], prompts[i], metadata[i])
        return torch.tensor(scores, dtype=torch.float32)

    def _send(self, image: np.ndarray, prompt: str, meta: dict):
        return self.handle.score.remote((image, prompt, meta))

    def _result(self, response, image: np.ndarray, prompt: str, meta: dict) -> float:
        """The score; a request whose replica died is sent again (Serve replaces replicas)."""
        for attempt in range(self.max_retries + 1):
            try:
                return float(response.result())
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self.max_retries:
                    raise
                time.sleep(0.5 * (attempt + 1))
                response = self._send(image, prompt, meta)
        raise AssertionError("unreachable")


def remote_reward(cfg: RewardsConfig, serving: RewardServingConfig) -> CompositeReward:
    return CompositeReward(
        [(RemoteReward(c.name, serving.max_retries), c.weight) for c in cfg.components]
    )
