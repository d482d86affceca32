"""Exact costs from the price table.

Prices are USD per 1M tokens with at most 4 decimal places, so the price of a single
token is a whole number of 1e-10 USD ("cost units"). Costs are stored and summed as
integers of those units and turned into Decimal dollars only for display: no float
ever touches money.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..catalogue import Price

UNITS_PER_USD = 10**10
UNIT_DECIMALS = 10
MAX_UNITS = 2**63 - 1  # the ledger's BIGINT columns
_UNITS_PER_PRICE = UNITS_PER_USD // 10**6  # a price per 1M tokens, in units per token
_MAX_AMOUNT_CHARS = 40  # longer "amounts" are refused before any arithmetic


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as the upstream reported them or as estimated."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@functools.lru_cache(maxsize=1024)  # the catalogue's few prices, six times a request
def unit_price(price: Decimal) -> int:
    """The price of one token in cost units (exact: the config allows 4 decimals)."""
    return int(price * _UNITS_PER_PRICE)


def cost_units(price: Price, usage: Usage) -> int:
    """Uncached prompt tokens at `input`, cached at `cached_input`, completion at `output`.

    Completion tokens include reasoning tokens, as every provider counts them.
    """
    cached = min(usage.cached, usage.prompt)
    return (
        (usage.prompt - cached) * unit_price(price.input)
        + cached * unit_price(price.cached_input)
        + usage.completion * unit_price(price.output)
    )


def to_usd(units: int) -> Decimal:
    """Cost units as exact dollars, e.g. 2_970_000 -> Decimal('0.0002970000')."""
    return Decimal(units).scaleb(-UNIT_DECIMALS)


def format_cost(units: int) -> str:
    """Exact dollars with all 10 decimal places, never in exponent notation:
    0 -> "0.0000000000", 2_970_000 -> "0.0002970000"."""
    return f"{to_usd(units):f}"


def parse_usd(text: str) -> int:
    """An amount in USD ("25.00", "$0.5") as cost units; ValueError saying what is wrong.

    Worked on the decimal digits themselves, so no context rounding can turn an amount
    with too many decimals into a nearby one silently.
    """
    cleaned = text.strip().removeprefix("$").strip()
    try:
        if len(cleaned) > _MAX_AMOUNT_CHARS:
            raise InvalidOperation
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(
            f"{text[:_MAX_AMOUNT_CHARS]!r} is not an amount in USD (e.g. 25.00)"
        ) from None
    out_of_range = ValueError(
        f"must be a positive amount in USD (e.g. 25.00) below {MAX_UNITS // UNITS_PER_USD}"
    )
    if not amount.is_finite() or amount <= 0 or amount.adjusted() >= 10:
        raise out_of_range
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    significant = list(digits)
    while exponent < -UNIT_DECIMALS and significant and significant[-1] == 0:
        significant.pop()
        exponent += 1
    if exponent < -UNIT_DECIMALS:
        raise ValueError(f"at most {UNIT_DECIMALS} decimal places")
    units = int("".join(map(str, significant)) or "0") * 10 ** (exponent + UNIT_DECIMALS)
    if units > MAX_UNITS:
        raise out_of_range
    return units


def format_usd(units: int) -> str:
    """Cost units as exact dollars with at least two decimals: "25.00", "0.00010668"
    (caps and month-to-date figures; reports keep all ten decimals, `format_cost`)."""
    amount = to_usd(units).normalize()
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"{amount:f}"


def month_range(day: dt.date) -> tuple[dt.date, dt.date]:
    """The billing period of `day`: the first day of its calendar month and of the next
    one; ValueError past year 9999."""
    start = day.replace(day=1)
    if start.month == 12:
        return start, dt.date(start.year + 1, 1, 1)
    return start, start.replace(month=start.month + 1)


def month_bounds(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """Start of the calendar month (UTC) of `now` and of the next, as datetimes."""
    start, end = month_range(now.date())
    return dt.datetime.combine(start, dt.time()), dt.datetime.combine(end, dt.time())
