"""Customer API keys: creation, lookup and the operator's changes.

A key is `km-` plus 43 URL-safe random characters (256 bits). Only its SHA-256 is
stored: with that much entropy a slow password hash adds cost and no safety. The first
11 characters (`km-` and 8 more) are kept as the visible prefix operators refer to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .db import connection, write_transaction
from .models import ApiKey, utcnow

KEY_RE = re.compile(r"km-[A-Za-z0-9_-]{32,200}")
PREFIX_LENGTH = 11
MAX_ID = 2**63 - 1
MODEL_SEPARATOR = ","  # `allowed_models` is stored as one ","-joined text
MAX_NAME_LENGTH = 200  # the ledger's column
# C0 controls, DEL and C1 controls (Unicode's Cc): a name is shown in tables, pages, logs.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
EXPIRY_FORMAT = (
    "an ISO 8601 date or time (UTC unless an offset is given), "
    'e.g. "2027-01-31" or "2027-01-31T12:00:00Z"'
)


class UnknownKey(LookupError):
    """No single key matches the operator's reference."""


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its key: a snapshot, safe to cache."""

    id: int
    name: str
    prefix: str
    tier: str
    request_limits: tuple[str, ...] | None
    tokens_per_month: int | None
    allowed_models: frozenset[str] | None
    spend_cap_units: int | None
    expires_at: dt.datetime | None
    revoked: bool
    max_concurrent: int | None = None  # overrides the tier's

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        models = split_models(row.allowed_models)
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            tier=row.tier,
            request_limits=tuple(row.request_limits.split(";")) if row.request_limits else None,
            tokens_per_month=row.tokens_per_month,
            allowed_models=frozenset(models) if models else None,
            spend_cap_units=row.spend_cap_units,
            expires_at=row.expires_at,
            revoked=row.revoked_at is not None,
            max_concurrent=row.max_concurrent,
        )

    def expired(self) -> bool:
        """Whether the key has expired; the clock is read only for a key that can."""
        return self.expires_at is not None and self.expires_at <= utcnow()


def check_name(value: str, label: str = "name") -> str:
    """A key's name as stored (stripped), or ValueError saying what is wrong.

    The one rule for every way a name is set (admin API, CLI), so they cannot drift.
    """
    if not value.strip():
        raise ValueError(f"{label} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{label} must be at most {MAX_NAME_LENGTH} characters")
    if CONTROL.search(value):
        raise ValueError(f"{label} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape or undecodable argv
        raise ValueError(f"{label} must be valid Unicode text") from None
    return value.strip()


def parse_expiry(text: str, label: str = "expires_at") -> dt.datetime:
    """An expiry as stored (naive UTC), from ISO 8601 text; ValueError if it is not one
    or is not in the future. Shared by the admin API and the CLI, like `check_name`."""
    try:
        moment = dt.datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):  # OverflowError: 9999-12-31T23:59-23:59 in UTC
        raise ValueError(f"{label} must be {EXPIRY_FORMAT}") from None
    if moment <= utcnow():
        raise ValueError(f"{label} is in the past; to stop a key now, revoke it")
    return moment


def generate_key() -> str:
    return "km-" + secrets.token_urlsafe(32)


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def is_well_formed(plain: str) -> bool:
    return KEY_RE.fullmatch(plain) is not None


def lookup(plain: str) -> KeyInfo | None:
    """The key whose hash matches, revoked or not; None if there is none."""
    with connection():
        row = ApiKey.get_or_none(ApiKey.key_hash == hash_key(plain))
    return KeyInfo.from_row(row) if row else None


def create_key(
    name: str, tier: str, expires_at: dt.datetime | None = None, **settings: object
) -> tuple[ApiKey, str]:
    """Store a new key; the plain key is returned once and never again.

    `settings` (limits, allow-list, spend cap) go in the same INSERT, so a key handed
    out by a sign-up site is never usable without them.
    """
    plain = generate_key()
    with connection():
        row = ApiKey.create(
            name=name,
            tier=tier,
            prefix=plain[:PREFIX_LENGTH],
            key_hash=hash_key(plain),
            expires_at=expires_at,
            **settings,
        )
    return row, plain


def find_key(ref: str) -> ApiKey:
    """The key named by its id (`12`) or its visible prefix (`km-AbCd1234`)."""
    ref = ref.strip()
    with connection():
        if ref.isascii() and ref.isdigit():  # not "²": a digit to isdigit(), not to int()
            row = ApiKey.get_or_none(ApiKey.id == int(ref)) if int(ref) <= MAX_ID else None
            if row is None:
                raise UnknownKey(f"no key with id {ref[:20]}")
            return row
        if ref.startswith("km-") and len(ref) > PREFIX_LENGTH:
            # A full key pasted by the operator: match on its hash, never store it.
            row = ApiKey.get_or_none(ApiKey.key_hash == hash_key(ref))
        else:
            rows = list(ApiKey.select().where(ApiKey.prefix == ref).limit(2))
            if len(rows) > 1:
                raise UnknownKey(f"prefix {ref} matches several keys; use the key id")
            row = rows[0] if rows else None
    if row is None:
        raise UnknownKey(f"no key with prefix {ref[:PREFIX_LENGTH]}")
    return row


def list_keys() -> list[ApiKey]:
    with connection():
        return list(ApiKey.select().order_by(ApiKey.id))


def update_key(row: ApiKey, **fields: object) -> ApiKey:
    """Write changed fields of a key (tier, limits, revocation...)."""
    with connection(), write_transaction():
        ApiKey.update(**fields).where(ApiKey.id == row.id).execute()
        return ApiKey.get_by_id(row.id)


def key_status(row: ApiKey, now: dt.datetime) -> str:
    """ "active", "revoked" or "expired", as the gateway would treat the key at `now`."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def join_models(models: list[str] | None) -> str | None:
    """An allow-list as stored: None (every model) or the ids joined by ","."""
    return MODEL_SEPARATOR.join(models) if models is not None else None


def check_models(models: Iterable[str], configured: Collection[str]) -> list[str]:
    """An allow-list to store: configured model ids, duplicates dropped, order kept."""
    allowed = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not allowed:
        raise ValueError("no model given; to allow every model, clear the allow-list")
    unknown = [m for m in allowed if m not in configured]
    if unknown:
        raise ValueError(
            f"unknown model {', '.join(map(repr, unknown))[:300]} "
            f"(configured: {', '.join(configured)})"
        )
    return allowed


def split_models(stored: str | None) -> list[str] | None:
    return stored.split(MODEL_SEPARATOR) if stored else None


def revoke_key(row: ApiKey) -> ApiKey:
    if row.revoked_at is not None:
        return row
    return update_key(row, revoked_at=utcnow())
