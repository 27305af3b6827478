"""Benchmarks: `raydraft bench NAME` prints ratios measured side by side in one run."""

from raydraft.bench.draft_cost import run as draft_cost
from raydraft.bench.gpu import run as gpu
from raydraft.bench.lowprec import run as lowprec
from raydraft.bench.sampler import run as sampler

BENCHES = {"draft-cost": draft_cost, "gpu": gpu, "lowprec": lowprec, "sampler": sampler}
