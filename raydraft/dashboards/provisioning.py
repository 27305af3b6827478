"""Grafana provisioning: the data source and the dashboard folder, read unedited by a
Grafana started with GF_PATHS_PROVISIONING pointing here (dashboards/README.md)."""

from __future__ import annotations

from raydraft.dashboards.files import SCRAPE_INTERVAL, dump_yaml


def grafana_datasource() -> str:
    """Prometheus at $PROMETHEUS_URL (Grafana expands it when it reads the file)."""
    source = {
        "name": "Prometheus",
        "type": "prometheus",
        "uid": "raydraft-prometheus",
        "access": "proxy",
        "url": "${PROMETHEUS_URL}",
        "isDefault": True,
        "jsonData": {"timeInterval": SCRAPE_INTERVAL},
    }
    return dump_yaml({"apiVersion": 1, "datasources": [source]})


def grafana_dashboards() -> str:
    """The folder of raydraft.json at $RAYDRAFT_DASHBOARDS (this repository's dashboards/)."""
    provider = {
        "name": "raydraft",
        "type": "file",
        "folder": "raydraft",
        "disableDeletion": False,
        "allowUiUpdates": False,
        "updateIntervalSeconds": 30,
        "options": {"path": "${RAYDRAFT_DASHBOARDS}", "foldersFromFilesStructure": False},
    }
    return dump_yaml({"apiVersion": 1, "providers": [provider]})
