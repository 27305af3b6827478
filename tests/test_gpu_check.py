"""The GPU check script on a machine without a GPU: it starts, says there is none, and
every one of its checks runs on tiny models on the CPU (so the script is not first
exercised on a borrowed GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydraft.bench.gpu import run as gpu_check

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_there_is_no_gpu():
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU on this machine" in done.stdout


def test_every_check_runs_on_tiny_models(capsys):
    gpu_check(["device=cpu", "size=small", "steps=1", "repeats=1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    rows = [row for row in rows if len(row) == 4 and not row[0].startswith("|---")]
    assert not [row for row in rows if "FAILED" in row[2]]
    measures = {(row[0].strip("| "), row[2]) for row in rows}
    for family in ("sd3", "flux"):
        assert (family, "rollout fp32 images/s") in measures
        assert (family, "rollout fp8 images/s") in measures
        assert (family, "re-quantize at sync (LoRA merged)") in measures
    assert any(check == "fsdp2" for check, _ in measures)
    fp8 = [row for row in rows if row[2].startswith("denoiser fp8")]
    assert len(fp8) == 2 and all("(0 layers" not in row[2] for row in fp8)
