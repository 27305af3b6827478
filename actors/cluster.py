"""Joining a Ray cluster, or starting one that listens on loopback only."""

from __future__ import annotations

import os
import socket

import ray
from ray._private import ray_constants

# Without this Ray on Linux resolves 127.0.0.1 to the machine's external address and
# binds GCS, raylet and metrics there.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# How a dead actor shows when its results are fetched.
WORKER_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS); without either start a loopback-only local
    instance. Returns True when this call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.update(LOOPBACK_ENV)  # for the processes Ray starts from here
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray read the variable when it was imported
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": dict(LOOPBACK_ENV)},
        configure_logging=False,
        log_to_driver=True,
    )
    return True


def actor_threads(cpus: float, configured: int | None) -> int:
    """torch threads for an actor: the configured count, else its CPU share (at least 1)."""
    return configured or max(1, int(cpus))


def failed_calls(calls: list[ray.ObjectRef], timeout_s: float | None = None) -> list[int]:
    """Positions of the calls whose actor died (or did not answer within `timeout_s`)."""
    failed = []
    for index, call in enumerate(calls):
        try:
            ray.get(call, timeout=timeout_s)
        except (*WORKER_FAILURES, ray.exceptions.GetTimeoutError):
            failed.append(index)
    return failed


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free port on it: where a process group meets."""
    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def wait_for_start(refs: list[ray.ObjectRef], what: str, timeout_s: float) -> list:
    """ray.get that names the shortfall when the cluster cannot place `what`."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise RuntimeError(
            f"{what} did not start within {timeout_s:.0f} s: the cluster has {total} "
            f"({free} free); lower ray.worker_cpus / ray.learner_cpus / "
            "ray.reward_serving.num_cpus or add nodes"
        ) from None
