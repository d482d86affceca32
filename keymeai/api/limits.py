"""Request-rate limits per key, by Flask-Limiter, from the tier table.

The identity is the API key (never the IP). Each key gets its tier's `requests`
strings, or its own (the Scale tier's per-key overrides). Storage is `memory://` for one
process, Redis for several. When Redis is unreachable, `ratelimit.on_storage_error`
decides: "allow" counts in each process's memory until Redis answers again
(Flask-Limiter's in-memory fallback), "deny" answers 503.

Flask-Limiter evaluates the limit once per request, in its own `before_request` hook:
the limit is the API blueprint's (`per_key`), and the API's authentication is an app
hook registered before Flask-Limiter's, so the key is known when the limit is counted.
A route decorator would cost a second pass of Flask-Limiter's machinery on every
request: its hook runs for every request of the app whatever else is configured (4.x
has no switch for it), and the decorator then evaluates again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, request
from flask_limiter import Limiter, RateLimitExceeded, RouteLimit
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import RedisStorage, Storage
from limits.strategies import STRATEGIES, FixedWindowRateLimiter
from limits.util import WindowStats

from ..config import Config, RateLimitSettings, Tier
from ..errors import ApiError, format_duration, retry_after
from ..ledger.keys import KeyInfo
from ..ops import metrics

log = logging.getLogger(__name__)

CHAT_ENDPOINT = "api.chat_completions"
# The endpoints that call a model (keymeai.api.unconfigured refuses one without a provider key
# before the request limit counts).
MODEL_ENDPOINTS = frozenset(
    [CHAT_ENDPOINT, "api.messages", "api.embeddings", "api.create_response"]
)
STRATEGY = "keymeai-fixed-window"
# Redis answers in well under a millisecond; a Redis that stops answering must not hold
# requests (or threads) for long. Errors are raised as limits' StorageError.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 1,
    "socket_connect_timeout": 1,
    "wrap_exceptions": True,
}
# limits' own fixed-window script (INCRBY, EXPIRE on the window's first hit) that also
# returns the window's remaining time, so one round trip yields what the headers need.
_INCR_EXPIRE_PTTL = b"""
local current = redis.call("incrby", KEYS[1], ARGV[2])
if tonumber(current) == tonumber(ARGV[2]) then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("pttl", KEYS[1])}
"""


class CountingFixedWindow(FixedWindowRateLimiter):
    """limits' fixed window, keeping each hit's count and reset time for the headers.

    Flask-Limiter reads the header values with `get_window_stats` after the hit: on
    Redis a GET and a TTL, two more round trips on every request. Here the hit returns
    them and they are kept for the request. In memory the count is read under the same
    lock as the increment: limits' MemoryStorage reads it after releasing its lock, so
    two threads taking the last slot together could both be refused.
    """

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage)
        self._lock = threading.Lock()
        self._script = (
            storage.get_connection().register_script(_INCR_EXPIRE_PTTL)
            if isinstance(storage, RedisStorage)
            else None
        )

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        key = item.key_for(*identifiers)
        count, reset_at = self._increment(key, item.get_expiry(), cost)
        g.setdefault("ratelimit_windows", {})[key] = WindowStats(
            reset_at, max(0, item.amount - count)
        )
        return count <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        windows: dict[str, WindowStats] = g.get("ratelimit_windows", {})
        stats = windows.get(item.key_for(*identifiers))
        return stats if stats is not None else super().get_window_stats(item, *identifiers)

    def _increment(self, key: str, expiry: int, cost: int) -> tuple[int, float]:
        """The window's count after adding `cost`, and when the window ends (epoch)."""
        if self._script is None:
            with self._lock:
                return self.storage.incr(key, expiry, cost), self.storage.get_expiry(key)
        storage: Any = self.storage
        try:
            count, ttl_ms = self._script([storage.prefixed_key(key)], [expiry, cost])
        except storage.base_exceptions as exc:
            raise StorageError(exc) from exc
        return int(count), time.time() + max(int(ttl_ms), 0) / 1000


STRATEGIES[STRATEGY] = CountingFixedWindow


def limits_in_force(key: KeyInfo, tier: Tier) -> tuple[str, ...]:
    """The key's own request limits (Scale), else its tier's."""
    return key.request_limits or tier.requests


def limit_key() -> str:
    """The current request's storage identity for its key's limits."""
    return storage_key(g.api_key)


