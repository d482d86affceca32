"""Invite codes for self-service sign-up: made by operators, redeemed at /signup.

A code is `inv-` plus 24 URL-safe random characters (144 bits); like a key, only its
SHA-256 is stored, with the first 12 characters as the prefix operators refer to. A code
grants its tier and stops after `max_uses` keys; redeeming it counts the use and creates
the key in one transaction, so concurrent sign-ups cannot pass the bound. Operators
manage codes with `flask --app app invites ...`, the admin API (`/admin/invites`, below)
and the dashboard.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

from flask import Blueprint, Response

from ..errors import ApiError, invalid
from ..ledger import keys
from ..ledger.db import connection, write_transaction
from ..ledger.models import ApiKey, InviteCode, utcnow
from . import admin

PREFIX_LENGTH = 12
MAX_NOTE_LENGTH = 200
MAX_USES = 1_000_000_000


class UnknownInvite(LookupError):
    """No single code matches the operator's reference."""


def hash_code(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8", "surrogatepass")).hexdigest()


def status(row: InviteCode, now: dt.datetime) -> str:
    """ "active", "revoked", "expired" or "used up"."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    if row.max_uses is not None and row.uses >= row.max_uses:
        return "used up"
    return "active"


def check_note(value: str) -> str:
    if len(value) > MAX_NOTE_LENGTH:
        raise ValueError(f"the note must be at most {MAX_NOTE_LENGTH} characters")
    if keys.CONTROL.search(value):
        raise ValueError("the note must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raise ValueError("the note must be valid Unicode text") from None
    return value.strip()


def create(
    tier: str, max_uses: int | None = None, expires_at: dt.datetime | None = None, note: str = ""
) -> tuple[InviteCode, str]:
    """Store a new code; the plain code is returned once and never again."""
    plain = "inv-" + secrets.token_urlsafe(18)
    with connection():
        row = InviteCode.create(
            code_hash=hash_code(plain),
            prefix=plain[:PREFIX_LENGTH],
            tier=tier,
            max_uses=max_uses,
            expires_at=expires_at,
            note=note,
        )
    return row, plain


def list_all() -> list[InviteCode]:
    with connection():
        return list(InviteCode.select().order_by(InviteCode.id))


def find(ref: str) -> InviteCode:
    """The code named by its id, its prefix or the code itself."""
    ref = ref.strip()
    with connection():
        if ref.isascii() and ref.isdigit() and int(ref) <= keys.MAX_ID:
            row = InviteCode.get_or_none(InviteCode.id == int(ref))
        elif len(ref) > PREFIX_LENGTH:
            row = InviteCode.get_or_none(InviteCode.code_hash == hash_code(ref))
        else:
            rows = list(InviteCode.select().where(InviteCode.prefix == ref).limit(2))
            if len(rows) > 1:
                raise UnknownInvite(f"prefix {ref} matches several codes; use the code's id")
            row = rows[0] if rows else None
    if row is None:
        raise UnknownInvite(f"no invite code {ref[:PREFIX_LENGTH]}")
    return row


def revoke(row: InviteCode) -> InviteCode:
    if row.revoked_at is None:
        with connection(), write_transaction():
            InviteCode.update(revoked_at=utcnow()).where(InviteCode.id == row.id).execute()
            row = InviteCode.get_by_id(row.id)
    return row


def redeem(plain: str, name: str, address: str, email: str | None) -> tuple[ApiKey, str] | None:
    """A new key of the code's tier, its use counted; None if the code is unknown,
    revoked, expired or used up (the caller must not say which)."""
    now = utcnow()
    with connection(), write_transaction():
        row = InviteCode.get_or_none(InviteCode.code_hash == hash_code(plain))
        if row is None or status(row, now) != "active":
            return None
        counted = (
            InviteCode.update(uses=InviteCode.uses + 1)
            .where(
                (InviteCode.id == row.id)
                & (InviteCode.max_uses.is_null() | (InviteCode.uses < InviteCode.max_uses))
            )
            .execute()
        )
        if counted != 1:
            return None
        return keys.create_key(
            name,
            row.tier,
            origin=f"invite:{row.id}",
            origin_address=address,
            origin_email=email,
        )


def give_back(key: ApiKey) -> None:
    """Undo a sign-up whose key could not be delivered: revoke the key, return the use."""
    keys.revoke_key(key)
    if key.origin and key.origin.startswith("invite:"):
        with connection(), write_transaction():
            InviteCode.update(uses=InviteCode.uses - 1).where(
                (InviteCode.id == int(key.origin.split(":")[1])) & (InviteCode.uses > 0)
            ).execute()


def invite_object(row: InviteCode, now: dt.datetime) -> dict[str, Any]:
    """A code as the admin API shows it: never its hash."""
    return {
        "object": "invite",
        "id": row.id,
        "prefix": row.prefix,
        "tier": row.tier,
        "uses": row.uses,
        "max_uses": row.max_uses,
        "note": row.note,
        "status": status(row, now),
        "created_at": admin.iso(row.created_at),
        "expires_at": admin.iso(row.expires_at),
        "revoked_at": admin.iso(row.revoked_at),
    }


# The admin API: /admin/invites, behind the admin token like the rest of /admin.

bp = Blueprint("invites", __name__, url_prefix="/admin/invites")
bp.before_request(admin.require_admin)

INVITE_FIELDS = ("tier", "max_uses", "expires_at", "note")


def _max_uses(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_USES:
        raise invalid(f"max_uses must be an integer from 1 to {MAX_USES}, or null", "max_uses")
    return value


def _note(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("note must be a string", "note")
    try:
        return check_note(value)
    except ValueError as exc:
        raise invalid(str(exc), "note") from None


def _find(ref: str) -> InviteCode:
    if len(ref) > PREFIX_LENGTH:
        raise invalid("Name a code by its id or its prefix, never by the code itself.")
    try:
        return find(ref)
    except UnknownInvite as exc:
        raise ApiError(404, f"No such invite: {exc}.", code="invite_not_found") from None


@bp.post("")
def create_invite() -> Response:
    """Make a code; the response is the only place the plain code ever appears."""
    body = admin.body()
    for name in body:
        if name not in INVITE_FIELDS:
            raise invalid(f"Unrecognized request argument supplied: {admin.echo(name)}")
    if "tier" not in body:
        raise invalid("you must provide a tier parameter", "tier")
    row, plain = create(
        admin.parse_tier(body["tier"]),
        _max_uses(body.get("max_uses")),
        admin.parse_expires_at(body.get("expires_at")),
        _note(body.get("note", "")),
    )
    response = admin.json_response({**invite_object(row, utcnow()), "code": plain}, 201)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("")
def list_invites() -> Response:
    now = utcnow()
    return admin.json_response(
        {"object": "list", "data": [invite_object(row, now) for row in list_all()]}
    )


@bp.post("/<ref>/revoke")
@bp.delete("/<ref>")
def revoke_invite(ref: str) -> Response:
    """Revoke (idempotent): the code makes no more keys; keys it made stay."""
    return admin.json_response(invite_object(revoke(_find(ref)), utcnow()))
