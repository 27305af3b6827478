"""Black-box rewards as Ray Serve deployments, and the client that makes one look local.

One deployment per configured reward component: `@serve.batch` gathers chunks of images
from every rollout worker into model-sized batches, and Serve autoscales the
replicas. Rollout workers call them through `DeploymentHandle`s (no HTTP hop inside the
cluster); `RemoteReward` is a `raydraft.rewards.base.Reward`, so the composite, the NaN
checks and `on_bad_reward: drop` work unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from raydraft.config import (
    ExperimentConfig,
    RewardsConfig,
    RewardServingConfig,
    reward_serving_for,
)
from raydraft.rewards.base import CompositeReward, check_shape, reward_details
from raydraft.rewards.registry import make_reward

APP_PREFIX = "raydraft-reward-"


def app_name(reward: str) -> str:
    return APP_PREFIX + reward


Request = tuple[np.ndarray, list[str], list[dict]]  # a chunk: images (n, C, H, W), prompts, meta


class RewardServer:
    """One reward model behind Serve. A request is a chunk of images; `@serve.batch` joins
    the chunks that arrive together (from every rollout worker) into one model call."""

    def __init__(self, name: str, options: dict[str, Any], max_batch_size: int, wait_s: float):
        self.reward = make_reward(name, options)
        for method in (self.score, self.score_with_grad):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(wait_s)

    @staticmethod
    def _join(requests: list[Request]) -> tuple[torch.Tensor, list[str], list[dict], list[int]]:
        images = torch.from_numpy(np.concatenate([images for images, _, _ in requests]))
        prompts = [p for _, chunk, _ in requests for p in chunk]
        metadata = [m for _, _, chunk in requests for m in chunk]
        return images, prompts, metadata, [len(chunk) for _, chunk, _ in requests]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score(self, requests: list[Request]) -> list[tuple[np.ndarray, dict]]:
        """Each request's scores and the reward's per-sample details of them."""
        images, prompts, metadata, sizes = self._join(requests)
        with torch.no_grad():
            scores = self.reward.score(images, prompts, metadata)
        check_shape(self.reward.name, scores, len(prompts))  # before splitting by request
        # NaN checks belong to the caller, which names the reward and the samples.
        values = np.asarray(scores.detach().float().cpu(), dtype=np.float64)
        bounds = np.cumsum(sizes)[:-1]
        details = {
            k: np.split(v.cpu().numpy(), bounds) for k, v in reward_details(self.reward).items()
        }
        return [
            (part, {k: parts[i] for k, parts in details.items()})
            for i, part in enumerate(np.split(values, bounds))
        ]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score_with_grad(self, requests: list[Request]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Scores and their image gradients: DRaFT with a disaggregated reward. Each score
        depends on its own image only, so the gradient of the sum is per image."""
        if not self.reward.differentiable:
            raise TypeError(f"reward {self.reward.name!r} is not differentiable")
        images, prompts, metadata, sizes = self._join(requests)
        images.requires_grad_(True)
        scores = self.reward.score(images, prompts, metadata)
        check_shape(self.reward.name, scores, len(prompts))
        (grads,) = torch.autograd.grad(scores.float().sum(), images)
        values = np.asarray(scores.detach().float(), dtype=np.float64)
        bounds = np.cumsum(sizes)[:-1]
        return list(zip(np.split(values, bounds), np.split(grads.numpy(), bounds), strict=True))

    def pid(self) -> int:
        return os.getpid()

    def environment(self, names: list[str]) -> dict[str, Any]:
        """The replica's interpreter and the named environment variables: what its
        runtime_env gave it."""
        return {"python": sys.executable} | {name: os.environ.get(name) for name in names}


def deploy_rewards(
    cfg: RewardsConfig, serving: RewardServingConfig, timeout_s: float, wait: bool = True
) -> dict[str, str]:
    """Start (or update) one Serve application per reward component, each with its own
    settings over `serving` and its own runtime_env if it names one; {reward: app name}.
    Without `wait` the replicas start in the background (`wait_until_running`)."""
    serve.start(proxy_location="Disabled")
    targets = []
    for component in cfg.components:
        settings = reward_serving_for(serving, component)
        actor_options = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
        if component.runtime_env is not None:
            actor_options["runtime_env"] = component.runtime_env
        deployment = serve.deployment(RewardServer).options(
            name=component.name,
            autoscaling_config={
                "min_replicas": settings.min_replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.target_ongoing_requests,
                "upscale_delay_s": settings.upscale_delay_s,
                "downscale_delay_s": settings.downscale_delay_s,
                "look_back_period_s": settings.look_back_period_s,
            },
            max_ongoing_requests=settings.max_ongoing_requests,
            ray_actor_options=actor_options,
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        app = deployment.bind(
            component.name,
            component.options,
            settings.max_batch_size,
            settings.batch_wait_timeout_s,
        )
        targets.append(serve.RunTarget(app, name=app_name(component.name), route_prefix=None))
    serve.run_many(
        targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
    )
    apps = {c.name: app_name(c.name) for c in cfg.components}
    if wait:
        wait_until_running(list(apps.values()), timeout_s)
    return apps


def wait_until_running(apps: list[str], timeout_s: float) -> None:
    """Serve's own wait never gives up; this one names the failure or the shortfall."""
    deadline = time.monotonic() + timeout_s
    for app in apps:
        while time.monotonic() < deadline:
            status = serve.status().applications.get(app)
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"reward deployment {app} failed: {status.message}")
            time.sleep(0.2)
        else:
            free = ray.available_resources().get("CPU", 0.0)
            raise RuntimeError(
                f"reward deployment {app} did not start within {timeout_s:.0f} s ({free} CPUs "
                "free); lower ray.reward_serving.num_cpus (or the component's serving.num_cpus) "
                "or add nodes"
            )


