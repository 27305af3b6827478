"""Joining a Ray cluster, or starting one that listens on loopback only."""

from __future__ import annotations

import os
import socket
import warnings

import ray
from ray._private import ray_constants
from ray._private.authentication.authentication_utils import is_token_auth_enabled

# Without this Ray on Linux resolves 127.0.0.1 to the machine's external address and
# binds GCS, raylet and metrics there.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
WILDCARD_HOSTS = ("[::]", "0.0.0.0", "")

# Ray starts worker processes at niceness 15 so that they yield to a cluster node's
# daemons; on a laptop that makes every role yield to whatever else the user runs (the
# reward replica waited over a minute for a core beside one busy process). A local
# instance runs them at the user's own priority.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
# Serve's controller runs its control loop every 0.1 s, and each pass also calls the GCS:
# 3 % and 1.6 % of a core on an idle local instance, stalling a torch thread each time on
# a laptop. Every second halves that (1 % and 0.6 %); a replica then starts, or is
# replaced, up to a second later. The user's own setting wins.
LOCAL_SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0"}

# How a dead actor shows when its results are fetched.
WORKER_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS); without either start a local instance that
    listens on loopback only and takes Ray's token authentication. Returns True when this
    call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.update(LOOPBACK_ENV)  # for the processes Ray starts from here
    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray read the variable when it was imported
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={
            "env_vars": dict(LOOPBACK_ENV),
            "worker_process_setup_hook": f"{__name__}.{bind_grpc_to_loopback.__name__}",
        },
        configure_logging=False,
        log_to_driver=True,
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    if not is_token_auth_enabled():  # Ray enables it for a new local instance unless told not to
        warnings.warn(
            "the local Ray instance runs without token authentication "
            f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE')}): any local user can call it",
            stacklevel=2,
        )
    return True


def bind_grpc_to_loopback() -> None:
    """Worker setup hook of the local instance: gRPC servers that Ray binds to every
    interface bind to loopback instead.

    Each Serve replica starts an inter-deployment gRPC server on `[::]:0`, hard-coded in
    Ray (ray-project/ray#64544); raydraft's handles never use it (it serves only
    RAY_SERVE_USE_GRPC_BY_DEFAULT), and on a one-machine instance loopback is the only
    address anything dials. Ray's helper `add_port_to_grpc_server` is patched where the
    replica module finds it, before that module is imported (or in it, if it was)."""
    import sys

    from ray._common import tls_utils

    bind = tls_utils.add_port_to_grpc_server

    def bind_on_loopback(server: object, address: str) -> int:
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in WILDCARD_HOSTS else address)

    tls_utils.add_port_to_grpc_server = bind_on_loopback
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        replica.add_port_to_grpc_server = bind_on_loopback


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
