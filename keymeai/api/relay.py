"""Relaying the upstream's answer to the client, metering it on the way.

One path for both kinds of answer: every completion body or stream chunk goes through
the meter (usage, text for estimates), and the meter is finished exactly once however
the relay ends. What the client is sent, one write per event, is the dialect's
(keymeai.api.dialect): chat completions' chunks pass as the upstream sent them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from ..config import GatewaySettings
from ..ledger.metering import Meter
from ..ops import metrics
from .dialect import Dialect
from .sse import EventReader, UpstreamEnded, UpstreamFailed
from .stalls import STALLS
from .upstream import Opened, UpstreamModelError

IDLE_TICK = 0.5  # how often an idle stream looks for a client that hung up
DONE_GRACE = 1.0  # seconds an upstream gets to end its response after [DONE]
# After a client left, the upstream is read on while it keeps sending (no gap over
# SETTLE_GAP) for at most SETTLE_SECONDS, for the usage it bills: the rest of a 2,000-word
# answer comes in ~20 ms, and a client that stops at the finish chunk leaves DashScope's
# and Ark's usage chunk milliseconds behind. An upstream that is thinking, or far from
# its end, is estimated rather than waited for. At most SETTLING streams of a worker read
# on at once: hundreds of clients dropped together (an outage, the write timeout of a
# burst) would otherwise have the worker decode hundreds of answers' tails at once.
SETTLE_SECONDS = 1.0
SETTLE_GAP = 0.1
SETTLING = threading.BoundedSemaphore(8)
CUT_WRITE_GRACE = 1.0  # once streams are cut, a write stalled this long is dropped
# The kernel's send buffer for a stream's client (Linux doubles it): autotuned, it grows
# to 4 MiB (tcp_wmem), which a client that stops reading keeps full, and which would
# hide it from the write timeout for the whole of most answers. A quarter of a MiB is
# still far beyond what a token stream needs in flight.
STREAM_SEND_BUFFER = 128 * 1024


# How a stream cut short ends, in words and code (the dialect frames them).
STREAM_FAILED = (
    "The upstream model stopped responding before the answer was complete.",
    "upstream_stream_failed",
)
STREAM_INTERRUPTED = (
    "The gateway is restarting and had to end this answer early. Please retry.",
    "server_shutting_down",
)

# When the worker was asked to stop: the monotonic time from which running streams are
# cut short. Set from a signal handler, so it is a plain assignment; each stream looks at
# it between events and on every idle tick, and keymeai.api.stalls drops those stuck in a
# write to a client that does not read.
_cut_at: float | None = None


def cut_streams_after(seconds: float) -> None:
    """End every stream still running `seconds` from now, each metered and closed with an
    error event: the worker is stopping, ahead of its hard deadline."""
    global _cut_at
    _cut_at = time.monotonic() + seconds


_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')


def carries_usage(event: bytes) -> bool:
    """Whether a chunk may report usage: a `"usage"` that is not `"usage": null`."""
    at = event.find(b'"usage"')
    return at >= 0 and not _NULL_USAGE.match(event, at)


class _BrokenChunk(Exception):
    """A stream event that is not a chat completion chunk."""


class _ClientGone:
    """The client closed its connection while the upstream was idle."""


class _Cut:
    """The worker is stopping and the stream's time is up."""


def client_socket() -> Any:
    """The client's socket, where the server exposes it (gunicorn and Werkzeug do)."""
    environ = request.environ
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


