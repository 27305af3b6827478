"""Metric names, defined once: the Prometheus exporter, the Grafana dashboard and the alert
rules read them.

Each iteration's `metrics.jsonl` row is exported as Prometheus series named
`raydraft_<name>` with a `run` label, from the process that drives training (the trainer,
or the Ray job's driver). Keys that name a part (`reward_mean/<component>`) become one
labelled series per part; a count per iteration becomes a running `_total` counter, which
Prometheus cannot miss between two scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

PREFIX = "raydraft_"
IMAGE_RATE = "suffix: img/s"  # Grafana's custom unit: a suffix after the value
FRACTION = "percentunit"  # Grafana: 0..1 drawn as 0..100%


@dataclass(frozen=True)
class Metric:
    key: str | None  # the metrics.jsonl key; None: the exporter sets it from elsewhere
    name: str  # the exported series, without PREFIX (a counter's ends in _total)
    help: str
    unit: str  # Grafana's unit of the series
    panel: str  # the dashboard panel it is drawn in
    # Labels besides `run`. A row-fed metric with one label reads every key
    # `<key>/<value>` as the series whose label has that value.
    labels: tuple[str, ...] = ()
    counter: bool = False  # the row holds the iteration's count: exported as its running sum

    @property
    def exported(self) -> str:
        return PREFIX + self.name


METRICS = (
    Metric("reward_mean", "reward_mean", "Mean reward of the iteration's samples", "none",
           "Reward"),
    Metric("reward_std", "reward_std", "Std of the iteration's rewards", "none", "Reward"),
    Metric("reward_mean", "reward_component_mean", "Mean of each reward component (with two "
           "or more) and of each reward detail (GenEval's strict, OCR failures)", "none",
           "Reward by component", labels=("component",)),
    Metric("reward_std", "reward_component_std", "Std of each reward component's scores over "
           "the iteration's samples", "none", "Reward by component", labels=("component",)),
    Metric("images_per_s", "images_per_second", "Images generated and trained on per second "
           "of the iteration", IMAGE_RATE, "Images per second"),
    Metric("images_per_s", "role_images_per_second", "Images per second of each role's own "
           "time (rollout and reward: summed over workers; learner: the update)", IMAGE_RATE,
           "Images per second", labels=("role",)),
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
           "Weight sync time"),
    Metric("weight_sync_bytes", "weight_sync_bytes", "Bytes of the published weights",
           "bytes", "Weight sync size"),
    Metric("policy_version", "policy_version", "Version of the learner's weights", "none",
           "Policy version"),
    Metric("staleness", "staleness", "Versions between sampling and training a batch",
           "none", "Staleness"),
    Metric("rollouts_in_flight", "rollouts_in_flight", "Batches dispatched, not yet trained",
           "none", "Rollouts in flight"),
    Metric("reissued_parts", "reissued_parts", "Prompt-batch parts re-sent after a worker "
           "died, since the run started", "none", "Faults"),
    Metric("bad_reward_dropped", "bad_rewards_dropped_total", "Samples dropped for a NaN/inf "
           "reward, since the run started", "none", "Faults", counter=True),
    Metric("policy_loss", "policy_loss", "Policy loss of the update", "none", "Policy loss"),
    Metric("grad_norm", "grad_norm", "Gradient norm before clipping", "none",
           "Gradient norm"),
    Metric("kl_ref", "kl_ref", "KL to the reference model", "none", "KL to reference"),
    Metric("clipfrac", "clip_fraction", "Fraction of clipped ratios (Flow-GRPO)", FRACTION,
           "Clipped and flat groups"),
    Metric("zero_std_fraction", "zero_std_group_fraction",
           "Fraction of groups with equal rewards (no signal)", FRACTION,
           "Clipped and flat groups"),
    Metric("mismatch_log_ratio_max", "mismatch_log_ratio_max", "Largest |log-ratio| of the "
           "full-precision over the low-precision behaviour policy (Flow-GRPO)", "none",
           "Low-precision mismatch"),
    Metric("is_truncated_fraction", "is_truncated_fraction", "Fraction of importance weights "
           "truncated (Flow-GRPO)", FRACTION, "Importance weights"),
    Metric("is_ess", "is_effective_sample_size", "Effective sample size over N of the "
           "importance weights (Flow-GRPO)", FRACTION, "Importance weights"),
    Metric("fidelity_spearman_rho", "fidelity_spearman_rho", "Within-group Spearman ρ of "
           "low- vs full-precision rewards on the same seeds (audited iterations)", "none",
           "Low- vs full-precision ranking"),
    Metric("fidelity_kendall_tau", "fidelity_kendall_tau", "Within-group Kendall τ of low- vs "
           "full-precision rewards on the same seeds", "none",
           "Low- vs full-precision ranking"),
)  # fmt: skip
STEPS = Metric(None, "steps_total", "Training iterations", "none", "Run", counter=True)
IMAGES = Metric(None, "images_total", "Images trained on", "none", "Run", counter=True)
# Seconds since the epoch: drawn as its age, time() minus it.
LAST_STEP = Metric(
    None, "last_step_timestamp_seconds", "Unix time the last iteration ended", "s", "Run"
)
MAX_STALENESS = Metric(
    None, "max_staleness", "The configured bound on staleness (ray.max_staleness)", "none",
    "Staleness",
)  # fmt: skip
EVAL_ACCURACY = Metric(
    None, "eval_accuracy", "Held-out accuracy of the latest evaluation, per category (and "
    "overall) and score (strict, clauses)", FRACTION, "Evaluation accuracy per category",
    labels=("category", "score"),
)  # fmt: skip
EXPORTER_METRICS = (STEPS, IMAGES, LAST_STEP, MAX_STALENESS, EVAL_ACCURACY)
ALL_METRICS = (*METRICS, *EXPORTER_METRICS)
# Each role's images per second: the seconds key of the row that times it.
ROLE_SECONDS = {"rollout": "time_rollout_s", "reward": "time_reward_s", "learner": "time_update_s"}


def row_metric(key: str) -> Metric:
    """The one unlabelled series of a metrics.jsonl key."""
    return next(m for m in METRICS if m.key == key and not m.labels)


def role_rates(row: Mapping[str, float], images: int) -> dict[str, float]:
    """`images_per_s/<role>` keys: the iteration's images over each role's own seconds (a
    role that took no time, such as a reward inside the loss, has none)."""
    return {
        f"images_per_s/{role}": images / row[key]
        for role, key in ROLE_SECONDS.items()
        if row.get(key, 0.0) > 0.0
    }


def labelled_values(metric: Metric, row: Mapping[str, float]) -> dict[str, float]:
    """{label value: value} of the row's `<key>/<value>` keys for a one-label metric."""
    prefix = f"{metric.key}/"
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


