"""Prometheus metrics, correct across gunicorn worker processes.

When `PROMETHEUS_MULTIPROC_DIR` is set (gunicorn.conf.py does it before the workers
start) prometheus-client keeps each worker's values in files there and `/metrics`
merges them; otherwise the process's own registry is served.
"""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from ..ledger.billing import Usage


_HTTP_STATUS = re.compile(r"HTTP ([1-5][0-9][0-9])\b")

REQUESTS = Counter(
    "keymeai_requests",
    "Chat completion requests by model, status and outcome.",
    ["model", "status", "outcome"],
)
TOKENS = Counter("keymeai_tokens", "Tokens metered, by model and kind.", ["model", "kind"])
UPSTREAM_LATENCY = Histogram(
    "keymeai_upstream_latency_seconds",
    "Time from forwarding a request to an upstream until its answer can be relayed: "
    "the first event of a stream, the whole body otherwise.",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
FAILOVERS = Counter(
    "keymeai_upstream_failures", "Upstream attempts that failed over.", ["provider", "reason"]
)
REJECTIONS = Counter("keymeai_limit_rejections", "Requests refused by a limit.", ["reason"])
STREAMS = Gauge(
    "keymeai_streams_in_flight", "Streams being relayed now.", multiprocess_mode="livesum"
)


def upstream_failed_over(provider: str, detail: str) -> None:
    """Count an attempt that moved on to the next upstream, by a bounded reason.

    The detail is the router's text ("HTTP 503 overloaded", "ConnectTimeout", "stream
    ended before ..."); only its kind becomes a label, never provider-chosen text.
    """
    status = _HTTP_STATUS.match(detail)
    head = detail.split(":", 1)[0]
    if status:
        reason = f"http_{status.group(1)}"
    elif detail.startswith("stream ended"):
        reason = "stream_ended"
    elif detail.startswith("body read failed"):
        reason = "body_read_failed"
    elif head.isidentifier():
        reason = head  # an exception class name: ConnectTimeout, ConnectionError...
    else:
        reason = "other"
    FAILOVERS.labels(provider, reason).inc()


def request_finished(model: str, status: int, outcome: str, usage: Usage) -> None:
    _requests(model, status, outcome).inc()
    if usage.total:
        prompt, completion = _tokens(model)
        prompt.inc(usage.prompt)
        completion.inc(usage.completion)


def upstream_latency(provider: str, seconds: float) -> None:
    _latency(provider).observe(seconds)


# Each request's series, looked up once per label set: `labels()` validates and locks on
# every call, a good part of what counting costs. The label values are bounded: the
# configured models and providers, the outcomes, the HTTP statuses.
@functools.cache
def _requests(model: str, status: int, outcome: str) -> Counter:
    return REQUESTS.labels(model, str(status), outcome)


@functools.cache
def _tokens(model: str) -> tuple[Counter, Counter]:
    return TOKENS.labels(model, "prompt"), TOKENS.labels(model, "completion")


@functools.cache
def _latency(provider: str) -> Histogram:
    return UPSTREAM_LATENCY.labels(provider)


def exposition() -> tuple[bytes, str]:
    """The metrics page, merged over all worker processes when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
