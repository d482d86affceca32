"""Stream writes that stall are ended by disconnecting the client.

A gevent or gthread worker writing to a client that does not read blocks in the
server's `sendall`, which has no timeout of its own; the stream's code is suspended at
its `yield` meanwhile, so nothing it checks between chunks (its write timeout, the
shutdown cut-off) can run. One thread (a greenlet under gevent) per worker looks at the
live streams every TICK seconds and shuts the socket of each whose current write has
lasted past its limit: the blocked write then fails at once (EPIPE, which the servers
take as a client that left), the stream's generator is closed and meters the request.
Cheap on the hot path: a stream only notes when each write starts and ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

TICK = 0.5  # how often stalled writes are looked for: a drop comes at most this late


class Writer(Protocol):
    """A stream whose writes can stall."""

    client: Any  # the client's socket
    request_id: str

    def write_time_left(self, now: float) -> float | None:
        """How much longer the current write may last (None: no write in progress)."""


class Stalls:
    """The live streams of this worker, and the thread that drops stalled ones."""

    def __init__(self) -> None:
        self._live: set[Writer] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, stream: Writer) -> None:
        with self._lock:
            self._live.add(stream)
            if self._thread is None:  # started in the worker that streams (after a fork)
                self._thread = threading.Thread(target=self._run, name="stalled-writes")
                self._thread.daemon = True
                self._thread.start()

    def discard(self, stream: Writer) -> None:
        with self._lock:
            self._live.discard(stream)

    def _run(self) -> None:
        while True:
            time.sleep(TICK)
            now = time.monotonic()
            with self._lock:
                if not self._live:
                    self._thread = None  # idle: the next stream starts another
                    return
                streams = list(self._live)
            for stream in streams:
                left = stream.write_time_left(now)
                if left is not None and left <= 0:
                    self.discard(stream)
                    drop(stream)


def drop(stream: Writer) -> None:
    """Disconnect the client of a stalled stream: its blocked write fails now, with
    EPIPE, which the servers take quietly as a client that left.

    Through a duplicate of the socket: gevent's own socket object would cancel the
    blocked write with EBADF instead, which gunicorn logs as an error with a traceback.
    """
    log.info("stream client stopped reading; disconnected", extra={"request_id": stream.request_id})
    with contextlib.suppress(OSError, ValueError):
        sock = stream.client
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


STALLS = Stalls()
