"""Cost arithmetic (keymeai.ledger.billing): integer units of 1e-10 USD, the amounts people
type and read, and billing months."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymeai.catalogue import Price
from keymeai.ledger.billing import (
    MAX_UNITS,
    UNITS_PER_USD,
    Usage,
    cost_units,
    format_cost,
    format_usd,
    month_bounds,
    month_range,
    parse_usd,
    unit_price,
)

# USD per 1M tokens; one unit is 1e-10 USD, so 1 USD per 1M tokens is 10_000 units a token.
PRICE = Price(input=Decimal("1"), cached_input=Decimal("0.25"), output=Decimal("2"))


@pytest.mark.parametrize(
    ("price", "units"),
    [("0.0001", 1), ("0.07", 700), ("1.1", 11_000), ("2.19", 21_900), ("123.4567", 1_234_567)],
)
def test_a_price_with_up_to_4_decimals_is_a_whole_number_of_units_a_token(
    price: str, units: int
) -> None:
    assert unit_price(Decimal(price)) == units


def test_cost_is_uncached_cached_and_completion_each_at_its_price() -> None:
    assert cost_units(PRICE, Usage(prompt=1000, cached=400, completion=10)) == (
        600 * 10_000 + 400 * 2_500 + 10 * 20_000
    )
    # reasoning is part of the completion already: not billed again
    assert cost_units(PRICE, Usage(prompt=0, completion=10, reasoning=10)) == 10 * 20_000


counts = st.integers(min_value=0, max_value=10**9)


@given(a=st.tuples(counts, counts, counts), b=st.tuples(counts, counts, counts))
def test_costs_add_up_exactly_however_requests_are_grouped(
    a: tuple[int, int, int], b: tuple[int, int, int]
) -> None:
    """The roll-ups sum per-request costs: that must equal the cost of the summed usage
    (integer units: no rounding anywhere)."""
    usage_a = Usage(prompt=a[0] + a[1], cached=a[1], completion=a[2])
    usage_b = Usage(prompt=b[0] + b[1], cached=b[1], completion=b[2])
    together = Usage(
        prompt=usage_a.prompt + usage_b.prompt,
        cached=usage_a.cached + usage_b.cached,
        completion=usage_a.completion + usage_b.completion,
    )
    assert cost_units(PRICE, usage_a) + cost_units(PRICE, usage_b) == cost_units(PRICE, together)


@pytest.mark.parametrize(
    ("units", "text"),
    [
        (0, "0.00"),
        (1, "0.0000000001"),
        (10**8, "0.01"),
        (10**9, "0.10"),
        (25 * UNITS_PER_USD, "25.00"),
        (250 * UNITS_PER_USD, "250.00"),  # not 2.5E+2
        (1_066_800, "0.00010668"),
        (UNITS_PER_USD + 1, "1.0000000001"),
        (MAX_UNITS, "922337203.6854775807"),
        (-5 * 10**8, "-0.05"),
    ],
)
def test_format_usd_is_exact_with_at_least_two_decimals(units: int, text: str) -> None:
    assert format_usd(units) == text


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("25", 25 * UNITS_PER_USD),
        (" $ 25.00 ", 25 * UNITS_PER_USD),
        ("0.0000000001", 1),
        ("1e-10", 1),
        ("1E3", 1000 * UNITS_PER_USD),
        ("0.10000000000000", 10**9),  # trailing zeros past the 10th decimal are nothing
    ],
)
def test_parse_usd_reads_what_people_type(text: str, units: int) -> None:
    assert parse_usd(text) == units


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not an amount"),
        ("$", "not an amount"),
        ("25 USD", "not an amount"),
        ("0", "positive amount"),
        ("-1", "positive amount"),
        ("NaN", "positive amount"),
        ("Infinity", "positive amount"),
        ("1e10", "positive amount"),
        ("0.00000000001", "at most 10 decimal places"),
    ],
)
def test_parse_usd_refuses_saying_why(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_usd(text)


@given(st.integers(min_value=1, max_value=MAX_UNITS))
def test_an_amount_shown_reads_back_as_itself(units: int) -> None:
    assert parse_usd(format_usd(units)) == units
    assert parse_usd(format_cost(units)) == units


@pytest.mark.parametrize(
    ("day", "start", "end"),
    [
        (dt.date(2025, 1, 1), dt.date(2025, 1, 1), dt.date(2025, 2, 1)),
        (dt.date(2025, 1, 31), dt.date(2025, 1, 1), dt.date(2025, 2, 1)),
        (dt.date(2024, 2, 29), dt.date(2024, 2, 1), dt.date(2024, 3, 1)),
        (dt.date(2025, 12, 31), dt.date(2025, 12, 1), dt.date(2026, 1, 1)),
    ],
)
def test_a_billing_month_is_the_calendar_month(day: dt.date, start: dt.date, end: dt.date) -> None:
    assert month_range(day) == (start, end)


def test_month_bounds_are_midnights_and_the_last_month_ends_in_an_error() -> None:
    assert month_bounds(dt.datetime(2025, 12, 31, 23, 59, 59, 999999)) == (
        dt.datetime(2025, 12, 1),
        dt.datetime(2026, 1, 1),
    )
    with pytest.raises(ValueError):
        month_range(dt.date(9999, 12, 1))
