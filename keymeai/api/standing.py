"""`GET /v1/usage`: a key's own standing, for the customer holding it.

What the response headers tell after each request, asked for at any time and in one
place: the tier, this month's requests, tokens and cost from the ledger, and every limit
in force with what is left of it and when it resets. Reading it costs no request of the
limit (it is not rate-limited) and shows nothing of any other key.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

from flask import Blueprint, Response, g, jsonify
from limits.errors import StorageError

from .. import gateway
from ..config import Tier
from ..ledger.billing import format_usd, month_bounds
from ..ledger.db import connection
from ..ledger.journal import catch_up
from ..ledger.keys import KeyInfo
from ..ledger.models import utcnow
from ..ledger.quota import month_usage, token_quota
from . import concurrency
from .limits import current_windows
from .serve import require_key

log = logging.getLogger(__name__)

bp = Blueprint("standing", __name__, url_prefix="/v1")
bp.before_request(require_key)


def _iso(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with a Z, to the second."""
    return moment.replace(microsecond=0).isoformat() + "Z"


def _reset(resets_at: dt.datetime, now: dt.datetime) -> dict[str, Any]:
    return {
        "resets_at": _iso(resets_at),
        "resets_in_seconds": max(0, math.ceil((resets_at - now).total_seconds())),
    }


def _request_limits(key: KeyInfo, tier: Tier) -> list[dict[str, Any]] | None:
    """Each request limit's window; None when the limiter storage cannot be read."""
    try:
        windows = current_windows(gateway.current().limiter, key, tier)
    except StorageError as exc:
        log.warning("usage: rate limit storage unreachable: %s", type(exc.storage_error).__name__)
        return None
    now = utcnow()
    not_started = {"resets_at": None, "resets_in_seconds": None}
    entries = []
    for item, (reset_epoch, remaining) in windows:
        used = item.amount - remaining
        reset = dt.datetime.fromtimestamp(reset_epoch, dt.UTC).replace(tzinfo=None)
        entries.append(
            {
                "limit": str(item),
                "max_requests": item.amount,
                "window_seconds": item.get_expiry(),
                "used": used,
                "remaining": remaining,
                # A window starts with its first request.
                **(_reset(reset, now) if used else not_started),
            }
        )
    return entries


@bp.get("/usage")
def usage() -> Response:
    return jsonify(standing(g.api_key, g.tier))


def standing(key: KeyInfo, tier: Tier) -> dict[str, Any]:
    """A key's standing: the body of `GET /v1/usage`, and the figures the customer page
    and the dashboard's key page show."""
    now = utcnow()
    start, end = month_bounds(now)
    catch_up()  # every request answered so far, whichever worker journaled it
    with connection():
        month = month_usage(key.id, now)
    tokens = token_quota(key, tier)
    cap = key.spend_cap_units
    return {
        "object": "usage",
        "key": {"id": key.id, "prefix": key.prefix, "name": key.name},
        "tier": tier.name,
        "period": {"start": _iso(start), "end": _iso(end), **_reset(end, now)},
        "usage": {
            "requests": month.requests,
            "prompt_tokens": month.prompt_tokens,
            "completion_tokens": month.completion_tokens,
            "total_tokens": month.total_tokens,
            "cost": format_usd(month.cost_units),
        },
        "limits": {
            "requests": _request_limits(key, tier),
            "tokens": None
            if tokens is None
            else {
                "limit": tokens,
                "used": month.total_tokens,
                "in_flight": month.reserved_tokens,
                "remaining": max(0, tokens - month.total_tokens - month.reserved_tokens),
                **_reset(end, now),
            },
            "concurrency": concurrency.standing(key, tier),
            "spend": None
            if cap is None
            else {
                "limit": format_usd(cap),
                "used": format_usd(month.cost_units),
                "in_flight": format_usd(month.reserved_cost_units),
                "remaining": format_usd(max(0, cap - month.cost_units - month.reserved_cost_units)),
                **_reset(end, now),
            },
        },
    }
