"""The benchmarks run end to end (their numbers go to docs/benchmarks.md, not to tests)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from raydraft.bench.machine import cpu_model, describe
from raydraft.cli import main


@pytest.mark.parametrize(
    ("family", "samplers"),
    [
        ("sd", ["ours, DDIM eta 0", "ours, DDIM eta 1 + log-probs"]),
        ("flux", ["ours, flow ODE", "ours, flow SDE + log-probs"]),
    ],
)
def test_sampler_bench_prints_a_ratio_per_sampler(capsys, family, samplers):
    assert main(["bench", "sampler", f"family={family}", "steps=2", "batch=1", "repeats=1"]) == 0
    out = capsys.readouterr().out
    assert describe() in out.splitlines()[0]  # the header names the machine
    rows = [line for line in out.splitlines() if re.match(r"\| \w", line)]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| pipeline", *(f"| {s}" for s in samplers)]
    assert all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows[1:])


def test_the_machine_line_names_the_processor_and_torchs_cpu_kernels():
    line = describe()
    assert cpu_model() in line and torch.__version__ in line
    assert f"kernels {torch.backends.cpu.get_cpu_capability()}" in line


@pytest.mark.slow  # starts its own Ray instance and Serve (about 40 s)
def test_rewards_bench_prints_a_ratio_per_reward():
    command = [sys.executable, "-m", "raydraft", "bench", "rewards", "rewards=pickscore,ocr",
               "batch=2", "side=128", "repeats=1"]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600).stdout
    rows = [line for line in out.splitlines() if re.match(r"\| (pickscore|ocr) ", line)]
    assert [r.split(" | ")[0] for r in rows] == ["| pickscore", "| ocr"], out
    assert all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows)


@pytest.mark.slow  # trains the embedded default one iteration per arm and evaluates (~30 s)
def test_lowprec_bench_prints_a_row_per_arm(capsys):
    assert main(["bench", "lowprec", "minutes=0", "eval_per_category=1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| full", "| fp8-explore", "| nvfp4-explore"]
    # fidelity: none in full precision, one audit per explored iteration
    assert rows[0].endswith("| - |") and all(r.endswith("(1) |") for r in rows[1:])


@pytest.mark.parametrize(
    ("bench", "count"),
    [("draft-cost", "steps"), ("gpu", "steps"), ("sampler", "batch"), ("lowprec", "seed"),
     ("rewards", "batch"), ("system", "steps")],
)  # fmt: skip
def test_an_unknown_or_mistyped_bench_option_is_named(bench, count):
    """Each bench reads its options before it starts anything (Ray, a model, a GPU)."""
    with pytest.raises(SystemExit, match=rf"{bench}: unknown option 'batchsize'; options: \["):
        main(["bench", bench, "batchsize=4"])
    with pytest.raises(SystemExit, match=rf"{bench}: option {count}='two' is not a int"):
        main(["bench", bench, f"{count}=two"])
