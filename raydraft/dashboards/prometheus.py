"""Prometheus's files: the scrape config (the driver and Ray's nodes) and the alert rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raydraft.dashboards.files import REWARD_APPS, SCRAPE_INTERVAL, dump_yaml
from raydraft.metrics import LAST_STEP, MAX_STALENESS, row_metric

# The reward servers' p95 latency above which rollouts wait on them (alert).
REWARD_P95_LIMIT_MS = 5000
# Where Ray's head writes the addresses of every node's metrics agent.
RAY_SERVICE_DISCOVERY = "/tmp/ray/prom_metrics_service_discovery.json"


def prometheus_config(
    driver: str = "127.0.0.1:9464",
    ray_nodes: list[str] | None = None,
    interval: str = SCRAPE_INTERVAL,
    rules: str = "alerts.yml",
) -> str:
    """Scrape the training driver and Ray's metrics agents: `ray_nodes` (host:port each),
    or every node listed in the service discovery file of Ray's head."""
    ray: dict[str, Any] = (
        {"file_sd_configs": [{"files": [RAY_SERVICE_DISCOVERY]}]}
        if ray_nodes is None
        else {"static_configs": [{"targets": ray_nodes}]}
    )
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules],
        "scrape_configs": [
            {"job_name": "raydraft", "static_configs": [{"targets": [driver]}]},
            {"job_name": "ray", **ray},
        ],
    }
    return dump_yaml(config)


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    duration: str  # how long the condition holds before it fires
    summary: str
    description: str


def alerts() -> list[Alert]:
    staleness, step = row_metric("staleness"), row_metric("time_step_s")
    dropped = row_metric("bad_reward_dropped")
    latency = f"ray_serve_deployment_processing_latency_ms_bucket{{{REWARD_APPS}}}"
    by_deployment = "sum by (application, deployment)"
    healthy = f"{by_deployment} (ray_serve_deployment_replica_healthy{{{REWARD_APPS}}})"
    target = f"{by_deployment} (ray_serve_autoscaling_target_replicas{{{REWARD_APPS}}})"
    return [
        Alert(
            "RaydraftRunStalled",
            f"time() - {LAST_STEP.exported} > clamp_min(10 * {step.exported}, 600)",
            "1m",
            "Run {{ $labels.run }}: no iteration for {{ $value | humanizeDuration }}",
            "No iteration for 10 times the last one's duration (at least 10 minutes) while "
            "the driver is up: a hung worker, learner or reward server.",
        ),
        Alert(
            "RaydraftStalenessAboveBound",
            f"{staleness.exported} > {MAX_STALENESS.exported}",
            "0s",
            "Run {{ $labels.run }} trained a batch {{ $value }} versions stale",
            "Staleness above ray.max_staleness: the async schedule let a batch through that "
            "its bound should have held back.",
        ),
        Alert(
            "RaydraftRewardsDropped",
            f"increase({dropped.exported}[10m]) > 0",
            "0s",
            "Run {{ $labels.run }} dropped samples for NaN/inf rewards in the last 10 minutes",
            "A reward returned non-finite scores (rewards.on_bad_reward: drop); the samples "
            "were left out of the update.",
        ),
        Alert(
            "RaydraftRewardLatencyHigh",
            f"histogram_quantile(0.95,\n  sum by (application, deployment, le) "
            f"(rate({latency}[5m]))\n) > {REWARD_P95_LIMIT_MS}",
            "5m",
            'Reward deployment {{ $labels.deployment }}: p95 latency {{ printf "%.0f" $value }} ms',
            f"Reward replicas' p95 processing latency above {REWARD_P95_LIMIT_MS} ms: "
            "rollout workers wait on the reward; add replicas or raise max_replicas.",
        ),
        Alert(
            "RaydraftNoHealthyRewardReplica",
            f"({target} > 0)\nunless on (application, deployment)\n({healthy} > 0)",
            "1m",
            "Reward deployment {{ $labels.deployment }} has no healthy replica",
            "The autoscaler wants replicas but none is healthy: every reward call waits or fails.",
        ),
    ]


def alert_rules() -> str:
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.duration,
            "labels": {"severity": "warning"},
            "annotations": {"summary": a.summary, "description": a.description},
        }
        for a in alerts()
    ]
    return dump_yaml({"groups": [{"name": "raydraft", "rules": rules}]})
