"""A model none of whose providers has an API key is the operator's fault, not the client's.

Its requests get 503 `model_not_configured` (no "retry shortly", no Retry-After) and
cost the key nothing: not a request of its limit, no usage record, no upstream call.
The config points DashScope (qwen-plus, qwen-max) at an environment variable that is
not set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from tests.helpers.clients import HI, ask
from tests.helpers.config import add_model
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

UNSET = "KEYMEAI_TEST_UNSET_KEY"  # never set: the tests' environment is PROVIDER_ENV only
LIMIT = 4


@pytest.fixture
def keyless_dashscope(
    config_data: dict[str, Any], start_gateway: Callable[..., Gateway]
) -> Gateway:
    config_data["providers"]["dashscope"]["api_key_env"] = UNSET
    config_data["tiers"]["standard"]["requests"] = [f"{LIMIT} per minute"]
    return start_gateway()


def assert_not_configured(error: openai.APIStatusError, model: str) -> None:
    assert error.status_code == 503
    assert (error.code, error.type) == ("model_not_configured", "server_error")
    assert f"not configured to serve the model `{model}`" in error.message
    assert "retry" not in error.message.lower()
    assert "Retry-After" not in error.response.headers
    assert "x-ratelimit-remaining-requests" not in error.response.headers


def remaining(raw: Any) -> int:
    return int(raw.headers["x-ratelimit-remaining-requests"])


def test_a_model_whose_provider_has_no_key_is_503_and_spends_no_request(
    keyless_dashscope: Gateway, upstream: FakeUpstream
) -> None:
    client = keyless_dashscope.client(keyless_dashscope.create_key())
    assert remaining(ask(client)) == LIMIT - 1
    for model, stream in [("qwen-plus", False), ("qwen-max", True), ("qwen-plus", False)]:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=HI, stream=stream)
        assert_not_configured(caught.value, model)
    assert remaining(ask(client)) == LIMIT - 2  # the three refusals counted nothing
    for left in range(LIMIT - 3, -1, -1):
        assert remaining(ask(client)) == left
    with pytest.raises(openai.RateLimitError):  # the limit is reached...
        ask(client)
    with pytest.raises(openai.APIStatusError) as caught:  # ...and the setup fault is still ours
        client.chat.completions.create(model="qwen-plus", messages=HI)
    assert_not_configured(caught.value, "qwen-plus")
    assert upstream.count(shape="dashscope") == 0
    assert {r.model for r in usage_records()} == {"deepseek-chat"}


def test_a_keyless_provider_is_left_out_of_a_model_that_has_another(
    config_data: dict[str, Any], start_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    config_data["providers"]["dashscope"]["api_key_env"] = UNSET
    add_model(config_data, "mixed", [("dashscope", "qwen-plus"), ("deepseek", "deepseek-chat")])
    gateway = start_gateway()
    completion = gateway.client(gateway.create_key()).chat.completions.create(
        model="mixed", messages=HI
    )
    assert completion.choices[0].message.content == "Echo: hi"
    [record] = usage_records()
    assert (record.provider, record.attempts) == ("deepseek", 1)
    assert upstream.count(shape="dashscope") == 0


def test_a_key_not_allowed_the_model_gets_403_and_bad_bodies_their_400(
    keyless_dashscope: Gateway,
) -> None:
    _, plain = keys.create_key("narrow", "standard", allowed_models="deepseek-chat")
    narrow = keyless_dashscope.client(plain)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        narrow.chat.completions.create(model="qwen-plus", messages=HI)
    assert denied.value.code == "model_not_allowed"
    bad = requests.post(  # names the model, but is no JSON: the view's 400, not a 503
        f"{keyless_dashscope.url}/v1/chat/completions",
        data=b'{"model": "qwen-plus", "messages": [',
        headers={"Authorization": f"Bearer {plain}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert bad.status_code == 400
