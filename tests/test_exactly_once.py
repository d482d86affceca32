"""Usage records are written exactly once, even when a write is retried after its commit.

Every record carries `record_id`, the gateway's own id, beside the client's `request_id`.
A PostgreSQL connection that drops after COMMIT but before the acknowledgement makes
`write_usage` retry a write that already landed: the retry must find its record_id and
add nothing, neither a second row nor a second roll-up increment. Checked row by row on
SQLite and on PostgreSQL, with the real Meter, reservation and ledger.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from peewee import OperationalError

from keymeai.api.validation import parse_chat_request
from keymeai.ledger import metering, quota
from keymeai.ledger.db import connection, db
from keymeai.ledger.keys import KeyInfo, create_key
from keymeai.ledger.metering import Meter
from keymeai.ledger.models import QuotaReservation, UsageDaily, UsageRecord
from tests.helpers.config import build_config
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

pytestmark = pytest.mark.both_databases

RECORD_ID = re.compile(r"[0-9a-f]{32}")
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def daily_rows() -> list[UsageDaily]:
    with connection():
        return list(UsageDaily.select())


def reservations() -> list[QuotaReservation]:
    with connection():
        return list(QuotaReservation.select())


@pytest.fixture
def metered(config_data: dict[str, Any], ledger: None) -> Callable[[], Meter]:
    """New Meters for real requests of a key with a token quota, each holding a real
    reservation, as api.py makes them."""
    config = build_config(config_data)
    row, _ = create_key("once", "standard", tokens_per_month=1_000_000)
    key = KeyInfo.from_row(row)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}

    def meter() -> Meter:
        chat = parse_chat_request(body, config.models)
        reservation, _ = quota.reserve(key, config.tiers["standard"], chat, config.quota)
        assert reservation is not None
        meter = Meter(key, chat, "client-chosen-id")
        meter.reservation_id = reservation
        meter.attempt(chat.model.upstreams[0])
        meter.observe({"usage": USAGE})
        return meter

    return meter


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """The arguments of every `write_usage` call (which still runs)."""
    calls: list[tuple[Any, Any]] = []
    real = metering.write_usage

    def spy(fields: Any, reservation_id: Any) -> None:
        calls.append((dict(fields) if fields else fields, reservation_id))
        real(fields, reservation_id)

    monkeypatch.setattr(metering, "write_usage", spy)
    return calls


def assert_counted_once(meter: Meter) -> None:
    """One row with the meter's ids and usage, one roll-up increment, no reservation."""
    [record] = usage_records()
    assert record.record_id == meter.record_id and RECORD_ID.fullmatch(record.record_id)
    assert record.request_id == "client-chosen-id"
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (11, 7, 18)
    [daily] = daily_rows()
    assert (daily.requests, daily.prompt_tokens, daily.completion_tokens) == (1, 11, 7)
    assert (daily.total_tokens, daily.cost_units) == (18, record.cost_units)
    assert reservations() == []


def test_the_same_record_written_twice_is_one_row_and_one_increment(
    metered: Callable[[], Meter], writes: list[tuple[Any, Any]]
) -> None:
    meter = metered()
    meter.finish(200, "ok")
    [(fields, _)] = writes
    assert fields["record_id"] == meter.record_id
    # Replayed (as from the "usage record not written" log line) with another hold on
    # the key: nothing is counted again, but the hold is still released.
    hold = metered().reservation_id
    assert [r.id for r in reservations()] == [hold]
    metering.write_usage(fields, hold)
    assert_counted_once(meter)


def lose_next_acknowledgement(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ledger's next COMMIT takes effect, then fails as a dropped connection would
    (the server committed; the client never heard). Later commits work."""
    database = db.obj
    real_commit = database.commit
    commits: list[str] = []

    def commit() -> Any:
        result = real_commit()
        commits.append("committed")
        if len(commits) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(database, "commit", commit)
    return commits


def test_a_write_retried_after_a_lost_acknowledgement_counts_once(
    metered: Callable[[], Meter], monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = metered()
    commits = lose_next_acknowledgement(monkeypatch)
    meter.finish(200, "ok")
    assert commits == ["committed", "committed"]  # the write was retried
    assert_counted_once(meter)


@contextmanager
def captured_info(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """caplog sees the `keymeai` logger's INFO lines (that logger does not propagate)."""
    logger = logging.getLogger("keymeai")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, "keymeai")
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def test_records_of_one_client_request_id_have_their_own_record_ids(
    gateway: Gateway, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": "retry-me-7"}
    with captured_info(caplog):
        for _ in range(2):
            response = requests.post(url, json=body, headers=headers, timeout=10)
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == "retry-me-7"
    first, second = usage_records()
    assert first.request_id == second.request_id == "retry-me-7"
    assert RECORD_ID.fullmatch(first.record_id) and RECORD_ID.fullmatch(second.record_id)
    assert first.record_id != second.record_id
    with connection():
        [daily] = UsageDaily.select()
    assert daily.requests == 2
    logged = [r for r in caplog.records if r.getMessage() == "chat completion"]
    assert [(r.request_id, r.record_id) for r in logged] == [  # type: ignore[attr-defined]
        ("retry-me-7", first.record_id),
        ("retry-me-7", second.record_id),
    ]


def test_old_records_without_record_id_stay_valid(metered: Callable[[], Meter]) -> None:
    """Rows from before record_id existed (NULL) do not collide with each other or new ones."""
    meter = metered()
    meter.finish(200, "ok")
    with connection():
        [row] = UsageRecord.select()
        for _ in range(2):
            UsageRecord.insert(
                key=row.key_id, request_id="old", model=row.model, status=200, outcome="ok"
            ).execute()
    metered().finish(200, "ok")
    records = usage_records()
    assert [r.record_id is None for r in records] == [False, True, True, False]
    assert len({r.record_id for r in records}) == 3


def test_a_release_applied_again_never_frees_a_later_hold(
    metered: Callable[[], Meter], writes: list[tuple[Any, Any]]
) -> None:
    """A journal line may be applied twice (a reader catching up behind the writer), so
    a reservation's id must never be handed to a later one: SQLite reuses the highest
    rowid once its row is gone, and the second release would free a request in flight."""
    metered().finish(200, "ok")
    [(fields, released)] = writes
    later = metered().reservation_id
    assert later != released
    metering.write_usage(fields, released)  # the same line, applied once more
    assert [r.id for r in reservations()] == [later]
