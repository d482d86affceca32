"""Costs: the pricing rule against hand-computed values, through every provider shape,
exact over a million records, and a price change that leaves old records alone."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from keymeai.catalogue import Price
from keymeai.config import parse_config
from keymeai.ledger import db, keys, reports
from keymeai.ledger.billing import Usage, cost_units, format_cost, parse_usd, to_usd
from keymeai.ledger.db import connection
from tests.helpers.config import PRICES, PROVIDER_ENV, add_model, base_config
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import expected_cost, usage_records
from tests.helpers.servers import Gateway
from tests.helpers.services import postgres_database

UNITS = Decimal(10) ** 10  # cost units per USD
MODELS = list(PRICES)


def price(**values: str) -> Price:
    amounts = {name: Decimal(value) for name, value in values.items()}
    amounts.setdefault("cached_input", amounts["input"])
    return Price(**amounts)


DEEPSEEK_CHAT = price(input="0.27", cached_input="0.07", output="1.10")
DOUBAO = price(input="0.11", cached_input="0.022", output="0.28")


@pytest.mark.parametrize(
    ("price_", "usage", "usd"),
    [
        # 700 x 0.27 + 300 x 0.07 + 500 x 1.10 = 189 + 21 + 550 micro-dollars
        (DEEPSEEK_CHAT, Usage(prompt=1000, cached=300, completion=500), "0.00076"),
        # 10000 x 0.11 + 2345 x 0.022 + 678 x 0.28 = 1100 + 51.59 + 189.84 micro-dollars
        (DOUBAO, Usage(prompt=12345, cached=2345, completion=678), "0.00134143"),
        # reasoning tokens are part of the completion: billed once, at `output`
        (DEEPSEEK_CHAT, Usage(prompt=10, completion=100, reasoning=60), "0.0001127"),
        # a provider reporting more cached than prompt tokens: all prompt tokens cached
        (DEEPSEEK_CHAT, Usage(prompt=10, cached=50, completion=0), "0.0000007"),
        # the smallest price the config allows is exactly one unit per token
        (price(input="0.0001", output="0.0001"), Usage(prompt=3, completion=4), "0.0000000007"),
        (price(input="1.6", cached_input="0.64", output="6.4"), Usage(1, 1), "0.000008"),
        (DOUBAO, Usage(), "0"),
    ],
)
def test_cost_of_one_request_matches_hand_computation(
    price_: Price, usage: Usage, usd: str
) -> None:
    units = cost_units(price_, usage)
    assert to_usd(units) == Decimal(usd)
    assert units == Decimal(usd) * UNITS


def test_cached_price_defaults_to_input_price() -> None:
    data = base_config("http://127.0.0.1:9", "sqlite:///unused.db")
    data["models"]["qwen-plus"]["price"] = {"input": 0.4, "output": 1.2}
    model = parse_config(data, PROVIDER_ENV).models["qwen-plus"]
    assert model.price.cached_input == Decimal("0.4")
    assert cost_units(model.price, Usage(prompt=100, cached=100)) == 400_000  # 100 x 0.4


def test_cost_text_is_exact_and_never_in_exponent_notation() -> None:
    assert format_cost(0) == "0.0000000000"
    assert format_cost(1) == "0.0000000001"
    assert format_cost(7_600_000) == "0.0007600000"
    assert format_cost(2**63 - 1) == "922337203.6854775807"
    assert parse_usd("$25.10") == 251_000_000_000
    assert parse_usd("922337203.6854775807") == 2**63 - 1
    for bad, message in [
        ("1e999999", "positive amount"),  # once a decimal.Overflow traceback in the CLI
        ("0.1000000000000000000000000000001", "at most 10 decimal places"),
        ("x" * 1000, "not an amount"),
        ("922337203.6854775808", "positive amount"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_usd(bad)


def test_every_provider_shape_is_billed_by_the_rule(client: OpenAI, upstream: FakeUpstream) -> None:
    """DeepSeek reports cached tokens as prompt_cache_hit_tokens, DashScope and Ark only as
    prompt_tokens_details.cached_tokens; reasoning tokens are part of the completion."""
    knobs = {"words": 40, "cached": 5, "reasoning_words": 7}
    question = [{"role": "user", "content": "a question of exactly nine words for the cache"}]
    for model in MODELS:
        for stream in (False, True):
            response = client.chat.completions.create(
                model=model, messages=question, stream=stream, extra_body={"fake": knobs}
            )
            if stream:
                assert len(list(response)) > 40  # type: ignore[arg-type]
            reported = upstream.requests[-1].response_usage
            if model.startswith("deepseek"):
                assert reported["prompt_cache_hit_tokens"] == 5
            else:
                assert "prompt_cache_hit_tokens" not in reported
                assert reported["prompt_tokens_details"]["cached_tokens"] == 5
            assert (reported["prompt_tokens"], reported["completion_tokens"]) == (12, 47)
            record = usage_records()[-1]
            assert (record.model, record.stream) == (model, stream)
            counts = (record.prompt_tokens, record.cached_tokens, record.completion_tokens)
            assert counts == (12, 5, 47) and record.reasoning_tokens == 7
            assert not record.estimated
            # 7 uncached and 5 cached prompt tokens, 47 completion tokens (7 reasoning)
            assert to_usd(record.cost_units) == expected_cost(model, 12, 5, 47), (model, stream)
    assert len(usage_records()) == 2 * len(MODELS)


def test_hand_computed_cost_of_a_cached_deepseek_request(client: OpenAI) -> None:
    client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],  # 4 prompt tokens for the fake
        extra_body={"fake": {"words": 100, "cached": 3}},
    )
    (record,) = usage_records()
    # 1 x 0.27 + 3 x 0.07 + 100 x 1.10 micro-dollars = 0.00011048 USD
    assert record.cost_units == 1_104_800


def test_a_price_change_applies_to_later_records_only(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    first = start_gateway(config_data)
    key = first.create_key("standard")
    ask = {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"fake": {"words": 10}}}
    first.client(key).chat.completions.create(model="qwen-plus", **ask)
    first.server.stop()

    config_data["models"]["qwen-plus"]["price"] = {"input": 2, "cached_input": 1, "output": 8}
    second = start_gateway(config_data)  # the app restarted with the new price table
    second.client(key).chat.completions.create(model="qwen-plus", **ask)

    old, new = usage_records()
    assert to_usd(old.cost_units) == (4 * Decimal("0.4") + 10 * Decimal("1.2")) / 10**6
    assert to_usd(new.cost_units) == (4 * 2 + 10 * 8) / Decimal(10**6)
    (row,) = reports.monthly_usage(dt.date.today())
    assert row.cost == to_usd(old.cost_units + new.cost_units) == Decimal("0.0001016")


# A month of a million records. They are generated inside the database from a table of
# usage patterns, each with the cost billing.cost_units gives it, and rolled up per key,
# model and day; the expected sums are worked out here in Decimal, pattern by pattern.
PATTERNS = 1009
# A million on SQLite; PostgreSQL, slower to fill, shows its numeric sums stay exact too.
RECORDS = {"sqlite": 1_000_000, "postgresql": 200_000}
MONTH = dt.date(2026, 3, 1)
# The test config's models, and one priced like the dearest models (o1-pro: $150 and $600)
# to the 4th decimal, so that sums reach millions of dollars with every 1e-10 USD
# significant: more digits than a float holds.
MILLION_PRICES = {
    **PRICES,
    "house-model": {"input": 150.1234, "cached_input": 75.0617, "output": 600.4321},
}
MILLION_MODELS = list(MILLION_PRICES)
SQL = {
    "sqlite": {
        "series": "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n"
        " WHERE i < {last})",
        "source": "n",
        "created_at": "'2026-03-' || printf('%02d', 1 + n.i % 31) || ' 12:00:00'",
        "pattern": "n.i % {patterns}",
        "day": "date(created_at)",
    },
    "postgresql": {
        "series": "",
        "source": "generate_series(0, {last}) AS n(i)",
        "created_at": "TIMESTAMP '2026-03-01 12:00:00' + MOD(n.i, 31) * INTERVAL '1 day'",
        "pattern": "MOD(n.i, {patterns})",  # psycopg2 would read a bare % as a placeholder
        "day": "CAST(created_at AS DATE)",
    },
}


def usage_patterns() -> list[tuple[int, str, int, int, int]]:
    """(key index, model, prompt, cached, completion): large and irregular numbers."""
    patterns = []
    for j in range(PATTERNS):
        prompt = 20_000 + (j * 7919) % 120_000
        cached = (j * 104_729) % (prompt + 1) if j % 3 else 0
        model = MILLION_MODELS[j % len(MILLION_MODELS)]
        patterns.append((j % 3, model, prompt, cached, 500 + (j * 31) % 16_000))
    return patterns


def fill_month(dialect: str, key_ids: list[int], records: int) -> None:
    data = base_config("http://127.0.0.1:9", "sqlite:///unused.db")
    add_model(data, "house-model", [("deepseek", "house-model")])
    data["models"]["house-model"]["price"] = MILLION_PRICES["house-model"]
    config = parse_config(data, PROVIDER_ENV)
    sql = SQL[dialect]
    param = "%s" if dialect == "postgresql" else "?"
    with connection(), db.db.atomic():
        if dialect == "sqlite":  # room to sort a million rows in memory for the GROUP BY
            db.db.execute_sql("PRAGMA cache_size = -200000")
        db.db.execute_sql(
            "CREATE TEMPORARY TABLE pattern (id INTEGER PRIMARY KEY, key_id INTEGER, model TEXT,"
            " prompt INTEGER, cached INTEGER, completion INTEGER, cost BIGINT)"
        )
        cursor = db.db.cursor()
        cursor.executemany(
            f"INSERT INTO pattern VALUES ({', '.join([param] * 7)})",
            [
                (
                    j,
                    key_ids[k],
                    model,
                    prompt,
                    cached,
                    completion,
                    cost_units(config.models[model].price, Usage(prompt, completion, cached)),
                )
                for j, (k, model, prompt, cached, completion) in enumerate(usage_patterns())
            ],
        )
        series = sql["series"].format(last=records - 1)
        source = sql["source"].format(last=records - 1)
        pattern = sql["pattern"].format(patterns=PATTERNS)
        db.db.execute_sql(
            f"{series} INSERT INTO usage_record (key_id, created_at, request_id, model, provider,"
            " upstream_model, stream, status, outcome, attempts, prompt_tokens, completion_tokens,"
            " total_tokens, cached_tokens, reasoning_tokens, estimated, latency_ms, cost_units)"
            f" SELECT p.key_id, {sql['created_at']}, 'req_' || n.i, p.model, 'fake', p.model,"
            " false, 200, 'ok', 1, p.prompt, p.completion, p.prompt + p.completion, p.cached, 0,"
            f" false, 100, p.cost FROM {source} JOIN pattern p ON p.id = {pattern}"
        )
        db.db.execute_sql(
            "INSERT INTO usage_daily (key_id, day, model, requests, prompt_tokens,"
            " completion_tokens, cached_tokens, total_tokens, cost_units)"
            f" SELECT key_id, {sql['day']}, model, COUNT(*), SUM(prompt_tokens),"
            " SUM(completion_tokens), SUM(cached_tokens), SUM(total_tokens), SUM(cost_units)"
            f" FROM usage_record GROUP BY key_id, {sql['day']}, model"
        )


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_month_of_many_records_sums_exactly(tmp_path: Path, dialect: str) -> None:
    sqlite = contextlib.nullcontext(f"sqlite:///{tmp_path / 'million.db'}")
    with postgres_database() if dialect == "postgresql" else sqlite as url:
        db.open_database(url)
        db.upgrade()
        key_ids = [keys.create_key(f"customer {n}", "standard")[0].id for n in range(3)]
        records = RECORDS[dialect]
        fill_month(dialect, key_ids, records)

        expected: dict[tuple[int, str], list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
        for j, (k, model, prompt, cached, completion) in enumerate(usage_patterns()):
            count = records // PATTERNS + (j < records % PATTERNS)
            sums = expected[(key_ids[k], model)]
            for i, value in enumerate((1, prompt, completion, cached, prompt + completion)):
                sums[i] += count * value
            sums[5] += count * expected_cost(model, prompt, cached, completion, MILLION_PRICES)

        rows = reports.monthly_usage(MONTH)
        got = {
            (r.key_id, r.model): [
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                r.total_tokens,
                r.cost,
            ]
            for r in rows
        }
        assert got == expected
        total = sum(sums[5] for sums in expected.values())
        assert reports.Totals.of(rows).cost_units == total * UNITS
        assert reports.totals_dict(rows)["cost"] == f"{total:.10f}"
        with connection():
            raw = db.db.execute_sql("SELECT SUM(cost_units), COUNT(*) FROM usage_record")
            assert raw.fetchone() == (total * UNITS, records)
        daily = reports.monthly_usage(MONTH, key_ids[1], by="day")
        assert len(daily) == 31 * sum(key_id == key_ids[1] for key_id, _ in expected)
        assert sum(r.cost for r in daily) == sum(
            sums[5] for (key_id, _), sums in expected.items() if key_id == key_ids[1]
        )

    # The same sum in floats, record by record as a naive meter would add it, drifts:
    # the data can tell exact arithmetic from float arithmetic.
    floats = [float(expected_cost(*p[1:], MILLION_PRICES)) for p in usage_patterns()]
    drifting = 0.0
    for i in range(records):
        drifting += floats[i % PATTERNS]
    assert Decimal(drifting).quantize(Decimal("1e-10")) != total
