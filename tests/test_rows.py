"""Batches take rows and join through one implementation (`raydraft.rows.Rows`): a field
added to a batch is sliced and joined with no code, or fails loudly; none is forgotten."""

import dataclasses
import importlib
import inspect
import pkgutil
from dataclasses import dataclass

import pytest
import torch

import raydraft
from raydraft.rows import Rows


@dataclass
class Inner(Rows):
    values: torch.Tensor


@dataclass
class Batch(Rows):
    shared = ("step", "version")
    combine = {"version": min}  # noqa: RUF012

    tensor: torch.Tensor
    names: list[str]
    by_name: dict[str, torch.Tensor]
    nested: Inner
    absent: torch.Tensor | None
    step: int
    version: int


def batch(offset: int, rows: int = 3, version: int = 0) -> Batch:
    index = torch.arange(offset, offset + rows)
    return Batch(
        tensor=index * 10, names=[f"row {i}" for i in index.tolist()],
        by_name={"a": index.float()}, nested=Inner(index * 100), absent=None,
        step=7, version=version,
    )  # fmt: skip


def test_every_kind_of_per_row_field_is_selected_and_joined():
    picked = batch(0).select(torch.tensor([2, 0]))
    assert picked.tensor.tolist() == [20, 0] and picked.names == ["row 2", "row 0"]
    assert picked.by_name["a"].tolist() == [2.0, 0.0] and picked.nested.values.tolist() == [200, 0]
    assert picked.absent is None and picked.step == 7
    joined = Batch.concat([batch(0, version=3), batch(3, version=2)])
    assert joined.tensor.tolist() == [i * 10 for i in range(6)]
    assert joined.names == [f"row {i}" for i in range(6)]
    assert joined.nested.values.tolist() == [i * 100 for i in range(6)]
    assert (joined.step, joined.version) == (7, 2)


def test_a_shared_field_must_agree_unless_combined():
    other = dataclasses.replace(batch(3), step=8)
    with pytest.raises(ValueError, match=r"Batch parts differ in their shared 'step'"):
        Batch.concat([batch(0), other])


def test_a_scalar_field_not_declared_shared_fails_loudly():
    @dataclass
    class Forgot(Rows):
        values: torch.Tensor
        temperature: float

    with pytest.raises(TypeError, match=r"'temperature' \(float\) has no rows: declare it shared"):
        Forgot(torch.zeros(2), 0.5).select([0])
    with pytest.raises(TypeError, match=r"'temperature'"):
        Forgot.concat([Forgot(torch.zeros(2), 0.5)] * 2)


def batch_classes() -> list[type]:
    """Every dataclass in raydraft that has a length: a batch of rows."""
    found = []
    for info in pkgutil.walk_packages(raydraft.__path__, "raydraft."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            ours = cls.__module__ == info.name and dataclasses.is_dataclass(cls)
            if ours and "__len__" in vars(cls):
                found.append(cls)
    return found


def test_every_batch_in_the_project_takes_and_joins_rows_generically():
    classes = batch_classes()
    names = {cls.__name__ for cls in classes}
    assert {"PromptBatch", "Conditioning", "Trajectory", "RolloutResult", "DraftBatch"} <= names
    assert {"GRPOBatch", "GRPORollout", "NFTBatch", "NFTRollout"} <= names
    for cls in classes:
        assert issubclass(cls, Rows), cls
        assert "select" not in vars(cls) and "concat" not in vars(cls), cls
