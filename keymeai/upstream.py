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
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from . import metrics
from .config import Config, Provider, Upstream
from .errors import ApiError, invalid
from .metering import Meter
from .sse import EventReader, UpstreamEnded, UpstreamFailed, describe_error
from .transport import ProviderClient
from .validation import ChatRequest

log = logging.getLogger(__name__)
# urllib3's warnings ("Connection pool is full, discarding connection: <host>", header
# parse failures with the URL) name the provider; the gateway logs upstream faults itself.
logging.getLogger("urllib3").setLevel(logging.ERROR)

MAX_ERROR_BODY = 64 * 1024
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
class Breaker:
    """Consecutive-failure circuit breaker for one upstream, shared by a worker's threads.

    Closed while failures < threshold. Open for `cooldown` seconds after that; then one
    caller probes, and the others keep skipping the upstream until the probe reports back
    (or `probe_timeout` passes: a probe that never reports must not block it for ever).
    """

    threshold: int
    cooldown: float
    probe_timeout: float
    failures: int = 0
    open_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def allow(self, now: float) -> bool:
        with self.lock:
            if self.failures < self.threshold:
                return True
            if now < self.open_until:
                return False
            self.open_until = now + self.probe_timeout
            return True

    def succeeded(self) -> None:
        with self.lock:
            self.failures = 0
            self.open_until = 0.0

    def failed(self, now: float) -> None:
        with self.lock:
            self.failures += 1
            if self.failures >= self.threshold:
                self.open_until = now + self.cooldown


@dataclass
class Attempt:
    """One upstream tried for one request: reports faults to its breaker and the log."""

    upstream: Upstream
    breaker: Breaker
    request_id: str
    reported: bool = False

    def succeeded(self) -> None:
        if not self.reported:
            self.reported = True
            self.breaker.succeeded()

    def failed(self, what: str, reason: str, level: int = logging.WARNING) -> None:
        if not self.reported:
            self.reported = True
            self.breaker.failed(time.monotonic())
        log.log(
            level,
            "upstream %s/%s %s: %s",
            self.upstream.provider,
            self.upstream.model,
            what,
            reason,
            extra={"request_id": self.request_id},
        )


@dataclass
class Opened:
    """An upstream that accepted the request: non-stream with its body read and
    checked, or a stream whose first event has arrived (the relay reports how it ends)."""

    attempt: Attempt
    completion: dict[str, Any] | None = None  # non-stream: the parsed body
    raw_body: bytes = b""
    events: EventReader | None = None  # stream: the rest of the events
    first_event: bytes | None = None


class Router:
    """Sends chat requests to the upstreams of their model, in order."""

    def __init__(self, config: Config) -> None:
        self.providers = config.providers
        self.clients = {name: ProviderClient(p) for name, p in config.providers.items()}
        self.breakers = {
            (u.provider, u.model): Breaker(
                config.routing.failure_threshold,
                config.routing.cooldown_seconds,
                probe_timeout=max(
                    config.routing.cooldown_seconds,
                    self.providers[u.provider].connect_timeout
                    + self.providers[u.provider].read_timeout,
                ),
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
        for upstream in chat.model.upstreams:
            provider = self.providers[upstream.provider]
            breaker = self.breakers[(upstream.provider, upstream.model)]
            if not provider.api_key or not breaker.allow(time.monotonic()):
                continue
            meter.attempt(upstream)
            attempt = Attempt(upstream, breaker, meter.request_id)
            started = time.monotonic()
            try:
                opened = self._attempt(provider, attempt, chat)
            except _Unavailable as exc:
                metrics.upstream_failed_over(upstream.provider, str(exc))
                attempt.failed("unavailable", str(exc))
                continue
            except UpstreamModelError as exc:
                attempt.failed("gave an invalid response", exc.detail, logging.ERROR)
                raise
            except ApiError:
                attempt.succeeded()  # it answered: the request was at fault, not the upstream
                raise
            metrics.UPSTREAM_LATENCY.labels(upstream.provider).observe(time.monotonic() - started)
            if opened.events is None:
                attempt.succeeded()
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

    def _attempt(self, provider: Provider, attempt: Attempt, chat: ChatRequest) -> Opened:
        body = dict(chat.body, model=attempt.upstream.model)
        if chat.stream:
            # Always ask for usage: metering needs it even when the client did not.
            body["stream_options"] = dict(chat.body.get("stream_options") or {}, include_usage=True)
        try:
            response = self.clients[provider.name].post(
                json.dumps(body, ensure_ascii=False).encode()
            )
        except requests.RequestException as exc:
            raise _Unavailable(describe_error(exc)) from None
        if response.status_code != 200:
            self._refuse(response, provider)
        if chat.stream:
            return self._open_stream(response, attempt, provider.read_timeout)
        return self._read_completion(response, attempt)

    def _refuse(self, response: requests.Response, provider: Provider) -> None:
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
            raise invalid(f"Upstream rejected the request: {_scrub(message[:1000], provider)}")
        raise _Unavailable(f"HTTP {status} {code}".strip())

    def _read_completion(self, response: requests.Response, attempt: Attempt) -> Opened:
        try:
            raw = response.content
        except requests.RequestException as exc:
            raise _Unavailable(f"body read failed: {describe_error(exc)}") from None
        body = raw.strip()
        try:
            completion = json.loads(body)
        except ValueError:
            raise UpstreamModelError(f"non-JSON body ({len(raw)} bytes)") from None
        if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
            raise UpstreamModelError("JSON body without choices")
        return Opened(attempt, completion=completion, raw_body=body)

    def _open_stream(
        self, response: requests.Response, attempt: Attempt, read_timeout: float
    ) -> Opened:
        content_type = response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type:
            response.close()
            raise UpstreamModelError(f"stream answered with {content_type or 'no content type'}")
        events = EventReader(response)
        # Wait for the first event (a keep-alive comment counts) before answering the
        # client: an upstream that dies or stalls now can still be replaced by the next.
        try:
            first = events.get(timeout=read_timeout)
        except queue.Empty:
            first = UpstreamFailed("no event within read_timeout")
        if isinstance(first, UpstreamFailed | UpstreamEnded):
            events.close()
            reason = first.reason if isinstance(first, UpstreamFailed) else "empty stream"
            raise _Unavailable(f"stream ended before its first event: {reason}")
        return Opened(attempt, events=events, first_event=first)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


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


def _scrub(text: str, provider: Provider) -> str:
    """An upstream's message with the provider's key and address taken out, should it
    ever echo them back."""
    for secret in (provider.api_key, provider.base_url, urlsplit(provider.base_url).netloc):
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
