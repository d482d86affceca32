"""Usage reports from the daily roll-ups: what the CLI, admin API and pages show.

Reports read `usage_daily` (a row per key, model and day), never the raw records, so a
month's report stays fast however many requests it covers; the roll-ups are written
in the same transaction as the records, so their sums are the records' sums.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from peewee import fn

from .billing import to_usd
from .db import connection
from .ledger import ApiKey, UsageDaily

FIELDS = (
    "key_id",
    "key_name",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "cost",
)


@dataclass(frozen=True)
class ReportRow:
    key_id: int
    key_name: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost: Decimal


def parse_month(text: str) -> dt.date:
    """ "2026-11" -> date(2026, 11, 1); ValueError otherwise."""
    return dt.datetime.strptime(text, "%Y-%m").date()


def month_range(first: dt.date) -> tuple[dt.date, dt.date]:
    following = (first.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    return first.replace(day=1), following


def monthly_usage(month: dt.date, key_id: int | None = None) -> list[ReportRow]:
    """Per key and model sums for the calendar month that contains `month`."""
    start, end = month_range(month)
    query = (
        UsageDaily.select(
            UsageDaily.key,
            ApiKey.name,
            UsageDaily.model,
            fn.SUM(UsageDaily.requests),
            fn.SUM(UsageDaily.prompt_tokens),
            fn.SUM(UsageDaily.completion_tokens),
            fn.SUM(UsageDaily.cached_tokens),
            fn.SUM(UsageDaily.total_tokens),
            fn.SUM(UsageDaily.cost_units),
        )
        .join(ApiKey)
        .where((UsageDaily.day >= start) & (UsageDaily.day < end))
        .group_by(UsageDaily.key, ApiKey.name, UsageDaily.model)
        .order_by(UsageDaily.key, UsageDaily.model)
    )
    if key_id is not None:
        query = query.where(UsageDaily.key == key_id)
    with connection():
        rows: list[tuple[Any, ...]] = list(query.tuples())  # type: ignore[arg-type]
    return [
        ReportRow(
            key_id=kid,
            key_name=name,
            model=model,
            requests=int(requests),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            cached_tokens=int(cached),
            total_tokens=int(total),
            cost=to_usd(int(cost)),
        )
        for kid, name, model, requests, prompt, completion, cached, total, cost in rows
    ]


def to_json(rows: list[ReportRow]) -> str:
    """A JSON array of the rows, `cost` as an exact number literal (no float rounding)."""
    items = []
    for row in rows:
        fields: dict[str, Any] = asdict(row)
        cost = fields.pop("cost")
        text = json.dumps(fields)
        items.append(f'{text[:-1]}, "cost": {cost:f}}}')
    return "[" + ", ".join(items) + "]"
