"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory `step-000120/` holds `tensors.safetensors` (trainable weights,
optimizer moments, EMA, RNG states) and `state.json` (step, version, optimizer hyper-
parameters, data cursor). It is written under a temporary name and renamed, so a crash
never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from raydraft.ema import EMA
from raydraft.local_weights import first_line
from raydraft.models.base import Policy

_PREFIX = "step-"
logger = logging.getLogger(__name__)


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


def load_for_inference(policy: Policy, run_dir: str | Path, step: int | None = None) -> int:
    """Checkpoint `step`'s weights (default: the newest complete checkpoint's) into `policy`,
    its EMA weights when it kept them: what sampling, evaluation and export use. Returns the
    step."""
    root = Path(run_dir) / "checkpoints"
    path = newest_checkpoint(root) if step is None else checkpoint_at(root, step)
    tensors, _, state = load_checkpoint(path)
    policy.load_trainable(tensors["trainable"], state["policy_version"])
    if "ema" in tensors:
        ema = EMA(policy.trainable_parameters(), decay=0.5)
        ema.load_state_dict(tensors["ema"])
        ema.copy_to_parameters()
    return state["step"]


def checkpoint_at(root: Path, step: int) -> Path:
    """The checkpoint of `step` under `root`; the error lists the steps there are, or names
    the file that cannot be loaded."""
    path = root / f"{_PREFIX}{step:06d}"
    if not path.is_dir():
        steps = [int(p.name.removeprefix(_PREFIX)) for p in list_checkpoints(root)]
        raise FileNotFoundError(f"{root}: no checkpoint of step {step} (there are steps {steps})")
    problem = incomplete(path)
    if problem is not None:
        raise FileNotFoundError(problem)
    return path


def newest_checkpoint(root: Path) -> Path:
    """The newest complete checkpoint under `root`. Checkpoints are renamed into place whole,
    but a full disk or an interrupted copy of a run directory can still cut a file short:
    such a checkpoint is skipped with a warning naming the file and the checkpoint used
    instead (`checkpoint.keep` retains the previous ones for this)."""
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"{root}: no checkpoint there")
    skipped = []
    for path in reversed(found):
        problem = incomplete(path)
        if problem is None:
            for bad in skipped:
                logger.warning("%s; using %s instead", bad, path)
            return path
        skipped.append(problem)
    raise FileNotFoundError(f"{root}: no complete checkpoint ({'; '.join(skipped)})")


def incomplete(path: Path) -> str | None:
    """Why checkpoint `path` cannot be loaded, naming the file; None when it can. Reads only
    state.json and the safetensors header, which records the file's full length."""
    tensors, state = path / "tensors.safetensors", path / "state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"{state} cannot be loaded ({first_line(err)})"
    try:
        with safe_open(str(tensors), "pt"):
            pass
    except (OSError, SafetensorError) as err:
        return f"{tensors} cannot be loaded ({first_line(err)})"
    return None
