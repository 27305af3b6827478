"""report.html: one self-contained page about a run, from its run directory alone.

Every image is embedded as a data: URI and the page has no script and no external link,
so it opens offline, attaches to an issue or an email, and shows the same thing in a year.
"""

from __future__ import annotations

import base64
import io
import math
import re
from html import escape
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from raydraft.report.charts import format_value
from raydraft.report.panels import (
    Figure,
    Rows,
    column,
    other_figures,
    reward_figures,
    shown_keys,
    stage_table,
    sync_figures,
    throughput_figures,
)
from raydraft.run_dir import RunDirectory

MAX_GRIDS = 8  # sample grids shown: the first, the last and evenly spaced ones between
EMBED_AS_IS_BYTES = 1_500_000  # larger grids (big images) are embedded as smaller JPEGs
SECTIONS = {
    "summary": "Summary",
    "rewards": "Rewards",
    "throughput": "Throughput",
    "sync": "Staleness and weight sync",
    "samples": "Samples across training",
    "evaluation": "Evaluation",
    "metrics": "Other metrics",
    "config": "Config",
}
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 24px 48px; background: white; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { border-bottom: 1px solid #ddd; margin-top: 36px; }
nav a { margin-right: 14px; } .muted, figcaption, .note { color: #666; font-size: 13px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px 24px; }
figure { margin: 0 0 12px; } img { max-width: 100%; height: auto; display: block; }
img.grid { image-rendering: pixelated; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 12px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, .facts td { text-align: left; }
.up { color: #1a7f37; } .down { color: #c62828; }
pre { background: #f5f5f5; padding: 12px; font-size: 12.5px; overflow-x: auto; }
"""


def data_uri(image: Image.Image | Path) -> str:
    """An image as a data: URI: PNG (a file as-is unless it is large, then a JPEG at
    most 1600 pixels wide, to keep the page small)."""
    if isinstance(image, Path):
        raw = image.read_bytes()
        if len(raw) <= EMBED_AS_IS_BYTES:
            return "data:image/png;base64," + base64.b64encode(raw).decode()
        picture = Image.open(image).convert("RGB")
        picture.thumbnail((1600, 1600 * picture.height // picture.width))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=88)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure_html(figure: Figure) -> str:
    if figure.image is None:
        return f'<p class="note">{escape(figure.note)}</p>'
    width = figure.image.width // 2  # charts are drawn at twice their shown size
    return (
        f'<figure><img src="{data_uri(figure.image)}" width="{width}" '
        f'alt="{escape(figure.title)}"><figcaption>{escape(figure.title)}'
        f"{' ' + escape(figure.note) if figure.note else ''}</figcaption></figure>"
    )


def figures_html(figures: list[Figure]) -> str:
    charts = "".join(figure_html(f) for f in figures if f.image is not None)
    notes = "".join(figure_html(f) for f in figures if f.image is None)
    return (f'<div class="charts">{charts}</div>' if charts else "") + notes


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def summary_html(cfg: dict[str, Any], rows: Rows, evaluation: dict[str, Any]) -> str:
    """The run at a glance: what was trained, how long, and how the reward moved."""
    algorithm = cfg.get("algorithm", {}).get("name", "?")
    model = cfg.get("model", {})
    facts = [
        ["model", escape(f"{model.get('family', '?')} {model.get('path') or '(shipped)'}")],
        ["algorithm", escape(algorithm)],
        ["reward", escape(reward_name(cfg))],
        ["prompts", escape(str(cfg.get("data", {}).get("prompts", "?")))],
        ["runtime", escape(str(cfg.get("runtime", "?")))],
        ["steps", f"{len(rows)}" + (f" (last {rows[-1]['step']})" if rows else "")],
    ]
    rewards = column(rows, "reward_mean")[1]
    if rewards:
        window = max(1, len(rewards) // 10)
        first, last = _mean(rewards[:window]), _mean(rewards[-window:])
        span = "first → last step" if window == 1 else f"means of the first and last {window} steps"
        facts.append(["reward_mean", f"{first:.4g} → {last:.4g} ({span})"])
    rate, step_s = column(rows, "images_per_s")[1], column(rows, "time_step_s")[1]
    if rate:
        facts.append(["images/s", f"{_mean(rate):.3g} mean"])
    if step_s:
        facts.append(["time training", _duration(sum(step_s))])
    if "overall" in evaluation.get("base", {}) and "overall" in evaluation.get("final", {}):
        base, final = evaluation["base"]["overall"], evaluation["final"]["overall"]
        facts.append(["eval overall", f"{base['strict']:.3f} → {final['strict']:.3f} (strict)"])
    return table_html(["", ""], facts).replace("<table>", '<table class="facts">', 1)


def reward_name(cfg: dict[str, Any]) -> str:
    components = cfg.get("rewards", {}).get("components", [])
    return " + ".join(str(c.get("name", "?")) for c in components) or "?"


def throughput_html(rows: Rows) -> str:
    stages = [
        [escape(stage), format_value(mean, "s"), f"{share:.0%}"]
        for stage, mean, share in stage_table(rows)
    ]
    table = table_html(["stage", "mean per iteration", "of step time"], stages)
    return figures_html(throughput_figures(rows)) + (table if stages else "")


def samples_html(samples: list[Path]) -> str:
    """The grids (same prompts and seeds every time) at up to MAX_GRIDS steps."""
    if not samples:
        return '<p class="note">no sample grids in this run (logging.sample_every=0)</p>'
    keep = sorted({round(i * (len(samples) - 1) / (MAX_GRIDS - 1)) for i in range(MAX_GRIDS)})
    shown = [samples[i] for i in keep if i < len(samples)]
    note = ""
    if len(shown) < len(samples):
        note = f'<p class="note">{len(shown)} of the {len(samples)} grids in samples/.</p>'
    figures = "".join(
        f'<figure><figcaption>step {grid_step(path)}</figcaption><img class="grid" '
        f'src="{data_uri(path)}" alt="samples at step {grid_step(path)}"></figure>'
        for path in shown
    )
    return (
        '<p class="muted">The same prompts and seeds at every step, each image captioned with '
        "its category and prompt.</p>" + note + figures
    )


def grid_step(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)\.png", path.name)
    return int(match.group(1)) if match else -1


def evaluation_html(evaluation: dict[str, Any]) -> str:
    """Base against final per category: strict accuracy, its change, clause accuracy."""
    base, final = evaluation.get("base"), evaluation.get("final")
    if not base:
        return '<p class="note">not evaluated in this run (logging.eval_per_category=0)</p>'
    final = final or {}
    rows = []
    for category, b in base.items():
        f = final.get(category)
        delta = f["strict"] - b["strict"] if f else math.nan
        css = "up" if delta > 0 else "down" if delta < 0 else ""
        rows.append([
            f"<b>{escape(category)}</b>" if category == "overall" else escape(category),
            f"{b['strict']:.3f}",
            f"{f['strict']:.3f}" if f else "–",
            f'<span class="{css}">{delta:+.3f}</span>' if f else "–",
            f"{b['clauses']:.3f}",
            f"{f['clauses']:.3f}" if f else "–",
        ])  # fmt: skip
    header = [
        "category", f"base (step {evaluation.get('base_step', 0)})",
        f"final (step {evaluation.get('final_step', '–')})", "Δ strict",
        "base clauses", "final clauses",
    ]  # fmt: skip
    return (
        '<p class="muted">GenEval-style accuracy on held-out prompts: strict = every clause '
        "of the prompt satisfied; clauses = the fraction satisfied.</p>" + table_html(header, rows)
    )


def metrics_html(rows: Rows) -> str:
    figures, constants = other_figures(rows, shown_keys())
    table = table_html(
        ["constant metric", "value"], [[escape(k), format_value(v)] for k, v in constants.items()]
    )
    return figures_html(figures) + (table if constants else "")


def render(run: RunDirectory) -> str:
    """The page's HTML."""
    config_path = run.root / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    cfg = yaml.safe_load(config_text) or {}
    rows, evaluation = run.read_metrics(), run.read_eval()
    name = str(cfg.get("name", run.root.name))
    body = {
        "summary": summary_html(cfg, rows, evaluation),
        "rewards": figures_html(reward_figures(rows, reward_name(cfg))),
        "throughput": throughput_html(rows),
        # The Ray engine records batches in flight every step; the local trainer never does.
        "sync": figures_html(sync_figures(rows, not column(rows, "rollouts_in_flight")[0])),
        "samples": samples_html(sorted(run.samples.glob("step-*.png"), key=grid_step)),
        "evaluation": evaluation_html(evaluation),
        "metrics": metrics_html(rows),
        "config": f"<details><summary>config.yaml (resolved)</summary><pre>"
        f"{escape(config_text)}</pre></details>",
    }
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS.items())
    sections = "".join(
        f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{html}</section>'
        for key, html in body.items()
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>raydraft report: '
        f"{escape(name)}</title><style>{STYLE}</style></head><body><main>"
        f'<h1>{escape(name)}</h1><p class="muted">raydraft run report · '
        f"{escape(str(run.root))}</p><nav>{nav}</nav>{sections}</main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) from the run directory's files; returns it."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file() and not (root / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{root}: no config.yaml or metrics.jsonl (not a run directory)")
    path = Path(out) if out else root / "report.html"
    path.write_text(render(RunDirectory(root)), encoding="utf-8")
    return path
