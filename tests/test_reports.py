"""Usage reports (CLI and shared code): per key and model, per day, CSV with totals, and
sums that equal the raw usage records."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

import openai
import pytest

from keymeai.ledger import billing, keys, metering, reports
from keymeai.ledger.billing import to_usd
from keymeai.ledger.models import utcnow
from tests.helpers.cli import invoke
from tests.helpers.clients import HI
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

COUNTS = ["requests", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens"]


def record(key_id: int, at: dt.datetime, model: str = "qwen-plus", **counts: int) -> None:
    """A usage record through the meter's own write path (record and roll-up together)."""
    prompt, completion = counts.get("prompt", 10), counts.get("completion", 5)
    metering.write_usage(
        {
            "key": key_id,
            "created_at": at,
            "record_id": uuid.uuid4().hex,
            "request_id": f"req_{at:%Y%m%d%H%M%S%f}",
            "model": model,
            "provider": "dashscope",
            "upstream_model": model,
            "stream": False,
            "status": 200,
            "outcome": "ok",
            "attempts": 1,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": counts.get("cached", 0),
            "reasoning_tokens": 0,
            "estimated": False,
            "latency_ms": 100,
            "cost_units": counts.get("cost", 12_345),
        },
        None,
    )


def raw_sums(month: dt.date, by: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The month's raw records summed in Python, per (day,) key and model."""
    start, end = billing.month_range(month)
    sums: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for rec in usage_records():
        if start <= rec.created_at.date() < end:
            group = (rec.key_id, rec.model)
            if by == "day":
                group = (rec.created_at.date(), *group)
            row = sums[group]
            row["requests"] += 1
            for name in COUNTS[1:]:
                row[name] += getattr(rec, name)
            row["cost"] += to_usd(rec.cost_units)
    return sums


def as_sums(rows: list[reports.ReportRow], by: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    result = {}
    for row in rows:
        group = (row.day, row.key_id, row.model) if by == "day" else (row.key_id, row.model)
        result[group] = {**{name: getattr(row, name) for name in COUNTS}, "cost": row.cost}
    return result


@pytest.fixture
def busy_month(gateway: Gateway) -> tuple[int, int]:
    """Two keys' requests over real HTTP this month, plus records on other days and in
    the neighbouring months written by the meter's write path."""
    alice, bob = (keys.create_key(name, "standard") for name in ("alice", "bob"))
    a, b = gateway.client(alice[1]), gateway.client(bob[1])
    a.chat.completions.create(
        model="deepseek-chat", messages=HI, extra_body={"fake": {"cached": 2}}
    )
    list(a.chat.completions.create(model="deepseek-chat", messages=HI, stream=True))
    a.chat.completions.create(model="qwen-max", messages=HI, extra_body={"fake": {"words": 30}})
    list(
        b.chat.completions.create(
            model="doubao-pro-32k", messages=HI, stream=True, extra_body={"fake": {"cached": 3}}
        )
    )
    first = utcnow().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    record(alice[0].id, first, prompt=1000, completion=10, cached=100, cost=999_999_999)
    record(bob[0].id, first + dt.timedelta(hours=1), model="qwen-max")
    record(bob[0].id, first - dt.timedelta(microseconds=1), prompt=7)  # last month
    following = (first + dt.timedelta(days=32)).replace(day=1)
    record(bob[0].id, following, prompt=9)  # next month
    return alice[0].id, bob[0].id


@pytest.mark.parametrize("by", ["model", "day"])
def test_report_sums_equal_the_raw_records(busy_month: tuple[int, int], by: str) -> None:
    month = utcnow().date()
    rows = reports.monthly_usage(month, by=by)
    expected = raw_sums(month, by)
    assert as_sums(rows, by) == expected
    assert len(expected) >= 4
    assert sum(r.requests for r in rows) == 6 == len(usage_records()) - 2
    totals = reports.Totals.of(rows)
    this_month = [r for r in usage_records() if r.created_at.date() >= month.replace(day=1)]
    this_month = [r for r in this_month if r.created_at.date() < billing.month_range(month)[1]]
    assert totals.cost_units == sum(r.cost_units for r in this_month)
    assert totals.total_tokens == sum(r.total_tokens for r in this_month)
    _, bob = busy_month
    only_bob = reports.monthly_usage(month, bob, by)
    assert as_sums(only_bob, by) == {g: s for g, s in expected.items() if bob in g}


def test_neighbouring_months_hold_their_own_records(busy_month: tuple[int, int]) -> None:
    _, bob = busy_month
    first = utcnow().date().replace(day=1)
    last_month = reports.monthly_usage((first - dt.timedelta(days=1)).replace(day=1), by="day")
    assert [(r.key_id, r.prompt_tokens, r.day) for r in last_month] == [
        (bob, 7, first - dt.timedelta(days=1))
    ]
    next_month = reports.monthly_usage(billing.month_range(first)[1])
    assert [(r.key_id, r.prompt_tokens) for r in next_month] == [(bob, 9)]


def test_cli_formats_share_the_rows_and_table_and_csv_end_with_totals(
    gateway: Gateway, busy_month: tuple[int, int]
) -> None:
    rows = reports.monthly_usage(utcnow().date())
    totals = reports.Totals.of(rows)

    as_json = invoke(gateway.app, "usage", "report", "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    items = json.loads(as_json.output, parse_float=Decimal)
    assert isinstance(items, list) and len(items) == len(rows)  # rows only, no totals
    assert all(list(item) == list(reports.FIELDS) for item in items)
    assert [(i["key_id"], i["model"], i["cost"]) for i in items] == [
        (r.key_id, r.model, r.cost) for r in rows
    ]
    assert re.search(r'"cost": 0\.0999999999}', as_json.output)  # an exact number literal

    as_csv = invoke(gateway.app, "usage", "report", "--format", "csv")
    lines = list(csv.reader(io.StringIO(as_csv.output)))
    assert lines[0] == list(reports.FIELDS)
    assert lines[1:-1] == [
        [*(str(i[f]) for f in reports.FIELDS[:-1]), f"{i['cost']:f}"] for i in items
    ]
    assert lines[-1] == [
        "total", "", "",
        *(str(getattr(totals, name)) for name in COUNTS),
        f"{to_usd(totals.cost_units):f}",
    ]  # fmt: skip
    assert sum(Decimal(line[-1]) for line in lines[1:-1]) == Decimal(lines[-1][-1])

    table = invoke(gateway.app, "usage", "report").output.splitlines()
    assert table[0].split() == list(reports.FIELDS)
    assert len(table) == len(rows) + 2
    assert table[-1].split() == ["total", *lines[-1][3:]]


def test_cli_per_day_breakdown(gateway: Gateway, busy_month: tuple[int, int]) -> None:
    alice, bob = busy_month
    month = f"{utcnow():%Y-%m}"
    out = invoke(
        gateway.app, "usage", "report", "--by", "day", "--format", "json", "--month", month
    )
    items = json.loads(out.output, parse_float=Decimal)
    assert all(list(item) == ["day", *reports.FIELDS] for item in items)
    first = utcnow().date().replace(day=1).isoformat()
    (written,) = [
        i for i in items if (i["day"], i["key_id"], i["model"]) == (first, alice, "qwen-plus")
    ]
    assert written["cost"] == Decimal("0.0999999999")
    assert (written["prompt_tokens"], written["cached_tokens"]) == (1000, 100)
    expected = raw_sums(utcnow().date(), "day")
    assert {(dt.date.fromisoformat(i["day"]), i["key_id"], i["model"]) for i in items} == set(
        expected
    )

    args = ["usage", "report", "--by", "day", "--format", "csv", "--key", str(bob)]
    lines = list(csv.reader(io.StringIO(invoke(gateway.app, *args).output)))
    assert lines[0] == ["day", *reports.FIELDS]
    assert {line[1] for line in lines[1:-1]} == {str(bob)}
    assert lines[-1][:4] == ["total", "", "", ""]
    assert int(lines[-1][4]) == sum(i["requests"] for i in items if i["key_id"] == bob)


def test_an_empty_month_is_an_empty_list_and_a_zero_total(gateway: Gateway) -> None:
    assert invoke(gateway.app, "usage", "report", "--format", "json").output.strip() == "[]"
    lines = invoke(gateway.app, "usage", "report", "--format", "csv").output.splitlines()
    assert lines == [",".join(reports.FIELDS), "total,,,0,0,0,0,0,0.0000000000"]


def test_report_mistakes_are_clear(gateway: Gateway) -> None:
    for args, message in [
        (["--month", "9999-12"], "expected YYYY-MM"),  # its month has no end: was a traceback
        (["--month", "2026-13"], "expected YYYY-MM"),
        (["--by", "week"], "'week' is not one of 'model', 'day'"),
        (["--key", "²"], "no key with prefix ²"),  # isdigit() but not int(): was a traceback
        (["--key", "99999999999999999999"], "no key with id 99999999999999999999"),
    ]:
        result = invoke(gateway.app, "usage", "report", *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit), args  # no traceback


def test_set_models_restricts_and_all_restores(gateway: Gateway) -> None:
    row, plain = keys.create_key("narrow", "standard")
    client = gateway.client(plain)
    done = invoke(
        gateway.app, "keys", "set-models", str(row.id), "qwen-plus, deepseek-chat,qwen-plus"
    )
    assert done.exit_code == 0, done.output
    assert "may use: qwen-plus,deepseek-chat." in done.output
    assert keys.find_key(str(row.id)).allowed_models == "qwen-plus,deepseek-chat"
    assert "qwen-plus,deepseek-chat" in invoke(gateway.app, "keys", "list").output

    client.chat.completions.create(model="qwen-plus", messages=HI)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="qwen-max", messages=HI)
    assert caught.value.status_code == 403
    assert caught.value.code == "model_not_allowed"
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert "not allowed to use the model `qwen-max`" in caught.value.message
    assert len(usage_records()) == 1  # the refused request reached no upstream

    restored = invoke(gateway.app, "keys", "set-models", row.prefix, "--all")
    assert "may use: every model." in restored.output
    client.chat.completions.create(model="qwen-max", messages=HI)


def test_set_models_mistakes(gateway: Gateway) -> None:
    row, _ = keys.create_key("narrow", "standard")
    for args, message in [
        (["qwen-plus,gpt-4"], "unknown model 'gpt-4'"),
        ([" , "], "no model given"),
        ([], "give MODELS"),
        (["qwen-plus", "--all"], "give MODELS"),
    ]:
        result = invoke(gateway.app, "keys", "set-models", str(row.id), *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert keys.find_key(str(row.id)).allowed_models is None
