"""The generated alert rules: promtool checks them, and runs dashboards/alerts_test.yml,
whose series make each alert fire and leave the series beside them quiet."""

import re
import subprocess
from pathlib import Path

import yaml
from binaries import require

from raydraft.dashboards import alerts

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
FIXTURES = DASHBOARDS / "alerts_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("promtool"), *args], cwd=DASHBOARDS, capture_output=True, text=True
    )


def test_promtool_accepts_every_rule():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_each_alert_fires_on_its_fixtures_and_only_there():
    done = promtool("test", "rules", FIXTURES.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_fixtures_make_every_alert_fire_and_stay_quiet():
    """promtool compares the whole set of firing alerts at each evaluation: a case that
    expects none shows the rule quiet, one that expects some shows it firing (and quiet
    on the other series of that case)."""
    cases = [case for test in yaml.safe_load(FIXTURES.read_text())["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    for alert in alerts():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == alert.name]
        assert any(expected), f"no fixture makes {alert.name} fire"
        assert not all(expected), f"no fixture shows {alert.name} quiet"


def test_the_fixtures_feed_exactly_the_series_the_rules_read():
    tests = yaml.safe_load(FIXTURES.read_text())["tests"]
    fed = {re.match(r"\w+", s["series"]).group() for t in tests for s in t["input_series"]}
    read = {name for alert in alerts() for name in re.findall(r"\b(ray(?:draft)?_\w+)", alert.expr)}
    assert fed == read
