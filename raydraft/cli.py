"""`raydraft train | eval | sample | export | serve-rewards | dashboards | bench | report`."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from raydraft.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, load_config

if TYPE_CHECKING:
    from raydraft.trainer import Engine


def _run_dir(name: str) -> Path:
    """runs/<name>, or runs/<name>-N when that one is taken."""
    base = Path("runs") / name
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def _run_config(run_dir: Path, overrides: list[str], option: str) -> ExperimentConfig:
    """The config a run directory was trained with (`option` names where it was given)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{option} {run_dir}: no config.yaml there (not a run directory)")
    return load_config(config_path, overrides)


def train(args: argparse.Namespace) -> int:
    from raydraft.rewards.registry import check_reward_names
    from raydraft.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        cfg = _run_config(run_dir, args.overrides, "--resume")
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else _run_dir(cfg.name)
    check_reward_names(cfg.rewards)
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    if args.local:
        cfg = cfg.model_copy(update={"runtime": "local"})
    if args.address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": args.address})})
    with _engine(cfg) as engine, _sigterm_interrupts():
        trainer = Trainer(cfg, run_dir, engine=engine)
        if args.resume:
            step = trainer.resume()
            print(f"resumed {run_dir} at step {step}")
        history = trainer.fit()
    if history:
        first, last = history[0], history[-1]
        print(
            f"{cfg.name}: {trainer.step} steps, reward {first.get('reward_mean', float('nan')):.4f}"
            f" -> {last.get('reward_mean', float('nan')):.4f}, "
            f"{last['images_per_s']:.1f} images/s\nrun directory: {run_dir}"
        )
    return 0


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`ray job stop`, `kill`, a preempted pod) acts like Ctrl-C: the trainer
    checkpoints and the roles shut down. Ray sends SIGKILL 3 s later unless
    RAY_JOB_STOP_WAIT_TIME_S says otherwise: raise it where a checkpoint takes longer."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _engine(cfg: ExperimentConfig) -> Iterator[Engine | None]:
    """None for the single-process trainer; else the Ray runtime, shut down on the way out."""
    if cfg.runtime == "local":
        yield None
        return
    import os

    import ray

    from raydraft_ray.cluster import connect
    from raydraft_ray.engine import RayEngine, required_cpus

    started = connect(cfg.ray.address, num_cpus=max(os.cpu_count() or 1, required_cpus(cfg)))
    engine = None
    try:
        engine = RayEngine(cfg)
        yield engine
    finally:
        if engine is not None:
            engine.close()
        if started:
            ray.shutdown()


def evaluate(args: argparse.Namespace) -> int:
    """GenEval-style table of the base model, and of a run's newest checkpoint if given."""
    import json

    from raydraft.build import build_policy, eval_sampler
    from raydraft.checkpoint import load_for_inference
    from raydraft.evaluation import evaluate as run_eval
    from raydraft.evaluation import format_table

    run_dir = Path(args.run_dir) if args.run_dir else None
    source = run_dir / "config.yaml" if run_dir else args.config
    cfg = load_config(source, args.overrides)
    per_category = args.per_category or cfg.logging.eval_per_category or 48
    guidance = cfg.sampler.guidance_scale
    policy = build_policy(cfg.model)
    sampler = eval_sampler(cfg, policy)
    tables = {"base": run_eval(policy, sampler, guidance, per_category)}
    report: dict = {"base": tables["base"], "base_step": 0, "per_category": per_category}
    if run_dir:
        step = load_for_inference(policy, run_dir)
        tables[f"step {step}"] = run_eval(policy, sampler, guidance, per_category)
        report |= {"final": tables[f"step {step}"], "final_step": step}
        (run_dir / "eval.json").write_text(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(tables))
    return 0


def sample(args: argparse.Namespace) -> int:
    """Images for prompts with the deterministic sampler: a base model or a run's weights."""
    from raydraft.build import build_policy, eval_sampler
    from raydraft.checkpoint import load_for_inference
    from raydraft.sample_grids import image_grid
    from raydraft.sampling.loop import sample_images

    run_dir = Path(args.run_dir) if args.run_dir else None
    cfg = load_config(run_dir / "config.yaml" if run_dir else args.config, args.overrides)
    policy = build_policy(cfg.model)
    if run_dir:
        print(f"{run_dir}: step {load_for_inference(policy, run_dir)}")
    seeds = [args.seed + i for i in range(len(args.prompt))]
    images = sample_images(
        policy, eval_sampler(cfg, policy), args.prompt, seeds, cfg.sampler.guidance_scale
    )
    image_grid(images, columns=min(len(images), 8)).save(args.out)
    print(args.out)
    return 0


