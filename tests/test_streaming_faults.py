"""Upstream faults on streamed requests, in-process and under gunicorn.

Until the upstream's first event arrives nothing has gone to the client, so the gateway
may still fail over; after that a fault ends the stream with an SSE `error` event in
OpenAI's shape (the openai SDK raises `APIError` with our message) and the usage relayed
so far is billed as an estimate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from tests.helpers.errors import assert_no_secrets, log_text
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.routing import FAST_TIMEOUTS, ROUTED_MODEL, SOON, Routed, add_route

MESSAGES = [{"role": "user", "content": "hello there"}]
PROMPT_ESTIMATE = 7  # "hello there": 11 x 0.3 = 3.3, plus 3 for the message, rounded up
STREAM_FAILED = "The upstream model stopped responding before the answer was complete."


@dataclass
class Streamed:
    """What an SDK client got from a stream: text, the exception, timings."""

    text: str = ""
    error: Exception | None = None
    elapsed: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # seconds at which chunks came
    usage: Any = None


def stream(
    client: openai.OpenAI, messages: Any = MESSAGES, model: str = ROUTED_MODEL, **extra: Any
) -> Streamed:
    result = Streamed()
    started = time.monotonic()
    try:
        for chunk in client.chat.completions.create(
            model=model, messages=messages, stream=True, **extra
        ):
            result.arrivals.append(time.monotonic() - started)
            result.usage = chunk.usage or result.usage
            if chunk.choices:
                result.text += chunk.choices[0].delta.content or ""
    except openai.APIError as exc:
        result.error = exc
    result.elapsed = time.monotonic() - started
    return result


def assert_cut_short(got: Streamed, record: Any, completion_tokens: int) -> None:
    """The client saw our error event; the ledger billed the relayed part as an estimate."""
    assert type(got.error) is openai.APIError  # an event in the stream, not an HTTP status
    assert got.error.message == STREAM_FAILED
    assert got.error.code == "upstream_stream_failed"
    assert (record.status, record.outcome, record.estimated) == (200, "upstream_failed", True)
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT_ESTIMATE, completion_tokens)
    assert record.cost_units > 0


@pytest.mark.parametrize(
    "mode", ["500", "503", "429", "ark/403", "octet-error", "die-before-body", "hang"]
)
def test_stream_fails_over_before_its_first_event(
    route: Callable[..., Routed], upstream: FakeUpstream, mode: str
) -> None:
    routed = route(mode, "dashscope/ok")
    got = stream(routed.client)
    assert got.error is None and got.text == "Echo: hello there"
    assert got.elapsed < SOON
    served = upstream.requests[-1]
    assert served.shape == "dashscope" and upstream.count() == 2
    [record] = usage_records()
    assert (record.provider, record.attempts, record.outcome) == (routed.providers[1], 2, "ok")
    assert record.completion_tokens == served.response_usage["completion_tokens"]
    assert not record.estimated


def test_stream_silent_after_its_headers_fails_over_at_read_timeout(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    """Ark sends its headers, then nothing for longer than read_timeout: no event has
    reached the client yet, so the next upstream (DeepSeek, which keeps its queued
    request alive with comments) still gets the request."""
    routed = route("ark/ok", "deepseek/ok", read_timeout=0.6)
    got = stream(routed.client, extra_body={"fake": {"first_delay": 1.0}})
    assert got.error is None and got.text == "Echo: hello there"
    assert 1.55 <= got.elapsed < 3.5  # 0.6 s read_timeout on Ark, then DeepSeek's 1 s queue
    assert [r.shape for r in upstream.requests] == ["ark", "deepseek"]
    [record] = usage_records()
    assert (record.provider, record.attempts, record.outcome) == (routed.providers[1], 2, "ok")


def test_stream_nobody_can_serve_is_503_before_any_byte(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    got = stream(route("503", "hang").client)
    assert isinstance(got.error, openai.InternalServerError)
    assert got.error.status_code == 503 and got.arrivals == []
    assert 0.45 <= got.elapsed < SOON
    [record] = usage_records()
    assert (record.outcome, record.attempts, record.cost_units) == ("unavailable", 2, 0)


@pytest.mark.parametrize("shape", ["ark", "deepseek"])
def test_upstream_dying_mid_stream_ends_it_with_an_error_event(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    routed = route(f"{shape}/die", "ok")
    got = stream(routed.client, extra_body={"fake": {"words": 8}})
    assert got.text == "w1 w2 "  # relayed until the upstream died: no failover after that
    assert got.elapsed < 1.5
    assert upstream.count(mode="ok") == 0
    [record] = usage_records()
    assert_cut_short(got, record, completion_tokens=2)  # "w1 w2 ": 6 x 0.3 = 1.8
    request_id = record.request_id
    assert any(
        getattr(r, "request_id", None) == request_id and "failed mid-stream" in r.getMessage()
        for r in gateway_logs.records
    )
    assert_no_secrets(log_text(gateway_logs), upstream.url, routed.key)


def test_error_event_is_openai_shaped_and_the_stream_ends_cleanly(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    """On the wire: `event: error` with an OpenAI error object, then the body ends."""
    routed = route("ark/die")
    response = requests.post(
        f"{str(routed.client.base_url).rstrip('/')}/chat/completions",
        headers={"Authorization": f"Bearer {routed.key}"},
        json={"model": ROUTED_MODEL, "messages": MESSAGES, "stream": True},
        stream=True,
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    body = response.content.decode()  # raises if the chunked body is not terminated
    events = [e for e in body.split("\n\n") if e]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert error == {
        "error": {
            "message": STREAM_FAILED,
            "type": "server_error",
            "param": None,
            "code": "upstream_stream_failed",
        }
    }
    assert "[DONE]" not in body
    assert_no_secrets(body, upstream.url, routed.key)


def test_upstream_hanging_after_its_first_event_is_cut_at_read_timeout(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("ark/hang-after-headers", "ok")
    got = stream(routed.client)
    assert got.text == "" and len(got.arrivals) == 1  # the role chunk, then silence
    assert 0.45 <= got.elapsed < SOON
    assert upstream.count(mode="ok") == 0
    [record] = usage_records()
    assert_cut_short(got, record, completion_tokens=0)


def test_chunks_slower_than_read_timeout_cut_the_stream(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("ark/slow", read_timeout=0.6)
    got = stream(routed.client, extra_body={"fake": {"interval": 2.0}})
    assert got.text == "" and len(got.arrivals) == 1
    assert 0.55 <= got.elapsed < 1.9  # cut at read_timeout, not after the 2 s gap
    [record] = usage_records()
    assert_cut_short(got, record, completion_tokens=0)


def test_chunks_within_read_timeout_flow_one_by_one(route: Callable[..., Routed]) -> None:
    routed = route("ark/slow", read_timeout=1.0)
    got = stream(routed.client, extra_body={"fake": {"interval": 0.2, "words": 3}})
    assert got.error is None and got.text == "w1 w2 w3"
    # 5 chunks 0.2 s apart reach the client as they come, not in one piece at the end.
    assert got.arrivals[-1] - got.arrivals[0] >= 0.6
    [record] = usage_records()
    assert record.outcome == "ok" and not record.estimated


def test_keep_alives_of_a_queued_request_hold_off_read_timeout(
    route: Callable[..., Routed],
) -> None:
    """DeepSeek sends `: keep-alive` while a request is queued: that is not a hang."""
    routed = route("deepseek/ok", read_timeout=0.8)  # comments come every 0.2 s
    got = stream(routed.client, extra_body={"fake": {"first_delay": 1.2}})
    assert got.error is None and got.text == "Echo: hello there"
    assert got.elapsed >= 1.2


@pytest.mark.parametrize("mode", ["ark/badjson", "deepseek/wrongshape"])
def test_broken_chunk_mid_stream_ends_it_with_an_error_event(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """badjson: one good chunk, then bad JSON. deepseek/wrongshape: a keep-alive went first."""
    routed = route(mode, "ok")
    got = stream(routed.client)
    assert upstream.count(mode="ok") == 0
    [record] = usage_records()
    assert_cut_short(got, record, completion_tokens=0)
    logged = [
        r for r in gateway_logs.records if getattr(r, "request_id", None) == record.request_id
    ]
    assert any("failed mid-stream" in r.getMessage() for r in logged)


@pytest.mark.parametrize("mode", ["garbage", "empty", "ark/wrongshape", "dashscope/wrongshape"])
def test_malformed_stream_answer_is_500_before_any_byte(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    routed = route(mode, "ok")
    got = stream(routed.client)
    assert isinstance(got.error, openai.InternalServerError)
    assert got.error.status_code == 500 and got.error.code == "upstream_model_error"
    assert upstream.count(mode="ok") == 0
    [record] = usage_records()
    assert (record.status, record.outcome, record.cost_units) == (500, "upstream_error", 0)
    request_id = got.error.response.headers["x-request-id"]
    assert any(
        getattr(r, "request_id", None) == request_id and r.levelname == "ERROR"
        for r in gateway_logs.records
    )
    assert_no_secrets(got.error.response.text + log_text(gateway_logs), upstream.url, routed.key)


def test_stream_client_error_is_400(route: Callable[..., Routed], upstream: FakeUpstream) -> None:
    got = stream(route("422", "ok").client)
    assert isinstance(got.error, openai.BadRequestError)
    assert "Invalid Parameters" in got.error.body["message"]
    assert upstream.count(mode="ok") == 0


def test_stream_without_usage_is_estimated_by_the_character_rule(
    route: Callable[..., Routed],
) -> None:
    routed = route("dashscope/nousage")
    result = stream(
        routed.client,
        messages=[{"role": "user", "content": "你好 world"}],
        stream_options={"include_usage": True},
    )
    assert result.error is None and result.text == "Echo: 你好 world"
    assert result.usage is None  # the upstream sent none: the client gets no invented one
    [record] = usage_records()
    # As for the non-stream answer: prompt 3.0 + 3 = 6; completion 4.8, rounded up: 5.
    assert (record.prompt_tokens, record.completion_tokens) == (6, 5)
    assert record.estimated and record.outcome == "ok"


def gunicorn_gateway(
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    start_gunicorn: Callable[..., Any],
    routes: dict[str, str],
) -> tuple[Any, openai.OpenAI, str]:
    """gunicorn serving one model per fault mode (`{model: mode}`), each failing over to ok."""
    for model, mode in routes.items():
        add_route(config_data, upstream.url, model, [mode, "ok"], **FAST_TIMEOUTS)
    server = start_gunicorn()
    key = keys.create_key("gunicorn", "standard")[1]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=15)
    return server, client, key


@pytest.mark.usefixtures("ledger")
def test_gunicorn_upstream_dying_or_stalling_mid_stream(
    config_data: dict[str, Any], upstream: FakeUpstream, start_gunicorn: Callable[..., Any]
) -> None:
    routes = {"dies": "ark/die", "stalls": "ark/hang-after-headers"}
    server, client, key = gunicorn_gateway(config_data, upstream, start_gunicorn, routes)
    died = stream(client, model="dies", extra_body={"fake": {"words": 8}})
    assert died.text == "w1 w2 " and died.elapsed < 1.5
    stalled = stream(client, model="stalls")
    assert stalled.text == "" and 0.45 <= stalled.elapsed < SOON
    died_record, stalled_record = wait_for_records(2)
    assert_cut_short(died, died_record, completion_tokens=2)
    assert_cut_short(stalled, stalled_record, completion_tokens=0)
    assert upstream.count(mode="ok") == 0
    server.stop()
    assert_no_secrets(server.log(), upstream.url, key)


@pytest.mark.usefixtures("ledger")
def test_gunicorn_hanging_upstream_fails_over_within_read_timeout(
    config_data: dict[str, Any], upstream: FakeUpstream, start_gunicorn: Callable[..., Any]
) -> None:
    server, client, key = gunicorn_gateway(
        config_data, upstream, start_gunicorn, {ROUTED_MODEL: "hang"}
    )
    started = time.monotonic()
    completion = client.chat.completions.create(model=ROUTED_MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "Echo: hello there"
    assert 0.45 <= time.monotonic() - started < SOON
    got = stream(client)
    assert got.error is None and got.text == "Echo: hello there"
    assert 0.45 <= got.elapsed < SOON
    records = wait_for_records(2)
    assert [(r.stream, r.attempts, r.outcome, r.estimated) for r in records] == [
        (False, 2, "ok", False),
        (True, 2, "ok", False),
    ]
    server.stop()
    assert "ReadTimeout" in server.log()
    assert_no_secrets(server.log(), upstream.url, key)


def test_estimate_does_not_depend_on_how_the_text_was_split(route: Callable[..., Routed]) -> None:
    """ "w1 w2 ... w10" is 30 characters, 9.0 tokens, in one body or in ten chunks
    (summed as floats, ten chunks of 0.3 x 3 came to 9.000000000000002: 10 tokens)."""
    routed = route("ark/nousage")
    knobs = {"extra_body": {"fake": {"words": 10}}}
    got = stream(routed.client, **knobs)
    assert got.text == " ".join(f"w{i}" for i in range(1, 11))
    routed.client.chat.completions.create(model=ROUTED_MODEL, messages=MESSAGES, **knobs)
    streamed, whole = usage_records()
    assert streamed.estimated and whole.estimated
    assert streamed.completion_tokens == whole.completion_tokens == 9
