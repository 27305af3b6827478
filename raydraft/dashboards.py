"""Grafana dashboard JSON and Prometheus scrape config, generated from `raydraft.metrics`.

`raydraft dashboards --out dashboards/` writes them; the committed copies are checked
against the generator in the tests, so a renamed metric cannot leave a dead panel.
"""

from __future__ import annotations

import json
from pathlib import Path

from raydraft.metrics import IMAGES_TOTAL, METRICS, PREFIX, STEPS_TOTAL

# Ray Serve's own histogram of reward-replica latency (ray_ prefix: Ray's exporter).
SERVE_LATENCY = "ray_serve_deployment_processing_latency_ms_bucket"
REWARD_APPS = 'application=~"raydraft-reward-.*"'


def _panel(title: str, targets: list[tuple[str, str]], unit: str, index: int) -> dict:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def grafana_dashboard() -> dict:
    """One panel per `Metric.panel`, plus totals and the reward servers' latency."""
    panels: dict[str, tuple[list[tuple[str, str]], str]] = {}
    for m in METRICS:
        targets, _ = panels.setdefault(m.panel, ([], m.unit))
        targets.append((f'{PREFIX}{m.name}{{run=~"$run"}}', f"{m.name} {{{{run}}}}"))
    rate = [
        (f'rate({PREFIX}{STEPS_TOTAL}{{run=~"$run"}}[5m]) * 60', "steps/min {{run}}"),
        (f'rate({PREFIX}{IMAGES_TOTAL}{{run=~"$run"}}[5m]) * 60', "images/min {{run}}"),
    ]
    latency = [
        (
            f"histogram_quantile({q}, sum by (le, deployment) "
            f"(rate({SERVE_LATENCY}{{{REWARD_APPS}}}[5m])))",
            f"p{int(q * 100)} {{{{deployment}}}}",
        )
        for q in (0.5, 0.95)
    ]
    rows = [(title, targets, unit) for title, (targets, unit) in panels.items()]
    rows += [("Progress", rate, "none"), ("Reward server latency", latency, "ms")]
    return {
        "title": "raydraft",
        "uid": "raydraft",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "run",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({PREFIX}{STEPS_TOTAL}, run)",
                    "includeAll": True,
                    "multi": True,
                },
            ]
        },
        "panels": [_panel(t, targets, unit, i) for i, (t, targets, unit) in enumerate(rows)],
    }


def prometheus_config(driver: str = "127.0.0.1:9464") -> str:
    """Scrape the training driver and, through Ray's service discovery file, the cluster."""
    return (
        "global:\n  scrape_interval: 10s\n"
        "scrape_configs:\n"
        f"  - job_name: raydraft\n    static_configs:\n      - targets: ['{driver}']\n"
        "  - job_name: ray\n    file_sd_configs:\n"
        "      - files: ['/tmp/ray/prom_metrics_service_discovery.json']\n"
    )


def write(out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dashboard, scrape = out / "raydraft.json", out / "prometheus.yml"
    dashboard.write_text(json.dumps(grafana_dashboard(), indent=1) + "\n")
    scrape.write_text(prometheus_config())
    return [dashboard, scrape]
