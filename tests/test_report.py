"""report.html from a real (tiny) run: every section, every image embedded and decodable,
the evaluation table complete, nothing fetched from a network, and a browser draws it;
the sample grids cover every category with captions; the charts survive odd metrics."""

import base64
import io
import json
import math
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from binaries import require
from overrides import SMALL
from PIL import Image

from raydraft.cli import main
from raydraft.config import DEFAULT_CONFIG, load_config
from raydraft.data.prompts import load_prompts_with_metadata
from raydraft.data.shapes import CATEGORIES
from raydraft.report.charts import Series, format_value, line_chart, moving_average, nice_ticks
from raydraft.report.page import SECTIONS, write_report
from raydraft.sample_grids import SAMPLE_CELL, captioned_grid, grid_prompts
from raydraft.trainer import SAMPLE_GRID_SIZE, Trainer

MAX_REPORT_BYTES = 2_000_000  # a 2-step toy run's report is about 0.4 MB


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """The default config, test-sized: 2 steps with a sample grid each step and a
    1-sample-per-category evaluation of the base and the final model."""
    overrides = [
        *SMALL, "algorithm.group_size=4", "logging.sample_every=1",
        "logging.eval_per_category=1",
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("report") / "run"
    trainer = Trainer(load_config(DEFAULT_CONFIG, overrides), root)
    trainer.fit(2)
    return trainer


class Page(HTMLParser):
    """What the tests look at: section ids, image sources, tables, scripts, links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections, self.images, self.scripts, self.links = [], [], 0, []
        self.tables: dict[str, list[list[str]]] = {}
        self._section, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections.append(self._section)
        elif tag == "img":
            self.images.append((self._section, attrs["src"]))
        elif tag == "script":
            self.scripts += 1
        elif tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "tr":
            self._row = []
            self.tables.setdefault(self._section, []).append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def decode(src: str) -> Image.Image:
    header, data = src.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_the_report_is_self_contained_with_every_section(run):
    path = run.run.root / "report.html"  # written by `fit`
    text = path.read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert page.scripts == 0 and "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text
    assert all(link.startswith("#") for link in page.links)
    assert path.stat().st_size < MAX_REPORT_BYTES
    for _, src in page.images:
        assert decode(src).size > (10, 10)
    # The reward and throughput charts, and one grid per saved step: the files themselves.
    by_section = {s: [src for sec, src in page.images if sec == s] for s in SECTIONS}
    assert len(by_section["rewards"]) >= 1 and len(by_section["throughput"]) == 2
    grids = sorted((run.run.root / "samples").glob("step-*.png"))
    assert [p.name for p in grids] == ["step-000000.png", "step-000001.png", "step-000002.png"]
    assert [base64.b64decode(s.split(",", 1)[1]) for s in by_section["samples"]] == [
        p.read_bytes() for p in grids
    ]
    assert "not recorded in this run (single-process run)" in text  # weight sync
    assert (run.run.root / "config.yaml").read_text().splitlines()[0] in text


def test_the_evaluation_table_has_every_category_and_overall(run):
    page = Page((run.run.root / "report.html").read_text())
    header, *rows = page.tables["evaluation"]
    assert header[:3] == ["category", "base (step 0)", "final (step 2)"]
    assert [r[0] for r in rows] == [*CATEGORIES, "overall"]
    report = json.loads((run.run.root / "eval.json").read_text())
    for row in rows:
        assert float(row[1]) == pytest.approx(report["base"][row[0]]["strict"], abs=5e-4)
        assert float(row[2]) == pytest.approx(report["final"][row[0]]["strict"], abs=5e-4)


def test_the_sample_grids_repeat_their_prompts_and_seeds(run):
    """Every grid shows the same prompts and seeds: the same weights draw it bit for bit."""
    first = run.save_samples().read_bytes()
    assert run.save_samples().read_bytes() == first


def test_the_report_command_writes_where_asked(run, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run.run.root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Page(out.read_text()).sections == list(SECTIONS)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_browser_draws_the_report(run, tmp_path):
    chromium = require("chromium")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
            "--window-size=1200,2000", (run.run.root / "report.html").resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20  # text, charts and samples, not an empty page
    assert (pixels < 128).mean() > 0.02  # dark pixels: drawn text and samples, not a blank


def test_grid_prompts_cover_every_category_one_per_column():
    grid = grid_prompts(*load_prompts_with_metadata("shapes-train"), SAMPLE_GRID_SIZE)
    assert grid.columns == len(CATEGORIES) and len(grid.prompts) == SAMPLE_GRID_SIZE
    assert grid.categories == [*CATEGORIES, *CATEGORIES]
    assert len(set(grid.prompts)) == SAMPLE_GRID_SIZE  # two different prompts per category
    plain = grid_prompts(*load_prompts_with_metadata("toy-colors"), SAMPLE_GRID_SIZE)
    assert plain.categories == [None] * SAMPLE_GRID_SIZE
    assert plain.prompts == load_prompts_with_metadata("toy-colors")[0][:SAMPLE_GRID_SIZE]
    tagged = grid_prompts(["a", "b", "c"], [{"tag": "x"}, {"tag": "y"}, {"tag": "x"}], 4)
    assert tagged.prompts == ["a", "b", "c", "b"] and tagged.columns == 2


def test_captioned_grid_scales_small_images_up_and_captions_them():
    images = torch.rand(3, 3, 32, 32)
    grid = captioned_grid(images, ["a red circle and a blue square"] * 3, 2, ["binding"] * 3)
    factor = SAMPLE_CELL // 32
    pixels = np.asarray(grid)
    first = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cell = pixels[8 : 8 + SAMPLE_CELL, 8 : 8 + SAMPLE_CELL]
    assert np.array_equal(cell, first.repeat(factor, 0).repeat(factor, 1))  # nearest, 4x
    caption = pixels[8 + SAMPLE_CELL + 4 : 8 + SAMPLE_CELL + 60, 8 : 8 + SAMPLE_CELL]
    assert (caption < 100).any()  # text drawn under the image
    assert grid.width == 8 + 2 * (SAMPLE_CELL + 8)


def test_a_run_without_some_metrics_says_so_and_charts_the_rest(tmp_path):
    """Ray-only keys charted where they vary; absent keys named; NaN and a lone step fine."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "reward_mean": math.nan, "staleness": 0, "weight_sync_bytes": 4e6},
        {"step": 2, "reward_mean": 0.5, "staleness": 1, "weight_sync_bytes": 4e6, "note": "x"},
        {"step": 3, "reward_mean": 0.7, "staleness": 1, "weight_sync_bytes": 4e6},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(run).read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert [s for s, _ in page.images] == ["rewards", "sync"]  # staleness varies
    assert "weight_sync_bytes: 4 MB at every step" in text
    assert "weight_sync_s: not recorded in this run" in text
    assert "no timings recorded" in text and "not evaluated in this run" in text
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.2}) + "\n")
    assert len(Page(write_report(run).read_text()).images) == 1


def test_chart_helpers():
    assert nice_ticks(0, 1.1, 5) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 3.5, 5) == pytest.approx([3, 3.1, 3.2, 3.3, 3.4, 3.5])
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert format_value(4e6, "bytes") == "4 MB" and format_value(0.25, "s") == "0.25 s"
    empty = line_chart("nothing finite", [Series("x", [1, 2], [math.nan, math.inf])])
    assert empty.size == line_chart("one", [Series("x", [1], [0.5])]).size
