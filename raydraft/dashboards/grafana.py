"""The Grafana dashboard: rows of panels built from `raydraft.metrics`' definitions and the
names of Ray's own metrics, one unit per panel, laid out on Grafana's 24-column grid."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Any

from raydraft.dashboards.files import REWARD_APPS
from raydraft.metrics import (
    ALL_METRICS,
    EVAL_ACCURACY,
    FRACTION,
    IMAGE_RATE,
    IMAGES,
    LAST_STEP,
    STEPS,
    Metric,
    row_metric,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RUN = 'run=~"$run"'
GPU = "instance, GpuIndex, GpuDeviceName"  # the labels of Ray's per-GPU node metrics
GRID_WIDTH = 24


@dataclass(frozen=True)
class Series:
    """One query of a panel, and the unit of the values it returns."""

    expr: str
    legend: str
    unit: str


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    description: str
    kind: str = "timeseries"  # or "stat", "table"
    width: int = 12
    height: int = 8

    @property
    def unit(self) -> str:
        """The one unit of all its series: one axis cannot draw two."""
        units = {s.unit for s in self.series}
        if len(units) != 1:
            raise ValueError(f"panel {self.title!r} mixes units {sorted(units)}: split it")
        return units.pop()


# -- series ---------------------------------------------------------------------------
def selector(metric: Metric) -> str:
    return f"{metric.exported}{{{RUN}}}"


def metric_series(metric: Metric) -> Series:
    labels = "".join(f"{{{{{label}}}}} " for label in metric.labels)
    return Series(selector(metric), f"{metric.name} {labels}{{{{run}}}}", metric.unit)


def serve_series(metric: str, legend: str, unit: str, by: str = "deployment") -> Series:
    """Ray Serve's `metric` summed per reward deployment."""
    return Series(f"sum by ({by}) ({metric}{{{REWARD_APPS}}})", legend, unit)


def serve_latency(quantile: float) -> Series:
    buckets = f"ray_serve_deployment_processing_latency_ms_bucket{{{REWARD_APPS}}}"
    return Series(
        f"histogram_quantile({quantile}, sum by (deployment, le) (rate({buckets}[{RATE}])))",
        f"p{round(quantile * 100)} {{{{deployment}}}}",
        "ms",
    )


def serve_rate(metric: str) -> str:
    return f"sum by (deployment) (rate({metric}{{{REWARD_APPS}}}[{RATE}]))"


# -- panels ---------------------------------------------------------------------------
def metric_panels() -> dict[str, Panel]:
    """One timeseries panel per `Metric.panel`, with the extra series some of them draw."""
    grouped: dict[str, list[Metric]] = {}
    for metric in ALL_METRICS:
        if metric.panel not in (STEPS.panel, EVAL_ACCURACY.panel):  # stats, table
            grouped.setdefault(metric.panel, []).append(metric)
    extra = {
        "Images per second": [
            Series(f"rate({selector(IMAGES)}[{RATE}])", "images_total rate {{run}}", IMAGE_RATE)
        ]
    }
    return {
        title: Panel(
            title,
            (*[metric_series(m) for m in metrics], *extra.get(title, [])),
            " ".join(f"{m.name}: {m.help}." for m in metrics),
        )
        for title, metrics in grouped.items()
    }


def stat_panels() -> list[Panel]:
    """The run at a glance: the newest value of each."""
    stats = [
        ("Step", STEPS),
        ("Images", IMAGES),
        ("Reward", row_metric("reward_mean")),
        ("Staleness", row_metric("staleness")),
        ("Policy version", row_metric("policy_version")),
    ]
    series = [(title, selector(m), m.unit) for title, m in stats]
    series.append(("Since last iteration", f"time() - {selector(LAST_STEP)}", LAST_STEP.unit))
    width = GRID_WIDTH // len(series)
    return [
        Panel(title, (Series(expr, "{{run}}", unit),), f"The newest value per run ({expr}).",
              "stat", width, height=4)
        for title, expr, unit in series
    ]  # fmt: skip


