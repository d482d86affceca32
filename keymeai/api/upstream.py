"""Routing a request to the upstreams of its model, with failover and cooldowns.

A model lists upstreams (provider + upstream model name), tried in order. Anything that
says "this upstream cannot serve now" (no connection, a timeout, 429, 5xx, an account
problem) moves on to the next; a complaint about the request itself goes back to the
client as a 400, its message scrubbed of the providers' secrets. An upstream that keeps
failing is skipped for a cooldown, so a dead provider costs clients no latency while
another upstream can serve; a model's last upstream is always tried. Once the response
to the client has started there is no failover: the relay (`relay.py`) takes it from
there.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import requests

from ..catalogue import Provider, Upstream
from ..config import Config
from ..errors import ApiError, invalid
from ..ledger.metering import Meter
from ..ops import metrics
from ..ops.scrub import Scrubber
from .sse import EventReader, UpstreamEnded, UpstreamFailed, describe_error
from .transport import ProviderClient
from .unconfigured import not_configured
from .validation import ChatRequest

log = logging.getLogger(__name__)
# urllib3's warnings ("Connection pool is full, discarding connection: <host>", header
# parse failures with the URL) name the provider; the gateway logs upstream faults itself.
logging.getLogger("urllib3").setLevel(logging.ERROR)

MAX_ERROR_BODY = 64 * 1024
MAX_REASON = 300  # characters of an upstream's fault text in a log line
ACCOUNT_ERROR_CODES = {"arrearage", "accountoverdueerror", "insufficient_quota"}
# Per model kind: the provider's path, and the list a 200 answer must carry to count as one.
KIND_PATHS = {"chat": "/chat/completions", "embedding": "/embeddings"}
ANSWER_LISTS = {"chat": "choices", "embedding": "data"}


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
    scrub: Scrubber
    clock: Callable[[], float] = time.monotonic
    reported: bool = False

    def succeeded(self) -> None:
        if not self.reported:
            self.reported = True
            self.breaker.succeeded()

    def failed(self, what: str, reason: str, level: int = logging.WARNING) -> None:
        """Log the fault: `reason` may quote the provider, scrubbed before it is cut short
        (the log filter could not recognise half a key)."""
        if not self.reported:
            self.reported = True
            self.breaker.failed(self.clock())
        log.log(
            level,
            "upstream %s/%s %s: %s",
            self.upstream.provider,
            self.upstream.model,
            what,
            self.scrub(reason)[:MAX_REASON],
            extra={"request_id": self.request_id},
        )


@dataclass(frozen=True)
class Route:
    """An upstream of a model that can be tried: its provider has an API key."""

    upstream: Upstream
    provider: Provider
    breaker: Breaker


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
    """Sends requests (chat completions, embeddings: the model's kind says which) to the
    upstreams of their model, in order.

    `clock` (monotonic seconds) times the cooldowns: tests pass one they can move on.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.providers = config.providers
        self.clients = {name: ProviderClient(p) for name, p in config.providers.items()}
        self.scrub = Scrubber.for_providers(config.providers.values())
        breakers = {
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
        # Upstreams whose provider has no API key are left out: they cannot serve.
        self.routes = {
            model.id: tuple(
                Route(u, self.providers[u.provider], breakers[(u.provider, u.model)])
                for u in model.upstreams
                if self.providers[u.provider].api_key
            )
            for model in config.models.values()
        }
        self.unconfigured = frozenset(m for m, routes in self.routes.items() if not routes)

    def open(self, chat: ChatRequest, meter: Meter) -> Opened:
        """The first upstream of the model that accepts the request, or a 503.

        Upstreams cooling down are skipped; when all of them are, the one whose cooldown
        ends first is tried all the same. Skipping it too would refuse the request
        without trying anything, for the whole cooldown, though the upstream may be
        serving again (a model's only upstream would be shut out after a few dropped
        streams). So a 503 always means that upstreams were tried and failed.
        The meter learns of every attempt, so the ledger can say which upstream served.
        """
        routes = self.routes[chat.model.id]
        if not routes:
            raise not_configured(chat.model.id)
        tried = False
        for route in routes:
            if route.breaker.allow(self.clock()):
                tried = True
                if opened := self._try(route, chat, meter):
                    return opened
        if not tried:
            soonest = min(routes, key=lambda r: r.breaker.open_until)
            if opened := self._try(soonest, chat, meter):
                return opened
        raise ApiError(
            503,
            f"No upstream can serve the model `{chat.model.id}` right now. Please retry shortly.",
            type="server_error",
            code="upstream_unavailable",
            headers={"Retry-After": str(self._retry_after(routes))},
        )

    def _try(self, route: Route, chat: ChatRequest, meter: Meter) -> Opened | None:
        """The upstream's answer, or None when it cannot serve now (try the next)."""
        upstream = route.upstream
        meter.attempt(upstream)
        attempt = Attempt(upstream, route.breaker, meter.request_id, self.scrub, self.clock)
        started = time.monotonic()
        try:
            opened = self._attempt(route.provider, attempt, chat)
        except _Unavailable as exc:
            metrics.upstream_failed_over(upstream.provider, str(exc))
            attempt.failed("unavailable", str(exc))
            return None
        except UpstreamModelError as exc:
            attempt.failed("gave an invalid response", exc.detail, logging.ERROR)
            raise
        except ApiError:
            attempt.succeeded()  # it answered: the request was at fault, not the upstream
            raise
        metrics.upstream_latency(upstream.provider, time.monotonic() - started)
        if opened.events is None:
            attempt.succeeded()
        return opened

    def _retry_after(self, routes: tuple[Route, ...]) -> int:
        now = self.clock()
        waits = [route.breaker.open_until - now for route in routes]
        return max(1, min(30, math.ceil(min(waits))))

    def _attempt(self, provider: Provider, attempt: Attempt, chat: ChatRequest) -> Opened:
        body = dict(chat.body, model=attempt.upstream.model)
        if chat.stream:
            # Always ask for usage: metering needs it even when the client did not.
            body["stream_options"] = dict(chat.body.get("stream_options") or {}, include_usage=True)
        try:
            response = self.clients[provider.name].post(_encode(body), KIND_PATHS[chat.model.kind])
        except requests.RequestException as exc:
            raise _Unavailable(describe_error(exc)) from None
        if response.status_code != 200:
            self._refuse(response)
        if chat.stream:
            return self._open_stream(response, attempt, provider.read_timeout)
        return self._read_completion(response, attempt, ANSWER_LISTS[chat.model.kind])

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
            raise invalid(f"Upstream rejected the request: {self.scrub(message)[:1000]}")
        raise _Unavailable(f"HTTP {status} {code}".strip())

    def _read_completion(
        self, response: requests.Response, attempt: Attempt, answer_list: str
    ) -> Opened:
        try:
            raw = response.content
        except requests.RequestException as exc:
            raise _Unavailable(f"body read failed: {describe_error(exc)}") from None
        body = raw.strip()
        try:
            completion = json.loads(body)
        except ValueError:
            raise UpstreamModelError(f"non-JSON body ({len(raw)} bytes)") from None
        if not isinstance(completion, dict) or not isinstance(completion.get(answer_list), list):
            raise UpstreamModelError(f"JSON body without {answer_list}")
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


def _encode(body: dict[str, Any]) -> bytes:
    """The request body for the upstream, as UTF-8 JSON. orjson writes it 10-25 times
    faster than `json.dumps` (a long chat history is tens of KB); the one value it refuses
    that a request can carry, an integer beyond 64 bits, goes through the standard library.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, ensure_ascii=False).encode()


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
