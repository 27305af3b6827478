"""`ray job submit` and `ray job stop` against a head node started with `ray start`."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from overrides import RAY_SMALL

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = [*RAY_SMALL, "algorithm.group_size=4", "logging.sample_every=1", "checkpoint.every=1"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node on loopback with token auth; yields the job API address and the env."""
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = os.environ | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    dashboard = _free_port()
    subprocess.run(
        [
            RAY, "start", "--head", "--num-cpus=4", "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--disable-usage-stats",
        ],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


def submit(
    head, run_dir: Path, max_steps: int, *overrides: str, wait: bool = True, job_id: str = ""
) -> subprocess.CompletedProcess:
    address, env = head
    command = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
        *(["--submission-id", job_id] if job_id else []),
        "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
        *([] if wait else ["--no-wait"]),
        "--", "python", "-m", "raydraft", "train", "--run-dir", str(run_dir),
        "--max-steps", str(max_steps), *TINY, *overrides,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_submitted_toy_run_succeeds_and_writes_its_run_directory(head, tmp_path):
    run = tmp_path / "run"
    done = submit(head, run, 2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert list((run / "rollouts").glob("*.parquet")) and list((run / "samples").glob("*.png"))


def test_ray_job_stop_checkpoints_before_the_job_ends(head, tmp_path):
    address, env = head
    run = tmp_path / "run"
    job_id = f"raydraft-stop-{secrets.token_hex(4)}"
    started = submit(head, run, 1000, "checkpoint.every=0", wait=False, job_id=job_id)
    assert started.returncode == 0, started.stderr
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline, "the job trained no steps"
        time.sleep(1)
    stop = [RAY, "job", "stop", "--address", address, job_id]
    subprocess.run(stop, env=env, check=True, capture_output=True, timeout=120)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step-{steps[-1]:06d}"]  # the step it stopped at, saved on SIGTERM
