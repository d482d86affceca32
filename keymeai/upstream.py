"""Routing a request to the upstreams of its model, with failover and cooldowns.

A model lists upstreams (provider + upstream model name), tried in order. Anything that
says "this upstream cannot serve now" (no connection, a timeout, 429, 5xx, an account
problem) moves on to the next; a complaint about the request itself goes back to the
client as a 400. An upstream that keeps failing is skipped for a cooldown, so a dead
provider costs clients no latency. Once the response to the client has started there is
no failover: the relay (`relay.py`) takes it from there.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from . import metrics
from .config import Config, Provider, Upstream
from .errors import ApiError, invalid
from .metering import Meter
from .sse import EventReader, UpstreamEnded, UpstreamFailed
from .validation import ChatRequest

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
USER_AGENT = "keymeai-gateway/1.0"
ACCOUNT_ERROR_CODES = {"arrearage", "accountoverdueerror", "insufficient_quota"}


class UpstreamModelError(ApiError):
    """The upstream answered 200 with something that is not a completion (500)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            500,
            "The upstream model returned an invalid response. Please retry.",
            type="server_error",
            code="upstream_model_error",
        )
        self.detail = detail


class _Unavailable(Exception):
    """This upstream cannot serve now; try the next one."""


@dataclass
class Opened:
    """An upstream that accepted the request: non-stream with its body read and
    checked, or a stream whose first event has arrived."""

    upstream: Upstream
    completion: dict[str, Any] | None = None  # non-stream: the parsed body
    raw_body: bytes = b""
    events: EventReader | None = None  # stream: the rest of the events
    first_event: bytes | None = None


@dataclass
class Breaker:
    """Consecutive-failure circuit breaker for one upstream, shared by a worker's threads."""

    threshold: int
    cooldown: float
    failures: int = 0
    open_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, now: float) -> bool:
        """Closed: yes. Open: no, until the cooldown ends; then one caller probes."""
        with self.lock:
            if self.failures < self.threshold:
                return True
            if now < self.open_until:
                return False
            self.open_until = now + self.cooldown
            return True

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, now: float) -> None:
        with self.lock:
            self.failures += 1
            if self.failures >= self.threshold:
                self.open_until = now + self.cooldown


def _session(provider: Provider) -> requests.Session:
    """A keep-alive pool for one provider, safe to share between threads."""
    session = requests.Session()
    # Proxies come from the environment once, not on every request (trust_env is slow),
    # and no provider cookie is ever replayed for another customer.
    session.proxies.update(requests.utils.get_environ_proxies(provider.base_url))
    session.trust_env = False
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=provider.max_connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(
        {
            "User-Agent": USER_AGENT,
            "Authorization": f"Bearer {provider.api_key}",
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
        }
    )
    return session


