"""Experiment trackers, offline: what TensorBoard's event files and a Weights & Biases
offline run hold, read back, equals what was logged; non-finite values are skipped; the
trainer feeds them every metrics row and sample grid when its switches are on."""

import io
import json
import os
import struct
import sys

import numpy as np
import pytest
from overrides import SMALL
from PIL import Image

from raydraft.config import DEFAULT_CONFIG, ConfigError, LoggingConfig, load_config
from raydraft.trackers import TensorBoardTracker, WandbTracker, open_trackers, scalars
from raydraft.trainer import Trainer


def require(module: str):
    """A tracker package: the test extra installs both, so CI (CI=true) fails without it."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module, reason="pip install 'raydraft[trackers]'")


ROWS = [
    {"step": 1, "reward_mean": 0.25, "reward_mean/a": 0.5, "lr": 1e-4, "images_per_s": 10.0},
    {"step": 2, "reward_mean": float("nan"), "reward_mean/a": 0.75, "lr": 1e-4, "tag": "x"},
    {"step": 3, "reward_mean": 0.5, "reward_mean/a": float("inf"), "ok": True, "n": 3},
]
PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8))


def test_scalars_keep_finite_numbers_only():
    assert scalars(ROWS[1]) == {"reward_mean/a": 0.75, "lr": 1e-4}
    assert scalars(ROWS[2]) == {"reward_mean": 0.5, "n": 3.0}


def tensorboard_events(log_dir):
    """(scalars {tag: [(step, value)]}, images {tag: [(step, PIL image)]}) of event files."""
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    values = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    images = {
        t: [(e.step, Image.open(io.BytesIO(e.encoded_image_string))) for e in events.Images(t)]
        for t in tags["images"]
    }
    return values, images


def expected_scalars(rows):
    """{key: [(step, value)]}: the finite numbers each row logged."""
    out = {}
    for row in rows:
        for key, value in scalars(row).items():
            out.setdefault(key, []).append((row["step"], value))
    return out


def test_tensorboard_event_files_hold_what_was_logged(tmp_path):
    require("tensorboard")
    tracker = TensorBoardTracker(tmp_path / "tb")
    for row in ROWS:
        tracker.log(row, row["step"])
    tracker.log_image("samples", PICTURE, 3)
    tracker.close()
    values, images = tensorboard_events(tmp_path / "tb")
    expected = expected_scalars(ROWS)
    assert set(values) == set(expected)
    for key, points in expected.items():  # event files store float32
        assert values[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]
    ((step, image),) = images["samples"]
    assert step == 3 and np.array_equal(np.asarray(image.convert("RGB")), np.asarray(PICTURE))


MAGIC = b":W&B"
BLOCK, HEADER = 32768, 7  # LevelDB-style log blocks; a record header is crc, length, type


def wandb_records(path):
    """The protobuf records of a `.wandb` transaction log (its format: wandb's datastore:
    a 7-byte file header, then 32 KiB blocks of records, a record split across blocks as
    FIRST, MIDDLE..., LAST parts)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == MAGIC
    position, pending, records = HEADER, b"", []
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < HEADER:  # a block's zero-padded tail
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_dir):
    """{step: {key: value}} of the offline run in `run_dir`/wandb (image entries as their
    metadata dicts)."""
    import wandb

    wandb.teardown()  # `finish` may return before wandb-core has written the log to disk
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if len(key) == 1:
                row[key[0]] = value
            else:
                row.setdefault(key[0], {})[key[1]] = value
        history.setdefault(row["_step"], {}).update(row)
    return history, log.parent


def wandb_image(history, files, step, name):
    entry = history[step][name]
    assert entry["_type"] == "image-file"
    return Image.open(files / "files" / entry["path"])


@pytest.fixture
def offline_wandb(monkeypatch):
    require("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_a_wandb_offline_run_holds_what_was_logged(tmp_path, offline_wandb):
    tracker = WandbTracker(LoggingConfig(wandb=True), tmp_path, "test", {"seed": 1})
    for row in ROWS:
        tracker.log(row, row["step"])
    tracker.log_image("samples", PICTURE, 3)
    tracker.close()
    history, files = wandb_history(tmp_path)
    for key, points in expected_scalars(ROWS).items():
        assert [(s, history[s][key]) for s, _ in points] == points
    assert "reward_mean" not in history[2] and "reward_mean/a" not in history[3]
    assert np.array_equal(np.asarray(wandb_image(history, files, 3, "samples")), PICTURE)
    # A second tracker on the same directory (a resumed run) continues the same W&B run.
    run_id = (tmp_path / "wandb" / "run-id").read_text()
    again = WandbTracker(LoggingConfig(wandb=True), tmp_path, "test", {"seed": 1})
    assert again.run.id == run_id
    again.close()


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"logging\.wandb=true .*raydraft\[trackers\]"):
        open_trackers(LoggingConfig(wandb=True), tmp_path, "test", {})
    assert open_trackers(LoggingConfig(), tmp_path, "test", {}).trackers == []


def test_the_trainer_feeds_every_row_and_grid_to_both_trackers(tmp_path, offline_wandb):
    require("tensorboard")
    overrides = [
        *SMALL, "algorithm.group_size=4", "logging.sample_every=1",
        "logging.tensorboard=true", "logging.wandb=true",
    ]  # fmt: skip
    trainer = Trainer(load_config(DEFAULT_CONFIG, overrides), tmp_path / "run")
    trainer.fit(2)
    root = trainer.run.root
    rows = trainer.run.read_metrics()
    grids = {s: Image.open(root / "samples" / f"step-{s:06d}.png") for s in (0, 1, 2)}
    values, images = tensorboard_events(root / "tensorboard")
    history, files = wandb_history(root)
    for key, points in expected_scalars(rows).items():
        assert values[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key
        assert [(s, history[s][key]) for s, _ in points] == points, key
    assert [s for s, _ in images["samples"]] == [0, 1, 2]
    for step, image in images["samples"]:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(grids[step]))
        assert np.array_equal(np.asarray(wandb_image(history, files, step, "samples")), grids[step])
