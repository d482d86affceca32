"""What the gateway wrote to the ledger, read the way its reports read it (journals
applied first), and the costs it should have come to, worked out independently."""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

from peewee import fn

from keymeai.catalogue import Price
from keymeai.ledger.billing import Usage, cost_units
from keymeai.ledger.db import connection
from keymeai.ledger.journal import catch_up
from keymeai.ledger.models import QuotaReservation, UsageDaily, UsageRecord
from tests.helpers.config import MODEL, PRICES

JOURNALS: list[Path] = []  # the usage journals of the test's gateways (see conftest)
MILLION = Decimal(1_000_000)


def apply_journals() -> None:
    """Apply what the test's gateways journaled, as `GET /v1/usage` and the reports do
    before they read (keymeai.ledger.journal.catch_up): the ledger then holds every request
    answered so far, and no reservation of one."""
    for directory in JOURNALS:
        catch_up(directory)


def usage_records() -> list[UsageRecord]:
    """Every usage record in the ledger, oldest first (journals applied)."""
    apply_journals()
    with connection():
        return list(UsageRecord.select().order_by(UsageRecord.id))


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    """The ledger's records once there are at least `count` (or whatever is there)."""
    deadline = time.monotonic() + timeout
    while True:
        records = usage_records()
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def reservations() -> int:
    """Reservations of requests in flight (the journals applied first)."""
    apply_journals()
    with connection():
        return int(QuotaReservation.select().count())


def record_sums() -> dict[tuple[int, str], tuple[int, ...]]:
    """Per (key, model): requests, prompt, completion, cached and total tokens, cost units,
    summed over the usage records."""
    with connection():
        query = UsageRecord.select(
            UsageRecord.key,
            UsageRecord.model,
            fn.COUNT(UsageRecord.id),
            fn.SUM(UsageRecord.prompt_tokens),
            fn.SUM(UsageRecord.completion_tokens),
            fn.SUM(UsageRecord.cached_tokens),
            fn.SUM(UsageRecord.total_tokens),
            fn.SUM(UsageRecord.cost_units),
        ).group_by(UsageRecord.key, UsageRecord.model)
        return {(k, m): tuple(int(v) for v in rest) for k, m, *rest in query.tuples()}


def rollup_sums() -> dict[tuple[int, str], tuple[int, ...]]:
    """The same sums from the daily rollup: they must equal `record_sums()`."""
    with connection():
        query = UsageDaily.select(
            UsageDaily.key,
            UsageDaily.model,
            fn.SUM(UsageDaily.requests),
            fn.SUM(UsageDaily.prompt_tokens),
            fn.SUM(UsageDaily.completion_tokens),
            fn.SUM(UsageDaily.cached_tokens),
            fn.SUM(UsageDaily.total_tokens),
            fn.SUM(UsageDaily.cost_units),
        ).group_by(UsageDaily.key, UsageDaily.model)
        return {(k, m): tuple(int(v) for v in rest) for k, m, *rest in query.tuples()}


def expected_cost(
    model: str,
    prompt: int,
    cached: int,
    completion: int,
    prices: Mapping[str, Mapping[str, float]] = PRICES,
) -> Decimal:
    """The pricing rule of docs/metering.md in Decimal dollars, from the test prices."""
    price = {name: Decimal(str(value)) for name, value in prices[model].items()}
    uncached = prompt - cached
    return (
        uncached * price["input"] + cached * price["cached_input"] + completion * price["output"]
    ) / MILLION


def price_of(prompt: int, completion: int) -> int:
    """The cost units of a request to MODEL, by the gateway's own rule (keymeai.ledger)."""
    price = Price(**{name: Decimal(str(value)) for name, value in PRICES[MODEL].items()})
    return cost_units(price, Usage(prompt, completion))
