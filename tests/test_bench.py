"""The benchmarks run end to end (their numbers go to docs/benchmarks.md, not to tests)."""

import re

import pytest

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
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \w", line)]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| pipeline", *(f"| {s}" for s in samplers)]
    assert all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows[1:])
