"""Authentication: who gets in, how fast a revoked key is out, and that no secret leaks.

Bad keys get 401 `invalid_api_key` (the openai SDK raises AuthenticationError), before
any limit is looked at; a revoked key stops working within `gateway.key_cache_seconds`;
the customer's km- key never travels upstream and the provider key never travels back.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.models import utcnow
from tests.helpers.config import UPSTREAM_KEY, add_model, add_provider
from tests.helpers.errors import assert_openai_error
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

CHAT: dict[str, Any] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "hi"}],
}


def bad_keys() -> dict[str, str]:
    """A key in each state that must be refused."""
    revoked_row, revoked = keys.create_key("revoked", "standard")
    keys.revoke_key(revoked_row)
    _, expired = keys.create_key("expired", "standard", utcnow() - dt.timedelta(seconds=1))
    return {
        "malformed": "not-a-km-key",
        "wrong scheme": "sk-" + keys.generate_key()[3:],
        "unknown": keys.generate_key(),
        "revoked": revoked,
        "expired": expired,
    }


def secret_part(key: str) -> str:
    """What must never be shown back: a km- key past its visible prefix, or all of it."""
    return key[keys.PREFIX_LENGTH :] if key.startswith("km-") else key


def status_of(call: Callable[[], object]) -> int:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def wait_for_401(call: Callable[[], object], limit: float) -> float:
    """Seconds until `call` is refused with 401; fails after `limit` seconds."""
    start = time.monotonic()
    while status_of(call) != 401:
        assert time.monotonic() - start < limit, "still accepted"
        time.sleep(0.05)
    return time.monotonic() - start


def test_sdk_gets_authentication_error_for_every_bad_key(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    for state, bad in bad_keys().items():
        client = gateway.client(bad)
        for call, args in (
            (client.chat.completions.create, CHAT),
            (client.chat.completions.create, {**CHAT, "stream": True}),
            (client.models.list, {}),
            (client.models.retrieve, {"model": "qwen-max"}),
        ):
            with pytest.raises(openai.AuthenticationError) as caught:
                call(**args)  # type: ignore[operator]
            error = caught.value
            assert (error.status_code, error.code) == (401, "invalid_api_key"), state
            assert error.type == "invalid_request_error"
            assert secret_part(bad) not in error.response.text, state
            assert error.response.headers["x-request-id"]
    assert upstream.requests == []
    assert usage_records() == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Bearer "}, {"X-Api-Key": "km-whatever"}],
    ids=["none", "empty", "bearer-only", "other-header"],
)
def test_missing_key_is_401_with_openai_hint(gateway: Gateway, headers: dict[str, str]) -> None:
    response = requests.post(
        f"{gateway.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10
    )
    error = assert_openai_error(response, 401, code="invalid_api_key", param=None)
    assert "Bearer" in error["message"]
    response = requests.get(f"{gateway.url}/v1/models", headers=headers, timeout=10)
    assert_openai_error(response, 401, code="invalid_api_key")


def test_revoked_key_stops_working_within_the_cache_ttl(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    ttl = config_data["gateway"]["key_cache_seconds"]
    gateway = start_gateway()
    row, key = keys.create_key("soon revoked", "standard")
    client = gateway.client(key)
    assert client.chat.completions.create(**CHAT).choices  # the key is cached as active
    keys.revoke_key(row)
    lag = wait_for_401(client.models.list, limit=ttl + 1)
    assert lag < ttl + 1
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.chat.completions.create(**CHAT)


def test_key_stops_working_when_it_expires(gateway: Gateway) -> None:
    _, key = keys.create_key("short-lived", "standard", utcnow() + dt.timedelta(seconds=1))
    client = gateway.client(key)
    assert client.models.list().data  # still valid, and now cached
    lag = wait_for_401(client.models.list, limit=3)
    assert lag < 2  # expiry is checked on every request, cached or not
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client.chat.completions.create(**CHAT)


def test_auth_comes_before_limits(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    config_data["tiers"]["tiny"] = {"requests": ["1 per day"]}
    gateway = start_gateway()
    row, key = keys.create_key("limited", "tiny")
    client = gateway.client(key)
    client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)
    for _ in range(3):
        for bad in bad_keys().values():
            with pytest.raises(openai.AuthenticationError):
                gateway.client(bad).chat.completions.create(**CHAT)
        response = requests.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert_openai_error(response, 401, code="invalid_api_key")
    # The limited key itself, once revoked: 401 from then on, never 429 again.
    keys.revoke_key(row)
    wait_for_401(lambda: client.chat.completions.create(**CHAT), limit=2)
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**CHAT)
    assert len(upstream.requests) == 1


@pytest.fixture
def gateway_logs() -> Iterator[list[str]]:
    """Every log line the gateway writes during the test, formatted."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record) + repr(vars(record)))

    handler = Capture()
    logger = logging.getLogger("keymeai")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_secrets_stay_where_they_belong(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    gateway_logs: list[str],
) -> None:
    """The km- key never goes upstream; the provider key never comes back, whatever
    the upstream answers, and neither is logged."""
    faults = ["400", "401", "402", "422", "503", "octet-error", "garbage", "die"]
    for mode in faults:
        add_provider(config_data, f"p{mode}", upstream.base_url("deepseek", mode))
        add_model(config_data, f"m{mode}", [(f"p{mode}", "deepseek-chat")])
    gateway = start_gateway(env={"KEYMEAI_ADMIN_TOKEN": "admin-token-for-test"})
    _, key = keys.create_key("secretive", "standard")
    client = gateway.client(key)
    replies: list[requests.Response] = []

    def send(**body: Any) -> None:
        replies.append(
            requests.post(
                f"{gateway.url}/v1/chat/completions",
                json={**CHAT, **body},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
        )

    send()
    send(stream=True, stream_options={"include_usage": True})
    for mode in faults:
        send(model=f"m{mode}")
        send(model=f"m{mode}", stream=True)
    for path in ("/v1/models", "/v1/models/deepseek-chat", "/healthz", "/readyz", "/metrics"):
        replies.append(
            requests.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        )
    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "Echo: hi"

    assert {r.status_code for r in replies} >= {200, 400, 401, 500, 503}
    for response in replies:
        seen = response.text + repr(response.headers)
        assert UPSTREAM_KEY not in seen, response.request.url
        assert secret_part(key) not in seen
    assert upstream.requests
    for sent in upstream.requests:
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        everything = repr(sent.headers) + sent.raw_body.decode() + sent.path
        assert secret_part(key) not in everything
        assert "km-" not in everything
    logged = "\n".join(gateway_logs)
    assert "chat completion" in logged  # the capture works
    assert UPSTREAM_KEY not in logged
    assert secret_part(key) not in logged
