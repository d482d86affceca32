"""The admin HTTP API under /admin: what a sign-up site or an operator's tools drive.

Keys (create, list, read, change, revoke) and any key's usage and cost, JSON in and out,
every mistake a 4xx in OpenAI's error shape. It answers only to
`Authorization: Bearer $KEYMEAI_ADMIN_TOKEN` (compared in constant time); without that
variable the whole API is off and answers 404. Customer keys are never accepted here,
and the customer rate limiter does not apply: these routes carry no customer key.

Money goes out as exact decimal strings ("25.00", "0.0002970000"), never as JSON
numbers a client would read into a float. Key hashes never leave the ledger; the plain
key is in the creation response only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Response, request, url_for

from .. import gateway
from ..api.auth import require_admin_token
from ..api.concurrency import MAX_CONCURRENT
from ..api.validation import parse_json_body
from ..config import ConfigError, validate_limits
from ..errors import ApiError, invalid
from ..ledger import keys, reports
from ..ledger.billing import MAX_UNITS, format_usd, parse_usd
from ..ledger.models import ApiKey, utcnow

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin")

MAX_LIMIT_STRINGS = 10
MAX_ECHO = 100  # characters of a client's value quoted back in an error message
USAGE_PARAMS = ("month", "key", "by", "format")


@bp.before_request
def require_admin() -> None:
    token = gateway.current().config.admin_token
    if token is None:
        raise ApiError(
            404,
            "The admin API is disabled on this server (KEYMEAI_ADMIN_TOKEN is not set).",
            code="admin_api_disabled",
        )
    require_admin_token(token)


def json_response(body: Any, status: int = 200) -> Response:
    """JSON with the fields in the order written (Flask's provider would sort them), and
    non-ASCII text escaped: whatever a name holds, the response can be encoded."""
    return Response(json.dumps(body), status, mimetype="application/json")


def iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"


def key_object(row: ApiKey, now: dt.datetime) -> dict[str, Any]:
    """A key as the admin API shows it: settings and state, never its hash."""
    return {
        "object": "api_key",
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "tier": row.tier,
        "status": keys.key_status(row, now),
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
        "allowed_models": keys.split_models(row.allowed_models),
        "requests": row.request_limits.split(";") if row.request_limits else None,
        "tokens_per_month": row.tokens_per_month,
        "spend_cap": format_usd(row.spend_cap_units) if row.spend_cap_units is not None else None,
        "max_concurrent": row.max_concurrent,
        "origin": row.origin,  # "invite:<id>" or "open" for a sign-up; null for an operator's
        "origin_address": row.origin_address,
    }


# Each settable field: a parser from the JSON value to the ledger column's value; a
# bad value is a 400 naming the field.


def echo(text: str) -> str:
    """A client's text fit to quote in an error: short, and encodable (a lone surrogate
    from a JSON escape would break the response)."""
    return text[:MAX_ECHO].encode("utf-8", "replace").decode("utf-8")


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("name must be a non-empty string", "name")
    try:
        return keys.check_name(value)
    except ValueError as exc:
        raise invalid(str(exc), "name") from None


def parse_tier(value: Any) -> str:
    tiers = gateway.current().config.tiers
    if not isinstance(value, str) or value not in tiers:
        shown = repr(value)[:MAX_ECHO] if isinstance(value, str) else type(value).__name__
        raise invalid(f"unknown tier {shown}; configured tiers: {', '.join(tiers)}", "tier")
    return value


def parse_expires_at(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        message = f"expires_at must be {keys.EXPIRY_FORMAT}, or null for no expiry"
        raise invalid(message, "expires_at")
    try:
        return keys.parse_expiry(value)
    except ValueError as exc:
        raise invalid(str(exc), "expires_at") from None


def _allowed_models(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise invalid(
            "allowed_models must be an array of model ids, or null for every model",
            "allowed_models",
        )
    try:
        return keys.join_models(keys.check_models(value, gateway.current().config.models))
    except ValueError as exc:
        raise invalid(f"allowed_models: {exc}", "allowed_models") from None


def _requests(value: Any) -> str | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not 0 < len(items) <= MAX_LIMIT_STRINGS
        or not all(isinstance(item, str) and len(item) <= MAX_ECHO for item in items)
    ):
        raise invalid(
            f'requests must be an array of 1 to {MAX_LIMIT_STRINGS} limit strings such as "500 '
            "per minute\", or null for the tier's limits",
            "requests",
        )
    try:
        return ";".join(validate_limits(items, "requests"))
    except ConfigError as exc:
        raise invalid(str(exc), "requests") from None


def _tokens_per_month(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_UNITS:
        raise invalid(
            "tokens_per_month must be a positive integer, or null for the tier's quota",
            "tokens_per_month",
        )
    return value


def _spend_cap(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise invalid(
            'spend_cap must be an amount in USD as a string such as "25.00", or null for none',
            "spend_cap",
        )
    try:
        return parse_usd(value if isinstance(value, str) else repr(value))
    except ValueError as exc:
        raise invalid(f"spend_cap: {exc}", "spend_cap") from None


def _max_concurrent(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONCURRENT:
        raise invalid(
            f"max_concurrent must be an integer from 1 to {MAX_CONCURRENT}, or null for the "
            "tier's bound",
            "max_concurrent",
        )
    return value


SETTINGS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _name),
    "tier": ("tier", parse_tier),
    "expires_at": ("expires_at", parse_expires_at),
    "allowed_models": ("allowed_models", _allowed_models),
    "requests": ("request_limits", _requests),
    "tokens_per_month": ("tokens_per_month", _tokens_per_month),
    "spend_cap": ("spend_cap_units", _spend_cap),
    "max_concurrent": ("max_concurrent", _max_concurrent),
}
REQUIRED_ON_CREATE = ("name", "tier")


def parse_settings(body: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ledger columns a request body sets; 400 for an unknown or invalid field."""
    for name in body:
        if name not in SETTINGS:
            raise invalid(f"Unrecognized request argument supplied: {echo(name)}", echo(name))
    for name in required:
        if name not in body:
            raise invalid(f"you must provide a {name} parameter", name)
    changes = {}
    for name, value in body.items():
        column, parse = SETTINGS[name]
        changes[column] = parse(value)
    return changes


