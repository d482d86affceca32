"""Monthly token quotas and spend caps: reservations, the crossing request, 429s."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.db import connection
from keymeai.ledger.models import QuotaReservation, utcnow
from tests.helpers.cli import invoke
from tests.helpers.clients import HI, ask, hammer, sdk, wait_until
from tests.helpers.config import MODEL
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import price_of, reservations, usage_records
from tests.helpers.servers import Gateway, Gunicorn, worker_pids

QUOTA = 2000
# "hi" is 4 prompt tokens for the fake and for the gateway's estimate; with 146 words
# a request uses 150 tokens and reserves 4 + max_tokens = 154.
WORDS = {"words": 146}
PER_REQUEST = 150
MAX_TOKENS = 150


@pytest.fixture
def hobby(config_data: dict[str, Any]) -> dict[str, Any]:
    """A Hobby tier of 2000 tokens a month, and a small default completion reservation."""
    config_data["tiers"]["hobby"]["tokens_per_month"] = QUOTA
    config_data["quota"] = {"default_completion_tokens": 500, "reservation_seconds": 900}
    return config_data


def ledger_tokens() -> int:
    return sum(record.total_tokens for record in usage_records())


def test_reservation_is_prompt_estimate_plus_max_tokens_or_default(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any]
) -> None:
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    raw = ask(client, WORDS, max_tokens=MAX_TOKENS)
    assert raw.headers["x-ratelimit-limit-tokens"] == str(QUOTA)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - 4 - MAX_TOKENS)
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert raw.headers["x-ratelimit-limit-requests"] == "600"
    # Settled to the real count: the next request sees 150 used, then holds 4 + 500.
    raw = ask(client, WORDS)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - PER_REQUEST - 4 - 500)
    assert ledger_tokens() == 2 * PER_REQUEST
    assert reservations() == 0


def test_quota_exhaustion_crossing_request_completes_next_is_refused(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], upstream: FakeUpstream
) -> None:
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    for n in range(1, 14):  # 13 x 150 = 1950: still below the quota
        ask(client, WORDS, max_tokens=MAX_TOKENS)
        assert ledger_tokens() == n * PER_REQUEST
    crossing = ask(client, WORDS, max_tokens=MAX_TOKENS)  # admitted at 1950, ends at 2100
    assert crossing.parse().usage.total_tokens == PER_REQUEST
    assert ledger_tokens() == 2100

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    error = caught.value
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert f"monthly token quota of {QUOTA} tokens (2100 used" in error.message
    headers = error.response.headers
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 0
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == str(QUOTA)
    assert upstream.count() == 14
    assert reservations() == 0


def test_concurrent_requests_near_the_edge_do_not_overdraw(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], upstream: FakeUpstream
) -> None:
    gateway = start_gateway(hobby)
    key = gateway.create_key("hobby")
    client = gateway.client(key)
    for _ in range(12):
        ask(client, WORDS, max_tokens=MAX_TOKENS)
    assert ledger_tokens() == 1800
    # 16 at once, each held upstream for a second so that all are in flight together:
    # 1800 + 154 < 2000 admits one, 1954 < 2000 admits a second, then 2108 refuses.
    knobs = {**WORDS, "first_delay": 1.0}
    outcomes = hammer([gateway.url], key, clients=16, attempts=1, knobs=knobs, max_tokens=150)
    assert outcomes == {"ok": 2, "429 insufficient_quota": 14}
    assert QUOTA < ledger_tokens() == 2100 <= QUOTA + PER_REQUEST
    assert outcome_of_next(client) == "429 insufficient_quota"
    assert upstream.count() == 14
    assert reservations() == 0


def outcome_of_next(client: openai.OpenAI) -> str:
    try:
        ask(client, WORDS)
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {exc.code}"
    except openai.APIConnectionError:
        return "connection error"
    return "ok"


def test_quota_under_concurrency_never_exceeds_quota_plus_one_request(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any]
) -> None:
    gateway = start_gateway(hobby)
    key = gateway.create_key("hobby")
    outcomes = hammer([gateway.url], key, clients=16, attempts=3, knobs=WORDS, max_tokens=150)
    assert outcomes["ok"] >= QUOTA // PER_REQUEST
    assert set(outcomes) == {"ok", "429 insufficient_quota"}
    assert QUOTA <= ledger_tokens() <= QUOTA + PER_REQUEST
    assert reservations() == 0


@pytest.mark.parametrize(
    ("mode", "stream", "status"),
    [
        ("503", False, 503),  # every upstream unavailable
        ("400", False, 400),  # the upstream rejects the request
        ("garbage", False, 500),  # not a completion
        ("die", True, 200),  # the stream breaks mid-way
    ],
)
def test_reservation_released_on_error_paths(
    start_gateway: Callable[..., Gateway],
    hobby: dict[str, Any],
    upstream: FakeUpstream,
    mode: str,
    stream: bool,
    status: int,
) -> None:
    hobby["providers"]["deepseek"]["base_url"] = f"{upstream.url}/deepseek/{mode}/v1"
    gateway = start_gateway(hobby)
    client = gateway.client(gateway.create_key("hobby"))
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model=MODEL, messages=HI, stream=stream))
    if status == 200:  # the stream started, then its error event was raised
        assert "stopped responding" in caught.value.message
    else:
        assert isinstance(caught.value, openai.APIStatusError)
        assert caught.value.status_code == status
    assert wait_until(lambda: reservations() == 0)


def test_reservation_released_when_the_client_disconnects_mid_stream(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any], upstream: FakeUpstream
) -> None:
    gateway = start_gateway(hobby)
    key = gateway.create_key("hobby")
    body = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "fake": {"words": 40, "interval": 0.1},
    }
    headers = {"Authorization": f"Bearer {key}"}
    with requests.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=10
    ) as response:
        assert response.status_code == 200
        next(response.iter_content(64))
        assert reservations() == 1
    assert wait_until(lambda: reservations() == 0)
    record = usage_records()[-1]
    assert record.outcome == "client_closed"


def test_crashed_worker_request_is_recorded_lost(
    start_gunicorn: Callable[..., Gunicorn],
    hobby: dict[str, Any],
    ledger: None,
    upstream: FakeUpstream,
) -> None:
    hobby["tiers"]["hobby"]["tokens_per_month"] = 100  # one reservation of 4 + 500 fills it
    hobby["quota"]["reservation_seconds"] = 3
    hobby["providers"]["deepseek"]["base_url"] = f"{upstream.url}/deepseek/sw-main/v1"
    upstream.switches["main"] = "hang"
    key = keys.create_key("crash", "hobby")[1]
    server = start_gunicorn(hobby)
    assert server.process is not None
    master = server.process.pid
    with sdk(server.url, key, timeout=30) as client:
        hung = threading.Thread(target=outcome_of_next, args=(client,), daemon=True)
        hung.start()
        assert wait_until(lambda: upstream.count() == 1)
        assert reservations() == 1
        (worker,) = worker_pids(master)
        os.kill(worker, signal.SIGKILL)  # the request dies with its worker
        hung.join(10)
        upstream.switches["main"] = "ok"
        assert wait_until(lambda: worker_pids(master) not in ([], [worker]))
        # The new worker replayed the dead one's journal: the request is recorded lost,
        # its prompt estimate counted, and its reservation released at once (no lapse).
        assert wait_until(lambda: len(usage_records()) == 1)  # once the new worker booted
        (lost,) = usage_records()
        assert (lost.outcome, lost.status, lost.estimated) == ("lost", 0, True)
        assert (lost.prompt_tokens, lost.completion_tokens, lost.total_tokens) == (4, 0, 4)
        assert reservations() == 0
        assert outcome_of_next(client) == "ok"
    assert usage_records()[-1].outcome == "ok"
    assert reservations() == 0


@pytest.mark.parametrize("tier", ["standard", "hobby"])
def test_spend_cap_refuses_once_reached(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
    tier: str,
) -> None:
    gateway = start_gateway(config_data)
    key = gateway.create_key(tier)
    client = gateway.client(key)
    one = price_of(4, 96)
    assert one == 1_066_800  # 4 x 2700 + 96 x 11000 units of 1e-10 USD
    result = invoke(
        gateway.app, "keys", "set-limits", str(keys.find_key(key).id), "--spend-cap", "0.0003"
    )
    assert result.exit_code == 0, result.output
    for _ in range(3):  # 0, 1_066_800 and 2_133_600 are below the cap of 3_000_000
        ask(client, {"words": 96})
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, {"words": 96})
    error = caught.value
    assert error.code == "insufficient_quota"
    assert "monthly spend cap of $0.0003 ($0.00032004 spent this month)" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert sum(r.cost_units for r in usage_records()) == 3 * one
    assert upstream.count() == 3
    assert reservations() == 0

    invoke(gateway.app, "keys", "set-limits", str(keys.find_key(key).id), "--spend-cap", "1.00")
    assert ask(client, {"words": 96}).status_code == 200


def test_lapsed_reservations_are_ignored_and_removed(
    start_gateway: Callable[..., Gateway], hobby: dict[str, Any]
) -> None:
    gateway = start_gateway(hobby)
    key = gateway.create_key("hobby")
    with connection():
        QuotaReservation.create(
            key=keys.find_key(key).id, tokens=10_000, expires_at=utcnow() - dt.timedelta(seconds=1)
        )
    raw = ask(gateway.client(key), WORDS, max_tokens=MAX_TOKENS)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(QUOTA - 4 - MAX_TOKENS)
    assert reservations() == 0
