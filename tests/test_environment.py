"""The trainer's environment stays importable. A torchvision built for another torch (PyPI's
beside the CPU torch here, pulled in by open_clip, easyocr, hpsv2, image-reward or vllm)
fails on import, and transformers imports it when present: `from transformers import
CLIPModel` breaks with it. Such packages belong in a reward deployment's own environment."""

import subprocess
import sys

CHECK = """
import importlib.util
if importlib.util.find_spec("torchvision") is not None:
    import torch
    import torchvision
    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
from transformers import CLIPModel
"""


def imports_cleanly(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300
    )


def test_torchvision_is_absent_or_works_beside_transformers():
    result = imports_cleanly()
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_catches_a_broken_torchvision(tmp_path):
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    result = imports_cleanly({"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert result.returncode != 0 and "torchvision::nms" in result.stderr