class Router:
    """Sends chat requests to the upstreams of their model, in order."""

    def __init__(self, config: Config) -> None:
        self.providers = config.providers
        self.keepalive = config.gateway.stream_keepalive_seconds
        self.sessions = {name: _session(p) for name, p in config.providers.items()}
        self.breakers = {
            (u.provider, u.model): Breaker(
                config.routing.failure_threshold, config.routing.cooldown_seconds
            )
            for model in config.models.values()
            for u in model.upstreams
        }
        for provider in config.providers.values():
            if not provider.api_key:
                log.warning(
                    "provider %s has no API key: %s is not set", provider.name, provider.api_key_env
                )

    def open(self, chat: ChatRequest, meter: Meter) -> Opened:
        """The first upstream of the model that accepts the request, or a 503.

        The meter learns of every attempt, so the ledger can say which upstream served.
        """
        request_id = meter.request_id
        for upstream in chat.model.upstreams:
            provider = self.providers[upstream.provider]
            breaker = self.breakers[(upstream.provider, upstream.model)]
            if not provider.api_key or not breaker.allow(time.monotonic()):
                continue
            meter.attempt(upstream)
            started = time.monotonic()
            try:
                opened = self._attempt(provider, upstream, chat)
            except _Unavailable as exc:
                metrics.upstream_failed_over(upstream.provider, str(exc))
                breaker.failed(time.monotonic())
                log.warning(
                    "upstream %s/%s unavailable: %s",
                    upstream.provider,
                    upstream.model,
                    exc,
                    extra={"request_id": request_id},
                )
                continue
            except UpstreamModelError as exc:
                breaker.failed(time.monotonic())
                log.error(
                    "upstream %s/%s gave an invalid response: %s",
                    upstream.provider,
                    upstream.model,
                    exc.detail,
                    extra={"request_id": request_id},
                )
                raise
            metrics.UPSTREAM_LATENCY.labels(upstream.provider).observe(time.monotonic() - started)
            breaker.succeeded()
            return opened
        raise ApiError(
            503,
            f"No upstream can serve the model `{chat.model.id}` right now. Please retry shortly.",
            type="server_error",
            code="upstream_unavailable",
            headers={"Retry-After": str(self._retry_after(chat))},
        )

    def _retry_after(self, chat: ChatRequest) -> int:
        now = time.monotonic()
        waits = [
            self.breakers[(u.provider, u.model)].open_until - now for u in chat.model.upstreams
        ]
        return max(1, min(30, math.ceil(min(waits))))

    def _attempt(self, provider: Provider, upstream: Upstream, chat: ChatRequest) -> Opened:
        body = dict(chat.body, model=upstream.model)
        if chat.stream:
            # Always ask for usage: metering needs it even when the client did not.
            body["stream_options"] = dict(chat.body.get("stream_options") or {}, include_usage=True)
        try:
            response = self.sessions[provider.name].post(
                f"{provider.base_url}/chat/completions",
                data=json.dumps(body, ensure_ascii=False).encode(),
                timeout=(provider.connect_timeout, provider.read_timeout),
                stream=True,
            )
        except requests.RequestException as exc:
            raise _Unavailable(type(exc).__name__) from None
        if response.status_code != 200:
            self._refuse(response)
        if chat.stream:
            return self._open_stream(response, upstream)
        return self._read_completion(response, upstream)

    def _refuse(self, response: requests.Response) -> None:
        """Turn an upstream error status into failover or a 400 for the client."""
        status = response.status_code
        try:
            raw = response.raw.read(MAX_ERROR_BODY, decode_content=True)
        except Exception:  # noqa: BLE001 - a broken error body is still an error
            raw = b""
        finally:
            response.close()
        error = _error_object(raw)
        code = str(error.get("code") or error.get("type") or "").lower()
        if status in (400, 413, 422) and code not in ACCOUNT_ERROR_CODES:
            message = error.get("message")
            if not isinstance(message, str) or not message:
                message = "The upstream provider rejected the request."
            raise invalid(f"Upstream rejected the request: {message[:1000]}")
        raise _Unavailable(f"HTTP {status} {code}".strip())

    def _read_completion(self, response: requests.Response, upstream: Upstream) -> Opened:
        try:
            raw = response.content
        except requests.RequestException as exc:
            raise _Unavailable(f"body read failed: {type(exc).__name__}") from None
        body = raw.strip()
        try:
            completion = json.loads(body)
        except ValueError:
            raise UpstreamModelError(f"non-JSON body ({len(raw)} bytes)") from None
        if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
            raise UpstreamModelError("JSON body without choices")
        return Opened(upstream=upstream, completion=completion, raw_body=body)

    def _open_stream(self, response: requests.Response, upstream: Upstream) -> Opened:
        content_type = response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type:
            response.close()
            raise UpstreamModelError(f"stream answered with {content_type or 'no content type'}")
        events = EventReader(response)
        # Wait for the first event before answering the client: an upstream that dies
        # now can still be replaced by the next one.
        first = events.get(timeout=None)
        if isinstance(first, UpstreamFailed | UpstreamEnded):
            events.close()
            raise _Unavailable(f"stream ended before its first event: {first}")
        return Opened(upstream=upstream, events=events, first_event=first)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()


def _error_object(raw: bytes) -> dict[str, Any]:
    """The `error` object of a provider's error body, parsed leniently."""
    try:
        body = json.loads(raw.strip() or b"{}")
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error", body)
    return error if isinstance(error, dict) else {"message": str(error)}
