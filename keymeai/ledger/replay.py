"""Replaying usage journals (keymeai.ledger.journal) into the ledger, from any process.

A journal is a file of JSON lines: `{"e": "s", ...}` when a request starts (see
`lost_record` for its fields), `{"e": "f", "id", "res", "rec"}` when it ends, with the
record `metering.write_batch` takes (or null) and the reservation to release. Applying
a line twice counts once (the record's `record_id`), so a file may be applied by its
owner's writer, by a reader that must see it (`catch_up`), and by `recover` after its
owner died, in any order.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from peewee import DatabaseError, InterfaceError, OperationalError

from .metering import WRITE_ATTEMPTS, write_batch

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
LOST_STATUS = 0  # a lost request's status: no final status was ever decided


def files(directory: Path) -> list[Path]:
    """The journal files in `directory`, oldest of each process first."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def _record(raw: dict[str, Any]) -> dict[str, Any]:
    """A journaled record as `write_batch` takes it (its time back to a datetime)."""
    created = raw["created_at"]
    if isinstance(created, str):
        raw = {**raw, "created_at": dt.datetime.fromisoformat(created)}
    return raw


def lost_record(started: dict[str, Any]) -> dict[str, Any]:
    """The record of a request whose process died before it ended: what was known at
    its start, flagged `lost` and estimated (the prompt estimate, no completion)."""
    prompt = started["prompt"]
    return {
        "key": started["key"],
        "created_at": started["at"],
        "record_id": started["id"],
        "request_id": started["rq"],
        "model": started["model"],
        "provider": None,
        "upstream_model": None,
        "stream": started["stream"],
        "status": LOST_STATUS,
        "outcome": "lost",
        "attempts": 0,
        "prompt_tokens": prompt,
        "completion_tokens": 0,
        "total_tokens": prompt,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": True,
        "latency_ms": 0,
        "cost_units": started["cost"],
    }


def read_entries(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of `path` from `offset`, parsed, and the offset after them.

    A last line without its newline is a write still under way (or torn by a kill):
    it is left for the next read. A line that is not JSON is skipped and logged.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:end].splitlines():
        try:
            entries.append(json.loads(raw))
        except ValueError:
            log.warning("journal %s: unreadable line skipped", path.name)
    return entries, offset + end


def apply(entries: Iterable[dict[str, Any]]) -> None:
    """Apply finished entries (a record and/or a reservation to release) in one
    transaction; a record the ledger refuses (its key deleted) is logged and skipped."""
    batch = [e for e in entries if e.get("e") == "f" and (e["rec"] or e["res"] is not None)]
    if not batch:
        return
    try:
        _write([_record(e["rec"]) for e in batch if e["rec"]], _releases(batch))
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        for entry in batch:  # one at a time, to find and drop the refused one
            try:
                _write([_record(entry["rec"])] if entry["rec"] else [], _releases([entry]))
            except (OperationalError, InterfaceError):
                raise
            except DatabaseError as exc:
                log.error("usage record refused: %s", exc, extra={"usage_record": entry["rec"]})


def _write(records: list[dict[str, Any]], releases: list[int]) -> None:
    """write_batch, tried again on a transient error (a deadlock or serialisation
    failure PostgreSQL resolved by aborting this side, a dropped connection): the batch
    is exactly-once, so a retry can only complete it."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            write_batch(records, releases)
            return
        except (OperationalError, InterfaceError):
            if attempt == WRITE_ATTEMPTS:
                raise
            time.sleep(0.01 * 2**attempt)


def _releases(batch: list[dict[str, Any]]) -> list[int]:
    return [e["res"] for e in batch if e.get("res") is not None]


_applied: dict[Path, int] = {}  # file -> bytes of it this process has applied


_applied_lock = threading.Lock()


def note_applied(path: Path | None, end: int) -> None:
    """`path` is applied up to byte `end`: `catch_up` reads on from there."""
    if path is not None:
        with _applied_lock:
            _applied[path] = max(end, _applied.get(path, 0))


@contextlib.contextmanager
def _held(path: Path) -> Iterator[bool]:
    """Whether we got `path`'s flock, i.e. its owner is gone (held for the block)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def recover(directory: Path) -> int:
    """Apply the files of dead processes in `directory`, their requests in flight as
    `lost` records, and remove them; returns how many files. Idempotent."""
    groups: dict[str, list[Path]] = {}
    for path in files(directory):
        groups.setdefault(path.name.rsplit("-", 1)[0], []).append(path)
    done = 0
    for paths in groups.values():
        with contextlib.ExitStack() as stack:
            if not all(stack.enter_context(_held(p)) for p in paths):
                continue  # its owner is alive (or another process is recovering it)
            apply(_with_lost(e for p in paths for e in read_entries(p)[0]))
            for path in paths:
                path.unlink(missing_ok=True)
            done += len(paths)
    if done:
        log.info("journal: recovered %d file(s) of stopped processes", done)
    return done


def _with_lost(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished entries, plus one for each request that started and never ended."""
    started: dict[str, dict[str, Any]] = {}
    finished: list[dict[str, Any]] = []
    for entry in entries:
        if entry.get("e") == "s":
            started.setdefault(entry["id"], entry)
        elif entry.get("e") == "f":
            finished.append(entry)
    for entry in finished:
        started.pop(entry["id"], None)
    lost = [{"e": "f", "res": s["res"], "rec": lost_record(s)} for s in started.values()]
    return finished + lost


def catch_up(directory: Path) -> None:
    """Apply the finished lines of every file in `directory` that this process has not
    applied yet (it remembers how far it got in each)."""
    present = files(directory)
    with _applied_lock:
        for gone in [p for p in _applied if p.parent == directory and p not in present]:
            del _applied[gone]
    for path in present:
        with _applied_lock:
            start = _applied.get(path, 0)
        entries, end = read_entries(path, start)
        apply(entries)
        note_applied(path, end)
