"""Usage reports from the daily roll-ups: what the CLI, the admin API and pages show.

Reports read `usage_daily` (a row per key, model and day), never the raw records, so a
month's report stays fast however many requests it covers; the roll-ups are written
in the same transaction as the records, so their sums are the records' sums.

A report is per key and model for a calendar month (UTC), or per day, key and model
(`by="day"`). Money stays in integer cost units until it is written out, as exact
decimal text with all ten decimal places.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from peewee import fn

from .billing import format_cost, month_range, to_usd
from .db import connection, db
from .journal import catch_up
from .models import ApiKey, UsageDaily, UsageRecord

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
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens")
GROUPINGS = ("model", "day")
TOTAL_LABEL = "total"


@dataclass(frozen=True)
class ReportRow:
    """One key and model's sums for the month, or for one day of it (`day` set)."""

    key_id: int
    key_name: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_units: int
    day: dt.date | None = None

    @property
    def cost(self) -> Decimal:
        return to_usd(self.cost_units)


@dataclass(frozen=True)
class Totals:
    """The sums of a report's rows: an invoice's bottom line."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_units: int = 0

    @classmethod
    def of(cls, rows: Sequence[ReportRow]) -> Totals:
        return cls(*(sum(getattr(row, name) for row in rows) for name in (*COUNTS, "cost_units")))


def fields(by: str = "model") -> tuple[str, ...]:
    """The report's columns: the documented fields, led by `day` for the per-day breakdown."""
    return ("day", *FIELDS) if by == "day" else FIELDS


def parse_month(text: str) -> dt.date:
    """ "2026-11" -> date(2026, 11, 1); ValueError otherwise (9999-12 included: its
    month has no end the calendar can name)."""
    first = dt.datetime.strptime(text, "%Y-%m").date()
    month_range(first)
    return first


def monthly_usage(month: dt.date, key_id: int | None = None, by: str = "model") -> list[ReportRow]:
    """Sums per key and model (and day, when `by="day"`) for the month of `month`."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}")
    start, end = month_range(month)
    groups: list[Any] = [UsageDaily.key, ApiKey.name, UsageDaily.model]
    if by == "day":
        groups.insert(0, UsageDaily.day)
    sums = [fn.SUM(getattr(UsageDaily, name)) for name in (*COUNTS, "cost_units")]
    query = (
        UsageDaily.select(*groups, *sums)
        .join(ApiKey)
        .where((UsageDaily.day >= start) & (UsageDaily.day < end))
        .group_by(*groups)
        .order_by(*groups)
    )
    if key_id is not None:
        query = query.where(UsageDaily.key == key_id)
    catch_up()  # the requests journaled and not yet applied count too
    with connection():
        # The plain cursor: peewee's per-value converters would double the time of a
        # per-day report of 150,000 rows, and every value is converted in _row anyway.
        rows: list[tuple[Any, ...]] = db.execute(query).fetchall()
    return [_row(values, by) for values in rows]


def daily_totals(month: dt.date, key_id: int | None = None) -> dict[dt.date, Totals]:
    """The month's sums per day, of every key or of one (days without usage left out):
    a chart's series in one GROUP BY over the roll-ups."""
    start, end = month_range(month)
    sums = [fn.SUM(getattr(UsageDaily, name)) for name in (*COUNTS, "cost_units")]
    query = (
        UsageDaily.select(UsageDaily.day, *sums)
        .where((UsageDaily.day >= start) & (UsageDaily.day < end))
        .group_by(UsageDaily.day)
    )
    if key_id is not None:
        query = query.where(UsageDaily.key == key_id)
    catch_up()  # the requests journaled and not yet applied count too
    with connection():
        rows: list[tuple[Any, ...]] = db.execute(query).fetchall()
    return {_date(day): Totals(*(int(value) for value in values)) for day, *values in rows}


def last_used(key_id: int | None = None) -> dict[int, dt.datetime]:
    """When each key (or one) was last used: its newest usage record. Keys never used
    are absent.

    One statement with a MAX per key that the (key, created_at) index answers with a
    seek (SQLite and PostgreSQL alike), never a scan of the records.
    """
    catch_up()
    with connection():
        rows: list[tuple[Any, ...]] = db.execute(last_used_query(key_id)).fetchall()
    return {key_id: _datetime(moment) for key_id, moment in rows if moment is not None}


