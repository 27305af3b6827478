"""Grafana dashboard, Prometheus scrape config, alert rules and Grafana provisioning,
generated from `raydraft.metrics` and the names of Ray's own metrics.

`raydraft dashboards --out dashboards/` writes them; the tests check the committed copies
against the generator, validate the dashboard with Grafana's strict schema, run every
panel's query through a real Prometheus scraping a run, and test the alert rules with
promtool, so a renamed metric cannot leave a dead panel or a silent alert.
"""

from __future__ import annotations

import json
from pathlib import Path

from raydraft.dashboards.files import REWARD_APPS, SCRAPE_INTERVAL
from raydraft.dashboards.grafana import GRID_WIDTH, grafana_dashboard
from raydraft.dashboards.prometheus import alert_rules, alerts, prometheus_config
from raydraft.dashboards.provisioning import grafana_dashboards, grafana_datasource

__all__ = [
    "GRID_WIDTH", "REWARD_APPS", "SCRAPE_INTERVAL", "alerts", "generated", "grafana_dashboard",
    "prometheus_config", "write",
]  # fmt: skip


def generated() -> dict[str, str]:
    """{path under the output folder: text} of every generated file."""
    return {
        "raydraft.json": json.dumps(grafana_dashboard(), indent=1, ensure_ascii=False) + "\n",
        "prometheus.yml": prometheus_config(),
        "alerts.yml": alert_rules(),
        "provisioning/datasources/raydraft.yaml": grafana_datasource(),
        "provisioning/dashboards/raydraft.yaml": grafana_dashboards(),
    }


def write(out: str | Path) -> list[Path]:
    out = Path(out)
    paths = []
    for name, text in generated().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
