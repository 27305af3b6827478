"""The benchmarks run end to end (their numbers go to docs/benchmarks.md, not to tests)."""

import re

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