def last_used_query(key_id: int | None = None) -> Any:
    """`last_used`'s statement (a key's id and its newest record's time), to explain."""
    newest = UsageRecord.select(fn.MAX(UsageRecord.created_at)).where(UsageRecord.key == ApiKey.id)
    query = ApiKey.select(ApiKey.id, newest)
    return query if key_id is None else query.where(ApiKey.id == key_id)


def _date(value: dt.date | str) -> dt.date:
    """A day as the driver hands it back (SQLite may give the stored text)."""
    return dt.date.fromisoformat(value) if isinstance(value, str) else value


def _datetime(value: dt.datetime | str) -> dt.datetime:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _row(values: tuple[Any, ...], by: str) -> ReportRow:
    day = None
    if by == "day":
        day, *rest = values
        day = _date(day)
        values = tuple(rest)
    key_id, name, model, *sums = values
    # PostgreSQL sums bigints as numeric (Decimal), SQLite as integers: both exact.
    requests, prompt, completion, cached, total, cost = (int(value) for value in sums)
    return ReportRow(key_id, name, model, requests, prompt, completion, cached, total, cost, day)


def _identity(row: ReportRow, by: str) -> dict[str, Any]:
    identity: dict[str, Any] = {"day": row.day.isoformat()} if by == "day" and row.day else {}
    identity.update(key_id=row.key_id, key_name=row.key_name, model=row.model)
    return identity


def as_dicts(rows: Sequence[ReportRow], by: str = "model") -> list[dict[str, Any]]:
    """Rows as JSON-ready objects in column order, `cost` as an exact decimal string."""
    return [
        {
            **_identity(row, by),
            **{name: getattr(row, name) for name in COUNTS},
            "cost": format_cost(row.cost_units),
        }
        for row in rows
    ]


def totals_dict(rows: Sequence[ReportRow]) -> dict[str, Any]:
    totals = Totals.of(rows)
    return {
        **{name: getattr(totals, name) for name in COUNTS},
        "cost": format_cost(totals.cost_units),
    }


def to_json(rows: Sequence[ReportRow], by: str = "model") -> str:
    """The CLI's JSON: an array of the rows (no totals), `cost` as an exact number
    literal with ten decimal places, which no float rounding has touched."""
    items = []
    for item in as_dicts(rows, by):
        cost = item.pop("cost")
        text = json.dumps(item)
        items.append(f'{text[:-1]}, "cost": {cost}}}')
    return "[" + ", ".join(items) + "]"


def _text(value: str) -> str:
    """A name as a cell a spreadsheet shows and never runs: a leading =, +, -, @ (or a
    tab or carriage return) would make it a formula, so it gets an apostrophe."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _cells(row: ReportRow, by: str) -> list[str]:
    day = [row.day.isoformat()] if by == "day" and row.day else []
    return [
        *day,
        str(row.key_id),
        _text(row.key_name),
        _text(row.model),
        str(row.requests),
        str(row.prompt_tokens),
        str(row.completion_tokens),
        str(row.cached_tokens),
        str(row.total_tokens),
        format_cost(row.cost_units),
    ]


def to_text_rows(rows: Sequence[ReportRow], by: str = "model") -> list[list[str]]:
    """Header, one line per row and a totals line, as text cells (table and CSV)."""
    columns = fields(by)
    lines = [list(columns), *(_cells(row, by) for row in rows)]
    total = totals_dict(rows)
    labels = {columns[0]: TOTAL_LABEL}
    lines.append([str(total.get(name, labels.get(name, ""))) for name in columns])
    return lines


def csv_filename(month: dt.date, key_id: int | None = None, by: str = "model") -> str:
    """`keymeai-usage-2026-11[-key12][-daily].csv`: what the report covers, at a glance."""
    suffix = f"-key{key_id}" if key_id is not None else ""
    return f"keymeai-usage-{month:%Y-%m}{suffix}{'-daily' if by == 'day' else ''}.csv"


def to_csv(rows: Sequence[ReportRow], by: str = "model") -> str:
    """CSV for invoicing: a header, the rows, and a last line "total" with the sums."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(to_text_rows(rows, by))
    return out.getvalue()
