"""Monthly token quotas (the Hobby tier's 5M tokens) and spend caps, from the ledger.

Before a request is forwarded it reserves what it may use: its prompt estimate plus
`max_tokens` (or `quota.default_completion_tokens`). It is admitted only while the
month's usage plus the reservations of requests in flight is below the quota, so
concurrent requests cannot overdraw it by more than the one request that crosses the
line. When the request ends, the meter replaces the reservation with the real count in
the same transaction. A reservation whose request crashed lapses after
`quota.reservation_seconds`.

A key's spend cap (`keys set-limits --spend-cap`) is checked the same way against the
month's cost: once reached, the key gets 429 until the month ends.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from peewee import fn

from . import metrics
from .billing import format_usd, month_bounds
from .config import QuotaSettings, Tier
from .db import connection, is_sqlite, write_transaction
from .errors import ApiError
from .keys import KeyInfo
from .ledger import ApiKey, QuotaReservation, UsageDaily, utcnow
from .limits import format_duration


@dataclass(frozen=True)
class MonthUsage:
    """A key's calendar month so far (from the daily roll-ups) and its tokens in flight."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_units: int = 0
    reserved_tokens: int = 0
    lapsed_reservations: int = 0


def month_usage(key_id: int, now: dt.datetime) -> MonthUsage:
    """One statement, so usage and reservations come from the same snapshot: a request
    settling in between cannot be counted twice or not at all."""
    start, _ = month_bounds(now)
    mine = QuotaReservation.key == key_id
    live = QuotaReservation.select(fn.COALESCE(fn.SUM(QuotaReservation.tokens), 0)).where(
        mine & (QuotaReservation.expires_at > now)
    )
    lapsed = QuotaReservation.select(fn.COUNT(QuotaReservation.id)).where(
        mine & (QuotaReservation.expires_at <= now)
    )
    sums = [
        fn.COALESCE(fn.SUM(field), 0)
        for field in (
            UsageDaily.requests,
            UsageDaily.prompt_tokens,
            UsageDaily.completion_tokens,
            UsageDaily.total_tokens,
            UsageDaily.cost_units,
        )
    ]
    row: tuple[Any, ...] = (
        UsageDaily.select(*sums, live, lapsed)
        .where((UsageDaily.key == key_id) & (UsageDaily.day >= start.date()))
        .tuples()
        .get()  # type: ignore[assignment]
    )
    return MonthUsage(*(int(value) for value in row))


@dataclass(frozen=True)
class QuotaState:
    limit: int
    used: int
    reserved: int
    resets_at: dt.datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)

    def headers(self) -> dict[str, str]:
        reset = (self.resets_at - utcnow()).total_seconds()
        return {
            "x-ratelimit-limit-tokens": str(self.limit),
            "x-ratelimit-remaining-tokens": str(self.remaining),
            "x-ratelimit-reset-tokens": format_duration(reset),
        }


def token_quota(key: KeyInfo, tier: Tier) -> int | None:
    return key.tokens_per_month if key.tokens_per_month is not None else tier.tokens_per_month


def _refuse(message: str, now: dt.datetime, resets_at: dt.datetime, **headers: str) -> ApiError:
    """429 insufficient_quota: nothing changes before the month ends, so the openai SDK
    is told not to retry."""
    return ApiError(
        429,
        f"{message} It resets on {resets_at:%Y-%m-%d} 00:00 UTC.",
        type="insufficient_quota",
        code="insufficient_quota",
        headers={
            "Retry-After": str(int((resets_at - now).total_seconds()) + 1),
            "x-should-retry": "false",
            **headers,
        },
    )


def _check_spend(key: KeyInfo, usage: MonthUsage, now: dt.datetime, resets_at: dt.datetime) -> None:
    cap = key.spend_cap_units
    if cap is not None and usage.cost_units >= cap:
        metrics.REJECTIONS.labels("spend").inc()
        raise _refuse(
            f"This key reached its monthly spend cap of ${format_usd(cap)} "
            f"(${format_usd(usage.cost_units)} spent this month).",
            now,
            resets_at,
        )


def reserve(
    key: KeyInfo, tier: Tier, estimate: int, settings: QuotaSettings
) -> tuple[int | None, QuotaState | None]:
    """Hold `estimate` tokens for a request, or refuse it with 429 insufficient_quota.

    Returns the reservation's id (None when the key has no token quota) and the state
    for the response headers.
    """
    limit = token_quota(key, tier)
    if limit is None and key.spend_cap_units is None:
        return None, None
    now = utcnow()
    _, resets_at = month_bounds(now)
    if limit is None:  # a spend cap alone holds nothing: one read decides
        with connection():
            _check_spend(key, month_usage(key.id, now), now, resets_at)
        return None, None
    with connection(), write_transaction():
        if not is_sqlite():
            # Serialise admissions per key; SQLite's IMMEDIATE transaction already does.
            ApiKey.select(ApiKey.id).where(ApiKey.id == key.id).for_update().execute()
        usage = month_usage(key.id, now)
        if usage.lapsed_reservations:
            QuotaReservation.delete().where(
                (QuotaReservation.key == key.id) & (QuotaReservation.expires_at <= now)
            ).execute()
        state = QuotaState(limit, usage.total_tokens, usage.reserved_tokens, resets_at)
        if usage.total_tokens + usage.reserved_tokens >= limit:
            metrics.REJECTIONS.labels("tokens").inc()
            raise _refuse(
                f"You exceeded your monthly token quota of {limit} tokens "
                f"({usage.total_tokens} used, {usage.reserved_tokens} held by requests "
                "in progress).",
                now,
                resets_at,
                **state.headers(),
            )
        _check_spend(key, usage, now, resets_at)
        reservation = QuotaReservation.create(
            key=key.id,
            tokens=estimate,
            expires_at=now + dt.timedelta(seconds=settings.reservation_seconds),
        )
    return reservation.id, QuotaState(
        limit, usage.total_tokens, usage.reserved_tokens + estimate, resets_at
    )
