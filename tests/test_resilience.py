"""Upstream faults on non-streamed requests: failover, client errors, bad answers, timeouts.

Each fault mode of the fake provider is pinned three ways: what the client (the openai
SDK) sees, how long it waited (bounded by the short timeouts of the test providers),
and what the ledger holds. Cooldowns and connection pools are in test_routing.py,
streams in test_streaming_faults.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from keymeai.catalogue import Provider
from keymeai.ledger.db import connection
from keymeai.ledger.models import UsageDaily, UsageRecord
from keymeai.ops.scrub import Scrubber
from tests.helpers.config import add_provider
from tests.helpers.errors import assert_no_secrets, log_text
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.routing import FAST_TIMEOUTS, ROUTED_MODEL, SOON, Routed, add_route
from tests.helpers.routing import timed_chat as chat
from tests.helpers.servers import Blackhole, free_port

MODEL = ROUTED_MODEL
# Answers that mean "this upstream cannot serve now": fail over, 503 when none is left.
REFUSALS = [
    "500",
    "502",
    "503",
    "429",
    "401",
    "402",  # DeepSeek: insufficient balance
    "ark/403",  # Ark: AccountOverdueError
    "404",
    "dashscope/arrearage",  # DashScope: 400 Arrearage
    "octet-error",  # a 500 whose JSON body comes as application/octet-stream
    "die",  # half the body, then the connection drops
    "die-before-body",
]
HANGS = ["hang", "hang-after-headers"]
MALFORMED = ["garbage", "badjson", "wrongshape", "empty"]


def assert_unbilled(record: UsageRecord, status: int, outcome: str, attempts: int = 1) -> None:
    assert (record.status, record.outcome, record.attempts) == (status, outcome, attempts)
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (0, 0, 0)
    assert record.cost_units == 0 and not record.estimated


@pytest.mark.parametrize("mode", REFUSALS)
def test_refusing_upstream_gives_503(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    routed = route(mode)
    error, elapsed = chat(routed.client)
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 503 and error.code == "upstream_unavailable"
    assert 1 <= int(error.response.headers["Retry-After"]) <= 30
    assert elapsed < SOON  # an answer, not a timeout: no waiting
    assert upstream.count() == 1
    [record] = usage_records()
    assert record.provider == routed.providers[0]
    assert_unbilled(record, 503, "unavailable")
    assert_no_secrets(error.response.text + log_text(gateway_logs), upstream.url, routed.key)


def test_octet_stream_error_body_is_read_leniently(
    route: Callable[..., Routed], gateway_logs: pytest.LogCaptureFixture
) -> None:
    """The code inside DeepSeek's application/octet-stream error body reaches the log."""
    error, _ = chat(route("octet-error").client)
    assert error.status_code == 503
    assert "HTTP 500 internal_error" in log_text(gateway_logs)


@pytest.mark.parametrize("mode", HANGS)
def test_hanging_upstream_holds_the_client_only_for_read_timeout(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    routed = route(mode)
    error, elapsed = chat(routed.client)
    assert isinstance(error, openai.InternalServerError) and error.status_code == 503
    assert 0.45 <= elapsed < SOON
    [record] = usage_records()
    assert_unbilled(record, 503, "unavailable")
    assert "ReadTimeout" in log_text(gateway_logs)


def test_upstream_within_read_timeout_is_waited_for(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("ok", "ark/ok", read_timeout=1.0)
    completion, elapsed = chat(routed.client, extra_body={"fake": {"first_delay": 0.3}})
    assert completion.choices[0].message.content == "Echo: hello there"
    assert upstream.count() == 1 and elapsed >= 0.3


def test_unreachable_upstream_costs_only_connect_timeout(
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    start_gateway: Callable[..., Any],
    blackhole: Blackhole,
) -> None:
    providers = add_route(config_data, upstream.url, MODEL, ["ok"], **FAST_TIMEOUTS)
    add_provider(config_data, "unreachable", f"{blackhole.url}/v1", connect_timeout=0.5)
    config_data["models"][MODEL]["upstreams"].insert(0, {"provider": "unreachable", "model": "x"})
    gateway = start_gateway()
    completion, elapsed = chat(gateway.client(gateway.create_key(), timeout=15))
    assert completion.choices[0].message.content == "Echo: hello there"
    assert 0.45 <= elapsed < SOON  # read_timeout is 10 s there: connect_timeout bounded it
    [record] = usage_records()
    assert (record.provider, record.attempts, record.outcome) == (providers[0], 2, "ok")


def test_refused_connection_fails_over_at_once(
    config_data: dict[str, Any], upstream: FakeUpstream, start_gateway: Callable[..., Any]
) -> None:
    add_route(config_data, upstream.url, MODEL, ["ok"], **FAST_TIMEOUTS)
    add_provider(config_data, "closed", f"http://127.0.0.1:{free_port()}/v1")
    config_data["models"][MODEL]["upstreams"].insert(0, {"provider": "closed", "model": "x"})
    gateway = start_gateway()
    completion, elapsed = chat(gateway.client(gateway.create_key(), timeout=15))
    assert completion.choices[0].message.content == "Echo: hello there"
    assert elapsed < 1


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("400", "Invalid request"),
        ("422", "Invalid Parameters"),
        ("ark/400", "A parameter is invalid."),
        ("dashscope/400", "Invalid request"),
    ],
)
def test_client_error_goes_back_as_400_without_failover(
    route: Callable[..., Routed], upstream: FakeUpstream, mode: str, message: str
) -> None:
    routed = route(mode, "ok")
    error, elapsed = chat(routed.client)
    assert isinstance(error, openai.BadRequestError)
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert message in error.body["message"]
    assert upstream.count(mode="ok") == 0 and elapsed < SOON
    [record] = usage_records()
    assert record.provider == routed.providers[0]
    assert_unbilled(record, 400, "rejected")


