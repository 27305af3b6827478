"""Metric names, defined once: the Prometheus exporter and the Grafana dashboards read them.

Each iteration's `metrics.jsonl` row is also exported as Prometheus gauges named
`raydraft_<name>` with a `run` label, plus step and image counters, from the process
that drives training (the trainer, or the Ray job's driver).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

PREFIX = "raydraft_"


@dataclass(frozen=True)
class Metric:
    key: str  # the metrics.jsonl key
    name: str  # the Prometheus name, without PREFIX
    help: str
    unit: str  # Grafana's unit for the panel
    panel: str  # the dashboard panel it is drawn in


METRICS = (
    Metric("reward_mean", "reward_mean", "Mean reward of the iteration's samples", "none",
           "Reward"),
    Metric("reward_std", "reward_std", "Std of the iteration's rewards", "none", "Reward"),
    Metric("images_per_s", "images_per_second", "Images generated and trained on per second",
           "none", "Throughput"),
    Metric("time_step_s", "step_seconds", "Wall time of the iteration", "s", "Step time"),
    Metric("time_rollout_s", "rollout_seconds", "Sampling time (summed over workers)", "s",
           "Step time"),
    Metric("time_reward_s", "reward_seconds", "Reward scoring time (summed over workers)", "s",
           "Step time"),
    Metric("time_update_s", "update_seconds", "Learner update time", "s", "Step time"),
    Metric("time_requantize_s", "requantize_seconds", "Seconds the rollouts' low-precision "
           "copy took to re-quantize after a weight sync", "s", "Step time"),
    Metric("swap_s", "swap_seconds", "Seconds colocated roles spent moving to and from host "
           "memory", "s", "Step time"),
    Metric("weight_sync_s", "weight_sync_seconds", "Seconds to publish the new weights", "s",
           "Weight sync"),
    Metric("weight_sync_bytes", "weight_sync_bytes", "Bytes of the published weights",
           "bytes", "Weight sync"),
    Metric("policy_version", "policy_version", "Version of the learner's weights", "none",
           "Versions"),
    Metric("staleness", "staleness", "Versions between sampling and training a batch",
           "none", "Versions"),
    Metric("rollouts_in_flight", "rollouts_in_flight", "Batches dispatched, not yet trained",
           "none", "Queues"),
    Metric("reissued_parts", "reissued_parts", "Prompt-batch parts re-sent after a worker died",
           "none", "Faults"),
    Metric("bad_reward_dropped", "bad_rewards_dropped", "Samples dropped for a NaN/inf reward",
           "none", "Faults"),
    Metric("policy_loss", "policy_loss", "Policy loss of the update", "none", "Optimisation"),
    Metric("grad_norm", "grad_norm", "Gradient norm before clipping", "none", "Optimisation"),
    Metric("kl_ref", "kl_ref", "KL to the reference model", "none", "Optimisation"),
    Metric("clipfrac", "clip_fraction", "Fraction of clipped ratios (Flow-GRPO)", "none",
           "Optimisation"),
    Metric("mismatch_log_ratio_max", "mismatch_log_ratio_max", "Largest |log-ratio| of the "
           "full-precision over the low-precision behaviour policy (Flow-GRPO)", "none",
           "Low-precision rollouts"),
    Metric("is_truncated_fraction", "is_truncated_fraction", "Fraction of importance weights "
           "truncated (Flow-GRPO)", "none", "Low-precision rollouts"),
    Metric("is_ess", "is_effective_sample_size", "Effective sample size over N of the "
           "importance weights (Flow-GRPO)", "none", "Low-precision rollouts"),
    Metric("fidelity_spearman_rho", "fidelity_spearman_rho", "Within-group Spearman ρ of "
           "low- vs full-precision rewards on the same seeds (audited iterations)", "none",
           "Low-precision rollouts"),
    Metric("fidelity_kendall_tau", "fidelity_kendall_tau", "Within-group Kendall τ of low- vs "
           "full-precision rewards on the same seeds", "none", "Low-precision rollouts"),
    Metric("zero_std_fraction", "zero_std_group_fraction",
           "Fraction of groups with equal rewards (no signal)", "none", "Optimisation"),
)  # fmt: skip
STEPS_TOTAL = "steps_total"
IMAGES_TOTAL = "images_total"


class MetricsExporter:
    """Prometheus gauges for one run, fed one metrics row per iteration."""

    def __init__(self, run: str, registry: CollectorRegistry | None = None) -> None:
        self.run = run
        self.registry = registry or CollectorRegistry()
        self.gauges = {
            m.key: Gauge(PREFIX + m.name, m.help, ["run"], registry=self.registry) for m in METRICS
        }
        self.steps = Counter(
            PREFIX + STEPS_TOTAL.removesuffix("_total"), "Training iterations", ["run"],
            registry=self.registry,
        )  # fmt: skip
        self.images = Counter(
            PREFIX + IMAGES_TOTAL.removesuffix("_total"), "Images trained on", ["run"],
            registry=self.registry,
        )  # fmt: skip

    def observe(self, row: dict[str, float], images: int) -> None:
        for key, gauge in self.gauges.items():
            value = row.get(key)
            if value is not None and not math.isnan(value):
                gauge.labels(self.run).set(value)
        self.steps.labels(self.run).inc()
        self.images.labels(self.run).inc(images)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0: a free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