def learner_busy_panel() -> Panel:
    update, step = row_metric("time_update_s"), row_metric("time_step_s")
    series = Series(f"{selector(update)} / {selector(step)}", "{{run}}", FRACTION)
    return Panel(
        "Learner busy fraction",
        (series,),
        "The share of each iteration the learner spent updating (update_seconds over "
        "step_seconds); in async mode the rest overlaps sampling.",
    )


def eval_panel() -> Panel:
    series = Series(
        f"max by (run, category, score) ({selector(EVAL_ACCURACY)})", "", EVAL_ACCURACY.unit
    )
    return Panel(EVAL_ACCURACY.panel, (series,), EVAL_ACCURACY.help + ".", "table")


def serve_panels() -> list[Panel]:
    """Ray Serve's own metrics of the reward deployments."""
    errors = serve_rate("ray_serve_deployment_error_counter_total")
    requests = serve_rate("ray_serve_deployment_request_counter_total")
    return [
        Panel(
            "Reward replicas: healthy and target",
            (
                serve_series(
                    "ray_serve_deployment_replica_healthy", "healthy {{deployment}}", "none"
                ),
                serve_series(
                    "ray_serve_autoscaling_target_replicas", "target {{deployment}}", "none"
                ),
            ),
            "Healthy replicas per reward deployment and the autoscaler's target.",
        ),
        Panel(
            "Reward requests queued",
            (serve_series("ray_serve_deployment_queued_queries", "{{deployment}}", "none"),),
            "Requests waiting in the rollout workers' handles for a replica.",
        ),
        Panel(
            "Reward requests ongoing",
            (serve_series("ray_serve_replica_processing_queries", "{{deployment}}", "none"),),
            "Requests the replicas are processing.",
        ),
        Panel(
            "Reward latency",
            (serve_latency(0.5), serve_latency(0.95)),
            "Processing latency of the reward replicas, p50 and p95.",
        ),
        Panel(
            "Reward requests and errors per second",
            (
                Series(requests, "requests {{deployment}}", "reqps"),
                # 0 while a deployment has served requests and never failed one.
                Series(f"{errors} or {requests} * 0", "errors {{deployment}}", "reqps"),
            ),
            "Requests and failed requests per second per reward deployment.",
        ),
    ]


def gpu_panels() -> list[Panel]:
    """Ray's node metrics of every GPU in the cluster (none on a CPU-only cluster)."""
    used = f"sum by ({GPU}) (ray_node_gram_used) * 1024 * 1024"
    total = f"sum by ({GPU}) (ray_node_gram_used + ray_node_gram_available) * 1024 * 1024"
    gpu = "{{instance}} GPU {{GpuIndex}} {{GpuDeviceName}}"
    return [
        Panel(
            "GPU utilisation",
            (Series(f"sum by ({GPU}) (ray_node_gpus_utilization)", gpu, "percent"),),
            "Utilisation of each GPU of the Ray nodes.",
        ),
        Panel(
            "GPU memory",
            (Series(used, f"used {gpu}", "bytes"), Series(total, f"total {gpu}", "bytes")),
            "Memory used on each GPU of the Ray nodes, and its total.",
        ),
    ]


def sections() -> list[tuple[str, list[Panel]]]:
    """The dashboard's rows, each a title and its panels; every metric panel is placed."""
    panels = metric_panels() | {p.title: p for p in (learner_busy_panel(), eval_panel())}
    layout = {
        "Throughput and time": [
            "Images per second", "Learner busy fraction", "Step time", "Weight sync time",
            "Weight sync size", "Policy version", "Staleness", "Rollouts in flight",
        ],
        "Rewards and evaluation": [
            "Reward", "Reward by component", EVAL_ACCURACY.panel, "Faults",
        ],
        "Optimisation": [
            "Policy loss", "Gradient norm", "KL to reference", "Clipped and flat groups",
        ],
        "Low-precision rollouts": [
            "Low-precision mismatch", "Importance weights", "Low- vs full-precision ranking",
        ],
    }  # fmt: skip
    placed = {title for titles in layout.values() for title in titles}
    if placed != set(panels):
        raise ValueError(f"panels without a row: {sorted(set(panels) - placed)}")
    rows = [(row, [panels[t] for t in titles]) for row, titles in layout.items()]
    return [
        ("Run", stat_panels()),
        *rows,
        ("Reward serving (Ray Serve)", serve_panels()),
        ("GPUs (Ray nodes)", gpu_panels()),
    ]