class MetricsExporter:
    """Prometheus series for one run, fed one metrics row per iteration.

    `max_staleness`, the run's configured bound, is exported so that an alert can compare
    each run's staleness with its own bound."""

    def __init__(
        self,
        run: str,
        registry: CollectorRegistry | None = None,
        max_staleness: int | None = None,
    ) -> None:
        self.run = run
        self.registry = registry or CollectorRegistry()
        self.series = {m: self._register(m) for m in ALL_METRICS}
        if max_staleness is not None:
            self.series[MAX_STALENESS].labels(run).set(max_staleness)

    def _register(self, metric: Metric) -> Gauge | Counter:
        labels = ["run", *metric.labels]
        if not metric.counter:
            return Gauge(metric.exported, metric.help, labels, registry=self.registry)
        name = metric.exported.removesuffix("_total")  # prometheus_client appends it
        counter = Counter(name, metric.help, labels, registry=self.registry)
        if not metric.labels:  # at 0 from the start: `increase` then sees the first count
            counter.labels(self.run)
        return counter

    def observe(self, row: Mapping[str, float], images: int) -> None:
        """One iteration's row; `images`: the samples it trained on."""
        row = {**row, **role_rates(row, images)}
        for metric in METRICS:
            if metric.labels:
                for value_of, value in labelled_values(metric, row).items():
                    if _finite(value):
                        self.series[metric].labels(self.run, value_of).set(value)
            elif _finite(row.get(metric.key)):
                self._record(metric, row[metric.key])
        self.series[STEPS].labels(self.run).inc()
        self.series[IMAGES].labels(self.run).inc(images)
        self.series[LAST_STEP].labels(self.run).set_to_current_time()

    def _record(self, metric: Metric, value: float) -> None:
        series = self.series[metric].labels(self.run)
        if metric.counter:
            series.inc(value)
        else:
            series.set(value)

    def observe_eval(self, table: Mapping[str, Mapping[str, float]]) -> None:
        """An evaluation's table, {category: {score: accuracy}} (`raydraft.evaluation`)."""
        for category, scores in table.items():
            for score, accuracy in scores.items():
                self.series[EVAL_ACCURACY].labels(self.run, category, score).set(accuracy)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0: a free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
