"""The usage journal: records leave the request path, and survive the process.

Each worker process appends one JSON line per event to its own file in
`metering.journal_dir`, with one `os.write` on a descriptor opened O_APPEND and no
fsync: once `write` returns, the kernel holds the bytes, so a SIGKILL (or any crash of
the process) loses nothing. A `started` line is written when a request has its meter and
its quota reservation; a `finished` line carries the record `metering.write_usage` would
have written. A writer thread (a greenlet under gevent) applies finished lines to the
ledger in batches, one transaction each, with the ledger's exactly-once statements
(`metering.write_batch`): a line applied twice counts once, so any process may apply
any journal.

Files are named `<pid>-<token>-<seq>.jsonl`, and their owner holds an flock on each:
a file nobody holds belongs to a dead process (a pid the kernel reused cannot fool
this). `replay.recover` applies such files (at start-up, and every 30 s for siblings):
a `started` line without its `finished` line becomes a `lost` record
(`replay.lost_record`) and its reservation is released. A torn last line (the kill
landed mid-write) is skipped.

Readers that must see every answered request (`GET /v1/usage`, reports, the dashboard)
call `catch_up` first, which applies the finished lines of every file in the directory
that this process has not applied yet.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from peewee import InterfaceError, OperationalError

from ..config import ConfigError
from . import replay
from .replay import SUFFIX

log = logging.getLogger(__name__)

ROTATE_BYTES = 64 * 1024  # an applied file this large is replaced by a fresh one
RECOVER_SECONDS = 30.0  # how often an idle writer looks for dead siblings' files
DRAIN_SECONDS = 10.0  # how long closing waits for an unreachable ledger
GIVE_UP_AFTER = 6  # failed attempts (about 6 s) before a closing writer leaves the file
# The writer gathers records for up to this many seconds after its last commit: a
# transaction's fixed cost (the connection, BEGIN IMMEDIATE, COMMIT) is about twice one
# record's inserts on SQLite, so a record applied alone costs ~120 µs of the worker's CPU
# and one of a batch of eight ~40 (measured). Readers that must see every answered
# request call `catch_up` anyway. A record that releases a quota hold is applied at
# once: its key's next request is admitted against the ledger, and should find the
# hold replaced by what the request used.
BATCH_SECONDS = 0.01


# A finished entry waiting for the writer: its file, the offset after it, it, its line.
Queued = tuple[Path | None, int, dict[str, Any], bytes]


class JournalError(ConfigError):
    """The journal directory cannot be used."""


def check_directory(directory: Path) -> Path:
    """Create `directory` if need be and prove it writable, at start-up (not at the
    first request)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise JournalError(f"metering.journal_dir {directory}: not writable ({exc})") from None
    return directory.resolve()


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_iso)  # json.dumps makes one a call


def _line(entry: dict[str, Any]) -> bytes:
    """One JSON line. orjson writes a naive datetime as `isoformat` does, several times
    faster than the standard library; an integer beyond 64 bits (a provider's absurd
    usage count) goes through the standard library as before."""
    try:
        return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(entry).encode() + b"\n"


