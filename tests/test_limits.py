"""Request limits per key from the tier table: exact counts, headers, 429s, overrides."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from flask import request

from keymeai.ledger import keys
from tests.helpers.cli import invoke
from tests.helpers.clients import HI, ask, hammer, sdk
from tests.helpers.config import MODEL, write_toml
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway, Gunicorn

DURATION = re.compile(r"\d+ms|(\d+h)?(\d+m)?\d+s")
# A day-long window that opened moments ago: ceil(86400 - elapsed) seconds.
DAY_WINDOW = re.compile(r"24h0m0s|23h59m\d+s")


def key_id(plain: str) -> str:
    return str(keys.find_key(plain).id)


def test_free_key_gets_exactly_100_requests_then_429(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.create_key("free")
    client = gateway.client(key)
    for n in range(1, 101):
        raw = ask(client)
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(100 - n)
        reset = raw.headers["x-ratelimit-reset-requests"]
        assert DURATION.fullmatch(reset), reset
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token quota on Free
    assert DAY_WINDOW.fullmatch(reset), reset  # the day-long window opened with the first request

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI)
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert error.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "100 per 1 day" in error.message
    headers = error.response.headers
    assert 86_000 < int(headers["retry-after"]) <= 86_400
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert DAY_WINDOW.fullmatch(headers["x-ratelimit-reset-requests"])
    # The refused request cost nothing: no upstream call, no usage record.
    assert upstream.count() == 100
    assert len(usage_records()) == 100


def test_auth_comes_before_the_limit(gateway: Gateway) -> None:
    key = gateway.create_key("free")
    invoke(gateway.app, "keys", "set-limits", key_id(key), "--requests", "1 per day")
    ask(gateway.client(key))
    with pytest.raises(openai.RateLimitError):
        ask(gateway.client(key))
    with pytest.raises(openai.AuthenticationError):
        ask(gateway.client(key[:-4] + "AAAA"))
    invoke(gateway.app, "keys", "revoke", key_id(key))
    with pytest.raises(openai.AuthenticationError):
        ask(gateway.client(key))


def test_16_concurrent_clients_on_one_free_key_in_process(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.create_key("free")
    outcomes = hammer([gateway.url], key, clients=16, attempts=8)
    assert outcomes == {"ok": 100, "429 rate_limit_exceeded": 28}
    assert upstream.count() == 100
    assert len(usage_records()) == 100


def test_16_concurrent_clients_on_one_free_key_under_gunicorn(
    start_gunicorn: Callable[..., Gunicorn], ledger: None, upstream: FakeUpstream
) -> None:
    key = keys.create_key("threads", "free")[1]
    server = start_gunicorn(args=["--threads", "16"])
    outcomes = hammer([server.url], key, clients=16, attempts=8)
    assert outcomes == {"ok": 100, "429 rate_limit_exceeded": 28}
    assert upstream.count() == 100
    assert len(usage_records()) == 100


def test_headers_on_streams_and_on_rejected_bodies(gateway: Gateway) -> None:
    client = gateway.client(gateway.create_key("standard"))
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=HI, stream=True
    ) as stream:
        assert stream.headers["x-ratelimit-limit-requests"] == "3000"
        assert stream.headers["x-ratelimit-remaining-requests"] == "2999"
        assert stream.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")
        assert b"[DONE]" in b"".join(stream.iter_bytes())
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=0)
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "2998"


def test_scale_key_gets_its_own_limits_from_set_limits(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.create_key("scale")
    client = gateway.client(key)
    assert ask(client).headers["x-ratelimit-limit-requests"] == "10000"

    result = invoke(
        gateway.app,
        "keys",
        "set-limits",
        key_id(key),
        "--requests",
        "100 per minute",
        "--requests",
        "3 per hour",
    )
    assert result.exit_code == 0, result.output
    assert "requests 100 per minute;3 per hour" in result.output
    # The smallest window is reported while none is exhausted.
    raw = ask(client)
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    ask(client)
    ask(client)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client)
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert 3500 < int(headers["retry-after"]) <= 3600
    assert "3 per 1 hour" in caught.value.message

    listed = invoke(gateway.app, "keys", "list")
    assert "100 per minute;3 per hour" in listed.output

    cleared = invoke(gateway.app, "keys", "set-limits", key_id(key), "--clear")
    assert "requests from tier" in cleared.output
    assert ask(client).headers["x-ratelimit-limit-requests"] == "10000"
    assert upstream.count() == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--requests", "lots per day"], "invalid limit 'lots per day'"),
        (["--tokens-per-month", "0"], "0 is not in the range"),
        (["--tokens-per-month", str(2**63)], "is not in the range"),
        (["--spend-cap", "abc"], "'abc' is not an amount in USD"),
        (["--spend-cap", "-5"], "must be a positive amount"),
        (["--spend-cap", "0"], "must be a positive amount"),
        (["--spend-cap", "NaN"], "must be a positive amount"),
        (["--spend-cap", "1e30"], "must be a positive amount"),
        (["--spend-cap", "0.00000000001"], "at most 10 decimal places"),
        ([], "give --requests, --tokens-per-month, --spend-cap, --max-concurrent or --clear"),
    ],
)
def test_set_limits_rejects_bad_values(gateway: Gateway, args: list[str], message: str) -> None:
    key = gateway.create_key("scale")
    result = invoke(gateway.app, "keys", "set-limits", key_id(key), *args)
    assert result.exit_code == 2
    assert message in result.output
    row = keys.find_key(key)
    assert (row.request_limits, row.tokens_per_month, row.spend_cap_units) == (None, None, None)


def test_set_limits_stores_exact_values_and_clear_drops_them(gateway: Gateway) -> None:
    key = gateway.create_key("scale")
    result = invoke(
        gateway.app,
        "keys",
        "set-limits",
        keys.find_key(key).prefix,
        "--tokens-per-month",
        "123456",
        "--spend-cap",
        "$25.10",
    )
    assert result.exit_code == 0, result.output
    assert "tokens/month 123456, spend cap/month $25.10" in result.output
    row = keys.find_key(key)
    assert (row.tokens_per_month, row.spend_cap_units) == (123456, 251_000_000_000)
    assert "$25.10/month" in invoke(gateway.app, "keys", "list").output
    invoke(gateway.app, "keys", "set-limits", key_id(key), "--spend-cap", "0.0000000001")
    assert keys.find_key(key).spend_cap_units == 1
    invoke(gateway.app, "keys", "set-limits", key_id(key), "--clear")
    row = keys.find_key(key)
    assert (row.request_limits, row.tokens_per_month, row.spend_cap_units) == (None, None, None)
    unknown = invoke(gateway.app, "keys", "set-limits", "999999", "--clear")
    assert unknown.exit_code == 1 and "no key with id 999999" in unknown.output


def test_sdk_retry_waits_for_retry_after_and_succeeds(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.create_key("scale")
    invoke(gateway.app, "keys", "set-limits", key_id(key), "--requests", "2 per 2 second")
    statuses: list[int] = []

    def record(response: Any) -> None:
        statuses.append(response.status_code)

    client = sdk(
        gateway.url,
        key,
        max_retries=1,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}),
    )
    ask(client)
    ask(client)
    started = time.monotonic()
    raw = ask(client)  # refused with Retry-After, retried by the SDK once the window ends
    waited = time.monotonic() - started
    assert statuses == [200, 200, 429, 200]
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert 0.9 < waited < 5
    assert upstream.count() == 3


def test_memory_limits_refuse_several_gunicorn_workers(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    config = write_toml(config_data, tmp_path / "memory.toml")
    server = Gunicorn(config, tmp_path / "gunicorn.log", {"WEB_CONCURRENCY": "2"})
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        server.start()
    assert server.process is not None and server.process.returncode != 0
    log = server.log()
    assert "ratelimit.storage_uri is memory:// but 2 workers were asked for" in log
    assert "Set REDIS_URL (or RATELIMIT_STORAGE_URI)" in log
    assert "Booting worker" not in log


def test_limit_strings_are_checked_at_start_up(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    from keymeai.config import ConfigError

    config_data["tiers"]["free"]["requests"] = ["100 a day"]
    with pytest.raises(ConfigError, match=r"tiers.free.requests: invalid limit '100 a day'"):
        start_gateway(config_data)


def test_flask_limiter_evaluates_a_chat_request_once(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass of Flask-Limiter per chat request, one hit of its strategy; none for
    `GET /v1/models` and `GET /v1/usage` beyond the pass every request of the app gets.

    A pass is counted where every pass of Flask-Limiter 4 resolves the limits that apply
    (its before_request hook, and again a route decorator's wrapper if the chat route had
    one: that arrangement costs two passes and would fail here)."""
    limiter = gateway.app.extensions["keymeai"].limiter
    passes: list[str] = []
    hits: list[str] = []
    resolve = limiter.limit_manager.resolve_limits
    hit = limiter.limiter.hit

    def resolving(*args: Any, **kwargs: Any) -> Any:
        passes.append(request.path)
        return resolve(*args, **kwargs)

    def hitting(*args: Any, **kwargs: Any) -> bool:
        hits.append(request.path)
        return bool(hit(*args, **kwargs))

    monkeypatch.setattr(limiter.limit_manager, "resolve_limits", resolving)
    monkeypatch.setattr(limiter.limiter, "hit", hitting)
    key = gateway.create_key("free")
    client = gateway.client(key)
    for n in range(1, 4):
        raw = ask(client)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(100 - n)
    assert passes == ["/v1/chat/completions"] * 3
    assert hits == ["/v1/chat/completions"] * 3

    passes.clear()
    client.models.list()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    assert session.get(f"{gateway.url}/v1/usage", timeout=10).status_code == 200
    assert passes == ["/v1/models", "/v1/usage"]
    assert hits == ["/v1/chat/completions"] * 3
    raw = ask(client)
    assert raw.headers["x-ratelimit-remaining-requests"] == "96"  # the GETs cost nothing


def test_a_preflight_without_a_key_leaves_the_limit_alone(
    gateway: Gateway, gateway_logs: pytest.LogCaptureFixture
) -> None:
    """An OPTIONS request has no key: Flask-Limiter must find no limit to count, not an
    error it would take for its storage failing (and switch to counting in memory)."""
    client = gateway.client(gateway.create_key("free"))
    assert ask(client).headers["x-ratelimit-remaining-requests"] == "99"
    preflight = requests.options(f"{gateway.url}/v1/chat/completions", timeout=10)
    assert preflight.status_code == 200 and "POST" in preflight.headers["Allow"]
    assert ask(client).headers["x-ratelimit-remaining-requests"] == "98"  # the same window
    assert not [r for r in gateway_logs.records if r.name.startswith("keymeai.api.limits")]
