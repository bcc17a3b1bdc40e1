"""Prometheus metrics of one server (its own registry, so tests can build several apps).

Label Studio hides backend failures from users ("Retrieved N predictions" even when nothing was stored),
so every error is counted here by kind, next to request latencies, job queue/run times and queue depths.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 100)


class Metrics:
    """The counters and histograms the routes update, and ``render()`` for ``GET /metrics``."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]], model_version: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "segmask_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "segmask_errors",
            "Requests answered with an error, by kind",
            ["route", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "segmask_request_seconds",
            "Request latency by route and mode (interactive, batch, ...)",
            ["route", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_queued = Histogram(
            "segmask_job_queued_seconds",
            "Time jobs waited in the queue",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_running = Histogram(
            "segmask_job_running_seconds",
            "Time jobs ran on a worker (or in-process)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predicted_regions = Counter(
            "segmask_predicted_regions", "Regions returned to Label Studio", ["mode"], registry=self.registry
        )
        self.webhooks = Counter(
            "segmask_webhook_events",
            "Webhook events received by action (Label Studio's actions; any other string is 'other')",
            ["action"],
            registry=self.registry,
        )
        self.registry.register(_LiveGauges(queue_depths, model_version))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveGauges:
    """Values read at scrape time: queue depths (from Redis) and the served model version."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]], model_version: Callable[[], str]) -> None:
        self.queue_depths = queue_depths
        self.model_version = model_version

    def collect(self):
        depth = GaugeMetricFamily("segmask_queue_depth", "Jobs waiting per queue", labels=["queue"])
        up = GaugeMetricFamily("segmask_redis_up", "1 when the queue backend answered this scrape")
        try:
            for name, count in self.queue_depths().items():
                depth.add_metric([name], count)
            up.add_metric([], 1)
        except Exception:  # a scrape must not fail because Redis is down; redis_up says so instead
            up.add_metric([], 0)
        yield depth
        yield up
        version = GaugeMetricFamily("segmask_model_info", "The model version served", labels=["version"])
        version.add_metric([self.model_version()], 1)
        yield version
