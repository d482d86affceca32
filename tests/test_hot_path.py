"""What the request path was made cheaper by keeps its meaning: the body watchdog's thread,
a concurrency slot released once, request ids, JSON written by orjson, the body read
once."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import socket
import threading
import time
from typing import Any

from keymeai.api.bodies import BODY, BodyDeadline, Watchdog
from keymeai.api.concurrency import UNBOUNDED, Slot
from keymeai.ledger.journal import _line
from keymeai.ops.health import new_request_id
from keymeai.ops.logs import JsonFormatter
from tests.helpers.errors import GENERATED_REQUEST_ID

BEYOND_64_BITS = 2**70 + 1


def test_the_body_watchdog_serves_body_after_body_with_one_thread() -> None:
    """A thread per body was a greenlet started for nearly every request: the body was
    read before the thread first ran, and the thread ended as it found nothing to watch."""
    watchdog = Watchdog(timeout=5)
    left, right = socket.socketpair()
    with left, right:
        threads = set()
        for _ in range(3):
            entry = watchdog.watch(left)
            assert watchdog.release(entry) is False
            time.sleep(0.05)  # the thread runs and finds no read in progress
            assert watchdog._thread is not None and watchdog._thread.is_alive()
            threads.add(watchdog._thread)
        assert len(threads) == 1


def test_the_body_watchdog_still_cuts_a_late_body_and_ends_when_idle() -> None:
    watchdog = Watchdog(timeout=0.3)
    left, right = socket.socketpair()
    with left, right:
        done = watchdog.watch(left)
        watchdog.release(done)
        late = watchdog.watch(right)
        thread = watchdog._thread
        assert thread is not None
        right.settimeout(5)
        assert right.recv(1) == b""  # blocked until the deadline shut its read side
        assert watchdog.release(late) is True
        thread.join(5)  # no body for a timeout: the thread ends
        assert not thread.is_alive()
        assert watchdog._thread is None


def test_a_body_read_whole_is_handed_to_the_view_and_a_short_one_is_not() -> None:
    """The view takes a whole body as bytes (`serve.read_body`); a body that ended early
    (the client left) is left to Werkzeug, which says so (400)."""
    seen = []

    def app(environ: dict[str, Any], start_response: object) -> list[bytes]:
        seen.append((environ.get(BODY), environ["wsgi.input"].read()))
        return [b""]

    deadline = BodyDeadline(app, timeout=5, limit=100)
    left, right = socket.socketpair()
    with left, right:
        for declared, sent in [("5", b"hello"), ("9", b"hello")]:
            environ = {"CONTENT_LENGTH": declared, "gunicorn.socket": left}
            deadline({**environ, "wsgi.input": io.BytesIO(sent)}, lambda *_: None)
    assert seen == [(b"hello", b"hello"), (None, b"hello")]


class _CountingStore:
    def __init__(self) -> None:
        self.released = 0

    def acquire(self, key_id: int, limit: int, member: str) -> tuple[bool, int]:
        return True, 1

    def release(self, key_id: int, member: str) -> None:
        self.released += 1


def test_a_slot_is_given_back_once_however_many_release_it() -> None:
    store = _CountingStore()
    slots = [Slot(store, 1, f"m{n}") for n in range(200)]
    start = threading.Barrier(4)

    def release_all() -> None:
        start.wait(5)
        for slot in slots:
            slot.release()

    workers = [threading.Thread(target=release_all) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert store.released == 200
    UNBOUNDED.release()  # the shared slot of unbounded keys: nothing to give back, ever
    UNBOUNDED.release()


def test_generated_request_ids_keep_their_form() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(GENERATED_REQUEST_ID.fullmatch(value) for value in ids)


def test_journal_lines_keep_their_times_and_any_integer() -> None:
    at = dt.datetime(2026, 12, 4, 19, 30, 5, 120)
    for entry in [{"at": at, "n": 7}, {"at": at, "n": BEYOND_64_BITS}]:
        line = _line(entry)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        parsed = json.loads(line)
        assert parsed == {"at": "2026-12-04T19:30:05.000120", "n": entry["n"]}
        assert dt.datetime.fromisoformat(parsed["at"]) == at


def test_log_lines_write_what_orjson_cannot() -> None:
    """A lone surrogate (provider text), a key that is not a string, an integer beyond
    64 bits: the line is still one JSON object, as the standard library writes it."""
    at = dt.datetime(2026, 12, 4, 19, 30, 5)
    for extra, expected in [
        ({"when": at, "n": 3}, {"when": str(at), "n": 3}),
        ({"text": "bad \ud800 text"}, {"text": "bad \ud800 text"}),
        ({"detail": {1: "one"}}, {"detail": {"1": "one"}}),
        ({"n": BEYOND_64_BITS}, {"n": BEYOND_64_BITS}),
    ]:
        record = logging.getLogger("keymeai.test").makeRecord(
            "keymeai.test", logging.INFO, __file__, 1, "line", (), None, extra=extra
        )
        text = JsonFormatter().format(record)
        assert "\n" not in text
        entry = json.loads(text)
        assert entry["message"] == "line"
        assert {k: entry[k] for k in expected} == expected
