"""The admin API over real HTTP: its guard, keys from creation to revocation, usage, and
a sign-up flow from a new key to the month's invoice CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from keymeai import keys
from keymeai.ledger import utcnow
from tests.billing_support import (
    ADMIN_TOKEN,
    Admin,
    admin_gateway,
    expected_cost,
    openai_error,
    run_cli,
)
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.limit_support import cli
from tests.support import usage_records

HI = [{"role": "user", "content": "hi"}]  # 4 prompt tokens for the fake
ENDPOINTS = [
    ("POST", "/keys"),
    ("GET", "/keys"),
    ("GET", "/keys/1"),
    ("PATCH", "/keys/1"),
    ("POST", "/keys/1/revoke"),
    ("DELETE", "/keys/1"),
    ("GET", "/usage"),
]


@pytest.fixture
def admin(start_gateway: Callable[..., Gateway]) -> tuple[Gateway, Admin]:
    return admin_gateway(start_gateway)


def test_disabled_without_the_admin_token(gateway: Gateway) -> None:
    keys.create_key("existing", "standard")
    for token in (None, ADMIN_TOKEN, ""):
        client = Admin(gateway.url, token)
        for method, path in ENDPOINTS:
            response = client.request(method, path, json={"name": "x", "tier": "free"})
            assert response.status_code == 404, (method, path)
            error = openai_error(response)
            assert error["code"] == "admin_api_disabled"
            assert "disabled" in error["message"]
    assert [row.name for row in keys.list_keys()] == ["existing"]


def test_refused_without_the_right_token(admin: tuple[Gateway, Admin]) -> None:
    gateway, _ = admin
    customer = gateway.create_key("scale")
    headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {customer}"},  # a customer key is not an admin token
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": ADMIN_TOKEN},
    ]
    for header in headers:
        for method, path in ENDPOINTS:
            response = requests.request(
                method, f"{gateway.url}/admin{path}", headers=header, json={}, timeout=10
            )
            assert response.status_code == 401, (header, method, path)
            error = openai_error(response)
            assert error["code"] == "invalid_admin_token"
            assert ADMIN_TOKEN not in response.text and customer not in response.text
    assert [row.name for row in keys.list_keys()] == ["test"]


def test_create_show_list_change_and_revoke_a_key(admin: tuple[Gateway, Admin]) -> None:
    gateway, api = admin
    expires = (utcnow() + dt.timedelta(days=30)).replace(microsecond=0)
    response = api.post(
        "/keys",
        json={
            "name": "Acme Inc",
            "tier": "scale",
            "expires_at": expires.isoformat() + "+00:00",
            "allowed_models": ["deepseek-chat", "qwen-plus"],
            "requests": ["5 per minute", "100 per day"],
            "tokens_per_month": 1_000_000,
            "spend_cap": "25.5",
        },
    )
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    created = response.json()
    plain = created.pop("key")
    assert keys.is_well_formed(plain)
    assert response.headers["Location"].endswith(f"/admin/keys/{created['id']}")
    assert created == {
        "object": "api_key",
        "id": created["id"],
        "name": "Acme Inc",
        "prefix": plain[:11],
        "tier": "scale",
        "status": "active",
        "created_at": created["created_at"],
        "expires_at": expires.isoformat() + "Z",
        "revoked_at": None,
        "allowed_models": ["deepseek-chat", "qwen-plus"],
        "requests": ["5 per minute", "100 per day"],
        "tokens_per_month": 1_000_000,
        "spend_cap": "25.50",
    }
    assert abs(dt.datetime.fromisoformat(created["created_at"][:-1]) - utcnow()).seconds < 60

    key_id = created["id"]
    assert api.get(f"/keys/{key_id}").json() == created
    assert api.get(f"/keys/{plain[:11]}").json() == created
    assert api.get("/keys").json() == {"object": "list", "data": [created]}

    client = gateway.client(plain)
    raw = client.chat.completions.with_raw_response.create(model="qwen-plus", messages=HI)
    assert raw.headers["x-ratelimit-limit-requests"] == "5"

    changed = api.patch(
        f"/keys/{key_id}",
        json={"tier": "standard", "requests": None, "name": "Acme", "allowed_models": None},
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["tier"], body["requests"], body["name"]) == ("standard", None, "Acme")
    assert (body["allowed_models"], body["spend_cap"]) == (None, "25.50")  # untouched
    raw = client.chat.completions.with_raw_response.create(model="qwen-max", messages=HI)
    assert raw.headers["x-ratelimit-limit-requests"] == "3000"  # at once on this instance
    assert api.patch(f"/keys/{key_id}", json={}).json() == body

    revoked = api.post(f"/keys/{key_id}/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"]
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="qwen-plus", messages=HI)
    assert "revoked" in caught.value.message
    again = api.delete(f"/keys/{key_id}")
    assert again.status_code == 200 and again.json() == revoked.json()  # idempotent
    assert api.get("/keys").json()["data"][0]["status"] == "revoked"  # kept for billing
    usage = api.get("/usage", params={"key": key_id}).json()
    assert sum(row["requests"] for row in usage["data"]) == 2

    digest = keys.hash_key(plain)
    for path in ("/keys", f"/keys/{key_id}", "/usage"):
        text = api.get(path).text
        assert digest not in text and plain not in text and "hash" not in text


def test_delete_revokes_and_leaves_the_usage(admin: tuple[Gateway, Admin]) -> None:
    gateway, api = admin
    created = api.create(tier="free")
    gateway.client(created["key"]).chat.completions.create(model="deepseek-chat", messages=HI)
    gone = api.delete(f"/keys/{created['prefix']}")
    assert gone.status_code == 200 and gone.json()["status"] == "revoked"
    assert len(usage_records()) == 1
    assert api.get("/usage").json()["total"]["requests"] == 1


def bad(status: int, param: str | None, *needles: str) -> tuple[int, str | None, tuple[str, ...]]:
    return status, param, needles


CREATE_MISTAKES: list[tuple[Any, tuple[int, str | None, tuple[str, ...]]]] = [
    (b'{"name": "x", "tier": ', bad(400, None, "could not parse the JSON body")),
    (b"[1, 2]", bad(400, None, "must be a JSON object")),
    (b"\xff\xfe", bad(400, None, "not valid UTF-8")),
    ({"tier": "free"}, bad(400, "name", "provide a name")),
    ({"name": "x"}, bad(400, "tier", "provide a tier")),
    ({"name": "x", "tier": "gold"}, bad(400, "tier", "unknown tier 'gold'", "free, hobby")),
    ({"name": "x", "tier": 5}, bad(400, "tier", "unknown tier int")),
    ({"name": "x", "tier": None}, bad(400, "tier")),
    ({"name": "", "tier": "free"}, bad(400, "name", "non-empty string")),
    ({"name": 12, "tier": "free"}, bad(400, "name")),
    ({"name": "x" * 201, "tier": "free"}, bad(400, "name", "at most 200")),
    ({"name": "a\nb", "tier": "free"}, bad(400, "name", "control characters")),
    ({"name": "x", "tier": "free", "teir": "free"}, bad(400, "teir", "Unrecognized")),
    ({"name": "x", "tier": "free", "expires_at": "soon"}, bad(400, "expires_at", "ISO 8601")),
    ({"name": "x", "tier": "free", "expires_at": 1893456000}, bad(400, "expires_at")),
    ({"name": "x", "tier": "free", "expires_at": "2001-01-01"}, bad(400, "expires_at", "past")),
    (
        {"name": "x", "tier": "free", "expires_at": "9999-12-31T23:59:59-23:59"},
        bad(400, "expires_at"),
    ),
    ({"name": "x", "tier": "free", "allowed_models": "qwen-plus"}, bad(400, "allowed_models")),
    ({"name": "x", "tier": "free", "allowed_models": []}, bad(400, "allowed_models", "no model")),
    (
        {"name": "x", "tier": "free", "allowed_models": ["qwen-plus", "gpt-4"]},
        bad(400, "allowed_models", "unknown model 'gpt-4'"),
    ),
    ({"name": "x", "tier": "free", "allowed_models": [1]}, bad(400, "allowed_models")),
    ({"name": "x", "tier": "free", "requests": "lots per day"}, bad(400, "requests", "'lots")),
    ({"name": "x", "tier": "free", "requests": []}, bad(400, "requests")),
    ({"name": "x", "tier": "free", "requests": [5]}, bad(400, "requests")),
    ({"name": "x", "tier": "free", "requests": {"a": 1}}, bad(400, "requests")),
    ({"name": "x", "tier": "free", "tokens_per_month": 0}, bad(400, "tokens_per_month")),
    ({"name": "x", "tier": "free", "tokens_per_month": 1.5}, bad(400, "tokens_per_month")),
    ({"name": "x", "tier": "free", "tokens_per_month": "100"}, bad(400, "tokens_per_month")),
    ({"name": "x", "tier": "free", "tokens_per_month": True}, bad(400, "tokens_per_month")),
    ({"name": "x", "tier": "free", "tokens_per_month": 2**63}, bad(400, "tokens_per_month")),
    ({"name": "x", "tier": "free", "spend_cap": "abc"}, bad(400, "spend_cap", "not an amount")),
    ({"name": "x", "tier": "free", "spend_cap": -5}, bad(400, "spend_cap", "positive")),
    ({"name": "x", "tier": "free", "spend_cap": "0"}, bad(400, "spend_cap", "positive")),
    ({"name": "x", "tier": "free", "spend_cap": "1e999999"}, bad(400, "spend_cap", "positive")),
    (
        {"name": "x", "tier": "free", "spend_cap": "0.00000000001"},
        bad(400, "spend_cap", "10 decimal places"),
    ),
    ({"name": "x", "tier": "free", "spend_cap": True}, bad(400, "spend_cap")),
    ({"name": "x", "tier": "free", "spend_cap": [25]}, bad(400, "spend_cap")),
]


@pytest.mark.parametrize(("body", "expected"), CREATE_MISTAKES)
def test_create_mistakes_are_openai_shaped_400s(
    admin: tuple[Gateway, Admin], body: Any, expected: tuple[int, str | None, tuple[str, ...]]
) -> None:
    _, api = admin
    if isinstance(body, bytes):
        response = api.post("/keys", data=body, headers={"Content-Type": "application/json"})
    else:
        response = api.post("/keys", json=body)
    status, param, needles = expected
    assert response.status_code == status, response.text
    error = openai_error(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in error["message"]
    assert keys.list_keys() == []


def test_odd_json_is_refused(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    for body in (b'{"name": "\\ud800", "tier": "free"}', b'{"\\udcb4": 1}'):
        response = api.post("/keys", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text  # lone surrogates: not text
        openai_error(response)
    for field in ("spend_cap", "tokens_per_month"):
        body = b'{"name": "x", "tier": "free", "%s": 1e400}' % field.encode()
        response = api.post("/keys", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and openai_error(response)["param"] == field
    text = api.post("/keys", data=b"{}", headers={"Content-Type": "text/plain"})
    assert text.status_code == 400 and "Content-Type" in openai_error(text)["message"]


def test_key_references_and_update_mistakes(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    created = api.create()
    key_id = created["id"]
    for method, path in [("GET", "/keys/{}"), ("PATCH", "/keys/{}"), ("DELETE", "/keys/{}")]:
        for ref in ("999", "99999999999999999999", "km-nothere", "%C2%B2"):
            response = api.request(method, path.format(ref), json={})
            assert response.status_code == 404, (method, ref)
            assert openai_error(response)["code"] == "key_not_found"
    assert api.post("/keys/999/revoke").status_code == 404
    full = api.get(f"/keys/{created['key']}")
    assert full.status_code == 400 and created["key"] not in full.text
    assert "never by the key itself" in openai_error(full)["message"]

    for body, param in [
        ({"name": None}, "name"),
        ({"tier": None}, "tier"),
        ({"tier": "gold"}, "tier"),
        ({"requests": ["1 per fortnight"]}, "requests"),
        ({"id": 5}, "id"),
        ({"key_hash": "x"}, "key_hash"),
        ({"prefix": "km-aaaaaaaa"}, "prefix"),
    ]:
        response = api.patch(f"/keys/{key_id}", json=body)
        assert response.status_code == 400, body
        assert openai_error(response)["param"] == param
    assert api.get(f"/keys/{key_id}").json() == {k: v for k, v in created.items() if k != "key"}
    wrong_method = api.request("PUT", f"/keys/{key_id}", json={})
    assert wrong_method.status_code == 405 and openai_error(wrong_method)


@pytest.mark.parametrize(
    ("params", "status", "param"),
    [
        ({"month": "2026-13"}, 400, "month"),
        ({"month": "9999-12"}, 400, "month"),
        ({"month": ""}, 400, "month"),
        ({"by": "week"}, 400, "by"),
        ({"format": "xml"}, 400, "format"),
        ({"keys": "1"}, 400, "keys"),
        ({"key": "999"}, 404, None),
    ],
)
def test_usage_query_mistakes(
    admin: tuple[Gateway, Admin], params: dict[str, str], status: int, param: str | None
) -> None:
    _, api = admin
    response = api.get("/usage", params=params)
    assert response.status_code == status
    assert openai_error(response)["param"] == param


def test_admin_routes_are_not_rate_limited_nor_spend_the_customer_limit(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["tiers"]["free"]["requests"] = ["2 per day"]
    gateway, api = admin_gateway(start_gateway, config_data)
    created = api.create(tier="free")
    for _ in range(15):
        for response in (api.get(f"/keys/{created['id']}"), api.get("/usage")):
            assert response.status_code == 200
            assert not any(h.lower().startswith("x-ratelimit") for h in response.headers)
    client = gateway.client(created["key"])
    for _ in range(2):
        client.chat.completions.create(model="deepseek-chat", messages=HI)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="deepseek-chat", messages=HI)
    assert api.get("/keys").status_code == 200


def test_expiry_set_and_cleared_over_the_api(admin: tuple[Gateway, Admin]) -> None:
    gateway, api = admin
    created = api.create()
    client = gateway.client(created["key"])
    soon = utcnow() + dt.timedelta(seconds=1.5)
    body = api.patch(f"/keys/{created['id']}", json={"expires_at": soon.isoformat()}).json()
    assert body["expires_at"] == soon.isoformat(timespec="seconds") + "Z"
    client.chat.completions.create(model="deepseek-chat", messages=HI)
    time.sleep(max(0.0, (soon - utcnow()).total_seconds()) + 0.05)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="deepseek-chat", messages=HI)
    assert caught.value.code == "invalid_api_key" and "expired" in caught.value.message
    assert api.get(f"/keys/{created['id']}").json()["status"] == "expired"
    api.patch(f"/keys/{created['id']}", json={"expires_at": None})
    client.chat.completions.create(model="deepseek-chat", messages=HI)


def test_a_key_created_expired_on_the_cli_is_refused(gateway: Gateway) -> None:
    result = cli(gateway.app, "keys", "create", "--name", "old", "--tier", "free", "--expires",
                 "2001-01-01")  # fmt: skip
    plain = result.output.splitlines()[-1]
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client(plain).chat.completions.create(model="deepseek-chat", messages=HI)
    assert caught.value.status_code == 401 and "has expired" in caught.value.message


def test_allow_list_over_the_api(admin: tuple[Gateway, Admin]) -> None:
    gateway, api = admin
    created = api.create(allowed_models=["deepseek-chat"])
    client = gateway.client(created["key"])
    client.chat.completions.create(model="deepseek-chat", messages=HI)
    for stream in (False, True):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(model="qwen-plus", messages=HI, stream=stream)
        assert caught.value.code == "model_not_allowed"
        assert caught.value.body == {  # the SDK's `body` is the error object
            "message": "This key is not allowed to use the model `qwen-plus`.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_allowed",
        }
    assert len(usage_records()) == 1
    api.patch(f"/keys/{created['id']}", json={"allowed_models": None})
    client.chat.completions.create(model="qwen-plus", messages=HI)


def test_spend_cap_over_the_api(admin: tuple[Gateway, Admin], upstream: FakeUpstream) -> None:
    gateway, api = admin
    created = api.create(spend_cap="0.00002")  # 200_000 units
    client = gateway.client(created["key"])
    ten = {"extra_body": {"fake": {"words": 10}}}  # 4 x 2700 + 10 x 11000 = 120_800 units
    client.chat.completions.create(model="deepseek-chat", messages=HI, **ten)
    client.chat.completions.create(model="deepseek-chat", messages=HI, **ten)  # crosses it
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="deepseek-chat", messages=HI, **ten)
    assert caught.value.code == "insufficient_quota"
    assert "spend cap of $0.00002 ($0.00002416 spent" in caught.value.message
    assert upstream.count() == 2
    usage = api.get("/usage", params={"key": created["id"]}).json()
    assert usage["total"]["cost"] == "0.0000241600"
    raised = api.patch(f"/keys/{created['id']}", json={"spend_cap": 1}).json()
    assert raised["spend_cap"] == "1.00"
    client.chat.completions.create(model="deepseek-chat", messages=HI)
    assert api.patch(f"/keys/{created['id']}", json={"spend_cap": None}).json()["spend_cap"] is None


def test_sign_up_flow_to_the_month_csv(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    """A sign-up site creates a key over HTTP; the customer uses it with the openai SDK;
    the month's CSV, from the CLI and from the admin API, bills exactly that."""
    gateway, api = admin_gateway(start_gateway, config_data)
    signup = api.post("/keys", json={"name": "Acme, Inc.", "tier": "hobby", "spend_cap": "10"})
    assert signup.status_code == 201
    created = signup.json()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=created["key"], max_retries=0)

    answer = client.chat.completions.create(
        model="deepseek-chat", messages=HI, extra_body={"fake": {"words": 20, "cached": 3}}
    )
    assert answer.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="qwen-plus",
            messages=[{"role": "user", "content": "stream me a story please"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"fake": {"words": 30, "cached": 4}},
        )
    )
    (usage,) = [chunk.usage for chunk in chunks if chunk.usage]
    sent = {request.body["model"]: request.response_usage for request in upstream.requests}
    assert (usage.prompt_tokens, usage.completion_tokens) == (8, 30)
    expected = {
        "deepseek-chat": (4, 20, 3, expected_cost("deepseek-chat", 4, 3, 20)),
        "qwen-plus": (8, 30, 4, expected_cost("qwen-plus", 8, 4, 30)),
    }
    for model, (prompt, completion, _, _) in expected.items():
        assert (sent[model]["prompt_tokens"], sent[model]["completion_tokens"]) == (
            prompt,
            completion,
        )
    total = sum(cost for *_, cost in expected.values())
    # 1 x 0.27 + 3 x 0.07 + 20 x 1.10 and 4 x 0.4 + 4 x 0.16 + 30 x 1.2 micro-dollars
    assert total == Decimal("0.00006072")

    month = f"{utcnow():%Y-%m}"
    key_id = str(created["id"])
    result = run_cli(
        config_data, tmp_path / "cli.toml",
        "usage", "report", "--month", month, "--key", key_id, "--format", "csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from_api = api.get("/usage", params={"month": month, "key": key_id, "format": "csv"})
    assert from_api.status_code == 200
    assert from_api.headers["Content-Type"].startswith("text/csv")
    assert f"keymeai-usage-{month}-key{key_id}.csv" in from_api.headers["Content-Disposition"]
    assert from_api.text == result.stdout

    header, *lines, totals = list(csv.reader(io.StringIO(result.stdout)))
    assert header == [
        "key_id", "key_name", "model", "requests", "prompt_tokens", "completion_tokens",
        "cached_tokens", "total_tokens", "cost",
    ]  # fmt: skip
    assert lines == [
        [key_id, "Acme, Inc.", model, "1", str(p), str(c), str(k), str(p + c), f"{cost:.10f}"]
        for model, (p, c, k, cost) in expected.items()
    ]
    assert totals == ["total", "", "", "2", "12", "50", "7", "62", f"{total:.10f}"]

    as_json = api.get("/usage", params={"key": key_id}).json()
    assert as_json["total"] == {
        "requests": 2,
        "prompt_tokens": 12,
        "completion_tokens": 50,
        "cached_tokens": 7,
        "total_tokens": 62,
        "cost": "0.0000607200",
    }
    assert [row["cost"] for row in as_json["data"]] == [line[-1] for line in lines]
    daily = api.get("/usage", params={"key": key_id, "by": "day"}).json()
    assert [row["day"] for row in daily["data"]] == [utcnow().date().isoformat()] * 2
