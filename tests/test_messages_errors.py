"""The Messages API's errors, in Anthropic's shape, and its streams cut short.

Every error on /v1/messages is `{"type": "error", "error": {"type", "message"}}` with
Anthropic's status, whoever raised it (auth, the request limit, quota, Werkzeug, the
router); the anthropic SDK maps each to its exception class. A stream cut short ends
with an `error` event and is still metered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest
import requests

from keymeai.ledger import keys
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.routing import ROUTED_MODEL, Routed
from tests.helpers.servers import Gateway

HELLO = [{"role": "user", "content": "hello there"}]


def sdk(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)


def routed_sdk(routed: Routed) -> anthropic.Anthropic:
    url = str(routed.client.base_url).rstrip("/").removesuffix("/v1")
    return sdk(url, routed.key)


def refused(call: Callable[[], Any], kind: type[anthropic.APIStatusError]) -> Any:
    """The error body of a call the SDK raises as `kind`, checked for Anthropic's shape."""
    with pytest.raises(kind) as info:
        call()
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}
    return info.value


def create(client: anthropic.Anthropic, **extra: Any) -> Callable[[], Any]:
    kwargs: dict[str, Any] = {"model": "deepseek-chat", "max_tokens": 50, "messages": HELLO}
    return lambda: client.messages.create(**{**kwargs, **extra})


def test_invalid_requests(gateway: Gateway, key: str, upstream: FakeUpstream) -> None:
    client = sdk(gateway.url, key)
    before = upstream.count()
    post = client.post
    for body, words in [
        ({"model": "deepseek-chat", "messages": HELLO}, "max_tokens"),
        ({"model": "deepseek-chat", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "deepseek-chat", "max_tokens": 0, "messages": HELLO}, "max_tokens"),
        ({"model": "deepseek-chat", "max_tokens": 5, "messages": [{"role": "tool"}]}, "role"),
        ({"model": "deepseek-chat", "max_tokens": 5, "messages": HELLO, "system": 3}, "system"),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "video"}]}],
            },
            "video",
        ),
        (
            {"model": "deepseek-chat", "max_tokens": 5, "messages": HELLO, "tool_choice": "x"},
            "tool_choice",
        ),
    ]:
        error = refused(
            lambda body=body: post("/v1/messages", cast_to=object, body=body),
            anthropic.BadRequestError,
        )
        assert error.status_code == 400
        assert error.body["error"]["type"] == "invalid_request_error"
        assert words in error.body["error"]["message"], error.body
    assert upstream.count() == before  # nothing bad reached the provider
    assert usage_records() == []


def test_auth_permission_and_unknown_model(gateway: Gateway, key: str) -> None:
    error = refused(create(sdk(gateway.url, "km-wrong")), anthropic.AuthenticationError)
    assert error.body["error"]["type"] == "authentication_error"
    no_key = requests.post(f"{gateway.url}/v1/messages", json={}, timeout=10)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"

    limited = keys.create_key("qwen only", "standard", allowed_models="qwen-plus")[1]
    error = refused(create(sdk(gateway.url, limited)), anthropic.PermissionDeniedError)
    assert error.body["error"]["type"] == "permission_error"
    count = sdk(gateway.url, limited).messages.count_tokens
    error = refused(
        lambda: count(model="deepseek-chat", messages=HELLO),  # type: ignore[arg-type]
        anthropic.PermissionDeniedError,
    )
    assert error.body["error"]["type"] == "permission_error"

    error = refused(create(sdk(gateway.url, key), model="claude-x"), anthropic.NotFoundError)
    assert error.body["error"]["type"] == "not_found_error"
    assert "claude-x" in error.body["error"]["message"]


def test_werkzeug_errors_take_the_shape(gateway: Gateway, key: str) -> None:
    headers = {"x-api-key": key}
    unknown = requests.post(f"{gateway.url}/v1/messages/batches", headers=headers, timeout=10)
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "not_found_error")
    method = requests.get(f"{gateway.url}/v1/messages", headers=headers, timeout=10)
    assert method.status_code == 405
    assert method.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Method not allowed for this URL."},
    }
    chat = requests.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=10)
    assert chat.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape there
    assert "type" not in chat.json()


