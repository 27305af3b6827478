"""The generated Grafana dashboard and its provisioning, checked offline: no Grafana server
runs here, so the dashboard is validated with Grafana's strict JSON schemas (vendored in
tests/vendor/grafana/), its grid and units are checked, and the committed files must be
the generator's output. tests/test_metrics.py runs every query through a real Prometheus."""

import importlib
import json
import pkgutil
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydraft.dashboards import (
    GRID_WIDTH,
    REWARD_APPS,
    SCRAPE_INTERVAL,
    alerts,
    generated,
    grafana_dashboard,
)
from raydraft.metrics import ALL_METRICS, FRACTION, IMAGE_RATE, IMAGES, MetricsExporter

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "vendor" / "grafana"
DASHBOARD = grafana_dashboard()
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
UNITS = {m.exported: m.unit for m in ALL_METRICS}
# The units of Ray's series as drawn here: Serve's counts, latencies in ms, request rates,
# GPU utilisation in percent and GPU memory (Ray reports MiB) scaled to bytes.
RAY_UNITS = {
    "ray_serve_deployment_replica_healthy": "none",
    "ray_serve_autoscaling_target_replicas": "none",
    "ray_serve_deployment_queued_queries": "none",
    "ray_serve_replica_processing_queries": "none",
    "ray_serve_deployment_processing_latency_ms_bucket": "ms",
    "ray_serve_deployment_request_counter_total": "reqps",
    "ray_serve_deployment_error_counter_total": "reqps",
    "ray_node_gpus_utilization": "percent",
    "ray_node_gram_used": "bytes",
    "ray_node_gram_available": "bytes",
}


def schema(name: str, definition: str | None = None) -> jsonschema.Draft7Validator:
    """A validator of the vendored `<name>.jsonschema.json` (one of its definitions)."""
    document = json.loads((SCHEMAS / f"{name}.jsonschema.json").read_text())
    if definition is not None:
        document = {"$ref": f"#/definitions/{definition}", **document}
    return jsonschema.Draft7Validator(document)


def errors(validator: jsonschema.Draft7Validator, instance: object) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def test_the_dashboard_validates_against_grafanas_strict_schema():
    assert errors(schema("dashboard"), DASHBOARD) == []


def test_the_strict_schema_rejects_what_grafana_would():
    validator = schema("dashboard")
    missing = {k: v for k, v in DASHBOARD.items() if k != "annotations"}
    misspelt = json.loads(json.dumps(DASHBOARD))
    misspelt["panels"][1]["gridPos"]["width"] = misspelt["panels"][1]["gridPos"].pop("w")
    too_wide = json.loads(json.dumps(DASHBOARD))
    too_wide["panels"][1]["gridPos"]["w"] = 30
    for broken in (missing, misspelt, too_wide):
        assert errors(validator, broken)


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_each_panel_validates_against_its_kinds_schema(panel):
    assert panel["type"] in ("timeseries", "stat", "table")
    found = errors(schema(panel["type"], "Options"), panel["options"])
    custom = panel["fieldConfig"]["defaults"].get("custom")
    if custom is not None:
        found += errors(schema(panel["type"], "FieldConfig"), custom)
    query = schema("prometheus", "Dataquery")
    found += [error for target in panel["targets"] for error in errors(query, target)]
    assert found == []


def test_panel_ids_are_unique():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def cells(grid: dict[str, int]) -> set[tuple[int, int]]:
    columns, rows = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
    return {(x, y) for x in columns for y in rows}


def test_panels_fit_the_24_columns_without_overlapping():
    taken: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        overlapped = {taken[cell] for cell in cells(grid) if cell in taken}
        assert not overlapped, f"{panel['title']} overlaps {overlapped}"
        taken |= dict.fromkeys(cells(grid), panel["title"])


def unit_of(expr: str) -> str:
    """The unit of what `expr` returns, from the units of the series it reads and the
    arithmetic on them (the forms the dashboard uses; `time() - t` keeps t's seconds)."""
    ours, ray = re.findall(r"\b(raydraft_\w+)", expr), re.findall(r"\b(ray_\w+)", expr)
    units = {UNITS[n] for n in ours} | {RAY_UNITS[n] for n in ray}
    assert len(units) == 1, f"{expr} reads series of units {units}"
    (unit,) = units
    if ours and " / " in expr:  # a ratio of two like quantities
        return FRACTION
    if ours and expr.startswith("rate("):
        assert ours == [IMAGES.exported], expr  # images counted per second
        return IMAGE_RATE
    return unit


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_every_series_of_a_panel_has_the_panels_unit(panel):
    unit = panel["fieldConfig"]["defaults"]["unit"]
    for target in panel["targets"]:
        for operand in target["expr"].split(" or "):
            assert unit_of(operand) == unit, operand


