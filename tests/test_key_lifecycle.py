"""Key lifecycle rules as customers meet them (expiry, model allow-list, spend cap), and
a sign-up flow from a key created over the admin API to the month's invoice CSV."""

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

from keymeai.ledger.db import connection
from keymeai.ledger.keys import hash_key
from keymeai.ledger.models import ApiKey, utcnow
from tests.helpers.admin import Admin, admin_gateway
from tests.helpers.cli import cli_env, flask_cli, invoke
from tests.helpers.clients import HI
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import expected_cost, usage_records
from tests.helpers.servers import Gateway


@pytest.fixture
def admin(start_gateway: Callable[..., Gateway]) -> tuple[Gateway, Admin]:
    return admin_gateway(start_gateway)


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


def test_a_key_past_its_expiry_is_refused(gateway: Gateway) -> None:
    """The CLI refuses an expiry in the past, so the key is made to expire by moving its
    expiry back in the ledger, as time passing would."""
    tomorrow = (utcnow() + dt.timedelta(days=1)).date().isoformat()
    result = invoke(gateway.app, "keys", "create", "--name", "old", "--tier", "free", "--expires",
                 tomorrow)  # fmt: skip
    plain = result.output.splitlines()[-1]
    with connection():
        ApiKey.update(expires_at=dt.datetime(2001, 1, 1)).where(
            ApiKey.key_hash == hash_key(plain)
        ).execute()
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
    # The key's model list is its allow-list, as OpenAI lists only a key's own models.
    assert [m.id for m in client.models.list().data] == ["deepseek-chat"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("qwen-plus")
    api.patch(f"/keys/{created['id']}", json={"allowed_models": None})
    client.chat.completions.create(model="qwen-plus", messages=HI)
    assert len(client.models.list().data) == 5


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
    client = gateway.client(created["key"])

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
    result = flask_cli(
        cli_env(config_data, tmp_path),
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