def export(args: argparse.Namespace) -> int:
    """A run's checkpoint (EMA weights where kept, as `sample --run-dir` draws) in the form
    that its model's own tools load: a diffusers LoRA (`pipe.load_lora_weights(OUT)`), a
    whole diffusers pipeline for a full fine-tune, or a toy model directory (`model.path`)."""
    from raydraft.build import build_policy
    from raydraft.checkpoint import load_for_inference

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir, args.overrides, "--run-dir")
    policy = build_policy(cfg.model)
    step = load_for_inference(policy, run_dir, args.step)
    policy.export(args.out)
    print(f"{run_dir} step {step} -> {args.out}")
    return 0


def serve_rewards(args: argparse.Namespace) -> int:
    """The config's rewards on Ray Serve behind HTTP until interrupted."""
    import os
    import time

    import ray
    from ray import serve

    from raydraft.rewards.registry import check_reward_names
    from raydraft_ray.cluster import connect
    from raydraft_ray.engine import required_cpus
    from raydraft_ray.reward_http import serve_rewards_http

    cfg = load_config(args.config, args.overrides)
    check_reward_names(cfg.rewards)
    started = connect(args.address, num_cpus=max(os.cpu_count() or 1, required_cpus(cfg)))
    try:
        with _sigterm_interrupts():
            print(f"serving rewards {[c.name for c in cfg.rewards.components]} at "
                  f"{serve_rewards_http(cfg)}/v1/rewards/NAME/score", flush=True)  # fmt: skip
            while True:
                time.sleep(3600)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()


def dashboards(args: argparse.Namespace) -> int:
    from raydraft.dashboards import write

    for path in write(args.out):
        print(path)
    return 0


def report(args: argparse.Namespace) -> int:
    """One self-contained report.html of a run directory (charts, samples, eval, config)."""
    from raydraft.report.page import write_report

    print(write_report(args.run_dir, args.out))  # not a run directory: FileNotFoundError
    return 0


RAY_BENCHES = ("rewards", "system")


def bench(args: argparse.Namespace) -> int:
    from raydraft.bench import BENCHES

    benches = dict(BENCHES)
    if args.name in RAY_BENCHES:  # the Ray layer's benches live with it (the core has no Ray)
        benches[args.name] = importlib.import_module(f"raydraft_ray.bench_{args.name}").run
    if args.name not in benches:
        print(f"unknown bench {args.name!r}; available: {sorted([*benches, *RAY_BENCHES])}",
              file=sys.stderr)  # fmt: skip
        return 2
    benches[args.name](args.options)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="raydraft", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train (no config: the embedded default)")
    p.add_argument("--config", help=f"YAML file or shipped config name (default: {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4")
    p.add_argument("--max-steps", type=int, help="iterations to train to")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--local", action="store_true", help="single-process trainer (no Ray)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=train)

    p = commands.add_parser("eval", help="GenEval-style accuracy on held-out shapes prompts")
    p.add_argument("--run-dir", help="evaluate this run's newest checkpoint against the base")
    p.add_argument("--config", help=f"config of the model to evaluate (default: {DEFAULT_CONFIG})")
    p.add_argument("--per-category", type=int, help="held-out samples per category (default 48)")
    p.add_argument("--out", help="also write the JSON report here")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.eval_num_steps=20")
    p.set_defaults(func=evaluate)

    p = commands.add_parser("sample", help="images for prompts (any model family) as a PNG")
    p.add_argument("--config", help=f"config of the model (default: {DEFAULT_CONFIG})")
    p.add_argument("--run-dir", help="sample with this run's newest checkpoint (EMA if kept)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (then +1 each)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.eval_num_steps=30")
    p.set_defaults(func=sample)

    p = commands.add_parser("export", help="a run's weights as a diffusers LoRA or pipeline")
    p.add_argument("--run-dir", required=True, help="the run directory")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.path=DIR")
    p.set_defaults(func=export)

    p = commands.add_parser("serve-rewards", help="the config's rewards as an HTTP endpoint")
    p.add_argument("--config", required=True, help="YAML file or shipped config name")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ray.reward_http.port=9000")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=serve_rewards)

    p = commands.add_parser("dashboards", help="write the Grafana dashboard and scrape config")
    p.add_argument("--out", default="dashboards", help="directory (default: dashboards/)")
    p.set_defaults(func=dashboards)

    p = commands.add_parser("bench", help="run a benchmark and print its ratios")
    p.add_argument("name", help="benchmark name, e.g. draft-cost")
    p.add_argument("options", nargs="*", help="key=value options of the benchmark")
    p.set_defaults(func=bench)

    p = commands.add_parser("report", help="write a run's self-contained report.html")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=report)
    return root


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Mistakes a user fixes in their input (a config, a path that holds
    nothing: raydraft raises FileNotFoundError only for paths it was given) end in one
    line and exit status 2, not a traceback."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"raydraft: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
