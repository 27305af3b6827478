"""Batches made of rows: one way to take some rows and to join batches, for every batch type.

A batch is a dataclass that inherits `Rows`. Every field holds one entry per row (a tensor
whose first dimension is the batch, a list, a dict of such, a nested batch, or None)
unless the class names it in `shared`: one value for the whole batch, kept by `select`
and, in `concat`, equal in every part or combined by the class's `combine` function for
it. Per row is the default, so a new field is sliced and joined without a line of code,
and a new scalar field that is not declared shared fails loudly on the first `select`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any, ClassVar, TypeVar

import torch

R = TypeVar("R", bound="Rows")


class Rows:
    shared: ClassVar[tuple[str, ...]] = ()
    # how `concat` combines a shared field's values (default: they must be equal)
    combine: ClassVar[dict[str, Callable[[list[Any]], Any]]] = {}

    def select(self: R, index: torch.Tensor | Sequence[int]) -> R:
        """The rows of `index`, in its order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, **{name: take(value, index, name) for name, value in self._rows()})

    @classmethod
    def concat(cls: type[R], parts: Sequence[R]) -> R:
        """The rows of `parts` one after another (batches gathered from workers)."""
        first = parts[0]
        changes = {name: join([getattr(p, name) for p in parts], name) for name, _ in first._rows()}
        for name in cls.shared:
            values = [getattr(p, name) for p in parts]
            if name in cls.combine:
                changes[name] = cls.combine[name](values)
            elif not all(same(v, values[0]) for v in values[1:]):
                raise ValueError(f"{cls.__name__} parts differ in their shared {name!r}")
        return replace(first, **changes)

    def _rows(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name not in self.shared]


def take(value: Any, index: torch.Tensor, name: str) -> Any:
    """The rows `index` of one per-row field."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, list):
        return [value[i] for i in index.tolist()]
    if isinstance(value, dict):
        return {k: take(v, index, f"{name}.{k}") for k, v in value.items()}
    if hasattr(value, "select"):
        return value.select(index)
    raise TypeError(f"field {name!r} ({type(value).__name__}) has no rows: declare it shared")


def join(values: list[Any], name: str) -> Any:
    """One per-row field of several batches, concatenated."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, list):
        return [x for value in values for x in value]
    if isinstance(first, dict):
        return {k: join([v[k] for v in values], f"{name}.{k}") for k in first}
    if hasattr(first, "concat"):
        return type(first).concat(values)
    raise TypeError(f"field {name!r} ({type(first).__name__}) has no rows: declare it shared")


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
