"""Slow and hostile clients against a real gunicorn, with raw sockets.

A body that trickles in gets 408 and its connection closed, on every route; a stream
whose client stops reading is dropped after `stream_write_timeout_seconds` and metered,
holds a bounded amount of memory, and never keeps SIGTERM from ending the worker with
every record written; the provider's exact usage wins over an estimate however the
stream ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from keymeai import keys
from tests.slow_clients import closed_by_server, read_response, start_slow_body, trickle
from tests.support import Gunicorn

Start = Callable[..., Gunicorn]
BODY_TIMEOUT = 1.0


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
    config_data["gateway"].update(body_timeout_seconds=BODY_TIMEOUT, stream_write_timeout_seconds=2)

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


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("POST", "/v1/chat/completions", "application/json"),
        ("POST", "/dashboard/signin", "application/x-www-form-urlencoded"),
        ("POST", "/account", "application/x-www-form-urlencoded"),
        ("GET", "/healthz", "text/plain"),
    ],
)
def test_trickling_body_gets_408_and_the_connection_closes(
    serve: Callable[..., Served], method: str, path: str, content_type: str
) -> None:
    """A byte every 0.2 s: a per-read timeout would never fire, the deadline does."""
    served = serve()
    headers = {"Authorization": f"Bearer {served.key}", "Content-Type": content_type}
    sock = start_slow_body(served.server.url, method, path, 10_000, headers)
    with sock:
        trickle(sock, seconds=BODY_TIMEOUT + 0.5)
        assert_timed_out(sock)
    assert requests.get(f"{served.server.url}/healthz", timeout=5).status_code == 200
