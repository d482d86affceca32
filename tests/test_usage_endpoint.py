"""GET /v1/usage: a key's own tier, usage, limits, what is left and when it resets."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.billing import format_usd
from tests.helpers.cli import invoke
from tests.helpers.clients import ask, wait_until
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import reservations, usage_records
from tests.helpers.servers import Gateway


def standing(client: openai.OpenAI) -> Any:
    """The endpoint through the openai SDK's generic GET, as a customer would call it."""
    return client.get("/usage", cast_to=object)


def test_free_key_standing_after_some_requests(gateway: Gateway) -> None:
    key = gateway.create_key("free", name="acme")
    client = gateway.client(key)
    for words in (5, 7, 9):
        ask(client, {"words": words})
    body = standing(client)

    records = usage_records()
    assert body["object"] == "usage"
    assert body["tier"] == "free"
    assert body["key"] == {"id": keys.find_key(key).id, "prefix": key[:11], "name": "acme"}
    assert body["usage"] == {
        "requests": 3,
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "completion_tokens": 5 + 7 + 9,
        "total_tokens": sum(r.total_tokens for r in records),
        "cost": format_usd(sum(r.cost_units for r in records)),
    }
    assert body["usage"]["cost"] == "0.00002634"  # 12 x 2700 + 21 x 11000 units of 1e-10 USD
    (window,) = body["limits"]["requests"]
    assert window["limit"] == "100 per 1 day"
    assert (window["max_requests"], window["window_seconds"]) == (100, 86_400)
    assert (window["used"], window["remaining"]) == (3, 97)
    assert 86_390 < window["resets_in_seconds"] <= 86_400
    resets_at = dt.datetime.fromisoformat(window["resets_at"].replace("Z", "+00:00"))
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=window["resets_in_seconds"])
    assert abs((resets_at - expected).total_seconds()) < 2
    assert body["limits"]["tokens"] is None and body["limits"]["spend"] is None


def test_period_is_the_calendar_month_in_utc(gateway: Gateway) -> None:
    body = standing(gateway.client(gateway.create_key("standard")))
    now = dt.datetime.now(dt.UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    period = body["period"]
    assert period["start"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert period["end"] == end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert period["resets_at"] == period["end"]
    assert abs(period["resets_in_seconds"] - (end - now).total_seconds()) < 2
    assert body["usage"]["requests"] == 0 and body["usage"]["cost"] == "0.00"
    (window,) = body["limits"]["requests"]
    # No request yet: the window has not started.
    assert (window["used"], window["remaining"], window["resets_at"]) == (0, 3000, None)


def test_reading_standing_is_not_rate_limited_and_costs_nothing(gateway: Gateway) -> None:
    key = gateway.create_key("scale")
    invoke(gateway.app, "keys", "set-limits", str(keys.find_key(key).id), "--requests", "1 per day")
    client = gateway.client(key)
    ask(client)
    for _ in range(5):
        raw = requests.get(
            f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=5
        )
        assert raw.status_code == 200
        assert "x-ratelimit-limit-requests" not in raw.headers
    (window,) = standing(client)["limits"]["requests"]
    assert (window["used"], window["remaining"]) == (1, 0)
    with pytest.raises(openai.RateLimitError):
        ask(client)
    assert standing(client)["usage"]["requests"] == 1


def test_a_tier_without_request_limits_reports_none(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["tiers"]["standard"]["requests"] = []
    gateway = start_gateway(config_data)
    client = gateway.client(gateway.create_key("standard"))
    ask(client)
    assert standing(client)["limits"]["requests"] == []


def test_hobby_key_tokens_and_requests_in_flight(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    config_data["tiers"]["hobby"]["tokens_per_month"] = 2000
    gateway = start_gateway(config_data)
    key = gateway.create_key("hobby")
    client = gateway.client(key)
    ask(client, {"words": 46}, max_tokens=100)  # 4 + 46 = 50 tokens
    slow = threading.Thread(target=ask, args=(client, {"held": True}), kwargs={"max_tokens": 300})
    slow.start()
    try:
        assert wait_until(lambda: reservations() == 1)
        tokens = standing(client)["limits"]["tokens"]
        assert slow.is_alive()  # seen while the request was upstream
    finally:
        upstream.release()
        slow.join(10)
    assert tokens["limit"] == 2000
    assert tokens["used"] == 50
    assert tokens["in_flight"] == 4 + 300
    assert tokens["remaining"] == 2000 - 50 - 304
    assert tokens["resets_at"].endswith("-01T00:00:00Z")
    after = standing(client)["limits"]["tokens"]
    assert after["in_flight"] == 0
    assert after["used"] == 50 + 4 + 2  # the slow one answered "Echo: hi"
    assert standing(client)["limits"]["requests"][0]["max_requests"] == 600


def test_spend_cap_is_reported(gateway: Gateway) -> None:
    key = gateway.create_key("standard")
    invoke(gateway.app, "keys", "set-limits", str(keys.find_key(key).id), "--spend-cap", "25")
    client = gateway.client(key)
    ask(client, {"words": 96})  # 1_066_800 units
    spend = standing(client)["limits"]["spend"]
    assert spend["limit"] == "25.00"
    assert spend["used"] == "0.00010668"
    assert spend["remaining"] == "24.99989332"


def test_a_key_sees_only_its_own_usage(gateway: Gateway) -> None:
    mine, theirs = gateway.create_key("free"), gateway.create_key("free")
    ask(gateway.client(theirs))
    ask(gateway.client(theirs))
    body = standing(gateway.client(mine))
    assert body["usage"]["requests"] == 0
    assert body["limits"]["requests"][0]["used"] == 0
    assert body["key"]["id"] == keys.find_key(mine).id


@pytest.mark.parametrize(
    ("method", "headers", "status", "code"),
    [
        ("GET", {}, 401, "invalid_api_key"),
        ("GET", {"Authorization": "Bearer km-" + "x" * 43}, 401, "invalid_api_key"),
        ("GET", {"Authorization": "Basic abc"}, 401, "invalid_api_key"),
        ("POST", "key", 405, "method_not_allowed"),
    ],
)
def test_errors_are_openai_shaped(
    gateway: Gateway, method: str, headers: Any, status: int, code: str
) -> None:
    if headers == "key":
        headers = {"Authorization": f"Bearer {gateway.create_key('free')}"}
    response = requests.request(method, f"{gateway.url}/v1/usage", headers=headers, timeout=5)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
