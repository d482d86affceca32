"""Monthly token quotas (the Hobby tier's 5M tokens) and spend caps, from the ledger.

Before a request is forwarded it reserves the most it may use (`Hold`): its prompt
estimate (tokens.estimate_prompt_tokens) plus its completion allowance (the larger of
`max_tokens` and `max_completion_tokens`, else `quota.default_completion_tokens`, times
`n`), in tokens and in cost at the model's uncached input and output prices. It is
admitted only while the month's usage plus the holds of requests in flight is below the
token quota, and the month's cost plus their held cost below the spend cap, so
concurrent requests cannot overdraw either by more than the one request that crosses
the line. When the request ends, the meter replaces the hold with the real count and
cost in the same transaction. A hold whose request crashed lapses after
`quota.reservation_seconds`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from peewee import fn

from ..config import QuotaSettings, Tier
from ..errors import ApiError, format_duration
from ..ops import metrics
from .billing import MAX_UNITS, Usage, cost_units, format_usd, month_bounds
from .db import connection, is_sqlite, write_transaction
from .journal import catch_up
from .keys import KeyInfo
from .models import ApiKey, QuotaReservation, UsageDaily, utcnow

if TYPE_CHECKING:
    from ..api.validation import ChatRequest

# No hold is larger (about $900,000 or 9e15 tokens): the sum of a key's holds and its
# month stay far inside the ledger's 64-bit integers whatever a request asks for.
HOLD_CEILING = MAX_UNITS // 1024


@dataclass(frozen=True)
class Hold:
    """The most a request may use: held against the quota and the cap while in flight."""

    tokens: int
    cost_units: int


def hold_for(chat: ChatRequest, settings: QuotaSettings) -> Hold:
    """The request's worst case: its prompt estimate at the uncached input price and its
    completion allowance at the output price, in the billing's exact cost units."""
    limit = chat.completion_limit or settings.default_completion_tokens
    worst = Usage(prompt=chat.prompt_estimate, completion=limit * chat.choices)
    return Hold(
        min(worst.total, HOLD_CEILING),
        min(cost_units(chat.model.price, worst), HOLD_CEILING),
    )


@dataclass(frozen=True)
class MonthUsage:
    """A key's calendar month so far (from the daily roll-ups) and its holds in flight."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_units: int = 0
    reserved_tokens: int = 0
    reserved_cost_units: int = 0
    lapsed_reservations: int = 0


def month_usage(key_id: int, now: dt.datetime) -> MonthUsage:
    """One statement, so usage and reservations come from the same snapshot: a request
    settling in between cannot be counted twice or not at all."""
    start, _ = month_bounds(now)
    mine = QuotaReservation.key == key_id
    live = [
        QuotaReservation.select(fn.COALESCE(fn.SUM(field), 0)).where(
            mine & (QuotaReservation.expires_at > now)
        )
        for field in (QuotaReservation.tokens, QuotaReservation.cost_units)
    ]
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
        UsageDaily.select(*sums, *live, lapsed)
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


class Refusal(ApiError):
    """429 insufficient_quota, for the token quota or the spend cap (`limit`)."""

    def __init__(self, limit: str, message: str, **options: Any) -> None:
        super().__init__(429, message, **options)
        self.limit = limit


def _refuse(
    limit: str, message: str, now: dt.datetime, resets_at: dt.datetime, **headers: str
) -> Refusal:
    """429 insufficient_quota: nothing changes before the month ends, so the openai SDK
    is told not to retry."""
    return Refusal(
        limit,
        f"{message} It resets on {resets_at:%Y-%m-%d} 00:00 UTC.",
        type="insufficient_quota",
        code="insufficient_quota",
        headers={
            "Retry-After": str(int((resets_at - now).total_seconds()) + 1),
            "x-should-retry": "false",
            **headers,
        },
    )


def _check_tokens(
    limit: int | None, usage: MonthUsage, now: dt.datetime, resets_at: dt.datetime
) -> QuotaState | None:
    if limit is None:
        return None
    state = QuotaState(limit, usage.total_tokens, usage.reserved_tokens, resets_at)
    if usage.total_tokens + usage.reserved_tokens >= limit:
        raise _refuse(
            "tokens",
            f"You exceeded your monthly token quota of {limit} tokens "
            f"({usage.total_tokens} used, {usage.reserved_tokens} held by requests "
            "in progress).",
            now,
            resets_at,
            **state.headers(),
        )
    return state


def _check_spend(key: KeyInfo, usage: MonthUsage, now: dt.datetime, resets_at: dt.datetime) -> None:
    cap = key.spend_cap_units
    if cap is None or usage.cost_units + usage.reserved_cost_units < cap:
        return
    held = usage.reserved_cost_units
    in_progress = f", ${format_usd(held)} held by requests in progress" if held else ""
    raise _refuse(
        "spend",
        f"This key reached its monthly spend cap of ${format_usd(cap)} "
        f"(${format_usd(usage.cost_units)} spent this month{in_progress}).",
        now,
        resets_at,
    )


def reserve(
    key: KeyInfo, tier: Tier, chat: ChatRequest, settings: QuotaSettings
) -> tuple[int | None, QuotaState | None]:
    """Hold the request's worst case (`hold_for`), or refuse it with 429 insufficient_quota.

    Returns the reservation's id (None when the key has neither a token quota nor a
    spend cap) and the token quota's state for the response headers.

    The ledger may still hold the reservation of a request that was just answered, its
    record waiting in a journal (keymeai.ledger.journal): a refusal is only final once the
    journals are applied, or a client that asks again at once would be refused for a
    request it no longer has in flight.
    """
    limit = token_quota(key, tier)
    if limit is None and key.spend_cap_units is None:
        return None, None
    hold = hold_for(chat, settings)
    try:
        return _admit(key, limit, hold, settings)
    except Refusal:
        catch_up()
    try:
        return _admit(key, limit, hold, settings)
    except Refusal as refusal:
        metrics.REJECTIONS.labels(refusal.limit).inc()
        raise


def _admit(
    key: KeyInfo, limit: int | None, hold: Hold, settings: QuotaSettings
) -> tuple[int, QuotaState | None]:
    """One admission check and, when it passes, the reservation, in one transaction."""
    now = utcnow()
    _, resets_at = month_bounds(now)
    with connection(), write_transaction():
        if not is_sqlite():
            # Serialise admissions per key; SQLite's IMMEDIATE transaction already does.
            ApiKey.select(ApiKey.id).where(ApiKey.id == key.id).for_update().execute()
        usage = month_usage(key.id, now)
        if usage.lapsed_reservations:
            QuotaReservation.delete().where(
                (QuotaReservation.key == key.id) & (QuotaReservation.expires_at <= now)
            ).execute()
        state = _check_tokens(limit, usage, now, resets_at)
        _check_spend(key, usage, now, resets_at)
        reservation = QuotaReservation.create(
            key=key.id,
            tokens=hold.tokens,
            cost_units=hold.cost_units,
            expires_at=now + dt.timedelta(seconds=settings.reservation_seconds),
        )
    if state is not None:
        state = replace(state, reserved=state.reserved + hold.tokens)
    return reservation.id, state