def test_metric_units_follow_their_names():
    """Prometheus names carry the base unit: a `_bytes` series drawn as seconds is the
    bug this catches."""
    suffixes = {
        "_seconds": "s",
        "_bytes": "bytes",
        "_fraction": FRACTION,
        "_per_second": IMAGE_RATE,
    }
    for metric in ALL_METRICS:
        for suffix, unit in suffixes.items():
            if metric.name.removesuffix("_total").endswith(suffix):
                assert metric.unit == unit, metric.name


def test_every_metric_is_drawn_and_every_query_reads_an_exported_one():
    exported = {
        sample.name
        for family in MetricsExporter("x").registry.collect()
        for sample in family.samples
    } | {m.exported for m in ALL_METRICS}  # labelled series exist once observed
    exprs = [t["expr"] for p in PANELS for t in p["targets"]] + [a.expr for a in alerts()]
    read = {name for expr in exprs for name in re.findall(r"\b(raydraft_\w+)", expr)}
    assert read <= exported
    drawn = {
        n for p in PANELS for t in p["targets"] for n in re.findall(r"raydraft_\w+", t["expr"])
    }
    assert {m.exported for m in ALL_METRICS} <= drawn


def test_rates_use_grafanas_rate_interval():
    windows = [
        w for p in PANELS for t in p["targets"] for w in re.findall(r"\[([^]]+)\]", t["expr"])
    ]
    assert windows and set(windows) == {"$__rate_interval"}


def ray_panels() -> list:
    """Every panel of the Grafana dashboards Ray ships (its `*_panels.py` definitions)."""
    package = importlib.import_module("ray.dashboard.modules.metrics.dashboards")
    panels = []
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_panels"):
            found = importlib.import_module(f"{package.__name__}.{module.name}")
            for config in (
                v for v in vars(found).values() if type(v).__name__ == "DashboardConfig"
            ):
                panels += [*config.panels, *(p for row in config.rows for p in row.panels)]
    return panels


def test_gpu_series_are_the_ones_rays_own_dashboards_draw():
    """No GPU here, so no GPU series to scrape: their names and labels must be Ray's."""
    ray_exprs = " ".join(t.expr for panel in ray_panels() for t in panel.targets)
    gpu = [t["expr"] for p in PANELS for t in p["targets"] if "ray_node_g" in t["expr"]]
    assert gpu
    for expr in gpu:
        for name in re.findall(r"\bray_node_\w+", expr):
            assert re.search(rf"\b{name}\b", ray_exprs), name
        for labels in re.findall(r"by \(([^)]*)\)", expr):
            for label in labels.split(", "):
                assert label in ray_exprs, label


def test_reward_series_select_the_applications_raydraft_deploys():
    from raydraft_ray.reward_serving import APP_PREFIX, app_name

    assert f'application=~"{APP_PREFIX}.*"' == REWARD_APPS
    assert re.fullmatch(APP_PREFIX + ".*", app_name("toy-geneval"))


def test_the_committed_files_are_the_generated_ones():
    for name, text in generated().items():
        path = ROOT / "dashboards" / name
        assert path.read_text(encoding="utf-8") == text, f"{name}: run `raydraft dashboards`"


def test_grafana_provisioning_loads_the_dashboard_from_the_prometheus_source():
    """Grafana reads <paths.provisioning>/datasources/*.yaml and dashboards/*.yaml and
    expands ${VAR} from its environment: PROMETHEUS_URL and RAYDRAFT_DASHBOARDS."""
    provisioning = ROOT / "dashboards" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/raydraft.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "${PROMETHEUS_URL}"
    assert source["jsonData"]["timeInterval"] == SCRAPE_INTERVAL
    scrape = yaml.safe_load((ROOT / "dashboards/prometheus.yml").read_text())
    assert scrape["global"]["scrape_interval"] == SCRAPE_INTERVAL
    (provider,) = yaml.safe_load((provisioning / "dashboards/raydraft.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    folder = Path(
        provider["options"]["path"].replace("${RAYDRAFT_DASHBOARDS}", str(ROOT / "dashboards"))
    )
    (dashboard,) = folder.glob("*.json")
    loaded = json.loads(dashboard.read_text())
    assert loaded["uid"] == DASHBOARD["uid"]
    assert {v["type"]: v["query"] for v in loaded["templating"]["list"]}["datasource"] == source[
        "type"
    ]
