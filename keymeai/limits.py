"""Request-rate limits per key, by Flask-Limiter, from the tier table.

The identity is the API key (never the IP), so the limit is checked as a route limit,
after the blueprint's authentication hook has put the key on `g`. Each key gets its
tier's `requests` strings, or its own (the Scale tier's per-key overrides). Storage is
`memory://` for one process, Redis for several; when Redis is down the gateway lets
requests through or refuses them with 503, as `ratelimit.on_storage_error` says.
"""

from __future__ import annotations

import math
import time

from flask import Flask, Response, g, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.errors import StorageError

from . import metrics
from .config import Config
from .errors import ApiError

CHAT_ENDPOINT = "api.chat_completions"


def limit_key() -> str:
    return f"key:{g.api_key.id}"


def request_limits() -> str:
    """The current key's limits, as one Flask-Limiter string ("a;b")."""
    key = g.api_key
    return ";".join(key.request_limits or g.tier.requests)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def init_app(app: Flask, config: Config) -> Limiter:
    """Attach a Flask-Limiter to the app and put the per-key limit on the chat route."""
    limiter = Limiter(
        key_func=limit_key,
        storage_uri=config.ratelimit.storage_uri,
        storage_options={"socket_timeout": 2, "socket_connect_timeout": 2}
        if config.ratelimit.storage_uri.startswith("redis")
        else {},
        strategy="fixed-window",
        headers_enabled=False,  # OpenAI's header names are added below
        swallow_errors=config.ratelimit.on_storage_error == "allow",
        default_limits=[],
    )
    limiter.init_app(app)
    limited = limiter.limit(request_limits, key_func=limit_key)
    app.view_functions[CHAT_ENDPOINT] = limited(app.view_functions[CHAT_ENDPOINT])  # type: ignore[assignment]

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Response:
        metrics.REJECTIONS.labels("requests").inc()
        current = limiter.current_limit
        retry = max(1, math.ceil(current.reset_at - time.time())) if current else 1
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
        return ApiError(
            503,
            "Rate limiting is temporarily unavailable. Please retry shortly.",
            type="server_error",
            code="ratelimit_unavailable",
            headers={"Retry-After": "5"},
        ).response()

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        if request.endpoint != CHAT_ENDPOINT:
            return response
        current = limiter.current_limit
        if current is not None:
            response.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            response.headers["x-ratelimit-remaining-requests"] = str(max(0, current.remaining))
            response.headers["x-ratelimit-reset-requests"] = format_duration(
                current.reset_at - time.time()
            )
        quota = g.get("quota")
        if quota is not None:
            response.headers.update(quota.headers())
        return response

    return limiter