def storage_key(key: KeyInfo) -> str:
    return f"key:{key.id}"


def request_limits() -> str:
    """The current key's limits, as one Flask-Limiter string ("a;b"); none for a request
    without a key, such as a CORS preflight (Flask answers OPTIONS itself). Flask-Limiter
    asks before it looks at the method, and takes any error as its storage failing."""
    key = g.get("api_key")
    return "" if key is None else ";".join(limits_in_force(key, g.tier))


def current_windows(
    limiter: Limiter, key: KeyInfo, tier: Tier
) -> list[tuple[RateLimitItem, WindowStats]]:
    """The key's request limits and their windows, without counting a request.

    The storage key is built as Flask-Limiter builds it for the chat route's limit: the
    key identity, then the endpoint as scope.
    """
    in_force = limits_in_force(key, tier)
    items = parse_many(";".join(in_force)) if in_force else []  # a tier may have none
    identity = storage_key(key)
    return [
        (item, limiter.limiter.get_window_stats(item, identity, CHAT_ENDPOINT)) for item in items
    ]


def storage_options(settings: RateLimitSettings) -> dict[str, Any]:
    """Options for the Redis client; `tls_verify = false` accepts a self-signed
    certificate, as hosted Redis add-ons (Heroku's) present on rediss:// URLs."""
    if settings.storage_uri.startswith("memory"):
        return {}
    if settings.storage_uri.startswith("rediss") and not settings.tls_verify:
        return {**REDIS_OPTIONS, "ssl_cert_reqs": "none"}
    return REDIS_OPTIONS


def create(config: Config) -> Limiter:
    """The app's Flask-Limiter, not yet on the app (see `init_app`)."""
    settings = config.ratelimit
    fail_open = settings.on_storage_error == "allow"
    limiter = Limiter(
        key_func=limit_key,
        storage_uri=settings.storage_uri,
        storage_options=storage_options(settings),
        strategy=STRATEGY,
        headers_enabled=False,  # OpenAI's header names are added below
        in_memory_fallback_enabled=fail_open,
        swallow_errors=fail_open,
        default_limits=[],
    )
    limiter.logger = log  # its storage warnings go out as the gateway's JSON log lines
    return limiter


def per_key(limiter: Limiter) -> RouteLimit:
    """The current key's request limits, for the API blueprint's POSTs (chat completions,
    embeddings; `GET /v1/models` and `GET /v1/usage` cost nothing). As a blueprint's limit
    it is counted by Flask-Limiter's hook. It is shared, under one storage key for every
    POST (the key's identity, then the chat route's name, as before there were others):
    a per-endpoint count would let a key spend its limit once per endpoint."""
    return limiter.shared_limit(
        request_limits, scope=CHAT_ENDPOINT, key_func=limit_key, methods=["POST"]
    )


def init_app(app: Flask, limiter: Limiter) -> None:
    """Put Flask-Limiter's hooks on the app (after the API's authentication hook, which
    they need), with OpenAI's 429 and the x-ratelimit-*-requests headers (the token
    quota's are set by `serve`, where the quota is checked)."""
    limiter.init_app(app)

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Response:
        metrics.REJECTIONS.labels("requests").inc()
        current = limiter.current_limit
        retry = retry_after(current.window.reset_time, time.time()) if current else 1
        return ApiError(
            429,
            f"Rate limit reached for requests: {exc.description} for this key. "
            f"Please try again in {format_duration(retry)}.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        ).response()

    @app.errorhandler(StorageError)
    def storage_down(exc: StorageError) -> Response:
        log.warning(
            "rate limit storage unreachable, request refused: %s",
            type(exc.storage_error).__name__,
            extra={"request_id": g.get("request_id")},
        )
        return ApiError(
            503,
            "Rate limiting is temporarily unavailable. Please retry shortly.",
            type="server_error",
            code="ratelimit_unavailable",
            headers={"Retry-After": "5"},
        ).response()

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        if request.blueprint != "api" or request.method != "POST":
            return response
        current = limiter.current_limit
        if current is not None:
            reset_at, remaining = current.window  # kept from the hit: no storage call
            response.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            response.headers["x-ratelimit-remaining-requests"] = str(remaining)
            response.headers["x-ratelimit-reset-requests"] = format_duration(reset_at - time.time())
        return response
