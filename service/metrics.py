"""The service's Prometheus metrics: its own registry, request counts, latency, live gauges.

Each app gets its own :class:`ServiceMetrics` (so several apps can live in one process). The
window statistics and the snapshot state are computed when Prometheus scrapes.

Example:
    >>> from oclust.service.loader import ModelHolder
    >>> from oclust.service.monitor import AssignmentMonitor
    >>> m = ServiceMetrics(ModelHolder(), AssignmentMonitor())
    >>> m.count_request("/assign", 200)
    >>> b'oclust_http_requests_total{endpoint="/assign",status="2xx"} 1.0' in m.render()
    True
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from oclust.service import installed_version
from oclust.service.loader import ModelHolder
from oclust.service.monitor import AssignmentMonitor

__all__ = ["LATENCY_BUCKETS", "ServiceMetrics", "package_version"]

LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)
NAN = float("nan")


@functools.cache
def package_version() -> str:
    """The installed oclust version (``unknown`` when run from an uninstalled tree)."""
    return installed_version("unknown")


class _LiveCollector(Collector):
    """Window statistics and snapshot state, computed when Prometheus scrapes."""

    def __init__(self, holder: ModelHolder, monitor: AssignmentMonitor) -> None:
        self.holder = holder
        self.monitor = monitor

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self.monitor.stats()
        total = CounterMetricFamily(
            "oclust_assignments", "Points assigned per cluster since start.", labels=["cluster"]
        )
        share = GaugeMetricFamily(
            "oclust_cluster_share", "Share of each cluster in the recent window.",
            labels=["cluster"],
        )
        for k in range(s.n_clusters):
            total.add_metric([str(k)], s.totals[k])
            share.add_metric([str(k)], s.shares[k] if s.filled else NAN)
        yield total
        yield share

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=NAN if value is None else float(value))

        yield gauge("oclust_hard_entropy_nats", "Entropy of the window's hard labels (nats).",
                    s.hard_entropy)
        yield gauge("oclust_hard_entropy_ratio", "Hard entropy divided by log K.",
                    s.hard_entropy_ratio)
        yield gauge("oclust_kl_star_nats", "KL(window cluster distribution || prior) (nats).",
                    s.kl_star)
        yield gauge("oclust_soft_entropy_nats", "Entropy of the window's mean soft assignment.",
                    s.soft_entropy)
        yield gauge("oclust_drift_js_nats", "Jensen-Shannon divergence of the window vs the "
                    "previous window (nats).", s.drift_js)
        model = self.holder.current
        yield gauge("oclust_snapshot_version", "Snapshot version being served.",
                    None if model is None else model.version)
        age = None
        if model is not None and model.created_at is not None:
            age = max(0.0, time.time() - model.created_at)
        yield gauge("oclust_snapshot_age_seconds", "Seconds since the served snapshot was made.",
                    age)
        yield gauge("oclust_snapshot_created_timestamp_seconds",
                    "Unix time the served snapshot was made.",
                    None if model is None else model.created_at)
        yield gauge("oclust_snapshot_fallback", "1 when the served snapshot is not the version "
                    "the store points at (that one cannot be loaded; see /readyz).",
                    1.0 if self.holder.fallback else 0.0)
        if self.holder.store_up is not None:
            yield gauge("oclust_store_up", "1 when the snapshot store answered the last attempt.",
                        1.0 if self.holder.store_up else 0.0)


class ServiceMetrics:
    """The app's own Prometheus registry (so several apps can live in one process).

    Example:
        >>> from oclust.service.loader import ModelHolder
        >>> from oclust.service.monitor import AssignmentMonitor
        >>> m = ServiceMetrics(ModelHolder(), AssignmentMonitor())
        >>> b"oclust_snapshot_version NaN" in m.render()
        True
    """

    def __init__(self, holder: ModelHolder, monitor: AssignmentMonitor) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_LiveCollector(holder, monitor))
        self.latency = Histogram(
            "oclust_assign_latency_seconds",
            "Time to answer /assign and /assign/batch (parse, infer, respond).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency_assign = self.latency.labels("/assign")  # same labels as the counter
        self.latency_batch = self.latency.labels("/assign/batch")
        Gauge("oclust_build_info", "Always 1; the labels name the build.",
              ["version", "python"], registry=self.registry).labels(
            package_version(), platform.python_version()).set(1)
        self.requests = Counter(
            "oclust_http_requests",
            "HTTP requests by endpoint and status class.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str], Any] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one answered request (status as 2xx/4xx/5xx; a client disconnect is 499)."""
        key = (endpoint, f"{status // 100}xx")
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