def body() -> dict[str, Any]:
    return parse_json_body(request.get_data(cache=False), request.content_type)


def _find(ref: str) -> ApiKey:
    """The key a URL names by id or visible prefix; 404 if there is none."""
    if ref.startswith("km-") and len(ref) > keys.PREFIX_LENGTH:
        raise invalid(
            "Name a key by its id or its prefix (km- and 8 characters), never by the key "
            "itself: URLs end up in logs."
        )
    try:
        return keys.find_key(ref)
    except keys.UnknownKey as exc:
        raise ApiError(404, f"No such key: {exc}.", code="key_not_found") from None


def note_change(row: ApiKey, action: str, fields: list[str]) -> None:
    """Log the change and drop this process's cached key lookups, so it applies here at
    once (other instances follow within `gateway.key_cache_seconds`). The dashboard's
    forms call it too."""
    gateway.current().keys.clear()
    log.info(
        f"admin: key {action}",
        extra={"key_id": row.id, "prefix": row.prefix, "fields": fields},
    )


@bp.post("/keys")
def create_key() -> Response:
    """Create a key; the response is the only place the plain key ever appears."""
    settings = parse_settings(body(), REQUIRED_ON_CREATE)
    name, tier = settings.pop("name"), settings.pop("tier")
    row, plain = keys.create_key(name, tier, **settings)
    note_change(row, "created", sorted(settings))
    response = json_response({**key_object(row, utcnow()), "key": plain}, 201)
    response.headers["Location"] = url_for(".get_key", ref=row.id)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/keys")
def list_keys() -> Response:
    now = utcnow()
    return json_response(
        {"object": "list", "data": [key_object(row, now) for row in keys.list_keys()]}
    )


@bp.get("/keys/<ref>")
def get_key(ref: str) -> Response:
    return json_response(key_object(_find(ref), utcnow()))


@bp.patch("/keys/<ref>")
def update_key(ref: str) -> Response:
    """Change any of the creation fields; null clears an optional one."""
    row = _find(ref)
    changes = parse_settings(body())
    if changes:
        row = keys.update_key(row, **changes)
        note_change(row, "updated", sorted(changes))
    return json_response(key_object(row, utcnow()))


@bp.post("/keys/<ref>/revoke")
@bp.delete("/keys/<ref>")
def revoke_key(ref: str) -> Response:
    """Revoke (idempotent). DELETE revokes too: the key's usage stays for billing."""
    row = keys.revoke_key(_find(ref))
    note_change(row, "revoked", [])
    return json_response(key_object(row, utcnow()))


@bp.get("/usage")
def usage() -> Response:
    """A month's usage and cost per key and model (or per day), JSON or CSV."""
    args = request.args
    for name in args:
        if name not in USAGE_PARAMS:
            raise invalid(
                f"Unknown query parameter {echo(name)!r} (known: {', '.join(USAGE_PARAMS)})",
                echo(name),
            )
    try:
        month = reports.parse_month(args["month"]) if "month" in args else None
    except ValueError:
        raise invalid("month must be YYYY-MM, e.g. 2026-01", "month") from None
    month = month or utcnow().date().replace(day=1)
    by = args.get("by", "model")
    if by not in reports.GROUPINGS:
        raise invalid(f"by must be one of {', '.join(reports.GROUPINGS)}", "by")
    fmt = args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise invalid("format must be json or csv", "format")
    key_id = _find(args["key"]).id if "key" in args else None

    rows = reports.monthly_usage(month, key_id, by)
    if fmt == "csv":
        filename = reports.csv_filename(month, key_id, by)
        return Response(
            reports.to_csv(rows, by),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return json_response(
        {
            "object": "list",
            "month": f"{month:%Y-%m}",
            "by": by,
            "key_id": key_id,
            "data": reports.as_dicts(rows, by),
            "total": reports.totals_dict(rows),
        }
    )
