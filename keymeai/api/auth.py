"""Bearer-key authentication, with a short in-process cache in front of the ledger.

Most requests come from a few keys in bursts; caching each lookup for a couple of
seconds spares the ledger a query per request while a revoked key still stops working
on every instance within `gateway.key_cache_seconds` (at most 5 s).
"""

from __future__ import annotations

import threading
import time

from flask import request

from ..errors import ApiError, anthropic_route, invalid_api_key
from ..ledger.keys import KeyInfo, hash_key, is_well_formed, lookup
from . import guesses

MAX_CACHED = 10_000


class KeyCache:
    """Key lookups by hash, each kept `ttl` seconds; unknown keys are cached too."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}
        self._lock = threading.Lock()

    def get(self, plain: str) -> KeyInfo | None:
        digest = hash_key(plain)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] > now:
            return entry[1]
        info = lookup(plain)
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) >= MAX_CACHED:
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl, info)
        return info

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def authenticate(cache: KeyCache) -> KeyInfo:
    """The active key of the current request, or a 401 in OpenAI's words.

    `Authorization: Bearer`; on the Anthropic Messages routes also `x-api-key`, which the
    anthropic SDK sends (elsewhere it is not a key: OpenAI's clients never send it)."""
    header = request.headers.get("Authorization", "").strip()
    anthropic = anthropic_route()
    api_key = request.headers.get("x-api-key", "").strip() if anthropic else ""
    if not header and api_key:
        return check_key(api_key, cache)
    if not header:
        where = "an x-api-key header or " if anthropic else ""
        raise invalid_api_key(
            f"You didn't provide an API key. You need to provide your API key in {where}an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise invalid_api_key(
            "The Authorization header must use Bearer auth (Authorization: Bearer km-...)."
        )
    return check_key(token, cache)


def check_key(token: str, cache: KeyCache) -> KeyInfo:
    """The active key `token` names, or a 401 in OpenAI's words; shared by the API and
    the customer page, so both refuse a key for the same reasons."""
    if not is_well_formed(token):
        raise invalid_api_key("Incorrect API key provided. Keys look like km-...")
    info = cache.get(token)
    if info is None:
        raise invalid_api_key(f"Incorrect API key provided: {token[:7]}****.")
    if info.revoked:
        raise invalid_api_key(f"This API key ({info.prefix}...) has been revoked.")
    if info.expired():
        raise invalid_api_key(f"This API key ({info.prefix}...) has expired.")
    return info


def require_admin_token(token: str) -> None:
    """Let the request through only with `Authorization: Bearer <admin token>`; wrong
    tokens are counted per client address (keymeai.api.guesses)."""
    header = request.headers.get("Authorization", "")
    scheme, _, supplied = header.partition(" ")
    bearer = supplied.strip() if scheme.lower() == "bearer" else ""
    if not guesses.is_admin_token(bearer, token):
        raise ApiError(401, "This endpoint needs the admin token.", code="invalid_admin_token")
