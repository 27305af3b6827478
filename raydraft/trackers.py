"""Experiment trackers: Weights & Biases and TensorBoard, each fed every metrics row and
sample grid the run directory records, behind `logging.wandb` and `logging.tensorboard`
(off by default).

Neither package is a dependency (`pip install 'raydraft[trackers]'`), so both are imported
only when switched on. The run directory stays the record and a tracker is one more view of
it: a value a tracker cannot show (NaN, inf, text) is left out rather than failing the run.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from PIL import Image

from raydraft.config import ConfigError, LoggingConfig

EXTRA = "pip install 'raydraft[trackers]'"


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any], step: int) -> None:
        """One metrics row at `step` (its finite numbers; see `scalars`)."""
        ...

    def log_image(self, name: str, image: Image.Image, step: int) -> None: ...

    def close(self) -> None:
        """Flush and finish: what was logged is on disk (or sent) afterwards."""
        ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a row: booleans, text, NaN and inf left out, and "step",
    which is the x axis rather than a value."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def _require(module: str, switch: str) -> ModuleType:
    """Import a tracker's package, or say which switch needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"logging.{switch}=true needs {module.split('.')[0]}, which is not installed: {EXTRA}"
        ) from err


class TensorBoardTracker:
    """Event files in `log_dir`; a resumed run purges the events past its checkpoint."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        _require("tensorboard", "tensorboard")
        writer = _require("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.writer = writer(str(log_dir), purge_step=purge_step)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in `run_dir`/wandb. Its id is kept there, so a resumed
    training run continues the same W&B run instead of starting a second one. Console
    capture is off: wandb would wrap this process's stdout and stderr (the progress bar,
    the printed tables), and a run's output is in its own log already."""

    def __init__(
        self, cfg: LoggingConfig, run_dir: Path, name: str, config: Mapping[str, Any]
    ) -> None:
        self.wandb = _require("wandb", "wandb")
        id_file = run_dir / "wandb" / "run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = self.wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode,
            name=name, dir=str(run_dir), config=dict(config), id=run_id, resume="allow",
            settings=self.wandb.Settings(console="off"),
        )  # fmt: skip
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log(scalars(row), step=step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker switched on, driven as one (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(row, step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, image, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(
    cfg: LoggingConfig, run_dir: Path, name: str, config: Mapping[str, Any], step: int = 0
) -> Trackers:
    """The trackers `cfg` switches on for a run at `step` (past 0: resumed, so TensorBoard
    drops the events an interrupted run wrote after its checkpoint)."""
    trackers: list[Tracker] = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", step + 1 if step else None))
    if cfg.wandb:
        trackers.append(WandbTracker(cfg, run_dir, name, config))
    return Trackers(trackers)