class Journal:
    """This process's journal file and its writer; one per app."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # a finished line releases a quota hold
        self._queue: deque[Queued] = deque()
        self._inflight: dict[str, bytes] = {}  # record_id -> its started line
        self._pid = 0
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._token = ""
        self._writer: threading.Thread | None = None
        self._closing = False
        _OPEN.add(self)

    # -- the request path ------------------------------------------------------------

    def started(self, entry: dict[str, Any]) -> None:
        """Note a request in flight (see `lost_record` for its fields)."""
        line = _line({"e": "s", **entry})
        with self._lock:
            self._write(line)
            self._inflight[entry["id"]] = line

    def finished(
        self, record_id: str, fields: dict[str, Any] | None, reservation_id: int | None
    ) -> None:
        """Journal a request's end: its record (None if it never reached an upstream)
        and the reservation to release; the writer applies it soon after."""
        entry = {"e": "f", "id": record_id, "res": reservation_id, "rec": fields}
        line = _line(entry)
        with self._lock:
            self._inflight.pop(record_id, None)
            self._write(line)
            self._queue.append((self._path, self._size, entry, line))
        if reservation_id is not None:
            self._hurry.set()
        self._wake.set()

    def _write(self, line: bytes) -> None:
        if self._pid != os.getpid():
            self._open_new()  # first use, or a fork of the process that made the app
        os.write(self._fd, line)
        self._size += len(line)

    def _open_new(self) -> None:
        """Start a new file (held by this process's flock) and rewrite into it what is
        not applied yet, the requests in flight and the finished lines queued, so the
        old file can go."""
        if self._pid != os.getpid():
            self._pid, self._token, self._seq = os.getpid(), secrets.token_hex(4), 0
            self._queue.clear()
            self._inflight.clear()
            self._fd, self._path, self._closing = -1, None, False  # the parent's are its own
            self._writer = threading.Thread(target=self._run, name="keymeai-journal", daemon=True)
            self._writer.start()
        self._seq += 1
        path = self.directory / f"{self._pid}-{self._token}-{self._seq:06d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        carried = [*self._inflight.values()]
        size = sum(map(len, carried))
        queued = list(self._queue)
        self._queue.clear()
        for _, _, entry, line in queued:
            carried.append(line)
            size += len(line)
            self._queue.append((path, size, entry, line))
        if carried:
            os.write(fd, b"".join(carried))
        old_fd, old_path = self._fd, self._path
        self._fd, self._path, self._size = fd, path, size
        if old_path is not None:
            old_path.unlink(missing_ok=True)
            os.close(old_fd)

    # -- the writer ----------------------------------------------------------------

    def _run(self) -> None:
        """Apply what was journaled in batches (`BATCH_SECONDS`); retry while the ledger
        is unreachable (the lines stay in the file meanwhile). Now and then, replay the
        files of siblings that died (`recover`)."""
        pending: list[Queued] = []
        failures = 0
        swept = applied = time.monotonic()
        while True:
            if not pending and not self._closing:
                self._wake.wait(RECOVER_SECONDS)
                self._hurry.wait(max(0.0, applied + BATCH_SECONDS - time.monotonic()))
            self._hurry.clear()
            self._wake.clear()
            while self._queue:
                pending.append(self._queue.popleft())
            if not self._closing and time.monotonic() - swept >= RECOVER_SECONDS:
                swept = time.monotonic()
                with contextlib.suppress(OperationalError, InterfaceError, OSError):
                    replay.recover(self.directory)
            if not pending:
                if self._closing:
                    return
                continue
            applied = time.monotonic()
            try:
                replay.apply(entry for _, _, entry, _ in pending)
            except Exception as exc:  # the lines stay: retried, never dropped
                failures += 1
                unreachable = isinstance(exc, OperationalError | InterfaceError)
                log.log(
                    logging.WARNING if unreachable else logging.ERROR,
                    "journal: usage records not applied yet, will retry: %s",
                    exc,
                    exc_info=not unreachable,
                )
                if self._closing and failures > GIVE_UP_AFTER:
                    self._queue.extendleft(reversed(pending))  # left in the file
                    return
                time.sleep(min(5.0, 0.05 * 2**failures))
                continue
            for path, end, _, _ in pending:
                replay.note_applied(path, end)
            pending, failures = [], 0
            self._rotate_if_done()

    def _rotate_if_done(self) -> None:
        with self._lock:
            if self._size >= ROTATE_BYTES:
                self._open_new()

    def close(self) -> None:
        """Drain into the ledger (SIGTERM, app teardown); the file goes once nothing in
        it is left to apply. Without a ledger, it stays for `recover`."""
        _OPEN.discard(self)
        writer = self._writer
        if writer is None or self._pid != os.getpid():
            return
        self._closing = True
        self._hurry.set()
        self._wake.set()
        writer.join(DRAIN_SECONDS)
        with self._lock:
            if not writer.is_alive() and not self._queue and not self._inflight and self._path:
                self._path.unlink(missing_ok=True)
            if self._fd >= 0:
                os.close(self._fd)
            self._pid, self._fd = 0, -1


_OPEN: set[Journal] = set()


def close_all() -> None:
    """Drain every journal of this process (the worker's exit, the interpreter's)."""
    for journal in list(_OPEN):
        journal.close()


atexit.register(close_all)


def default_directory(database_url: str) -> Path:
    """`keymeai-journal/` next to a SQLite ledger, else in the working directory."""
    if database_url.startswith("sqlite:///") and not database_url.endswith(":memory:"):
        return Path(database_url.removeprefix("sqlite:///")).parent / "keymeai-journal"
    return Path("keymeai-journal")


def catch_up(directory: Path | None = None) -> None:
    """Apply every finished line not yet applied by this process in `directory` (by
    default those of this process's open journals): after it, the ledger holds every
    request answered before the call, whichever worker of this machine served it."""
    directories = {directory} if directory else {j.directory for j in _OPEN}
    for folder in directories:
        replay.catch_up(folder)
