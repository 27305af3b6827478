"""Evaluation tables kept by what they depend on, so a base model is evaluated once.

Every run of a config starts by evaluating its base model on the same held-out samples,
which on a laptop delays the first iteration by about 6 s. The table is a function of the
weights, the sampler, the guidance, the number of samples, and the code that samples and
checks them; its key hashes all of these. Tables are looked up in the package (the shipped
model's, for the shipped configs) and in the user's cache, where new ones are stored.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import diffusers
import torch

from raydraft.models.base import Policy
from raydraft.sampling.samplers import Sampler

SHIPPED = Path(__file__).resolve().parent / "assets" / "evaluations"
# The code a table depends on besides the weights (a change to any of it is a new key).
TABLE_SOURCES = (
    "raydraft.evaluation",
    "raydraft.rewards.shapes_checker",
    "raydraft.data.shapes",
    "raydraft.sampling.loop",
    "raydraft.sampling.samplers",
    "raydraft.sampling.flow",
    "raydraft.sampling.ddim",
    "raydraft.models.base",
)


def user_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "raydraft" / "evaluations"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(policy: Policy) -> list[str]:
    """One digest per distinct module state of the policy: a frozen reference copy that
    still equals the trained module adds nothing, so the key is the same with or without."""
    digests = set()
    for module in policy.modules():
        h = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(_tensor_bytes(tensor))
        digests.add(h.hexdigest())
    return sorted(digests)


def evaluation_key(
    policy: Policy, sampler: Sampler, guidance: float, per_category: int, batch_size: int
) -> str:
    """What `raydraft.evaluation.evaluate`'s table depends on, hashed."""
    sampler_state = {
        k: v.tolist() if isinstance(v, torch.Tensor) else v
        for k, v in sorted(vars(sampler).items())
        if isinstance(v, torch.Tensor | int | float | str | bool)
    }
    code = hashlib.sha256()
    for module in TABLE_SOURCES:
        code.update(inspect.getsource(importlib.import_module(module)).encode())
    record = {
        "weights": weights_digest(policy),
        "sampler": [type(sampler).__name__, sampler_state],
        "guidance": guidance,
        "per_category": per_category,
        "batch_size": batch_size,
        "code": code.hexdigest(),
        "versions": [torch.__version__.split("+")[0], diffusers.__version__],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def cached_table(key: str) -> tuple[dict[str, Any], str] | None:
    """(table, where it was found), from the package or the user's cache."""
    for source, root in (("shipped", SHIPPED), ("cached", user_cache())):
        path = root / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())["table"], source
    return None


def store_table(key: str, table: dict[str, Any], root: Path | None = None) -> Path:
    """Keep `table` under `key` (the user's cache unless `root`)."""
    root = root or user_cache()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"table": table}, indent=1))
    tmp.replace(path)
    return path
