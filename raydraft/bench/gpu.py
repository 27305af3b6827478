"""`raydraft bench gpu` (`scripts/gpu-check`): the paths that only a GPU exercises, on the
full-size architectures with random weights, in one table.

- matrix products: bf16 and FP8 (rowwise scales, `torch._scaled_mm`) at 8192³;
- per family (SD3.5 Medium, FLUX.1-dev at 1024²): the denoiser's prediction in bf16 and
  through the rollouts' FP8 W8A8 copy (`raydraft.precision.rollout_copy`, the family's
  full-precision layers), its relative error, end-to-end rollouts
  (prompt encoding, the flow SDE with per-step log-probs, VAE decode) each way, the
  re-quantization time of a weight sync, and a colocated swap to host memory and back;
- FSDP2 over NCCL: one full fine-tuning step of SD3.5 Medium's transformer, sharded,
  and the full-state gather a weight sync makes;
- NCCL weight broadcast between ranks: not in this script (it needs two GPUs and Ray).

Each check is timed and reported on its own; one that fails prints its error and the
rest go on. `size=small device=cpu` runs every path on tiny models (the tests do), where
FP8 is the exact emulation.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options
from raydraft.bench.timing import median_seconds

DEFAULTS = {"size": "full", "families": "sd3,flux", "steps": 10, "repeats": 2, "device": "cuda"}
BATCH = {("sd3", "full"): 8, ("flux", "full"): 4, ("sd3", "small"): 2, ("flux", "small"): 2}
SIDE = {"full": 1024, "small": 64}
GUIDANCE = {"sd3": 4.5, "flux": 3.5}  # the pipelines' defaults
T5_TOKENS = {"sd3": 256, "flux": 512}  # likewise


class Table:
    """Rows printed as they are measured, so a run cut short still shows what it got."""

    def __init__(self) -> None:
        print("| check | model | measure | value |\n|---|---|---|---|", flush=True)

    def row(self, check: str, model: str, measure: str, value: str) -> None:
        print(f"| {check} | {model} | {measure} | {value} |", flush=True)


def run(options: list[str]) -> None:
    opts = parse_options("gpu", options, DEFAULTS)
    device = opts["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("raydraft bench gpu: no CUDA GPU on this machine, so there is nothing to check "
              f"({describe()}). Run it where a GPU is.")  # fmt: skip
        return
    size, steps, repeats = opts["size"], opts["steps"], opts["repeats"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"# raydraft bench gpu: {describe(device)}, {size} models, {dtype}, "
          f"{steps} sampler steps, median of {repeats}")  # fmt: skip
    table = Table()
    start = time.perf_counter()
    checks: list[tuple[str, Callable[[], None]]] = [
        ("matmul", lambda: check_matmul(table, device, size)),
        *[
            (family, lambda f=family: check_family(table, f, size, device, dtype, steps, repeats))
            for family in opts["families"].split(",")
        ],
        ("fsdp2", lambda: check_fsdp2(table, size, device, dtype)),
        ("nccl broadcast", lambda: check_broadcast(table, device)),
    ]
    for name, check in checks:
        try:
            check()
        except Exception as error:  # one broken path must not hide the others
            table.row(name, "-", "FAILED", f"{type(error).__name__}: {error}".replace("|", "/"))
            traceback.print_exc()
        finally:
            _release(device)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    def synced() -> None:
        fn()
        _sync(device)

    return median_seconds(synced, repeats, warm_up=True)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


@contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are allocated and initialised on `device` in `dtype`:
    a 12B-weight FLUX transformer in float32 on the host would take minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def check_matmul(table: Table, device: str, size: str) -> None:
    from raydraft.precision.formats import quantize_fp8
    from raydraft.precision.layers import fp8_kernels

    n = 8192 if size == "full" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n**3
    bf16 = _seconds(lambda: a @ b, device, 10)
    table.row("matmul", f"{n}³", "bf16 TFLOP/s", f"{flops / bf16 / 1e12:.0f}")
    if not fp8_kernels(torch.device(device)):
        table.row("matmul", f"{n}³", "fp8 TFLOP/s", "no FP8 kernels on this device")
        return
    qa, sa = quantize_fp8(a, rowwise=True)
    qb, sb = quantize_fp8(b, rowwise=True)  # rows of b are columns of the product

    def fp8() -> torch.Tensor:
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)

    seconds = _seconds(fp8, device, 10)
    table.row("matmul", f"{n}³", "fp8 rowwise TFLOP/s", f"{flops / seconds / 1e12:.0f}")
    table.row("matmul", f"{n}³", "fp8 / bf16 speed", f"{bf16 / seconds:.2f}×")


def _build_policy(family: str, size: str, device: str, dtype: torch.dtype):
    from raydraft.bench.sampler import build_flux_pipeline, build_sd3_pipeline
    from raydraft.config import ModelConfig
    from raydraft.models.flux import FluxPolicy
    from raydraft.models.sd3 import SD3Policy

    build, policy_class = {
        "sd3": (build_sd3_pipeline, SD3Policy),
        "flux": (build_flux_pipeline, FluxPolicy),
    }[family]
    torch.manual_seed(0)
    with built_on(device, dtype):
        pipe = build(size)
    cfg = ModelConfig(
        family=family, dtype=str(dtype).removeprefix("torch."), device=device,
        resolution=SIDE[size], max_sequence_length=T5_TOKENS[family] if size == "full" else 32,
    )  # fmt: skip
    return policy_class(pipe, cfg)


def check_family(
    table: Table, family: str, size: str, device: str, dtype: torch.dtype, steps: int,
    repeats: int,
) -> None:  # fmt: skip
    from raydraft.config import RolloutConfig, SamplerConfig
    from raydraft.offload import move_policy, release_cached_memory
    from raydraft.precision.rollout_copy import RolloutCopy
    from raydraft.sampling.loop import StepNoise, denoise
    from raydraft.sampling.samplers import build_sampler
    from raydraft.seeds import SDE_NOISE

    name = {"sd3": "SD3.5-Medium", "flux": "FLUX.1-dev"}[family] + f" ({size})"
    full = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    start = time.perf_counter()
    policy = _build_policy(family, size, device, dtype)
    _sync(device)
    weights = sum(p.numel() for m in policy.modules() for p in m.parameters())
    table.row(family, name, "weights; build seconds",
              f"{weights / 1e9:.2f}B; {time.perf_counter() - start:.0f} s")  # fmt: skip
    batch, guidance = BATCH[family, size], GUIDANCE[family]
    prompts = [f"a photo of thing {i}" for i in range(batch)]
    seeds = list(range(batch))
    sampler = build_sampler(SamplerConfig(kind="sde", noise_level=0.7), policy, steps)
    x = policy.initial_noise(seeds)
    t = torch.full((batch,), 0.5, device=device)

    def rollout() -> None:
        result = denoise(
            policy, policy.encode(prompts), policy.initial_noise(seeds), sampler, range(steps),
            guidance, StepNoise(seeds, SDE_NOISE), torch.ones(steps, dtype=torch.bool),
            record=True,
        )  # fmt: skip
        policy.decode(result.x)

    with torch.no_grad():
        cond = policy.encode(prompts)
        reference = policy.predict(x, t, cond, guidance).float()
        seconds = {full: _seconds(lambda: policy.predict(x, t, cond, guidance), device, 3)}
        images_s = {full: batch / _seconds(rollout, device, repeats)}
        table.row(family, name, f"denoiser {full}, batch {batch}",
                  f"{seconds[full] * 1e3:.0f} ms")  # fmt: skip
        table.row(family, name, f"rollout {full} images/s", f"{images_s[full]:.2f}")

        # The rollouts' own low-precision copy, with the family's full-precision layers;
        # `merge` re-quantizes W + s·BA at each sync, the costlier LoRA mode.
        # (The small models are narrower than SD3's and FLUX's default min_dim: all go.)
        rollout_cfg = RolloutConfig(
            precision="fp8", lora="merge", min_dim=0 if size == "small" else None
        )
        copy = RolloutCopy(rollout_cfg, family)
        with copy.sampling(policy):
            out = policy.predict(x, t, cond, guidance).float()
            error = (out - reference).norm() / reference.norm()
            seconds["fp8"] = _seconds(lambda: policy.predict(x, t, cond, guidance), device, 3)
            images_s["fp8"] = batch / _seconds(rollout, device, repeats)
            kinds = sorted({type(swap.stand_in).__name__ for swap in copy.swaps})
        policy.version += 1  # as after a weight sync: the copy re-quantizes on next use
        with copy.sampling(policy):
            _sync(device)
    table.row(family, name, f"denoiser fp8 W8A8 ({len(copy.swaps)} layers, {'/'.join(kinds)})",
              f"{seconds['fp8'] * 1e3:.0f} ms, {seconds[full] / seconds['fp8']:.2f}× {full}, "
              f"relative error {error:.4f}")  # fmt: skip
    table.row(family, name, "rollout fp8 images/s",
              f"{images_s['fp8']:.2f}, {images_s['fp8'] / images_s[full]:.2f}× {full}")  # fmt: skip
    refresh, iteration = copy.refresh_seconds, batch / images_s["fp8"]
    table.row(
        family,
        name,
        "re-quantize at sync (LoRA merged)",
        f"{refresh * 1e3:.0f} ms ({100 * refresh / iteration:.1f} % of one fp8 rollout)",
    )

    if device == "cuda":
        held = torch.cuda.memory_allocated()
        start = time.perf_counter()
        move_policy(policy, "cpu")
        release_cached_memory()
        out_seconds, left = time.perf_counter() - start, torch.cuda.memory_allocated()
        start = time.perf_counter()
        move_policy(policy, device)
        _sync(device)
        table.row(family, name, "colocated swap: GPU memory held → after swap-out",
                  f"{_gib(held)} → {_gib(left)}; out {out_seconds:.1f} s, "
                  f"in {time.perf_counter() - start:.1f} s")  # fmt: skip


def check_fsdp2(table: Table, size: str, device: str, dtype: torch.dtype) -> None:
    """One sharded full fine-tuning step of SD3.5 Medium's transformer (world size 1 here:
    the NCCL process group, sharding, reduce-scatter and full-state gather all run)."""
    import torch.distributed as dist

    from raydraft.bench.sampler import build_sd3_pipeline
    from raydraft.sharding import gather, shard_module

    backend = "nccl" if device == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        with built_on(device, dtype):
            transformer = build_sd3_pipeline(size).transformer
        transformer.enable_gradient_checkpointing()
        shard_module(transformer)
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-6)
        config, batch = transformer.config, 1
        side = config.sample_size
        inputs = {
            "hidden_states": torch.randn(batch, 16, side, side, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, 333, config.joint_attention_dim, device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(
                batch, config.pooled_projection_dim, device=device, dtype=dtype
            ),
            "timestep": torch.full((batch,), 500.0, device=device),
        }

        def step() -> None:
            loss = transformer(**inputs, return_dict=False)[0].float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        seconds = _seconds(step, device, 2)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        gather_seconds = _seconds(lambda: gather(transformer.state_dict()), device, 2)
        table.row("fsdp2", f"SD3.5-Medium transformer ({size})",
                  f"{backend} full fine-tune step, batch {batch}, checkpointed",
                  f"{seconds:.2f} s, peak {_gib(peak)}")  # fmt: skip
        table.row("fsdp2", f"SD3.5-Medium transformer ({size})", "full-state gather (sync)",
                  f"{gather_seconds * 1e3:.0f} ms")  # fmt: skip
    finally:
        dist.destroy_process_group()


def check_broadcast(table: Table, device: str) -> None:
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    table.row(
        "nccl broadcast",
        "-",
        "learner → worker weights",
        f"not checked by this script: needs 2 GPUs and Ray (this machine has {gpus})",
    )