# -- Grafana JSON ---------------------------------------------------------------------
# Each kind's options, as Grafana's per-panel schemas require them.
OPTIONS: dict[str, dict[str, Any]] = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
        "tooltip": {"mode": "multi", "sort": "none"},
    },
    "stat": {
        "graphMode": "area", "colorMode": "value", "justifyMode": "auto", "textMode": "auto",
        "wideLayout": True, "showPercentChange": False, "percentChangeColorMode": "standard",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    },
    "table": {"frameIndex": 0, "showHeader": True, "cellHeight": "sm"},
}  # fmt: skip
CUSTOM: dict[str, dict[str, Any]] = {
    "timeseries": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never"},
    "table": {"align": "auto", "inspect": False},
}
# A table of the newest values: one row per series, its labels as columns.
TABLE_TRANSFORMATIONS = [
    {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {}}}
]


def target(series: Series, index: int, kind: str) -> dict[str, Any]:
    table = kind == "table"
    return {
        "refId": chr(ord("A") + index),
        "expr": series.expr,
        "legendFormat": series.legend or "__auto",
        "format": "table" if table else "time_series",
        "instant": table,
        "range": not table,
    }


def panel_json(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    custom = {"custom": CUSTOM[panel.kind]} if panel.kind in CUSTOM else {}
    transformations = {"transformations": TABLE_TRANSFORMATIONS} if panel.kind == "table" else {}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": panel.unit, **custom}, "overrides": []},
        "options": OPTIONS[panel.kind],
        "targets": [target(s, i, panel.kind) for i, s in enumerate(panel.series)],
        **transformations,
    }


def layout(rows: list[tuple[str, list[Panel]]]) -> list[dict[str, Any]]:
    """Row headers and their panels, left to right, wrapping at the grid's 24 columns."""
    ids, out, y = count(1), [], 0
    for title, panels in rows:
        grid = {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}
        out.append({"id": next(ids), "type": "row", "title": title, "collapsed": False,
                    "gridPos": grid, "panels": []})  # fmt: skip
        x, y, line = 0, y + 1, 0
        for panel in panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line = 0, y + line, 0
            grid = {"h": panel.height, "w": panel.width, "x": x, "y": y}
            out.append(panel_json(panel, next(ids), grid))
            x, line = x + panel.width, max(line, panel.height)
        y += line
    return out


def annotations() -> dict[str, Any]:
    """Grafana's own annotations, and raydraft's firing alerts marked on every graph."""
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    alerts = {
        "name": "raydraft alerts",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "red",
        "expr": 'ALERTS{alertname=~"Raydraft.*", alertstate="firing"}',
        "titleFormat": "{{alertname}}",
        "tagKeys": "run,deployment",
    }
    return {"list": [builtin, alerts]}


def templating() -> dict[str, Any]:
    run = {
        "name": "run",
        "label": "Run",
        "type": "query",
        "datasource": DATASOURCE,
        "query": f"label_values({STEPS.exported}, run)",
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
    }
    source = {"name": "datasource", "label": "Prometheus", "type": "datasource",
              "query": "prometheus"}  # fmt: skip
    return {"list": [source, run]}


def grafana_dashboard() -> dict[str, Any]:
    return {
        "title": "raydraft",
        "uid": "raydraft",
        "description": "A raydraft run: progress, throughput, staleness, rewards, evaluation, "
        "the reward servers (Ray Serve) and the GPUs (Ray's node metrics).",
        "tags": ["raydraft", "ray"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": annotations(),
        "templating": templating(),
        "panels": layout(sections()),
    }