def test_request_too_large(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["gateway"]["max_request_bytes"] = 4096
    gateway = start_gateway()
    client = sdk(gateway.url, gateway.create_key())
    big = [{"role": "user", "content": "word " * 2000}]
    error = refused(create(client, messages=big), anthropic.APIStatusError)
    assert error.status_code == 413
    assert error.body["error"]["type"] == "request_too_large"


def test_rate_limit_with_retry_after(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["tiers"]["free"]["requests"] = ["1 per minute"]
    gateway = start_gateway()
    client = sdk(gateway.url, gateway.create_key("free"))
    create(client)()
    error = refused(create(client), anthropic.RateLimitError)
    assert error.body["error"]["type"] == "rate_limit_error"
    assert 0 < int(error.response.headers["Retry-After"]) <= 60
    assert len(wait_for_records(1)) == 1  # the refused request reached no provider
    # count_tokens counts against the same request limit, so it is refused too.
    error = refused(
        lambda: client.messages.count_tokens(model="deepseek-chat", messages=HELLO),  # type: ignore[arg-type]
        anthropic.RateLimitError,
    )
    assert error.body["error"]["type"] == "rate_limit_error"


def test_upstream_unavailable_is_overloaded(route: Callable[..., Routed]) -> None:
    client = routed_sdk(route("503"))
    error = refused(create(client, model=ROUTED_MODEL), anthropic.APIStatusError)
    assert error.status_code == 529
    assert error.body["error"]["type"] == "overloaded_error"


def test_upstream_garbage_is_api_error(route: Callable[..., Routed]) -> None:
    client = routed_sdk(route("wrongshape"))
    error = refused(create(client, model=ROUTED_MODEL), anthropic.InternalServerError)
    assert error.status_code >= 500
    assert error.body["error"]["type"] in ("api_error", "overloaded_error")
    [record] = wait_for_records(1)
    assert record.status >= 500


def test_mid_stream_failure_is_an_error_event(route: Callable[..., Routed]) -> None:
    client = routed_sdk(route("die", read_timeout=5))
    events: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(
            model=ROUTED_MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "one two three four five six"}],
        ) as stream,
    ):
        events.extend(event.type for event in stream)
    assert events[0] == "message_start"
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "api_error"
    assert "stopped responding" in body["error"]["message"]
    [record] = wait_for_records(1)
    assert (record.stream, record.outcome) == (True, "upstream_failed")
    assert record.prompt_tokens > 0  # estimated: the provider never sent its usage


def test_client_hang_up_mid_stream_is_metered(route: Callable[..., Routed]) -> None:
    client = routed_sdk(route("slow", read_timeout=5))
    words = " ".join(f"w{i}" for i in range(40))  # an echo of 41 chunks, 0.5 s apart
    with client.messages.stream(
        model=ROUTED_MODEL, max_tokens=100, messages=[{"role": "user", "content": words}]
    ) as stream:
        for event in stream:
            if event.type == "text":
                break  # leaving the block closes the connection
    [record] = wait_for_records(1, timeout=15)
    assert (record.stream, record.outcome) == (True, "client_closed")
    assert record.prompt_tokens > 0 and record.completion_tokens > 0


def test_quota_refusal_is_a_rate_limit_error(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    """A key whose monthly tokens are spent: Anthropic's 429, with Retry-After."""
    config_data["tiers"]["hobby"]["tokens_per_month"] = 5
    gateway = start_gateway()
    client = sdk(gateway.url, gateway.create_key("hobby"))
    create(client)()  # 8 tokens: admitted under the quota, and spends it
    wait_for_records(1)  # applied to the ledger, which the quota reads
    error = refused(create(client), anthropic.RateLimitError)
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "quota" in error.body["error"]["message"]
    assert int(error.response.headers["Retry-After"]) > 0
    assert len(usage_records()) == 1


def test_idle_pings_then_an_error_event(
    route: Callable[..., Routed], config_data: dict[str, Any]
) -> None:
    """A provider that goes silent after its first event: pings while it is silent, then
    its read timeout ends the stream with an error event, metered."""
    config_data["gateway"]["stream_keepalive_seconds"] = 1
    routed = route("hang-after-headers", read_timeout=3)
    url = str(routed.client.base_url).rstrip("/").removesuffix("/v1")
    response = requests.post(
        f"{url}/v1/messages",
        headers={"x-api-key": routed.key},
        json={"model": ROUTED_MODEL, "max_tokens": 50, "stream": True, "messages": HELLO},
        timeout=30,
    )
    events = [b.split("\n")[0].removeprefix("event: ") for b in response.text.split("\n\n") if b]
    assert events[0] == "message_start"
    assert events.count("ping") >= 2
    assert events[-1] == "error"
    [record] = wait_for_records(1)
    assert (record.stream, record.outcome) == (True, "upstream_failed")
