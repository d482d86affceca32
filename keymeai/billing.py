"""Exact costs from the price table.

Prices are USD per 1M tokens with at most 4 decimal places, so the price of a single
token is a whole number of 1e-10 USD ("cost units"). Costs are stored and summed as
integers of those units and turned into Decimal dollars only for display: no float
ever touches money.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from .config import Price

UNITS_PER_USD = 10**10
_UNITS_PER_PRICE = UNITS_PER_USD // 10**6  # a price per 1M tokens, in units per token


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


def unit_price(price: Decimal) -> int:
    """The price of one token in cost units (exact: the config allows 4 decimals)."""
    return int(price * _UNITS_PER_PRICE)


def cost_units(price: Price, usage: Usage) -> int:
    """Uncached prompt tokens at `input`, cached at `cached_input`, completion at `output`."""
    cached = min(usage.cached, usage.prompt)
    return (
        (usage.prompt - cached) * unit_price(price.input)
        + cached * unit_price(price.cached_input)
        + usage.completion * unit_price(price.output)
    )


def to_usd(units: int) -> Decimal:
    """Cost units as exact dollars, e.g. 2_970_000 -> Decimal('0.0002970000')."""
    return Decimal(units).scaleb(-10)