class RemoteReward:
    """A reward component served by Serve, scored one request per image. When
    `differentiable`, scores of images that require grad carry the served gradient, so
    DRaFT backpropagates through a reward that lives elsewhere (images.backward(-grad))."""

    def __init__(
        self, name: str, max_retries: int, images_per_request: int, differentiable: bool = False
    ) -> None:
        self.name = name
        self.max_retries = max_retries
        self.images_per_request = images_per_request
        self.differentiable = differentiable
        self.last_details: dict[str, torch.Tensor] = {}  # the served reward's, as in process
        self.handle: DeploymentHandle = serve.get_deployment_handle(name, app_name(name))

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata) -> torch.Tensor:
        if self.differentiable and images.requires_grad:
            return _ServedScore.apply(images, self, prompts, metadata)
        scores, self.last_details = self.score_and_details(images, prompts, metadata)
        return scores

    def score_and_details(
        self, images: torch.Tensor, prompts: Sequence[str], metadata
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores and the reward's per-sample details, for callers that share this object
        between threads (the HTTP ingress), where `last_details` would race."""
        answers = self._call("score", images, prompts, metadata)
        details = {
            key: torch.from_numpy(np.concatenate([details[key] for _, details in answers])).float()
            for key in answers[0][1]
        }
        return torch.from_numpy(np.concatenate([scores for scores, _ in answers])).float(), details

    def score_with_grad(
        self, images: torch.Tensor, prompts: Sequence[str], metadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        answers = self._call("score_with_grad", images, prompts, metadata)
        scores = torch.from_numpy(np.concatenate([values for values, _ in answers])).float()
        grads = torch.from_numpy(np.concatenate([grads for _, grads in answers]))
        return scores, grads.to(images.dtype)

    def _call(self, method: str, images: torch.Tensor, prompts: Sequence[str], metadata) -> list:
        """Every chunk out at once, then the answers in order; a chunk whose replica died
        is sent again (Serve replaces replicas)."""
        arrays = images.detach().float().cpu().numpy()
        step = self.images_per_request
        requests = [
            (arrays[i : i + step], list(prompts[i : i + step]), list(metadata[i : i + step]))
            for i in range(0, len(arrays), step)
        ]
        pending = [getattr(self.handle, method).remote(r) for r in requests]
        answers = zip(pending, requests, strict=True)
        return [self._result(method, response, request) for response, request in answers]

    def _result(self, method: str, response, request: Request) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return response.result()
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self.max_retries:
                    raise
                time.sleep(0.5 * (attempt + 1))
                response = getattr(self.handle, method).remote(request)
        raise AssertionError("unreachable")


class _ServedScore(torch.autograd.Function):
    """scores = reward(images) computed by a Serve replica; backward applies its
    d score / d image (a reward is per sample, so the Jacobian is block diagonal)."""

    @staticmethod
    def forward(ctx, images, reward: RemoteReward, prompts, metadata):
        scores, grads = reward.score_with_grad(images, prompts, metadata)
        ctx.save_for_backward(grads.to(images.device))
        return scores.to(images.device)

    @staticmethod
    def backward(ctx, grad_scores):
        (grads,) = ctx.saved_tensors
        return grad_scores.view(-1, *[1] * (grads.dim() - 1)) * grads, None, None, None


def remote_reward(
    cfg: RewardsConfig, serving: RewardServingConfig, differentiable: bool = False
) -> CompositeReward:
    remotes = []
    for component in cfg.components:
        settings = reward_serving_for(serving, component)
        remote = RemoteReward(
            component.name, settings.max_retries, settings.images_per_request, differentiable
        )
        remotes.append((remote, component.weight))
    return CompositeReward(remotes)


def rewards_on_serve(cfg: ExperimentConfig) -> bool:
    """Black-box rewards always are, and any reward that ranks explored candidates;
    DRaFT's differentiable ones when configured."""
    # Imported here: a reward replica imports this module, and the algorithms' imports
    # (diffusers, peft, transformers) would cost it seconds of start-up for nothing.
    from raydraft.build import algorithm_class

    scores_rollouts = algorithm_class(cfg).scores_rollouts or cfg.rollout.explore is not None
    return scores_rollouts or cfg.ray.reward_serving.serve_draft_rewards
