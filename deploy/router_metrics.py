"""The router's own ``/metrics`` (Prometheus text, ``treadle_router:`` names): what it routed
where and why, what it retried, the streams it had to cut, and each worker's load and health.
The workers keep their own ``/metrics`` (``treadle:`` names) on their ports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from treadle.deploy.pool import Pool

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("treadle_router:requests", "Requests answered, by worker and status class",
                                ["worker", "status"], registry=r)
        self.decisions = Counter("treadle_router:routing_decisions", "Why a worker was chosen "
                                 "(cache, load, balance, session, round_robin)", ["reason"], registry=r)
        self.retries = Counter("treadle_router:retries", "Requests retried on another worker before "
                               "their first byte", ["worker"], registry=r)
        self.stream_errors = Counter("treadle_router:stream_errors", "Streams cut by a failed worker "
                                     "(ended with an error event)", ["worker"], registry=r)
        self.no_worker = Counter("treadle_router:no_healthy_worker", "Requests answered 503: no healthy worker",
                                 registry=r)
        self.latency = Histogram("treadle_router:request_latency_seconds", "Arrival to last byte",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("treadle_router:inflight_requests", "Requests in flight", ["worker"], registry=r)
        self.healthy = Gauge("treadle_router:worker_healthy", "1 if the worker gets traffic", ["worker"], registry=r)
        self.routed = Gauge("treadle_router:routed_requests", "Requests sent to the worker, all time",
                            ["worker"], registry=r)

    def render(self, pool: Pool) -> bytes:
        for m in pool.members.values():
            self.inflight.labels(m.name).set(m.inflight)
            self.healthy.labels(m.name).set(1 if m.healthy and m.url else 0)
            self.routed.labels(m.name).set(m.routed)
        return generate_latest(self.registry)
