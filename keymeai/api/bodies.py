"""Request bodies have a deadline: a client may not hold a connection by trickling one.

WSGI servers read bodies lazily, when the app asks, and nothing bounds that read: a
client that sends a byte every few seconds holds its connection (and under gthread a
thread) as long as it likes, and a route that never reads its body is no safer, since
gunicorn reads what is left of it before the next keep-alive request. So every body is
read here, eagerly, before the app sees the request, under a deadline counted from the
headers; the app gets it as a BytesIO, and a body read whole also as bytes in
`environ[BODY]` (`serve.read_body` takes it from there: Werkzeug's stream wrappers cost
more than the rest of reading it).

A per-read socket timeout cannot bound the whole read (a byte just before each timeout
restarts it), so one watchdog thread (a greenlet under gevent) per app shuts the read
side of a socket whose deadline passed: the blocked read then ends at once, under
gevent, gthread and Werkzeug alike. Bodies are small, so the hot path costs a lock, a
deque append and a flag (measured in the tests' notes: a few microseconds).
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from ..errors import ApiError

log = logging.getLogger(__name__)

Environ = dict[str, Any]
BODY = "keymeai.body"  # the request body, when read whole here


class _Watch:
    """One body read in progress: its socket and deadline."""

    __slots__ = ("deadline", "done", "fired", "sock")

    def __init__(self, sock: Any, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.done = False
        self.fired = False


class Watchdog:
    """Shuts the read side of sockets whose body read outlived its deadline.

    All deadlines are `timeout` after their start, so they come in order: a deque, not a
    heap, and the thread never needs waking for a new one (it sleeps until the oldest).
    It ends once no body has come for `timeout` seconds: ending as soon as no read is
    left would start a thread (a greenlet) for nearly every request, whose body is
    usually read before the thread first runs.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._watches: deque[_Watch] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_deadline = 0.0  # of the latest body: the thread ends after it

    def watch(self, sock: Any) -> _Watch:
        entry = _Watch(sock, time.monotonic() + self.timeout)
        with self._lock:
            self._last_deadline = entry.deadline
            watches = self._watches
            while watches and watches[0].done:
                watches.popleft()  # finished reads leave as soon as they reach the head
            watches.append(entry)
            if self._thread is None:  # started in the process that serves (after a fork)
                self._thread = threading.Thread(target=self._run, name="body-watchdog")
                self._thread.daemon = True
                self._thread.start()
        return entry

    def release(self, entry: _Watch) -> bool:
        """End the watch; whether the deadline passed first (the socket was shut)."""
        with self._lock:
            entry.done = True
            return entry.fired

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                watches = self._watches
                while watches and (watches[0].done or watches[0].deadline <= now):
                    entry = watches.popleft()
                    if not entry.done:
                        entry.fired = True
                        with contextlib.suppress(OSError):
                            entry.sock.shutdown(socket.SHUT_RD)
                if watches:
                    wait = watches[0].deadline - now
                elif now < self._last_deadline:
                    wait = self._last_deadline - now  # a body came lately: more may follow
                else:
                    self._thread = None  # idle: the next body starts another
                    return
            time.sleep(wait)


class BodyDeadline:
    """WSGI middleware: read the body within `timeout` seconds or answer 408 and close."""

    def __init__(self, app: Any, timeout: float, limit: int) -> None:
        self.app = app
        self.limit = limit  # max_request_bytes: more is the app's 413 to give
        self.watchdog = Watchdog(timeout)

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        declared = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked and declared in ("", "0"):
            return self.app(environ, start_response)  # no body: the common GET
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        wanted = self.limit + 1 if chunked else _length(declared)
        if sock is None or wanted is None:
            return self.app(environ, start_response)  # nothing to bound it with
        if wanted > self.limit:
            # A quick 413 from the app, without reading; the rest is never drained.
            _close_after(start_response)
            return self.app(environ, start_response)
        entry = self.watchdog.watch(sock)
        try:
            body = _read(environ["wsgi.input"], wanted)
        except Exception:
            if not self.watchdog.release(entry):
                raise  # a malformed body: the server's own error
            body = b""
        if self.watchdog.release(entry):
            return self._timed_out(environ, start_response)
        if chunked and len(body) > self.limit:
            _close_after(start_response)  # the app answers 413; the rest stays unread
        environ["wsgi.input"] = io.BytesIO(body)
        if chunked or len(body) == wanted:  # else the client left early: Werkzeug says so
            environ[BODY] = body
        return self.app(environ, start_response)

    def _timed_out(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        log.info(
            "request body timed out",
            extra={"path": environ.get("PATH_INFO"), "timeout": self.watchdog.timeout},
        )
        error = ApiError(
            408,
            f"The request body did not arrive within {self.watchdog.timeout:g} seconds.",
            code="request_timeout",
        )
        _close_after(start_response)
        return error.response()(environ, start_response)


def _length(declared: str) -> int | None:
    try:
        length = int(declared)
    except ValueError:
        return None
    return length if length >= 0 else None


def _read(stream: Any, wanted: int) -> bytes:
    """Up to `wanted` bytes: fewer only at the end of the body (or of the connection)."""
    parts = []
    got = 0
    while got < wanted:
        piece = stream.read(wanted - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _close_after(start_response: Any) -> None:
    """Have gunicorn close the connection after this response (and say so in its
    `Connection` header) instead of reading the rest of the body: it drops an app's own
    `Connection` header. Werkzeug's development server closes every connection anyway."""
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()
