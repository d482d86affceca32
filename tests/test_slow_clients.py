"""Slow and hostile clients against a real gunicorn, with raw sockets.

A body that trickles in gets 408 and its connection closed, on every route; a stream
whose client stops reading is dropped after `stream_write_timeout_seconds` and metered,
holds a bounded amount of memory, and never keeps SIGTERM from ending the worker with
every record written; the provider's exact usage wins over an estimate however the
stream ended.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.models import UsageRecord
from tests.helpers.fake_upstream import FakeUpstream, RecordedRequest
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.raw_http import (
    closed_by_server,
    open_stream,
    read_response,
    start_slow_body,
    trickle,
)
from tests.helpers.servers import Gunicorn

Start = Callable[..., Gunicorn]
BODY_TIMEOUT = 1.0
WRITE_TIMEOUT = 1.0


@dataclass
class Served:
    server: Gunicorn
    key: str
    worker_class: str


@pytest.fixture(params=["gevent", "gthread"])
def serve(
    start_gunicorn: Start, ledger: None, config_data: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Served]]:
    """gunicorn (each worker model) with short body and write timeouts, and a key."""
    config_data["gateway"].update(
        body_timeout_seconds=BODY_TIMEOUT, stream_write_timeout_seconds=WRITE_TIMEOUT
    )

    def start(args: list[str] | None = None) -> Served:
        server = start_gunicorn(env={"KEYMEAI_WORKER_CLASS": request.param}, args=args)
        return Served(server, keys.create_key("slow", "standard")[1], request.param)

    yield start


def assert_timed_out(sock: Any) -> None:
    """A 408 in OpenAI's shape that says the connection closes, and it does."""
    started = time.monotonic()
    response = read_response(sock, timeout=10)
    assert response.status == 408, response
    assert response.json()["error"] == {
        "message": f"The request body did not arrive within {BODY_TIMEOUT:g} seconds.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
    assert response.headers["connection"] == "close"
    assert closed_by_server(sock, timeout=5), "the connection stayed open after the 408"
    assert time.monotonic() - started < 8


ROUTES = [  # one of each kind of view: the API, the dashboard, the account page, health
    ("POST", "/v1/chat/completions", "application/json"),
    ("POST", "/dashboard/signin", "application/x-www-form-urlencoded"),
    ("POST", "/account", "application/x-www-form-urlencoded"),
    ("GET", "/healthz", "text/plain"),
]


def test_trickling_bodies_get_408_and_their_connections_close(
    serve: Callable[..., Served],
) -> None:
    """A byte every 0.2 s to each route at once: a per-read timeout would never fire, the
    deadline does, on every route."""
    served = serve()
    socks = [
        start_slow_body(
            served.server.url,
            method,
            path,
            10_000,
            {"Authorization": f"Bearer {served.key}", "Content-Type": content_type},
        )
        for method, path, content_type in ROUTES
    ]
    try:
        trickle(*socks, seconds=BODY_TIMEOUT + 0.5)
        for sock in socks:
            assert_timed_out(sock)
    finally:
        for sock in socks:
            sock.close()
    assert requests.get(f"{served.server.url}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in served.server.log()


def test_many_slow_bodies_do_not_starve_healthz(serve: Callable[..., Served]) -> None:
    """More slow bodies than the worker takes connections: each is dropped at its
    deadline, so the connections free up and /healthz still answers."""
    served = serve(args=["--worker-connections", "20"])
    socks = [start_slow_body(served.server.url, "POST", "/account", 1000) for _ in range(30)]
    try:
        started = time.monotonic()
        assert requests.get(f"{served.server.url}/healthz", timeout=15).status_code == 200
        assert time.monotonic() - started < 15
        with ThreadPoolExecutor(len(socks)) as pool:
            statuses = list(pool.map(lambda s: read_response(s, timeout=15).status, socks))
        assert statuses == [408] * len(socks)
    finally:
        for sock in socks:
            sock.close()


def ask(words: int, **fake: Any) -> dict[str, Any]:
    """A streamed qwen-max request (DashScope: usage in a chunk of its own)."""
    return {
        "model": "qwen-max",
        "messages": [{"role": "user", "content": "a very long story"}],
        "stream": True,
        "fake": {"words": words, **fake},
    }


def assert_exact(record: UsageRecord, sent: RecordedRequest, outcomes: set[str]) -> None:
    """A stream's record, row by row: the provider's own counts, not an estimate."""
    assert sent.response_usage is not None
    assert (record.status, record.stream, record.outcome in outcomes) == (200, True, True)
    assert record.estimated is False
    assert record.prompt_tokens == sent.response_usage["prompt_tokens"]
    assert record.completion_tokens == sent.response_usage["completion_tokens"]
    assert record.total_tokens == sent.response_usage["total_tokens"]
    assert record.cost_units > 0


def stalling(upstream: FakeUpstream, streams: int, quiet: float = 1.0) -> Iterator[None]:
    """Yields every 0.25 s until `streams` requests reached the provider and none of their
    answers has moved on for `quiet` seconds (the gateway stopped reading them)."""
    deadline = time.monotonic() + 20
    sent, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        yield
        now_sent = sum(r.chunks_sent for r in upstream.requests)
        if upstream.count() < streams or now_sent != sent:
            sent, still_since = now_sent, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return
    raise AssertionError(f"{streams} streams did not stall: {upstream.count()} seen")


def worker_rss_kib(server: Gunicorn) -> int:
    pid = int(re.findall(r"Booting worker with pid: (\d+)", server.log())[-1])
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_client_that_stops_reading_is_dropped_and_metered_exactly(
    serve: Callable[..., Served], upstream: FakeUpstream
) -> None:
    """A 50k-word stream to a client with a small window that reads nothing: dropped
    after stream_write_timeout_seconds (1 s here), the provider slowed down meanwhile
    (it never got to the end), and metered with the usage it reported up front."""
    served = serve()
    started = time.monotonic()
    with open_stream(served.server.url, served.key, ask(50_000, usage_early=True)) as sock:
        records = wait_for_records(1, timeout=20)
        assert records, "no record for a stream whose client stopped reading"
        assert time.monotonic() - started >= WRITE_TIMEOUT
        assert closed_by_server(sock, timeout=5)
    [record] = records
    sent = upstream.requests[0]
    assert_exact(record, sent, {"client_closed"})
    assert record.completion_tokens == 50_000
    assert not sent.completed
    assert "Traceback" not in served.server.log()  # the drop is a quiet EPIPE for gunicorn


def test_non_stream_answer_nobody_reads_is_dropped_after_the_write_timeout(
    serve: Callable[..., Served],
) -> None:
    """A 200k-word non-stream answer (about 1.4 MB) to a client with a small window that
    reads nothing: metered before the write, and the connection dropped once the write
    has lasted stream_write_timeout_seconds (2 s), so the client holds no worker. Read
    afterwards, the connection ends before the answer does: the server gave up on it."""
    served = serve()
    with open_stream(served.server.url, served.key, {**ask(200_000), "stream": False}) as sock:
        [record] = wait_for_records(1, timeout=20)
        assert (record.stream, record.outcome, record.estimated) == (False, "ok", False)
        time.sleep(2 + 1.5)  # the write timeout, the stall check's tick, a margin
        received = read_to_end(sock, timeout=10)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    assert length > 1_000_000 and len(body) < length
    assert "Traceback" not in served.server.log()


def read_to_end(sock: Any, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    with contextlib.suppress(ConnectionResetError):
        while time.monotonic() < end and (piece := sock.recv(65536)):
            data += piece
    return data


def test_client_that_hangs_up_after_the_provider_finished_gets_exact_usage(
    serve: Callable[..., Served], upstream: FakeUpstream
) -> None:
    """The provider sent its whole answer, usage last; the client read a little and
    left. What the client never got is still metered: the provider's counts win."""
    served = serve()
    with open_stream(served.server.url, served.key, ask(2_000)) as sock:
        assert len(sock.recv(4096)) > 0
    [record] = wait_for_records(1, timeout=10)
    sent = upstream.requests[0]
    assert_exact(record, sent, {"client_closed"})
    assert record.completion_tokens == 2_000 and sent.completed


def test_streams_nobody_reads_keep_worker_memory_bounded(
    serve: Callable[..., Served], config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    """Five 50k-word streams (about 11 MB each) that nobody reads: the worker buffers a
    bounded amount of each, not the answers (+67 MB before the bound)."""
    config_data["gateway"]["stream_write_timeout_seconds"] = 30
    served = serve()
    before = worker_rss_kib(served.server)
    socks = [open_stream(served.server.url, served.key, ask(50_000)) for _ in range(5)]
    try:
        peak = before
        for _ in stalling(upstream, 5):  # within a second or two
            peak = max(peak, worker_rss_kib(served.server))
        assert upstream.count() == 5 and not any(r.completed for r in upstream.requests)
        assert peak - before < 20_000, (before, peak)
    finally:
        for sock in socks:
            sock.close()
    assert len(wait_for_records(5, timeout=10)) == 5


def test_sigterm_ends_streams_stuck_in_a_write_each_with_its_record(
    serve: Callable[..., Served], config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    """Three streams whose clients read nothing, far from their write timeout: SIGTERM
    to the master, and the worker cuts them within the grace period (4 s here; cut at
    2 s), writes a record for each and exits."""
    config_data["gateway"]["stream_write_timeout_seconds"] = 60
    served = serve(args=["--graceful-timeout", "4"])
    socks = []
    for i in range(3):
        body = ask(50_000, usage_early=True)
        body["messages"][0]["content"] = "story" + " more" * i  # prompts of 4, 5, 6 tokens
        socks.append(open_stream(served.server.url, served.key, body, request_id=f"cut-{i}"))
    try:
        for _ in stalling(upstream, 3):  # the writes stall
            pass
        process = served.server.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        # Within the grace period: a worker still stuck then is killed, its records lost.
        assert process.wait(timeout=20) == 0
    finally:
        for sock in socks:
            sock.close()
    records = sorted(usage_records(), key=lambda r: r.request_id)
    assert [r.request_id for r in records] == ["cut-0", "cut-1", "cut-2"]
    sent = sorted(upstream.requests, key=lambda r: len(r.body["messages"][0]["content"]))
    for record, request in zip(records, sent, strict=True):
        assert_exact(record, request, {"client_closed", "interrupted"})
        assert not request.completed
    assert "Traceback" not in served.server.log()


def test_oversized_content_length_is_a_quick_413_and_the_body_is_never_read(
    serve: Callable[..., Served],
) -> None:
    """A declared length over max_request_bytes: 413 at once, without waiting for the
    body, and the connection closes instead of reading 100 MB that may never come."""
    served = serve()
    headers = {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"}
    with start_slow_body(
        served.server.url, "POST", "/v1/chat/completions", 100_000_000, headers
    ) as sock:
        # Before the body's deadline (which would be a 408).
        response = read_response(sock, timeout=BODY_TIMEOUT * 0.9)
        assert response.status == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert closed_by_server(sock, timeout=BODY_TIMEOUT * 0.9)


def test_werkzeug_development_server_times_out_slow_bodies_too(
    start_gateway: Callable[..., Any], config_data: dict[str, Any]
) -> None:
    """`flask run`'s server (threads, its own socket in the environ) gets the same 408."""
    config_data["gateway"]["body_timeout_seconds"] = BODY_TIMEOUT
    gateway = start_gateway()
    with start_slow_body(gateway.url, "POST", "/account", 10_000) as sock:
        trickle(sock, seconds=BODY_TIMEOUT + 0.5)
        assert_timed_out(sock)
