"""`raydraft bench lowprec`: the embedded default (DiffusionNFT on the toy model) trained
for the same wall-clock budget per arm, in full precision (the shipped default) and with
Sol-RL's explore-then-regenerate from an FP8 W8A8 or an NVFP4 (weights) copy; then the
held-out strict accuracy of each (GenEval-style, the shapes world's eval prompts), the
accuracy gained per 1000 full-precision images trained on, and the low-precision arms'
ranking fidelity (audited every `fidelity_every` iterations).

On a CPU FP8 and FP4 are emulated, slower than full precision, so the wall-clock column
favours the full-precision arm here; accuracy per full-precision image is the comparison
that carries over to hardware with FP8/FP4 kernels.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options

EXPLORE = "rollout.explore={candidates: 32}"
ARMS = {
    "full": [],
    "fp8-explore": ["rollout.precision=fp8", EXPLORE],
    "nvfp4-explore": ["rollout.precision=nvfp4", "rollout.quantize_activations=false", EXPLORE],
}
DEFAULTS = {
    "minutes": 20.0,
    "arms": ",".join(ARMS),
    "seed": 0,
    "eval_per_category": 48,
    "fidelity_every": 5,
}


def run(options: list[str]) -> None:
    from raydraft.config import load_config
    from raydraft.trainer import Trainer

    opts = parse_options("lowprec", options, DEFAULTS)
    arms = opts["arms"].split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"lowprec: unknown arms {sorted(unknown)}; arms: {sorted(ARMS)}")
    print(
        f"# raydraft bench lowprec: {describe()}, {opts['minutes']} minutes per arm, "
        f"seed {opts['seed']}, {opts['eval_per_category']} eval prompts per category"
    )
    rows, base = [], None
    for arm in arms:
        cfg = load_config(None, [
            *ARMS[arm], f"seed={opts['seed']}", f"rollout.fidelity_every={opts['fidelity_every']}",
            f"logging.eval_per_category={opts['eval_per_category']}",
            "logging.progress_bar=false", "logging.sample_every=0", "checkpoint.every=0",
        ])  # fmt: skip
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir))
            if base is None:
                base = trainer.evaluate()["overall"]["strict"]
            start, metrics = time.perf_counter(), []
            while not metrics or time.perf_counter() - start < 60 * opts["minutes"]:
                metrics.append(trainer.train_step())
            seconds = time.perf_counter() - start
            accuracy = trainer.evaluate()["overall"]["strict"]
        images = len(metrics) * cfg.data.prompts_per_step * cfg.algorithm.group_size
        rhos = [m["fidelity_spearman_rho"] for m in metrics if "fidelity_spearman_rho" in m]
        rows.append((arm, len(metrics), seconds, images, accuracy, rhos))
    print(f"base model: held-out strict accuracy {base:.3f}\n")
    print(
        "| arm | iterations | seconds | full-precision images | held-out strict | "
        "gain per 1000 images | ranking Spearman (mean of audits) |\n|---|---|---|---|---|---|---|"
    )
    for arm, iterations, seconds, images, accuracy, rhos in rows:
        rho = f"{statistics.mean(rhos):.3f} ({len(rhos)})" if rhos else "-"
        gain = 1000 * (accuracy - base) / images
        print(f"| {arm} | {iterations} | {seconds:.0f} | {images} | {accuracy:.3f} | "
              f"{gain:+.4f} | {rho} |")  # fmt: skip
