"""Dashboard sessions kept in the ledger, so that signing out ends one for good.

The signed cookie alone cannot be taken back: a copy made before sign-out would stay
valid until it expired. Here the cookie carries a random token and the ledger keeps a
row per signed-in session; signing out deletes the row, so every copy of the cookie
stops working at once, on every instance.

The row holds an HMAC of the token keyed by the admin token, never the token itself: a
copy of the ledger opens no session, and rows made under an old admin token match no
cookie once the token changes (the cookie's signature fails before that anyway). A
session ends after IDLE without a visit; `last_seen_at` is written at most once per
TOUCH_EVERY to spare the ledger a write per page, and sign-in sweeps out idle rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from ..ledger.db import connection, write_transaction
from ..ledger.models import DashboardSession, utcnow

IDLE = dt.timedelta(hours=8)
TOUCH_EVERY = dt.timedelta(minutes=1)
ROW_KEY_SALT = b"keymeai dashboard session row"


def _digest(token: str, admin_token: str) -> str:
    key = hmac.new(admin_token.encode(), ROW_KEY_SALT, hashlib.sha256).digest()
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def start(admin_token: str) -> str:
    """A new session's token (for the cookie), its row written; idle rows swept out."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with connection(), write_transaction():
        DashboardSession.delete().where(DashboardSession.last_seen_at < now - IDLE).execute()
        DashboardSession.create(
            token_hash=_digest(token, admin_token), created_at=now, last_seen_at=now
        )
    return token


def is_live(token: str, admin_token: str) -> bool:
    """Whether the session is signed in and not idle past IDLE; notes the visit."""
    now = utcnow()
    digest = _digest(token, admin_token)
    with connection():
        row = DashboardSession.get_or_none(DashboardSession.token_hash == digest)
        if row is None or row.last_seen_at < now - IDLE:
            return False
        if row.last_seen_at < now - TOUCH_EVERY:
            with write_transaction():
                DashboardSession.update(last_seen_at=now).where(
                    DashboardSession.id == row.id
                ).execute()
    return True


def end(token: str, admin_token: str) -> None:
    """Sign the session out everywhere: its cookie opens nothing from now on."""
    with connection(), write_transaction():
        DashboardSession.delete().where(
            DashboardSession.token_hash == _digest(token, admin_token)
        ).execute()
