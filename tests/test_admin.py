"""The admin API over real HTTP: its guard, keys from creation to revocation, usage, and
an OpenAI-shaped 4xx for every bad input."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import openai
import pytest

from keymeai.ledger import keys
from keymeai.ledger.models import utcnow
from tests.helpers.admin import ADMIN_TOKEN, Admin, admin_gateway, from_address
from tests.helpers.clients import HI
from tests.helpers.errors import assert_openai_error
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

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
            error = assert_openai_error(response)
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
    for n, header in enumerate(headers):
        # Each header from an address of its own: 7 wrong tokens each stay under the
        # limit on guesses per address (tests/test_admin_guessing.py).
        client = from_address(f"127.0.0.{10 + n}")
        for method, path in ENDPOINTS:
            response = client.request(
                method, f"{gateway.url}/admin{path}", headers=header, json={}, timeout=10
            )
            assert response.status_code == 401, (header, method, path)
            error = assert_openai_error(response)
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
            "max_concurrent": 4,
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
        "max_concurrent": 4,
        "origin": None,
        "origin_address": None,
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
        json={
            "tier": "standard",
            "requests": None,
            "name": "Acme",
            "allowed_models": None,
            "max_concurrent": None,
        },
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["tier"], body["requests"], body["name"]) == ("standard", None, "Acme")
    assert body["max_concurrent"] is None
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


def valid(**fields: Any) -> dict[str, Any]:
    """A valid creation body, with `fields` added or replaced."""
    return {"name": "x", "tier": "free", **fields}


# (body, the error's param, words its message must contain): each one a 400.
CREATE_MISTAKES: list[tuple[Any, str | None, tuple[str, ...]]] = [
    (b'{"name": "x", "tier": ', None, ("could not parse the JSON body",)),
    (b"[1, 2]", None, ("must be a JSON object",)),
    (b"\xff\xfe", None, ("not valid UTF-8",)),
    ({"tier": "free"}, "name", ("provide a name",)),
    ({"name": "x"}, "tier", ("provide a tier",)),
    (valid(tier="gold"), "tier", ("unknown tier 'gold'", "free, hobby")),
    (valid(tier=5), "tier", ("unknown tier int",)),
    (valid(tier=None), "tier", ()),
    (valid(name=""), "name", ("non-empty string",)),
    (valid(name=12), "name", ()),
    (valid(name="x" * 201), "name", ("at most 200",)),
    (valid(name="a\nb"), "name", ("control characters",)),
    (valid(teir="free"), "teir", ("Unrecognized",)),
    (valid(expires_at="soon"), "expires_at", ("ISO 8601",)),
    (valid(expires_at=1893456000), "expires_at", ()),
    (valid(expires_at="2001-01-01"), "expires_at", ("past",)),
    (valid(expires_at="9999-12-31T23:59:59-23:59"), "expires_at", ()),  # overflows UTC
    (valid(allowed_models="qwen-plus"), "allowed_models", ()),
    (valid(allowed_models=[]), "allowed_models", ("no model",)),
    (valid(allowed_models=["qwen-plus", "gpt-4"]), "allowed_models", ("unknown model 'gpt-4'",)),
    (valid(allowed_models=[1]), "allowed_models", ()),
    (valid(requests="lots per day"), "requests", ("'lots",)),
    (valid(requests=[]), "requests", ()),
    (valid(requests=[5]), "requests", ()),
    (valid(requests={"a": 1}), "requests", ()),
    (valid(tokens_per_month=0), "tokens_per_month", ()),
    (valid(tokens_per_month=1.5), "tokens_per_month", ()),
    (valid(tokens_per_month="100"), "tokens_per_month", ()),
    (valid(tokens_per_month=True), "tokens_per_month", ()),
    (valid(tokens_per_month=2**63), "tokens_per_month", ()),
    (valid(spend_cap="abc"), "spend_cap", ("not an amount",)),
    (valid(spend_cap=-5), "spend_cap", ("positive",)),
    (valid(spend_cap="0"), "spend_cap", ("positive",)),
    (valid(spend_cap="1e999999"), "spend_cap", ("positive",)),
    (valid(spend_cap="0.00000000001"), "spend_cap", ("10 decimal places",)),
    (valid(spend_cap=True), "spend_cap", ()),
    (valid(spend_cap=[25]), "spend_cap", ()),
    (valid(max_concurrent=0), "max_concurrent", ("from 1 to",)),
    (valid(max_concurrent=1.5), "max_concurrent", ()),
    (valid(max_concurrent="4"), "max_concurrent", ()),
    (valid(max_concurrent=True), "max_concurrent", ()),
    (valid(max_concurrent=2**31), "max_concurrent", ()),
]


def test_create_mistakes_are_openai_shaped_400s(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    for body, param, needles in CREATE_MISTAKES:
        if isinstance(body, bytes):
            headers = {"Content-Type": "application/json"}
            response = api.post("/keys", data=body, headers=headers)
        else:
            response = api.post("/keys", json=body)
        assert response.status_code == 400, (body, response.text)
        error = assert_openai_error(response)
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), body
        assert all(needle in error["message"] for needle in needles), (body, error)
    assert keys.list_keys() == []


def test_odd_json_is_refused(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    for body in (b'{"name": "\\ud800", "tier": "free"}', b'{"\\udcb4": 1}'):
        response = api.post("/keys", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text  # lone surrogates: not text
        assert_openai_error(response)
    for field in ("spend_cap", "tokens_per_month"):
        body = b'{"name": "x", "tier": "free", "%s": 1e400}' % field.encode()
        response = api.post("/keys", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400  # refused while parsing: no number is infinite
        assert "numbers must be finite" in assert_openai_error(response)["message"]
    text = api.post("/keys", data=b"{}", headers={"Content-Type": "text/plain"})
    assert text.status_code == 400 and "Content-Type" in assert_openai_error(text)["message"]


def test_key_references_and_update_mistakes(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    created = api.create()
    key_id = created["id"]
    for method, path in [("GET", "/keys/{}"), ("PATCH", "/keys/{}"), ("DELETE", "/keys/{}")]:
        for ref in ("999", "99999999999999999999", "km-nothere", "%C2%B2"):
            response = api.request(method, path.format(ref), json={})
            assert response.status_code == 404, (method, ref)
            assert assert_openai_error(response)["code"] == "key_not_found"
    assert api.post("/keys/999/revoke").status_code == 404
    full = api.get(f"/keys/{created['key']}")
    assert full.status_code == 400 and created["key"] not in full.text
    assert "never by the key itself" in assert_openai_error(full)["message"]

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
        assert assert_openai_error(response)["param"] == param
    assert api.get(f"/keys/{key_id}").json() == {k: v for k, v in created.items() if k != "key"}
    wrong_method = api.request("PUT", f"/keys/{key_id}", json={})
    assert wrong_method.status_code == 405 and assert_openai_error(wrong_method)


def test_usage_query_mistakes(admin: tuple[Gateway, Admin]) -> None:
    _, api = admin
    for params, status, param in [
        ({"month": "2026-13"}, 400, "month"),
        ({"month": "9999-12"}, 400, "month"),
        ({"month": ""}, 400, "month"),
        ({"by": "week"}, 400, "by"),
        ({"format": "xml"}, 400, "format"),
        ({"keys": "1"}, 400, "keys"),  # a typo must not report every key
        ({"key": "999"}, 404, None),
    ]:
        response = api.get("/usage", params=params)
        assert response.status_code == status, params
        assert assert_openai_error(response)["param"] == param


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
