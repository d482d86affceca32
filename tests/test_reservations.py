"""Spend caps and token quotas hold the request's worst case while it is in flight, so that
neither is overshot by more than one request at any concurrency."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.billing import format_usd, parse_usd
from keymeai.ledger.db import connection
from keymeai.ledger.models import QuotaReservation
from keymeai.tokens import IMAGE_TOKENS, estimate_prompt_tokens
from tests.helpers.clients import HI, ask, hammer, sdk, wait_until
from tests.helpers.config import MODEL
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import price_of, reservations, usage_records, wait_for_records
from tests.helpers.servers import Gateway, Gunicorn

QUOTA = 2000
CAP = parse_usd("0.001")
WORDS = 245  # "hi" and 245 words: 4 x 2700 + 245 x 11000 = 2,705,800 units, $0.00027
PER_REQUEST = price_of(4, WORDS)
REFUSED = "429 insufficient_quota"


@pytest.fixture
def hobby(config_data: dict[str, Any]) -> dict[str, Any]:
    """A Hobby tier of 2000 tokens a month and a default completion allowance of 500."""
    config_data["tiers"]["hobby"]["tokens_per_month"] = QUOTA
    config_data["quota"] = {"default_completion_tokens": 500}
    return config_data


def until_refused(client: openai.OpenAI, knobs: dict[str, Any], **options: Any) -> int:
    """Requests one after another until the key is refused; how many were answered."""
    for answered in range(100):
        try:
            ask(client, knobs, **options)
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            return answered
    raise AssertionError("never refused")


@pytest.mark.both_databases
@pytest.mark.redis
@pytest.mark.parametrize("max_tokens", [250, None], ids=["max_tokens", "default_allowance"])
def test_spend_cap_holds_under_30_concurrent_requests(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    redis_url: str,
    ledger: None,
    max_tokens: int | None,
) -> None:
    """30 requests of $0.00027 at once against a $0.001 cap, on two workers: each holds
    its worst case ($0.000276 with max_tokens 250, $0.0045 with the 4096 default), so
    at most 4 are ever admitted and the one that crosses the cap completes."""
    config_data["ratelimit"]["storage_uri"] = redis_url  # two workers share request limits
    key = keys.create_key("capped", "standard", spend_cap_units=CAP)[1]
    server = start_gunicorn(env={"WEB_CONCURRENCY": "2"})
    options = {} if max_tokens is None else {"max_tokens": max_tokens}
    knobs = {"words": WORDS, "first_delay": 0.5}  # all 30 in flight together
    outcomes = hammer([server.url], key, clients=30, attempts=1, knobs=knobs, **options)
    assert set(outcomes) <= {"ok", REFUSED}
    records = wait_for_records(outcomes["ok"])
    assert len(records) == outcomes["ok"] >= 1  # every 200 was recorded, no other
    assert sum(r.cost_units for r in records) == outcomes["ok"] * PER_REQUEST
    with sdk(server.url, key) as client:
        more = until_refused(client, {"words": WORDS}, **options)
    records = wait_for_records(outcomes["ok"] + more)
    spent = sum(r.cost_units for r in records)
    assert len(records) == outcomes["ok"] + more == math.ceil(CAP / PER_REQUEST) == 4
    assert CAP <= spent <= CAP + PER_REQUEST  # overshot by the crossing request alone
    assert reservations() == 0


def big_tool() -> dict[str, Any]:
    """A function whose schema the fake provider bills as about 1,000 prompt tokens."""
    fields = {
        f"field_{i}": {"type": "string", "description": f"The value number {i} of the record"}
        for i in range(43)
    }
    return {
        "type": "function",
        "function": {
            "name": "store_record",
            "description": "Store one record in the archive.",
            "parameters": {"type": "object", "properties": fields, "required": list(fields)},
        },
    }


@pytest.mark.both_databases
def test_tool_schemas_are_held_against_the_token_quota(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], upstream: FakeUpstream
) -> None:
    """20 requests at once, each with a ~1,000-token tool schema and max_tokens 1, against
    a 2,000-token quota: the schema is held, so 2 are admitted, not all 20."""
    gateway = start_gateway(hobby)
    key = gateway.create_key("hobby")
    tools = [big_tool()]
    knobs = {"first_delay": 0.5}
    outcomes = hammer(
        [gateway.url], key, clients=20, attempts=1, knobs=knobs, max_tokens=1, tools=tools
    )
    assert set(outcomes) == {"ok", REFUSED}
    records = usage_records()
    per_request = records[0].total_tokens
    assert 900 < per_request < 1100  # as the provider bills it: 4 + schema + 1
    assert all(r.total_tokens == per_request and not r.estimated for r in records)
    assert outcomes["ok"] == len(records) == 2
    assert QUOTA < sum(r.total_tokens for r in records) <= QUOTA + per_request
    assert upstream.count() == 2
    assert reservations() == 0


def test_estimated_record_counts_the_schema(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], upstream: FakeUpstream
) -> None:
    """An upstream that reports no usage: the record's estimate includes the schema, and
    is no lower than what the provider would have billed."""
    hobby["providers"]["deepseek"]["base_url"] = f"{upstream.url}/deepseek/nousage/v1"
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    ask(client, max_tokens=1, tools=[big_tool()])
    (record,) = usage_records()
    assert record.estimated
    assert record.prompt_tokens == estimate_prompt_tokens({"messages": HI, "tools": [big_tool()]})
    billed = upstream.requests[-1]  # what the fake would bill: 4 + ceil(schema chars / 4)
    schema = json.dumps(billed.body["tools"], separators=(",", ":"))
    assert record.prompt_tokens >= 4 + math.ceil(len(schema) / 4) > 900


def test_max_completion_tokens_is_held(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any]
) -> None:
    """LangChain's parameter: the quota holds 4 + 150, not the default 500."""
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    raw = ask(client, max_completion_tokens=150)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - 4 - 150)
    raw = ask(client, max_completion_tokens=150, max_tokens=300)  # the larger of both
    used = raw.parse().usage.total_tokens
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - used - 4 - 300)


