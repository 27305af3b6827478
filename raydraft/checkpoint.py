"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory `step-000120/` holds `tensors.safetensors` (trainable weights,
optimizer moments, EMA, RNG states) and `state.json` (step, version, optimizer hyper-
parameters, data cursor). It is written under a temporary name and renamed, so a crash
never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raydraft.ema import EMA
from raydraft.models.base import Policy

_PREFIX = "step-"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    return {"state": slots, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `root` and prune all but the newest `keep`."""
    root = Path(root)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    flat = {
        f"{group}/{k}": v.detach().contiguous().cpu()
        for group, d in tensors.items()
        for k, v in d.items()
    }
    flat |= {f"optimizer/{k}": v.detach().contiguous().cpu() for k, v in opt_tensors.items()}
    save_file(flat, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def load_checkpoint(
    path: str | Path,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensor groups, optimizer state dict, state) of a checkpoint directory."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a raydraft checkpoint (no state.json)")
    flat = load_file(str(path / "tensors.safetensors"))
    state = json.loads((path / "state.json").read_text())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    optimizer = _unflatten_optimizer(groups.pop("optimizer", {}), state.pop("optimizer"))
    return groups, optimizer, state


def load_for_inference(policy: Policy, run_dir: str | Path) -> int:
    """The newest checkpoint's weights into `policy` (its EMA weights when it kept them)."""
    tensors, _, state = load_checkpoint(newest_checkpoint(Path(run_dir) / "checkpoints"))
    policy.load_trainable(tensors["trainable"], state["policy_version"])
    if "ema" in tensors:
        ema = EMA(policy.trainable_parameters(), decay=0.5)
        ema.load_state_dict(tensors["ema"])
        ema.copy_to_parameters()
    return state["step"]


def newest_checkpoint(root: Path) -> Path:
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"{root}: no checkpoint to resume from")
    return found[-1]
