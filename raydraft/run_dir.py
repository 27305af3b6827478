"""The run directory contract: config.yaml, metrics.jsonl, rollouts/, checkpoints/, samples/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image


class RunDirectory:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.rollouts = self.root / "rollouts"
        for path in (self.checkpoints, self.samples, self.rollouts):
            path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.root / "metrics.jsonl"
        self._pending_rollouts: list[dict[str, Any]] = []

    def write_config(self, text: str) -> None:
        (self.root / "config.yaml").write_text(text)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def write_eval(self, report: dict[str, Any]) -> None:
        (self.root / "eval.json").write_text(json.dumps(report, indent=1))

    def read_eval(self) -> dict[str, Any]:
        path = self.root / "eval.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def truncate_after(self, step: int) -> None:
        """Drop metrics and rollouts past a resumed checkpoint, so each step appears once."""
        self._pending_rollouts = [r for r in self._pending_rollouts if r["step"] <= step]
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        for path in sorted(self.rollouts.glob("*.parquet")):
            table = pq.read_table(path)
            if pc.max(table["step"]).as_py() <= step:
                continue
            kept_rows = table.filter(pc.less_equal(table["step"], step))
            path.unlink()
            if kept_rows.num_rows:
                first = pc.min(kept_rows["step"]).as_py()
                pq.write_table(kept_rows, self.rollouts / f"steps-{first:06d}-{step:06d}.parquet")

    def add_rollouts(self, records: list[dict[str, Any]]) -> None:
        self._pending_rollouts += records

    def flush_rollouts(self) -> Path | None:
        """Write the rollouts logged since the last flush (called at each checkpoint)."""
        if not self._pending_rollouts:
            return None
        steps = [r["step"] for r in self._pending_rollouts]
        path = self.rollouts / f"steps-{min(steps):06d}-{max(steps):06d}.parquet"
        pq.write_table(pa.Table.from_pylist(self._pending_rollouts), path)
        self._pending_rollouts = []
        return path

    def save_samples(self, grid: Image.Image, step: int) -> Path:
        """samples/step-NNNNNN.png: the report shows these across training."""
        path = self.samples / f"step-{step:06d}.png"
        grid.save(path)
        return path
