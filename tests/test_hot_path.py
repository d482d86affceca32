"""What the request path was made cheaper by keeps its meaning: the body watchdog's thread,
a concurrency slot released once, request ids."""

from __future__ import annotations

import socket
import threading
import time

from keymeai.api.bodies import Watchdog
from keymeai.api.concurrency import UNBOUNDED, Slot
from keymeai.ops.health import new_request_id
from tests.helpers.errors import GENERATED_REQUEST_ID


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