@pytest.mark.parametrize("tier", ["standard", "hobby"])
def test_a_request_in_flight_holds_tokens_and_cost(
    start_gateway: Callable[..., Gateway],
    hobby: dict[str, Any],
    tier: str,
    upstream: FakeUpstream,
) -> None:
    """The reservation row while the upstream answers: tokens and worst-case cost, also
    for a key with a spend cap and no token quota; GET /v1/usage shows them in flight."""
    gateway = start_gateway(hobby)
    key = keys.create_key("held", tier, spend_cap_units=parse_usd("1"))[1]
    client = gateway.client(key)
    knobs = {"words": 5, "held": True}  # upstream until the checks are done
    call = threading.Thread(target=ask, args=(client, knobs), kwargs={"max_completion_tokens": 150})
    call.start()
    try:
        assert wait_until(lambda: reservations() == 1)
        with connection():
            row = QuotaReservation.get()
        assert (row.tokens, row.cost_units) == (4 + 150, price_of(4, 150))
        standing = requests.get(
            f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()
        spend = standing["limits"]["spend"]
        assert spend["in_flight"] == format_usd(price_of(4, 150))
        assert spend["remaining"] == format_usd(parse_usd("1") - price_of(4, 150))
        assert call.is_alive()  # all of it seen while the request was upstream
    finally:
        upstream.release()
        call.join(10)
    assert reservations() == 0
    assert usage_records()[-1].cost_units == price_of(4, 5)


@pytest.mark.parametrize("image_tokens", [None, 300])
def test_image_parts_are_held(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], image_tokens: int | None
) -> None:
    """Each image part holds `[quota] image_tokens` (1445 by default), whatever its bytes."""
    if image_tokens is not None:
        hobby["quota"]["image_tokens"] = image_tokens
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    content = [{"type": "text", "text": "hi"}, image]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=150
    )
    allowance = image_tokens or IMAGE_TOKENS
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - 4 - allowance - 150)


@pytest.mark.parametrize("value", [0, 2**31, "150", 1.5])
def test_bad_max_completion_tokens_is_a_400_naming_it(
    gateway: Gateway, key: str, upstream: FakeUpstream, value: Any
) -> None:
    client = gateway.client(key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HI, extra_body={"max_completion_tokens": value}
        )
    assert caught.value.param == "max_completion_tokens"
    assert "max_completion_tokens must be an integer from 1 to" in caught.value.message
    assert upstream.count() == 0
