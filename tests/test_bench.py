"""The benchmarks run end to end (their numbers go to docs/benchmarks.md, not to tests)."""

import re

from raydraft.cli import main


def test_sampler_bench_prints_a_ratio_per_sampler(capsys):
    assert main(["bench", "sampler", "steps=2", "batch=1", "repeats=1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \w", line)]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| pipeline",
        "| ours, DDIM eta 0",
        "| ours, DDIM eta 1 + log-probs",
    ]
    assert all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows[1:])
