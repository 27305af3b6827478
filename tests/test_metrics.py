"""Prometheus metrics of a run, scraped over real HTTP (and by a real Prometheus when
installed); the Grafana dashboard and scrape config generated from the same names."""

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from overrides import SMALL as BASE
from prometheus_client.parser import text_string_to_metric_families

from raydraft.config import load_config
from raydraft.dashboards import grafana_dashboard, prometheus_config
from raydraft.metrics import METRICS, PREFIX, MetricsExporter
from raydraft.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = [*BASE, "algorithm.group_size=4", "logging.metrics_port=0"]


def scrape(url: str) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, sample.labels.get("run", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = Trainer(load_config("toy-flowgrpo", SMALL), tmp_path_factory.mktemp("run"))
    rows = [trainer.train_step() for _ in range(2)]
    return trainer, rows


def test_each_iteration_is_exported_with_the_run_label(trained):
    trainer, rows = trained
    samples = scrape(trainer.metrics_url)
    run = trainer.cfg.name
    assert samples[(PREFIX + "steps_total", run)] == 2
    assert samples[(PREFIX + "images_total", run)] == 16
    assert samples[(PREFIX + "reward_mean", run)] == pytest.approx(rows[-1]["reward_mean"])
    assert samples[(PREFIX + "step_seconds", run)] == pytest.approx(rows[-1]["time_step_s"])
    assert samples[(PREFIX + "policy_version", run)] == 2


def test_every_dashboard_query_names_an_exported_metric():
    exported = {
        sample.name
        for family in MetricsExporter("x").registry.collect()
        for sample in family.samples
    } | {PREFIX + m.name for m in METRICS}
    queried = {
        name
        for panel in grafana_dashboard()["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(raydraft_\w+)", target["expr"])
    }
    assert queried and queried <= exported | {PREFIX + "steps_total", PREFIX + "images_total"}
    assert {PREFIX + m.name for m in METRICS} <= queried  # every metric is drawn


def test_committed_dashboards_are_the_generated_ones():
    committed = json.loads((ROOT / "dashboards/raydraft.json").read_text())
    assert committed == grafana_dashboard(), "run `raydraft dashboards` and commit"
    assert (ROOT / "dashboards/prometheus.yml").read_text() == prometheus_config()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary")
def test_a_real_prometheus_scrapes_the_run_and_runs_every_dashboard_query(trained, tmp_path):
    trainer, _ = trained
    driver = urllib.parse.urlparse(trainer.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(driver).replace("10s", "1s"))
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    server = subprocess.Popen(
        [
            "prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                result = _query(port, f"{PREFIX}steps_total")["data"]["result"]
                if result:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus never scraped the run"
            time.sleep(0.5)
        assert float(result[0]["value"][1]) == 2
        for panel in grafana_dashboard()["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$run", ".*")
                assert _query(port, expr)["status"] == "success", expr
    finally:
        server.terminate()
        server.wait(timeout=30)
