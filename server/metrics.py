"""``GET /metrics``: Prometheus text, with SGLang's metric names under the ``treadle:`` prefix.

Request-level figures (outcome, tokens, TTFT, inter-token and end-to-end latency) are observed by
the routes as their requests run (``RequestTimer``); engine-level figures (running and waiting
requests, KV usage, prefix-cache hit rate) are read from the schedulers' ``internal_states`` when
Prometheus scrapes. Each app has a registry of its own, so that two servers in one process (the
tests) do not share counters.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
                0.5, 1.0, 2.5)


class Metrics:
    """The server's metrics, in a registry of its own."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter("treadle:num_requests", "Finished requests by outcome (success, abort, error)",
                                labels + ["outcome"], registry=r)
        self.prompt_tokens = Counter("treadle:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("treadle:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("treadle:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("treadle:inter_token_latency_seconds", "Time between two output tokens", labels,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("treadle:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("treadle:num_running_reqs", "Requests running", labels, registry=r)
        self.waiting = Gauge("treadle:num_queue_reqs", "Requests waiting", labels, registry=r)
        self.token_usage = Gauge("treadle:token_usage", "Fraction of KV pages in use by requests", labels, registry=r)
        self.cache_hit_rate = Gauge("treadle:cache_hit_rate", "Prefix-cache hit rate: cached / prompt tokens",
                                    labels, registry=r)
        self.model_name = model_name
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (the results' meta_info)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self, server_info: Optional[dict[str, Any]]) -> bytes:
        """The text Prometheus scrapes; the engine gauges from ``get_server_info()`` of the moment."""
        if server_info is not None:
            self._read_engine_state(server_info)
        return generate_latest(self.registry)

    def _read_engine_state(self, info: dict[str, Any]) -> None:
        states = info.get("internal_states") or []
        running = sum(s.get("num_running", 0) for s in states)
        waiting = sum(s.get("num_waiting", 0) for s in states)
        pages = sum(s.get("num_pages", 0) for s in states)
        # pages held by requests: neither free nor only kept by the prefix cache for reuse
        used = sum(s.get("num_pages", 0) - s.get("free_pages", 0) - s.get("evictable_pages", 0) for s in states)
        m = self.model_name
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        self.token_usage.labels(m).set(used / pages if pages else 0.0)
        # the schedulers count every prompt token they admitted and how many the prefix cache held
        # (all routes, the engine's whole life); the routes' own count is the fallback
        prompt = sum(s.get("prompt_tokens", 0) for s in states)
        cached = sum(s.get("cached_tokens", 0) for s in states)
        if not prompt:
            prompt, cached = self.prompt_tokens.labels(m)._value.get(), self.cached_tokens
        self.cache_hit_rate.labels(m).set(cached / prompt if prompt else 0.0)


class RequestTimer:
    """One request's timing: call ``tokens(n)`` as output tokens arrive (a stream's chunks; once
    for a whole result), then ``done(...)``. The first call sets the time to first token; each
    later one adds its gap, spread over its tokens, to the inter-token histogram."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: Optional[float] = None
        self.finished = False

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now, m = time.perf_counter(), self.metrics
        if self.last is None:
            m.ttft.labels(m.model_name).observe(now - self.start)
            n -= 1  # the first token's latency is the TTFT; the rest came together
        elif n:
            gap = (now - self.last) / n
            for _ in range(n):
                m.itl.labels(m.model_name).observe(gap)
        self.last = now

    def done(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0, cached_tokens: int = 0) -> None:
        """``outcome``: ``success``, ``abort`` (the client went away, or an abort call) or ``error``."""
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        m.requests.labels(m.model_name, outcome).inc()
        m.prompt_tokens.labels(m.model_name).inc(prompt_tokens)
        m.generation_tokens.labels(m.model_name).inc(completion_tokens)
        m.cached_tokens += cached_tokens
        m.e2e.labels(m.model_name).observe(time.perf_counter() - self.start)

    def done_with(self, outcome: str, metas: list[dict[str, Any]]) -> None:
        """``done`` with the token counts of the results' ``meta_info``s (one per item or choice)."""
        def total(key: str) -> int:
            return sum(int(m.get(key, 0) or 0) for m in metas)
        self.done(outcome, total("prompt_tokens"), total("completion_tokens"), total("cached_tokens"))

    def whole_result(self, metas: list[dict[str, Any]]) -> None:
        """A whole (not streamed) answer: its output tokens arrived at once, then it is done."""
        self.tokens(sum(int(m.get("completion_tokens", 0) or 0) for m in metas))
        self.done_with(outcome_of(metas), metas)


def outcome_of(metas: list[dict[str, Any]]) -> str:
    """``abort`` if any item was aborted (the engine's ``finish_reason`` type), else ``success``."""
    reasons = [m.get("finish_reason") for m in metas]
    return "abort" if any(isinstance(r, dict) and r.get("type") == "abort" for r in reasons) else "success"

