"""Monthly token quotas (the Hobby tier's 5M tokens), enforced from the ledger.

Before a request is forwarded it reserves what it may use: its prompt estimate plus
`max_tokens` (or `quota.default_completion_tokens`). It is admitted only while the
month's usage plus the reservations of requests in flight is below the quota, so
concurrent requests cannot overdraw it by more than the one request that crosses the
line. When the request ends, the meter replaces the reservation with the real count in
the same transaction. A reservation whose request crashed lapses after
`quota.reservation_seconds`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from peewee import fn

from . import metrics
from .config import QuotaSettings, Tier
from .db import connection, is_sqlite, write_transaction
from .errors import ApiError
from .keys import KeyInfo
from .ledger import ApiKey, QuotaReservation, UsageDaily, utcnow
from .limits import format_duration


def month_bounds(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """Start of this calendar month (UTC) and of the next."""
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + dt.timedelta(days=32)).replace(day=1)
    return start, following


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


def month_usage(key_id: int, now: dt.datetime) -> tuple[int, int]:
    """Tokens used and cost units spent by a key this month, from the daily roll-ups."""
    start, _ = month_bounds(now)
    row: tuple[Any, ...] = (
        UsageDaily.select(
            fn.COALESCE(fn.SUM(UsageDaily.total_tokens), 0),
            fn.COALESCE(fn.SUM(UsageDaily.cost_units), 0),
        )
        .where((UsageDaily.key == key_id) & (UsageDaily.day >= start.date()))
        .tuples()
        .get()  # type: ignore[assignment]
    )
    return int(row[0]), int(row[1])


def reserved_tokens(key_id: int, now: dt.datetime) -> int:
    return int(
        QuotaReservation.select(fn.COALESCE(fn.SUM(QuotaReservation.tokens), 0))
        .where((QuotaReservation.key == key_id) & (QuotaReservation.expires_at > now))
        .scalar()
    )


def reserve(
    key: KeyInfo, tier: Tier, estimate: int, settings: QuotaSettings
) -> tuple[int | None, QuotaState | None]:
    """Hold `estimate` tokens for a request, or refuse it with 429 insufficient_quota.

    Returns the reservation's id (None when the key has no token quota) and the state
    for the response headers.
    """
    limit = token_quota(key, tier)
    if limit is None:
        return None, None
    now = utcnow()
    _, resets_at = month_bounds(now)
    with connection(), write_transaction():
        if not is_sqlite():
            # Serialise admissions per key; SQLite's IMMEDIATE transaction already does.
            ApiKey.select(ApiKey.id).where(ApiKey.id == key.id).for_update().execute()
        QuotaReservation.delete().where(
            (QuotaReservation.key == key.id) & (QuotaReservation.expires_at <= now)
        ).execute()
        used, _ = month_usage(key.id, now)
        reserved = reserved_tokens(key.id, now)
        state = QuotaState(limit, used, reserved, resets_at)
        if used + reserved >= limit:
            metrics.REJECTIONS.labels("tokens").inc()
            retry = int((resets_at - now).total_seconds()) + 1
            raise ApiError(
                429,
                f"You exceeded your monthly token quota ({limit} tokens). It resets on "
                f"{resets_at:%Y-%m-%d} 00:00 UTC.",
                type="insufficient_quota",
                code="insufficient_quota",
                headers={"Retry-After": str(retry), **state.headers()},
            )
        reservation = QuotaReservation.create(
            key=key.id,
            tokens=estimate,
            expires_at=now + dt.timedelta(seconds=settings.reservation_seconds),
        )
    return reservation.id, QuotaState(limit, used, reserved + estimate, resets_at)