def client_hung_up(sock: Any) -> bool:
    """Whether the client has closed its end: a FIN waits on the socket.

    A write to a closed connection fails only at the second attempt, so while the
    upstream is silent this check notices a departed client long before pings would.
    poll() with a zero timeout never blocks, under threads or gevent alike.
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return bool(sock.recv(1, socket.MSG_PEEK) == b"")
    except ValueError:
        return False  # e.g. a TLS socket, which cannot peek: rely on pings
    except OSError:
        return True


def relay(opened: Opened, dialect: Dialect, meter: Meter, settings: GatewaySettings) -> Response:
    """The client's response, in its dialect: the checked completion, or the stream."""
    client = client_socket()
    if client is not None:
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
    if opened.events is None:
        assert opened.completion is not None
        meter.observe(opened.completion)
        meter.finish(200, "ok")
        body = dialect.answer(opened.completion, opened.raw_body)
        answer = AnswerWrite(body, client, meter.request_id, settings)
        response = Response(answer, mimetype="application/json")
        response.headers["Content-Length"] = str(len(body))
        return response
    stream = ChunkRelay(opened, dialect, meter, settings, client)
    try:
        first = stream.frame(opened.first_event)
    except _BrokenChunk as exc:
        opened.events.close()
        opened.attempt.failed("gave an invalid response", str(exc), logging.ERROR)
        meter.finish(500, "upstream_error")
        raise UpstreamModelError(str(exc)) from None
    except BaseException:
        opened.events.close()  # its reader thread and upstream connection with it
        raise
    response = Response(stream.run(first), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # tell nginx-style proxies not to buffer
    response.call_on_close(stream.close)  # runs even if the body was never iterated
    return response


def write_time_left(since: float | None, timeout: float, now: float) -> float | None:
    """How much longer a write begun at `since` may last (None: no write in progress);
    once the shutdown cut-off has passed, at most CUT_WRITE_GRACE."""
    if since is None:
        return None
    if _cut_at is not None and now >= _cut_at:
        timeout = min(timeout, CUT_WRITE_GRACE)
    return since + timeout - now


class AnswerWrite:
    """A non-stream answer, written in one piece under the same bound as a stream's
    chunks: a client that does not take it within the write timeout is disconnected
    (keymeai.api.stalls), so it cannot hold a greenlet or thread. The request was metered
    before the write began."""

    def __init__(self, body: bytes, client: Any, request_id: str, settings: GatewaySettings):
        self.body = body
        self.client = client
        self.request_id = request_id
        self.write_timeout = settings.stream_write_timeout_seconds
        self.writing_since: float | None = None

    def write_time_left(self, now: float) -> float | None:
        return write_time_left(self.writing_since, self.write_timeout, now)

    def __iter__(self) -> Iterator[bytes]:
        if self.client is None:
            yield self.body
            return
        STALLS.add(self)
        try:
            self.writing_since = time.monotonic()
            yield self.body
        finally:
            self.writing_since = None
            STALLS.discard(self)


class ChunkRelay:
    """Frames upstream events for the client, meters them, and reports how the stream
    ended to the upstream's breaker.

    Every event the upstream sent goes through the meter, the ones the client never got
    included: the usage the provider reports is what the record carries, however the
    stream ended.
    """

    def __init__(
        self,
        opened: Opened,
        dialect: Dialect,
        meter: Meter,
        settings: GatewaySettings,
        client: Any,
    ) -> None:
        assert opened.events is not None
        self.events: EventReader = opened.events
        self.attempt = opened.attempt
        self.dialect = dialect
        self.meter = meter
        self.keepalive = settings.stream_keepalive_seconds
        # A chunk the client does not accept within this ends the stream (keymeai.api.stalls).
        self.write_timeout = settings.stream_write_timeout_seconds
        self.client = client
        self.request_id = meter.request_id
        self.idle = 0.0
        self.saw_done = False
        self.saw_finish = False
        self.writing_since: float | None = None  # while the server writes a chunk
        self.metered = False  # the stream's end was metered by run()
        self.closed = False

    def write_time_left(self, now: float) -> float | None:
        """How much longer the chunk being written may take (keymeai.api.stalls asks)."""
        return write_time_left(self.writing_since, self.write_timeout, now)

    def frame(self, event: bytes | None) -> bytes | None:
        """The bytes to send for one upstream event (None: nothing to send)."""
        if event is None:
            return self.dialect.ping()  # the upstream's own keep-alive comment
        if event.strip() == b"[DONE]":
            self.saw_done = True
            return None  # the dialect's end is written once the stream is metered
        try:
            chunk: Any = json.loads(event)
        except ValueError:
            raise _BrokenChunk("stream event is not JSON") from None
        choices = self.observe(chunk)
        if any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
            self.saw_finish = True
        try:
            return self.dialect.event(chunk, event)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            # A chunk of an odd shape (a delta that is not an object, content that is not
            # text) that the client's dialect cannot carry: the upstream's fault, ended
            # as such, never a half-written stream.
            raise _BrokenChunk(f"stream chunk of an unexpected shape ({exc!r})") from None

    def observe(self, chunk: Any) -> list[Any]:
        """Meter one parsed chunk; its choices."""
        if not isinstance(chunk, dict):
            raise _BrokenChunk("stream event is not a JSON object")
        if "error" in chunk and "choices" not in chunk:
            raise _BrokenChunk(f"upstream error mid-stream: {chunk['error']}")  # Attempt cuts it
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise _BrokenChunk("stream chunk without choices")
        self.meter.observe(chunk)
        return choices

    def settle(self, wait: float) -> None:
        """Take the usage from the events the client never got; until it comes, read on
        for up to `wait` seconds while the upstream keeps sending.

        Only events that may carry usage are parsed (a byte search), so that hundreds of
        streams dropped at once do not cost the worker a parse of every event each; an
        estimate, if it comes to that, counts what the client was sent."""
        deadline = time.monotonic() + wait
        while self.meter.usage is None:
            left = max(0.0, deadline - time.monotonic())
            try:
                event = self.events.get(timeout=min(left, SETTLE_GAP))
            except queue.Empty:
                return
            if isinstance(event, UpstreamEnded | UpstreamFailed):
                return
            if event is not None and carries_usage(event):
                with contextlib.suppress(ValueError, _BrokenChunk):
                    self.observe(json.loads(event))

    def finish(self, outcome: str) -> None:
        self.metered = True
        self.meter.finish(200, outcome)

    def run(self, first: bytes | None) -> Iterator[bytes]:
        """Relay events until the upstream ends; meter once, however it ends.

        The record is journaled before the client sees the end of the stream, so a client
        that reads its usage right after `[DONE]` finds it (keymeai.ledger.journal.catch_up).
        """
        metrics.STREAMS.inc()
        STALLS.add(self)
        try:
            data, end = first, None
            while not self.saw_done:
                if data is not None:
                    self.writing_since = time.monotonic()  # as _write, inlined: per chunk
                    yield data
                    self.writing_since = None
                data, end = self._next()
                if end is not None:
                    break
            if isinstance(end, _ClientGone):
                return  # metered as client_closed on the way out
            if isinstance(end, _Cut):
                self.settle(0)
                self.finish("interrupted")
                yield from self._write(self.dialect.failed(*STREAM_INTERRUPTED))
                return
            if self.saw_done:
                self.events.wait_end(DONE_GRACE)  # so its connection goes back to the pool
            if self.saw_done or (self.saw_finish and isinstance(end, UpstreamEnded)):
                self.finish("ok")  # the end is written even if the upstream left out [DONE]
                self.attempt.succeeded()
                yield from self._write(self.dialect.done())
            else:
                reason = end.reason if isinstance(end, UpstreamFailed) else "ended unfinished"
                self.finish("upstream_failed")
                self.attempt.failed("failed mid-stream", reason)
                yield from self._write(self.dialect.failed(*STREAM_FAILED))
        finally:
            metrics.STREAMS.dec()
            self.close()

    def _write(self, data: bytes) -> Iterator[bytes]:
        """Hand `data` to the server, noting how long its write takes (keymeai.api.stalls)."""
        self.writing_since = time.monotonic()
        yield data
        self.writing_since = None

    def _next(
        self,
    ) -> tuple[bytes | None, UpstreamEnded | UpstreamFailed | _ClientGone | _Cut | None]:
        """The bytes to send next (None: nothing yet), or how the stream ended."""
        if _cut_at is not None and time.monotonic() >= _cut_at:
            return None, _Cut()
        try:
            event = self.events.get(timeout=min(self.keepalive, IDLE_TICK))
        except queue.Empty:
            if self.client is not None and client_hung_up(self.client):
                return None, _ClientGone()
            self.idle += IDLE_TICK
            if self.idle < self.keepalive:
                return None, None
            self.idle = 0.0
            return self.dialect.ping(), None  # keeps proxies from closing an idle stream
        self.idle = 0.0
        if isinstance(event, UpstreamEnded | UpstreamFailed):
            return None, event
        try:
            return self.frame(event), None
        except _BrokenChunk as exc:
            return None, UpstreamFailed(str(exc))

    def close(self) -> None:
        """Stop reading and meter once: the end of every stream, and the backstop for a
        body that was never iterated or a client that left or was dropped (the upstream
        was serving): what it sent meanwhile is metered first, its usage above all."""
        if self.closed:
            return
        self.closed = True
        STALLS.discard(self)
        if not self.metered:
            if _cut_at is None and SETTLING.acquire(blocking=False):
                try:
                    self.settle(SETTLE_SECONDS)
                finally:
                    SETTLING.release()
            else:
                self.settle(0)  # what came already, its usage if it is there
        self.events.close()
        self.meter.finish(200, "client_closed")  # a no-op unless the client left
        self.attempt.succeeded()  # likewise
