"""Wrong admin tokens, counted per client address: `/admin/*`, `/metrics` and the
dashboard's sign-in share one count, so no door lets an address guess faster.

The count is a fixed window of the app's limiter (its strategy over its storage: memory,
or Redis shared by every instance). The client is `request.remote_addr`, as for the
pages' own limits: the peer, or the client named by trusted proxies (ProxyFix).

Each attempt is compared first, then counted atomically: a wrong token increments the
window and is refused with 429 once the increment passes the limit; a right one only
reads the window and is refused with 429 while it is full. Any number of concurrent
guesses thus gets at most ATTEMPTS.amount answers of 401; every other answer to a
blocked address is 429, right token or not, so nothing is learnt from them.

A storage error follows `ratelimit.on_storage_error`: "deny" raises it (503, as for every
limit), "allow" counts in this process's memory until the storage answers again.
"""

from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, current_app, g
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, RateLimiter

from ..errors import ApiError, retry_after
from ..ops import metrics

log = logging.getLogger(__name__)

ATTEMPTS: RateLimitItem = parse("10 per minute")
SCOPE = "admin-token-guesses"
EXTENSION = "keymeai.guesses"


class GuessCounter:
    """The wrong-token windows of one app: its limiter's, or memory while that is down."""

    def __init__(self, limiter: Limiter, fail_open: bool) -> None:
        self.limiter = limiter
        self.fail_open = fail_open
        self.fallback = FixedWindowRateLimiter(MemoryStorage())
        self.degraded = False

    def admit(self, correct: bool, client: str) -> bool:
        """Count a wrong attempt or look at the window for a right one: whether the
        address may have its answer (False: it is blocked)."""
        try:
            allowed = self._count(self.limiter.limiter, correct, client)
        except StorageError as exc:
            if not self.fail_open:
                raise
            self._went_down(exc)
            return self._count(self.fallback, correct, client)
        if self.degraded:
            self.degraded = False
            log.info("admin token guesses: limiter storage answers again")
        return allowed

    def retry_after(self, client: str) -> int:
        """Seconds until the address's window ends."""
        strategy = self.fallback if self.degraded else self.limiter.limiter
        try:
            reset_at = strategy.get_window_stats(ATTEMPTS, SCOPE, client).reset_time
        except StorageError:
            return int(ATTEMPTS.get_expiry())
        return retry_after(reset_at, time.time())

    @staticmethod
    def _count(strategy: RateLimiter, correct: bool, client: str) -> bool:
        if correct:
            return strategy.test(ATTEMPTS, SCOPE, client)
        return strategy.hit(ATTEMPTS, SCOPE, client)

    def _went_down(self, exc: StorageError) -> None:
        if not self.degraded:
            self.degraded = True
            log.warning(
                "admin token guesses: limiter storage unreachable, counting in memory: %s",
                type(exc.storage_error).__name__,
                extra={"request_id": g.get("request_id")},
            )


def init_app(app: Flask, limiter: Limiter, fail_open: bool) -> None:
    app.extensions[EXTENSION] = GuessCounter(limiter, fail_open)


def is_admin_token(supplied: str, token: str) -> bool:
    """Whether `supplied` is the admin token (compared in constant time), counting a
    wrong one against the client's address; 429 while the address is blocked.

    No token at all guesses nothing (a scraper not given the token yet): it is refused
    without counting, so it cannot lock its own address out of the admin API."""
    if not supplied:
        return False
    correct = hmac.compare_digest(_utf8(supplied), _utf8(token))
    counter: GuessCounter = current_app.extensions[EXTENSION]
    client = get_remote_address()
    if counter.admit(correct, client):
        return correct
    metrics.REJECTIONS.labels("admin_token").inc()
    wait = counter.retry_after(client)
    raise ApiError(
        429,
        f"Too many wrong admin tokens from your address (limit: {ATTEMPTS}). "
        f"Please try again in {wait} seconds.",
        code="too_many_attempts",
        headers={"Retry-After": str(wait)},
    )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
