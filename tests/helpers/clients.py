"""Clients of a running gateway: the openai SDK (one, or many in parallel, as in the
limit and quota tests) and raw HTTP for exact bytes and headers."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import openai
import requests
from openai import OpenAI

from tests.helpers.config import MODEL
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records

if TYPE_CHECKING:  # servers imports this module (Gateway.client is `sdk`)
    from tests.helpers.servers import Gateway

HI = [{"role": "user", "content": "hi"}]  # the fake counts 4 prompt tokens; so does the gateway
SMALL_BODY_LIMIT = 16 * 1024  # gateway.max_request_bytes of the `api` fixture


def sdk(base_url: str, key: str, **options: Any) -> OpenAI:
    """The openai SDK pointed at a gateway (no retries unless asked; the SDK's own
    default wait would be 600 s)."""
    return OpenAI(
        base_url=f"{base_url}/v1", api_key=key, **{"max_retries": 0, "timeout": 60, **options}
    )


def ask(client: OpenAI, knobs: dict[str, Any] | None = None, **options: Any) -> Any:
    """One chat completion; the raw response (headers and `.parse()`)."""
    return client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HI,
        extra_body={"fake": knobs} if knobs else None,
        **options,
    )


def outcome(call: Callable[[], Any]) -> str:
    """ "ok", or the error code of a refused request (e.g. "rate_limit_exceeded")."""
    try:
        call()
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {exc.code}"
    return "ok"


def hammer(
    base_urls: list[str],
    key: str,
    clients: int = 16,
    attempts: int = 8,
    knobs: dict[str, Any] | None = None,
    **options: Any,
) -> collections.Counter[str]:
    """`clients` threads, each with its own SDK client (to the base URLs in turn),
    sending `attempts` requests as fast as they are answered; outcomes counted."""
    start = threading.Barrier(clients)

    def run(n: int) -> list[str]:
        with sdk(base_urls[n % len(base_urls)], key) as client:
            start.wait()
            return [outcome(lambda: ask(client, knobs, **options)) for _ in range(attempts)]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, range(clients)))
    return collections.Counter(item for result in results for item in result)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `predicate()` came to hold within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class Api:
    """A live gateway with a valid key, for raw HTTP (exact bytes and headers)."""

    gateway: Gateway
    key: str
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return f"{self.gateway.url}/v1/chat/completions"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def post(
        self, data: Any, content_type: str | None = "application/json", **kw: Any
    ) -> requests.Response:
        headers = self.headers(**({"Content-Type": content_type} if content_type else {}))
        headers.update(kw.pop("headers", {}))
        return requests.post(self.url, data=data, headers=headers, timeout=10, **kw)

    def post_json(self, body: Any) -> requests.Response:
        return self.post(json.dumps(body))

    def assert_rejected_for_free(self) -> None:
        """Nothing reached the upstream and nothing was metered."""
        assert self.upstream.requests == []
        assert usage_records() == []
