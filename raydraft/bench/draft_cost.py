"""`raydraft bench draft-cost`: what backpropagating through K sampler steps costs.

For K in {1, 2, T/2, T}: seconds per DRaFT-K update (no-grad prefix + K steps with
gradients + decode + reward + backward) divided by seconds of no-grad sampling of the
same batch, and the peak resident memory of the update with and without activation
checkpointing per model call (`algorithm.checkpoint_each_step`). CPU has no resettable
peak-memory counter, so every cell runs in a fresh process and reads its own
`ru_maxrss`; all cells run in this one invocation.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options
from raydraft.bench.timing import median_seconds

DEFAULTS = {"config": "toy-draft-k", "batch": 8, "steps": 8, "repeats": 3}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str, batch: int, steps: int, k: int, checkpoint: bool, repeats: int) -> dict:
    """One cell, in this process: sampling seconds, update seconds, peak memory."""
    from raydraft.build import build_algorithm, build_policy
    from raydraft.config import load_config
    from raydraft.data.prompts import PromptBatch
    from raydraft.rewards.registry import build_reward
    from raydraft.sampling.loop import sample_images

    torch.manual_seed(0)
    cfg = load_config(
        config,
        [
            f"sampler.num_steps={steps}",
            f"algorithm.truncation_steps={k}",
            f"algorithm.checkpoint_each_step={str(checkpoint).lower()}",
        ],
    )
    policy = build_policy(cfg.model)
    algorithm = build_algorithm(cfg, policy, build_reward(cfg.rewards))
    prompts = PromptBatch(
        ["a red circle"] * batch,
        torch.zeros(batch, dtype=torch.long),
        torch.arange(batch),
        [{} for _ in range(batch)],
    )
    generator = torch.Generator().manual_seed(0)

    def sample() -> None:
        seeds, guidance = prompts.seeds.tolist(), cfg.sampler.guidance_scale
        sample_images(policy, algorithm.sampler, prompts.prompts, seeds, guidance)

    def update() -> None:
        rollout = algorithm.rollout(policy, prompts, generator)
        loss, _ = algorithm.loss(policy, rollout)
        loss.backward()
        for p in policy.trainable_parameters():
            p.grad = None

    sample_s = median_seconds(sample, repeats, warm_up=True)
    before = _peak_rss_mb()
    update_s = median_seconds(update, repeats)
    return {
        "k": k,
        "checkpoint": checkpoint,
        "sample_s": sample_s,
        "update_s": update_s,
        "peak_rss_mb": _peak_rss_mb(),
        "update_extra_peak_mb": _peak_rss_mb() - before,
    }


def run(options: list[str]) -> list[dict]:
    opts = parse_options("draft-cost", options, DEFAULTS)
    steps = opts["steps"]
    ks = sorted({1, 2, steps // 2, steps})
    print(
        f"draft-cost: {opts['config']}, batch {opts['batch']}, T={steps} steps, "
        f"{torch.get_num_threads()} threads, {describe()}"
    )
    rows = []
    for k in ks:
        for checkpoint in (False, True):
            args = [k, checkpoint, opts["config"], opts["batch"], steps, opts["repeats"]]
            out = subprocess.run(
                [sys.executable, "-m", "raydraft.bench.draft_cost", *map(str, args)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'K':>3} {'ckpt':>5} {'update s':>9} {'sample s':>9} {'update/sample':>14} "
          f"{'peak MB':>8} {'update extra MB':>16}")  # fmt: skip
    for r in rows:
        print(
            f"{r['k']:>3} {('on' if r['checkpoint'] else 'off'):>5} {r['update_s']:>9.3f} "
            f"{r['sample_s']:>9.3f} {r['update_s'] / r['sample_s']:>14.2f} "
            f"{r['peak_rss_mb']:>8.0f} {r['update_extra_peak_mb']:>16.0f}"
        )
    return rows


if __name__ == "__main__":
    k, ckpt, config, batch, steps, repeats = sys.argv[1:]
    result = measure(config, int(batch), int(steps), int(k), ckpt == "True", int(repeats))
    print(json.dumps(result))
