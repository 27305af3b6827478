"""The machine a result came from, in one line: benchmark headers and CI logs name it,
because CPU kernels (and so the last bits of batch-size dependent results) and speed
differ between processors."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> str:
    """The processor with its cores and the vector extensions torch's CPU kernels use (and
    the GPU on CUDA), with the torch version."""
    cpu = (
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()})"
    )
    if device == "cuda":
        cpu = f"{torch.cuda.get_device_name()} on {cpu}"
    return f"{cpu}, torch {torch.__version__}"
