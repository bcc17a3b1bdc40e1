"""Prometheus metrics of one server (its own registry, so tests can build several apps).

Label Studio hides backend failures from users ("Retrieved N predictions" even when nothing was stored),
so every error is counted here by kind, next to request latencies, job queue/run times and queue depths.

With several server processes (Redis mode, ``segmask serve --workers N``), each keeps its values in a
directory they share (prometheus_client's multiprocess mode, :func:`share_between_processes`), and
``/metrics``, whichever process answers, reports the sums over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 100)
# WSGI environ key: time.perf_counter() when the server had the request ready for a thread (set by
# backend.server's worker; no request header can set a key without the HTTP_ prefix).
READY_AT = "segmask.ready_at"
_shared_dir: str | None = None


def share_between_processes(directory: str) -> None:
    """Keep this process's metric values in ``directory``, where every process's ``/metrics`` sums them.

    Call it in each server process before any :class:`Metrics` is built. prometheus_client chooses where
    values live when it is first imported (from ``PROMETHEUS_MULTIPROC_DIR``), and the gunicorn master
    imports it before it forks, so the choice is made again here, in the process itself.
    """
    global _shared_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # where prometheus_client writes this process's file
    values.ValueClass = values.MultiProcessValue()
    _shared_dir = directory


class Metrics:
    """The counters and histograms the routes update, and ``render()`` for ``GET /metrics``."""

    def __init__(
        self, queue_depths: Callable[[], dict[str, int]] | None, model_version: Callable[[], str]
    ) -> None:
        """``queue_depths`` reads the queues' lengths from Redis; None in embedded mode (no Redis)."""
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
            "Request latency by route and mode (interactive, batch, ...), from when the server had the "
            "request ready for a thread (waiting for a free thread included) to its answer",
            ["route", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.thread_wait = Histogram(
            "segmask_request_thread_wait_seconds",
            "Time requests waited for a free server thread (part of segmask_request_seconds; "
            "raise SEGMASK_SERVER_THREADS when it grows)",
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
        live = _LiveGauges(queue_depths, model_version)
        self.registry.register(live)
        self._exposed = self.registry if _shared_dir is None else _summed_registry(_shared_dir, live)

    def render(self) -> bytes:
        """The text ``GET /metrics`` answers (sums over the server processes when they share values)."""
        return generate_latest(self._exposed)


def _summed_registry(directory: str, live: _LiveGauges) -> CollectorRegistry:
    """What /metrics shows when processes share values: every process's counts summed from ``directory``,
    and the live gauges, which read the same Redis and model store in every process."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)
    registry.register(live)
    return registry


class _LiveGauges:
    """Values read at scrape time: queue depths and whether Redis answered (with Redis only), and the
    served model version."""

    def __init__(
        self, queue_depths: Callable[[], dict[str, int]] | None, model_version: Callable[[], str]
    ) -> None:
        self.queue_depths = queue_depths
        self.model_version = model_version

    def collect(self):
        if self.queue_depths is not None:
            yield from self._queues(self.queue_depths)
        version = GaugeMetricFamily("segmask_model_info", "The model version served", labels=["version"])
        version.add_metric([self.model_version()], 1)
        yield version

    @staticmethod
    def _queues(queue_depths: Callable[[], dict[str, int]]):
        depth = GaugeMetricFamily("segmask_queue_depth", "Jobs waiting per queue", labels=["queue"])
        up = GaugeMetricFamily(
            "segmask_redis_up",
            "1 when Redis answered this scrape, 0 when it did not; absent in embedded mode (no Redis)",
        )
        try:
            for name, count in queue_depths().items():
                depth.add_metric([name], count)
            up.add_metric([], 1)
        except Exception:  # a scrape must not fail because Redis is down; redis_up says so instead
            up.add_metric([], 0)
        yield depth
        yield up
