"""FSDP2 for the learner ranks: weights, gradients and optimizer state sharded across ranks.

For full fine-tuning of models that do not fit one device. Each block of the denoiser
(the elements of its ModuleLists: UNet down/up blocks, transformer blocks) is a unit of
its own, then the root; the frozen reference copy is sharded the same way. Gradients are
reduce-scattered as a SUM (divide factor 1), matching the data-parallel loss weighting of
`raydraft.learner`, so N sharded ranks take the steps of one rank with the whole batch.

Checkpoints and weight syncs hold full tensors, so a sharded run resumes unsharded and the
other way round: `gather` turns DTensors into full tensors and `scatter_like` back. Both
are collectives: every rank calls them, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_module(module: torch.nn.Module) -> None:
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(module)
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def gather(tree: Any) -> Any:
    """`tree` (nested dicts/lists of tensors) with every DTensor replaced by its full value."""
    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: gather(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(gather(v) for v in tree)
    return tree


def scatter_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this rank's shard when `like` is a DTensor. Every rank
    holds the same full value (one checkpoint), so no data moves."""
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    module.load_state_dict({k: scatter_like(v, own[k]) for k, v in state.items()}, strict=True)


def scatter_optimizer_state(state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """A full optimizer state dict (params by index, one group's order) laid out as `params`:
    the moments of a sharded parameter become its shard."""
    per_param = {}
    for index, param_state in state["state"].items():
        like = params[int(index)]
        per_param[index] = {
            key: scatter_like(value, like)
            if isinstance(value, torch.Tensor) and value.shape == like.shape
            else value
            for key, value in param_state.items()
        }
    return {**state, "state": per_param}
