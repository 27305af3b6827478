"""`raydraft serve-rewards`: the configured rewards' Serve deployments behind an HTTP
endpoint, for trainers outside this cluster (the `http` reward is its client;
raydraft/rewards/http_reward.py has the wire format).

One ingress deployment reads and validates each request (a body over the limit is refused
before it is read), then scores it through the reward's own deployment with the same
chunking and retries as the rollout workers' `RemoteReward`. It binds to 127.0.0.1 unless
configured; bound wider it refuses to start without a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from raydraft.config import ConfigError, ExperimentConfig, RewardHttpConfig, reward_serving_for
from raydraft.rewards.http_reward import PayloadError, PayloadLimits, decode_request, encode_scores
from raydraft_ray.reward_serving import RemoteReward, deploy_rewards

INGRESS_APP = "raydraft-reward-http"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: treat as wider
        return False


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_digest(http: RewardHttpConfig) -> str | None:
    """sha256 of the token in `http.token_env` (the replica keeps only the digest), None
    without one; bound wider than loopback, a token is required."""
    token = os.environ.get(http.token_env)
    if not token and not is_loopback(http.host):
        raise ConfigError(
            f"ray.reward_http.host={http.host!r} is not loopback: set a token in the "
            f"environment variable {http.token_env} (ray.reward_http.token_env) first"
        )
    return sha256_hex(token) if token else None


class RewardHttpIngress:
    """The HTTP face of the reward deployments: routes, token, limits, JSON errors."""

    def __init__(
        self, remotes: dict[str, tuple[int, int]], limits: PayloadLimits, digest: str | None
    ) -> None:
        self.rewards = {
            name: RemoteReward(name, max_retries, images_per_request)
            for name, (max_retries, images_per_request) in remotes.items()
        }
        self.limits = limits
        self.digest = digest

    async def __call__(self, request: Request) -> Response:
        try:
            self._authorize(request)
            return await self._route(request)
        except PayloadError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)

    def _authorize(self, request: Request) -> None:
        if self.digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sha256_hex(token), self.digest):
            raise PayloadError(401, "missing or wrong bearer token")

    async def _route(self, request: Request) -> Response:
        parts = tuple(request.url.path.strip("/").split("/"))
        if parts == ("v1", "rewards"):
            _require(request, "GET")
            return JSONResponse({"rewards": sorted(self.rewards)})
        if len(parts) != 4 or parts[:2] != ("v1", "rewards") or parts[3] != "score":
            raise PayloadError(404, f"no route {request.url.path}: POST /v1/rewards/NAME/score")
        _require(request, "POST")
        if parts[2] not in self.rewards:
            raise PayloadError(404, f"unknown reward {parts[2]!r}; served: {sorted(self.rewards)}")
        body = await self._body(request)
        images, prompts, metadata = await asyncio.to_thread(decode_request, body, self.limits)
        reward = self.rewards[parts[2]]
        scored = await asyncio.to_thread(reward.score_and_details, images, prompts, metadata)
        return Response(encode_scores(parts[2], *scored), media_type="application/json")

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit, declared or not."""
        limit = self.limits.max_bytes
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadError(413, f"body of {declared} bytes exceeds {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadError(413, f"body exceeds {limit} bytes")
        return bytes(body)


def _require(request: Request, method: str) -> None:
    if request.method != method:
        raise PayloadError(405, f"{request.method} {request.url.path}: use {method}")


def serve_rewards_http(cfg: ExperimentConfig, timeout_s: float = 300.0) -> str:
    """Deploy `cfg.rewards` and the HTTP ingress on the connected Ray cluster; the URL."""
    http = cfg.ray.reward_http
    digest = token_digest(http)
    serve.start(http_options={"host": http.host, "port": http.port}, proxy_location="HeadOnly")
    deploy_rewards(cfg.rewards, cfg.ray.reward_serving, timeout_s)
    remotes = {}
    for component in cfg.rewards.components:
        settings = reward_serving_for(cfg.ray.reward_serving, component)
        remotes[component.name] = (settings.max_retries, settings.images_per_request)
    limits = PayloadLimits(int(http.max_request_mb * 2**20), http.max_images, http.max_image_side)
    ingress = serve.deployment(RewardHttpIngress).options(
        name="http",
        ray_actor_options={"num_cpus": cfg.ray.reward_serving.num_cpus},
        max_ongoing_requests=cfg.ray.reward_serving.max_ongoing_requests,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    serve.run(ingress.bind(remotes, limits, digest), name=INGRESS_APP, route_prefix="/")
    return f"http://{http.host}:{http.port}"
