"""A default `raydraft train` on a laptop listens on loopback only, and its local Ray
instance takes token authentication."""

import ipaddress
import os
import subprocess
import sys
import time

import psutil


def listening(root: psutil.Process) -> dict[tuple[str, int], str]:
    """{(address, port): process name} of every listening socket in `root`'s process tree."""
    found = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline()[:1]) or process.name()
            title = process.name() if name.startswith("ray::") else name
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found[(connection.laddr.ip, connection.laddr.port)] = title
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_default_run_listens_on_loopback_only(tmp_path):
    """Every process the run starts (driver, GCS, raylet, agents, rollout worker, learner,
    Serve controller and reward replica) is sampled while it lives; a wildcard bind, such
    as the reward replica's inter-deployment gRPC server without the setup hook, fails."""
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    command = [
        sys.executable, "-m", "raydraft", "train", "--max-steps", "1", "--run-dir",
        str(tmp_path / "run"), "logging.eval_per_category=0", "logging.sample_every=0",
        "logging.progress_bar=false",
    ]  # fmt: skip
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root, seen = psutil.Process(run.pid), {}
    while run.poll() is None:
        seen |= listening(root)
        time.sleep(0.25)
    output = run.stdout.read().decode()
    assert run.returncode == 0, output[-3000:]
    assert "Token authentication is enabled" in output
    owners = set(seen.values())
    assert any("ServeReplica" in owner for owner in owners), owners  # the replica was sampled
    assert any("gcs_server" in owner for owner in owners), owners
    wide = {where: owner for where, owner in seen.items() if not is_loopback(where[0])}
    assert not wide, f"listening beyond loopback: {wide}"


def test_the_local_instance_and_its_workers_use_token_authentication():
    script = (
        "import ray\n"
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled\n"
        "from raydraft_ray.cluster import connect\n"
        "assert connect(num_cpus=1)\n"
        "worker = ray.get(ray.remote(is_token_auth_enabled).remote())\n"
        "print('driver', is_token_auth_enabled(), 'worker', worker)\n"
        "ray.shutdown()\n"
    )
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "driver True worker True" in done.stdout


def test_the_local_instance_runs_its_roles_at_the_users_priority_and_serve_at_1_hz():
    """Ray's workers, Serve's controller among them, at niceness 0 rather than Ray's 15,
    and the controller's control loop at 1 s rather than 0.1 s (`raydraft_ray.cluster`)."""
    script = (
        "import os, psutil, ray\n"
        "from ray import serve\n"
        "from raydraft_ray.cluster import connect\n"
        "assert connect(num_cpus=1)\n"
        "serve.start(proxy_location='Disabled')\n"
        "found = [p for p in psutil.Process().children(recursive=True)\n"
        "         if p.cmdline()[:1] == ['ray::ServeController']]\n"
        "assert len(found) == 1, [p.cmdline()[:1] for p in psutil.Process().children(True)]\n"
        "loop = found[0].environ().get('RAY_SERVE_CONTROL_LOOP_INTERVAL_S')\n"
        "print('nice', found[0].nice(), os.nice(0), 'loop', loop)\n"
        "serve.shutdown()\n"
        "ray.shutdown()\n"
    )
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nice 0 0 loop 1.0" in done.stdout, done.stdout
