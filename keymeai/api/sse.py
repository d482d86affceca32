"""Reading an upstream's server-sent events.

Providers frame SSE loosely (DashScope writes `data:{...}` with no space, DeepSeek sends
`: keep-alive` comments while a request is queued), so the decoder follows the SSE rules
leniently. The reader runs on its own thread (a greenlet under gevent) so that the relay
can wait for the next event with a timeout and ping an idle client meanwhile: a
blocking read cannot be interrupted without losing the connection's state.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import requests

READ_SIZE = 16384
QUEUE_READS = 4  # reads queued per stream: at most 64 KiB of events waiting for the client
# No chat chunk comes near this; a line or event past it is a broken upstream, ended as
# such rather than buffered without bound.
MAX_EVENT_BYTES = 8 * 1024 * 1024


class EventTooLarge(ValueError):
    """An upstream line or event past MAX_EVENT_BYTES."""


@dataclass(frozen=True)
class UpstreamEnded:
    """The upstream closed the stream normally."""


@dataclass(frozen=True)
class UpstreamFailed:
    """The stream broke: connection lost, read timeout, bad framing."""

    reason: str


# An item from the reader: a data payload, None for a comment (keep-alive), or the end.
Event = bytes | None | UpstreamEnded | UpstreamFailed


class SSEDecoder:
    """Incremental SSE decoder: feed it bytes, get back complete events."""

    def __init__(self) -> None:
        self._pending = bytearray()  # the line not yet ended: grows in place, read after read
        self._data: list[bytes] = []
        self._data_size = 0

    def feed(self, chunk: bytes) -> list[bytes | None]:
        """The events `chunk` completes; EventTooLarge past MAX_EVENT_BYTES."""
        if b"\n" not in chunk:
            self._pending += chunk
            self._check(len(self._pending))
            return []
        # Usually no line is left over from the last read: then the read is split as is.
        lines = (bytes(self._pending) + chunk if self._pending else chunk).split(b"\n")
        self._pending = bytearray(lines.pop())
        events: list[bytes | None] = []
        for line in lines:
            self._line(line.removesuffix(b"\r"), events)
        self._check(len(self._pending))
        return events

    def finish(self) -> list[bytes | None]:
        """Events left at the end of the stream, even without their final blank line."""
        events: list[bytes | None] = []
        if self._pending:
            self._line(bytes(self._pending).removesuffix(b"\r"), events)
            self._pending = bytearray()
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes | None]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._data_size = 0
            return
        if line.startswith(b":"):
            if None not in events:
                events.append(None)
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" "))
            self._data_size += len(value)
            self._check(self._data_size)

    @staticmethod
    def _check(size: int) -> None:
        if size > MAX_EVENT_BYTES:
            raise EventTooLarge(f"an upstream event over {MAX_EVENT_BYTES} bytes")


class EventReader:
    """Reads one upstream SSE response on a helper thread into a bounded queue.

    The queue holds at most QUEUE_READS reads' worth of events (a read is at most
    READ_SIZE bytes): when the client does not keep up, the reader stops reading and TCP
    slows the upstream down, instead of the worker buffering the whole answer. Events go
    through the queue as one list per read, so a fast stream costs one queue operation
    per read, not per event.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._queue: queue.Queue[Sequence[Event]] = queue.Queue(QUEUE_READS)
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="upstream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = SSEDecoder()
        raw = self._response.raw
        try:
            while not self._closed and (chunk := raw.read1(READ_SIZE, decode_content=True)):
                if events := decoder.feed(chunk):
                    self._put(events)
            self._put([*decoder.finish(), UpstreamEnded()])
        except Exception as exc:  # noqa: BLE001 - any failure ends the stream the same way
            self._put([UpstreamFailed(describe_error(exc))])
        finally:
            self._response.close()

    def _put(self, events: Sequence[Event]) -> None:
        """Queue a read's events, waiting while the queue is full (nothing once closed)."""
        if not self._closed:
            self._queue.put(events)

    def get(self, timeout: float | None) -> Event:
        """The next event; raises queue.Empty if none came within `timeout` seconds."""
        if not self._pending:
            self._pending.extend(self._queue.get(timeout=timeout))
        return self._pending.popleft()

    def wait_end(self, timeout: float) -> None:
        """Let the upstream finish its response after `[DONE]`, within `timeout` seconds.

        A response read to its end returns its connection to the keep-alive pool before
        the reader reports the end, so the next request can reuse it.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if isinstance(self.get(timeout=left), UpstreamEnded | UpstreamFailed):
                    return
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop reading: wakes the reader thread if it is blocked on the socket or on a
        full queue (whose events are dropped: read what you need before closing)."""
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()  # room for the one put a blocked reader makes
            except queue.Empty:
                break
        if self._thread.is_alive():
            # Errors mean the reader closed the response itself meanwhile.
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._response.raw.shutdown()


def describe_error(exc: BaseException) -> str:
    """The class names of an error and of what it wraps: "ConnectionError: ReadTimeoutError".

    Never the messages: requests and urllib3 put the provider's URL in them.
    """
    names: list[str] = []
    error: BaseException | None = exc
    while error is not None and len(names) < 4:
        names.append(type(error).__name__)
        inner = getattr(error, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            inner = next((a for a in error.args if isinstance(a, BaseException)), None)
        error = inner
    return ": ".join(names)
