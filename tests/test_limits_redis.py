"""Limits shared through Redis by several processes, and what happens when Redis fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from tests.helpers.clients import ask, hammer, outcome, sdk
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway, Gunicorn, free_port
from tests.helpers.services import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def limits_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the `keymeai.api.limits` logger (which does not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("keymeai.api.limits")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def storage(data: dict[str, Any], uri: str, on_error: str = "allow") -> dict[str, Any]:
    data["ratelimit"] = {"storage_uri": uri, "on_storage_error": on_error}
    data["tiers"]["free"]["requests"] = ["3 per day"]
    return data


def test_two_instances_share_one_exact_limit_and_quota(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    ledger: None,
    upstream: FakeUpstream,
    redis_url: str,
) -> None:
    config_data["tiers"]["hobby"]["tokens_per_month"] = 2000
    env = {"RATELIMIT_STORAGE_URI": redis_url, "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "8"}
    first = start_gunicorn(config_data, env, wait=False)
    second = start_gunicorn(config_data, env)  # same ledger file, same Redis database
    first.ready()
    urls = [first.url, second.url]

    free = keys.create_key("shared", "free")[1]
    outcomes = hammer(urls, free, clients=16, attempts=8)
    assert outcomes == {"ok": 100, "429 rate_limit_exceeded": 28}
    assert upstream.count() == 100
    for url in urls:
        with sdk(url, free) as client:
            assert outcome(lambda client=client: ask(client)) == "429 rate_limit_exceeded"

    # A Hobby key near its quota, hit through both instances at once (4 processes):
    # 1800 used, each request reserves 154 and uses 150, so exactly two are admitted.
    hobby = keys.create_key("quota", "hobby")[1]
    with sdk(first.url, hobby) as one, sdk(second.url, hobby) as two:
        for n in range(12):
            ask((one, two)[n % 2], {"words": 146}, max_tokens=150)
    knobs = {"words": 146, "first_delay": 1.0}
    outcomes = hammer(urls, hobby, clients=16, attempts=1, knobs=knobs, max_tokens=150)
    assert outcomes == {"ok": 2, "429 insufficient_quota": 14}
    hobby_id = keys.find_key(hobby).id
    assert sum(r.total_tokens for r in usage_records() if r.key_id == hobby_id) == 2100


def test_one_storage_round_trip_per_request(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], redis_server: RedisServer
) -> None:
    gateway = start_gateway(storage(config_data, redis_server.url))
    client = gateway.client(gateway.create_key("standard"))
    ask(client)  # loads the script
    redis_server.client().config_resetstat()
    for n in range(2, 12):
        raw = ask(client)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(3000 - n)
        assert raw.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")
    calls = redis_server.commands()
    for own in ("hello", "config|resetstat", "info"):  # the test's own client
        calls.pop(own, None)
    # One EVALSHA a request; INCRBY and PTTL run inside the script, on the server.
    assert calls == {"evalsha": 10, "incrby": 10, "pttl": 10}


def test_allow_counts_in_memory_while_nothing_listens(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    limits_log: list[logging.LogRecord],
) -> None:
    gateway = start_gateway(storage(config_data, f"redis://127.0.0.1:{free_port()}/1"))
    client = gateway.client(gateway.create_key("free"))
    remaining = [ask(client).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError):  # still limited, per process
        ask(client)
    assert upstream.count() == 3
    assert any("falling back to in-memory storage" in r.getMessage() for r in limits_log)
    ready = requests.get(f"{gateway.url}/readyz", timeout=5)
    assert ready.status_code == 503


def test_deny_answers_503_while_nothing_listens(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    limits_log: list[logging.LogRecord],
) -> None:
    gateway = start_gateway(storage(config_data, f"redis://127.0.0.1:{free_port()}/1", "deny"))
    client = gateway.client(gateway.create_key("free"))
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client)
    error = caught.value
    assert error.status_code == 503
    assert error.code == "ratelimit_unavailable"
    assert error.response.headers["retry-after"] == "5"
    assert "x-ratelimit-limit-requests" not in error.response.headers
    assert "Traceback" not in error.response.text
    assert upstream.count() == 0 and usage_records() == []
    assert any("storage unreachable" in r.getMessage() for r in limits_log)


def test_deny_refuses_while_redis_is_down_and_recovers(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    redis_server: RedisServer,
) -> None:
    gateway = start_gateway(storage(config_data, redis_server.url, "deny"))
    client = gateway.client(gateway.create_key("free"))
    assert ask(client).headers["x-ratelimit-remaining-requests"] == "2"
    redis_server.kill()
    assert outcome(lambda: ask(client)) == "503 ratelimit_unavailable"
    redis_server.start()  # same port, empty: the day's count starts again
    assert ask(client).headers["x-ratelimit-remaining-requests"] == "2"
    assert upstream.count() == 2


def test_allow_keeps_serving_when_redis_dies_mid_test(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    redis_server: RedisServer,
) -> None:
    gateway = start_gateway(storage(config_data, redis_server.url))
    client = gateway.client(gateway.create_key("free"))
    assert ask(client).headers["x-ratelimit-remaining-requests"] == "2"
    redis_server.kill()
    # Counted afresh in this process's memory from here on.
    assert [ask(client).status_code for _ in range(3)] == [200, 200, 200]
    assert outcome(lambda: ask(client)) == "429 rate_limit_exceeded"
    assert upstream.count() == 4


@pytest.mark.parametrize(("on_error", "expected"), [("allow", "ok"), ("deny", "503")])
def test_a_hung_redis_cannot_hang_requests(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    redis_server: RedisServer,
    on_error: str,
    expected: str,
) -> None:
    gateway = start_gateway(storage(config_data, redis_server.url, on_error))
    client = gateway.client(gateway.create_key("standard"), timeout=30)
    ask(client)
    redis_server.freeze()
    try:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            result = outcome(lambda: ask(client))
            timings.append(time.monotonic() - started)
            assert result.startswith(expected)
    finally:
        redis_server.thaw()
    assert max(timings) < 3  # the 1 s socket timeout bounds each storage call
    if on_error == "allow":  # only the request that found Redis hung waited for it
        assert sorted(timings)[1] < 0.5


def test_usage_endpoint_reads_windows_from_redis(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], redis_server: RedisServer
) -> None:
    gateway = start_gateway(storage(config_data, redis_server.url))
    key = gateway.create_key("free")
    client = gateway.client(key)
    ask(client)
    ask(client)
    standing: Any = client.get("/usage", cast_to=object)
    (window,) = standing["limits"]["requests"]
    assert (window["max_requests"], window["used"], window["remaining"]) == (3, 2, 1)
    assert 86_000 < window["resets_in_seconds"] <= 86_400
    redis_server.kill()
    standing = client.get("/usage", cast_to=object)
    assert standing["limits"]["requests"] is None  # unknown while the storage is away
    assert standing["usage"]["requests"] == 2
