"""Prometheus metrics of a run: the exporter fed rows directly, then a toy run through Ray
scraped over real HTTP and, where installed, by a real Prometheus that must find data for
every panel of the generated dashboard and evaluate every alert rule."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from binaries import require
from overrides import RAY_SMALL
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from raydraft.config import ExperimentConfig, load_config
from raydraft.dashboards import alerts, grafana_dashboard, prometheus_config
from raydraft.metrics import METRICS, PREFIX, MetricsExporter
from raydraft.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# Every series a run can export: two served reward components (per-component means),
# fp8 rollouts audited every iteration (the low-precision series), an evaluation at the
# start and the end (accuracy per category).
RUN = [
    *RAY_SMALL,
    "algorithm.group_size=4",
    "rewards.components=[{name: toy-geneval}, {name: jpeg-compressibility}]",
    "rollout.precision=fp8",
    "rollout.fidelity_every=1",
    "logging.eval_per_category=1",
]
SCRAPE_S = 1  # Prometheus's scrape interval here, and Ray's metrics report interval
# Ray's system config of that, read from the environment by the processes Ray starts.
REPORT_INTERVAL = "RAY_metrics_report_interval_ms"
# Grafana's $__rate_interval: 4 scrape intervals at the 1 s steps these queries use.
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
# Ray's per-GPU node metrics exist only on nodes with GPUs; their names and labels are
# checked against Ray's own dashboards instead (tests/test_dashboards.py).
GPU_SERIES = re.compile(r"\bray_node_(gpus_|gram_)")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, its labels other than `run`, sorted): value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the exporter, fed rows directly ---------------------------------------------------
ROW = {
    "reward_mean": 0.5,
    "reward_mean/clip": 0.25,
    "reward_mean/strict": math.nan,
    "time_step_s": 2.0,
    "time_rollout_s": 1.0,
    "time_reward_s": 0.5,
    "time_update_s": 0.0,
    "bad_reward_dropped": 3.0,
    "staleness": 1,
}


def test_rows_become_labelled_series_and_counts_running_totals():
    exporter = MetricsExporter("r", max_staleness=2)
    exporter.observe(ROW, images=8)
    exporter.observe(ROW | {"bad_reward_dropped": 1.0, "reward_mean": math.nan}, images=8)
    exporter.observe_eval({"counting": {"strict": 0.25, "clauses": 0.5}})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in exporter.registry.collect()
        for s in family.samples
    }
    run = (("run", "r"),)

    def value(name, **labels):
        return samples[(PREFIX + name, tuple(sorted((*run, *labels.items()))))]

    assert value("steps_total") == 2 and value("images_total") == 16
    assert value("bad_rewards_dropped_total") == 4  # 3 + 1: a count per row, summed
    assert value("reward_mean") == 0.5  # a NaN leaves the last finite value
    assert value("reward_component_mean", component="clip") == 0.25
    assert not any(("component", "strict") in labels for _, labels in samples)
    assert value("role_images_per_second", role="rollout") == 8.0
    assert value("role_images_per_second", role="reward") == 16.0
    assert not any(("role", "learner") in labels for _, labels in samples)  # took no time
    assert value("max_staleness") == 2 and value("staleness") == 1
    assert value("eval_accuracy", category="counting", score="clauses") == 0.5
    assert time.time() - value("last_step_timestamp_seconds") < 60


def test_counters_start_at_zero_so_the_first_count_shows_in_increase():
    samples = {s.name: s.value for f in MetricsExporter("r").registry.collect() for s in f.samples}
    assert samples[PREFIX + "steps_total"] == 0
    assert samples[PREFIX + "bad_rewards_dropped_total"] == 0


# -- a toy run through Ray, scraped --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus on loopback scraping with `config`, its data under `root`."""

    def __init__(self, config: str, root: Path) -> None:
        path = root / "prometheus.yml"
        path.write_text(config)
        check = subprocess.run([require("promtool"), "check", "config", str(path)],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        self.port = _free_port()
        self.log = root / "prometheus.log"
        self.process = subprocess.Popen(
            [
                require("prometheus"), f"--config.file={path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={root / 'data'}",
            ],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )  # fmt: skip

    def get(self, path: str, **params: object) -> dict:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def has_data(self, expr: str, start: float) -> bool:
        """Whether `expr` returns a value for some second since `start` (what a panel of
        the run draws)."""
        result = self.get("query_range", query=expr, start=start, end=time.time(), step=SCRAPE_S)
        return any(not math.isnan(float(v)) for s in result["result"] for _, v in s["values"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@dataclass
class Observed:
    cfg: ExperimentConfig
    trainer: Trainer
    rows: list[dict]
    start: float  # Unix time before the run started
    prometheus: Prometheus | None  # None where no prometheus binary is installed


def fail_a_reward_request(cfg: ExperimentConfig) -> None:
    """A request the reward replica raises on (gradients of a black-box reward): what a
    reward error looks like in Serve's own metrics."""
    import torch

    from raydraft_ray.reward_serving import RemoteReward

    name = cfg.rewards.components[-1].name
    reward = RemoteReward(name, max_retries=0, images_per_request=1, differentiable=True)
    with pytest.raises(TypeError, match="not differentiable"):
        reward.score_with_grad(torch.zeros(1, 3, 8, 8), ["a"], [{}])


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    from raydraft_ray.cluster import connect
    from raydraft_ray.engine import RayEngine

    os.environ[REPORT_INTERVAL] = str(SCRAPE_S * 1000)
    started = connect(None, num_cpus=4)
    root = tmp_path_factory.mktemp("observed")
    prometheus, engine = None, None
    try:
        node = ray.nodes()[0]
        agent = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        driver = _free_port()
        if shutil.which("prometheus") is not None:  # else the tests that need it skip or fail
            rules = str(ROOT / "dashboards/alerts.yml")
            config = prometheus_config(f"127.0.0.1:{driver}", [agent], f"{SCRAPE_S}s", rules)
            prometheus = Prometheus(config, root)
        cfg = load_config("toy-flowgrpo", [*RUN, f"logging.metrics_port={driver}"])
        start = time.time()
        engine = RayEngine(cfg)
        trainer = Trainer(cfg, root / "run", engine=engine)
        rows = trainer.fit(2)
        fail_a_reward_request(cfg)
        yield Observed(cfg, trainer, rows, start, prometheus)
    finally:
        if engine is not None:
            engine.close()
        if prometheus is not None:
            prometheus.stop()
        if started:
            serve.shutdown()
            ray.shutdown()
        os.environ.pop(REPORT_INTERVAL)


def test_each_iteration_of_a_ray_run_is_exported_with_the_run_label(observed):
    samples = scrape(observed.trainer.metrics_url)
    rows, cfg = observed.rows, observed.cfg

    def value(name, **labels):
        return samples[(PREFIX + name, tuple(sorted(labels.items())))]

    assert value("steps_total") == 2
    assert value("images_total") == 16
    assert value("reward_mean") == pytest.approx(rows[-1]["reward_mean"])
    assert value("step_seconds") == pytest.approx(rows[-1]["time_step_s"])
    assert value("policy_version") == 2
    for component in cfg.rewards.components:
        expected = rows[-1][f"reward_mean/{component.name}"]
        assert value("reward_component_mean", component=component.name) == pytest.approx(expected)
    for m in METRICS:
        if not m.labels and not m.counter:
            assert (PREFIX + m.name, ()) in samples, f"{m.key} is missing from the rows"
    final = observed.trainer.run.read_eval()["final"]
    assert value("eval_accuracy", category="overall", score="strict") == pytest.approx(
        final["overall"]["strict"]
    ), "the trainer exports each evaluation (MetricsExporter.observe_eval)"
    assert value("max_staleness") == cfg.ray.max_staleness, (
        "the trainer exports its staleness bound (MetricsExporter(max_staleness=...))"
    )


def test_promtool_accepts_the_exporters_output(observed):
    text = urllib.request.urlopen(observed.trainer.metrics_url, timeout=10).read()
    check = subprocess.run([require("promtool"), "check", "metrics"], input=text,
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def dashboard_queries() -> list[str]:
    """Every panel query as Grafana sends it for all runs (`$run` is `.*`), each operand of
    an `or` on its own: a fallback must not hide a misnamed series."""
    exprs = [t["expr"] for p in grafana_dashboard()["panels"] for t in p.get("targets", [])]
    substituted = [
        e.replace("$run", ".*").replace("$__rate_interval", RATE_INTERVAL) for e in exprs
    ]
    return [operand for expr in substituted for operand in expr.split(" or ")]


def test_a_real_prometheus_finds_data_for_every_panel(observed):
    prometheus = observed.prometheus
    if prometheus is None:
        require("prometheus")
    no_gpu = ray.cluster_resources().get("GPU", 0) == 0
    queries = [q for q in dashboard_queries() if not (no_gpu and GPU_SERIES.search(q))]
    deadline = time.monotonic() + 60  # Ray's agent reports each second, then a scrape
    while True:
        missing = [q for q in queries if not prometheus.has_data(q, observed.start)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    assert missing == [], f"no data (Prometheus log: {prometheus.log})"


def test_a_real_prometheus_evaluates_every_alert_and_none_fires(observed):
    prometheus = observed.prometheus
    if prometheus is None:
        require("prometheus")
    names = set(prometheus.get("label/__name__/values"))
    for alert in alerts():
        assert set(re.findall(r"\b(ray(?:draft)?_\w+)", alert.expr)) <= names, alert.name
    rules = [r for g in prometheus.get("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {a.name for a in alerts()}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    firing = prometheus.get("query", query='ALERTS{alertstate="firing"}')["result"]
    assert firing == []