@pytest.mark.parametrize("mode", MALFORMED)
def test_malformed_answer_is_500_upstream_model_error(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """No failover: the upstream answered 200, so it may have run (and billed) the request."""
    routed = route(mode, "ok")
    error, elapsed = chat(routed.client)
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 500 and error.code == "upstream_model_error"
    assert "upstream model" in error.body["message"]
    assert upstream.count(mode="ok") == 0 and elapsed < SOON
    [record] = usage_records()
    assert_unbilled(record, 500, "upstream_error")
    request_id = error.response.headers["x-request-id"]
    logged = [r for r in gateway_logs.records if getattr(r, "request_id", None) == request_id]
    assert any(r.levelname == "ERROR" and "invalid response" in r.getMessage() for r in logged)
    assert_no_secrets(error.response.text + log_text(gateway_logs), upstream.url, routed.key)


def test_answer_without_usage_is_estimated_by_the_character_rule(
    route: Callable[..., Routed],
) -> None:
    routed = route("nousage")
    completion = routed.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "你好 world"}]
    )
    assert completion.choices[0].message.content == "Echo: 你好 world"
    assert completion.usage is None
    [record] = usage_records()
    # Prompt: 2 Chinese x 0.6 + 6 other x 0.3 = 3.0, plus 3 for the message: 6.
    # Completion "Echo: 你好 world": 2 x 0.6 + 12 x 0.3 = 4.8, rounded up: 5.
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (6, 5, 11)
    assert record.estimated and record.outcome == "ok" and record.cost_units > 0


@pytest.mark.parametrize("mode", REFUSALS + HANGS)
def test_failover_serves_from_the_next_upstream_billed_once(
    route: Callable[..., Routed], upstream: FakeUpstream, mode: str
) -> None:
    routed = route(mode, "dashscope/ok")
    completion, elapsed = chat(routed.client)
    assert completion.choices[0].message.content == "Echo: hello there"
    assert elapsed < SOON
    served = upstream.requests[-1]
    assert served.shape == "dashscope" and upstream.count() == 2
    [record] = usage_records()
    assert (record.provider, record.upstream_model, record.attempts) == (
        routed.providers[1],
        f"{routed.providers[1]}-upstream",
        2,
    )
    usage = served.response_usage
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert (record.status, record.outcome, record.estimated) == (200, "ok", False)
    with connection():
        [daily] = UsageDaily.select()
    assert (daily.requests, daily.total_tokens, daily.cost_units) == (
        1,
        record.total_tokens,
        record.cost_units,
    )


def test_no_upstream_can_serve_gives_503_naming_no_provider(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
) -> None:
    routed = route("503", "ark/429", "hang")
    error, elapsed = chat(routed.client)
    assert isinstance(error, openai.InternalServerError) and error.status_code == 503
    assert "Retry-After" in error.response.headers
    assert 0.45 <= elapsed < SOON and upstream.count() == 3
    message = error.body["message"]
    assert MODEL in message and not any(p in message for p in routed.providers)
    [record] = usage_records()
    assert record.provider == routed.providers[2]
    assert_unbilled(record, 503, "unavailable", attempts=3)
    assert_no_secrets(error.response.text + log_text(gateway_logs), upstream.url, routed.key)


def test_upstream_message_for_the_client_is_scrubbed_of_provider_secrets() -> None:
    """Should a provider echo its URL or our key in a 400, the client never sees them."""
    provider = Provider(
        name="p",
        base_url="https://llm.example.com/v1",
        api_key_env="P_KEY",
        connect_timeout=1,
        read_timeout=1,
        max_connections=1,
        api_key="sk-secret",
    )
    message = "bad key sk-secret for https://llm.example.com/v1/chat (llm.example.com)"
    scrub = Scrubber.for_providers([provider])
    assert scrub(message) == "bad key [redacted] for [redacted]/chat ([redacted])"
