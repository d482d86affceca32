"""The usage journal: a SIGKILL loses no answered request and records those in flight.

Each worker appends its requests' `started` and `finished` lines to its own file and a
writer thread applies them to the ledger (keymeai/journal.py). The gunicorn tests hold
the ledger's write lock from this process while requests are answered, so their records
exist only in the journal when the worker is killed (or told to stop): what reaches the
ledger afterwards came from replaying or draining it. They run gthread workers, and gevent
ones on PostgreSQL: under gevent a SQLite writer waiting for the lock would block the
whole worker (sqlite3's busy wait is C code), which is not what is under test here.
(Without the test's lock, test_quota's crashed-worker test kills a gevent worker on
SQLite.)
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from keymeai import create_app
from keymeai.api.validation import parse_chat_request
from keymeai.config import ConfigError
from keymeai.ledger import journal, quota, replay
from keymeai.ledger.db import connection, db, is_sqlite
from keymeai.ledger.keys import KeyInfo, create_key
from keymeai.ledger.metering import Meter
from keymeai.ledger.models import QuotaReservation, UsageDaily, UsageRecord
from tests.helpers.clients import HI, sdk, wait_until
from tests.helpers.config import MODEL, build_config
from tests.helpers.ledger import reservations, usage_records
from tests.helpers.servers import Gunicorn, worker_pids

pytestmark = pytest.mark.both_databases

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
GTHREAD = {"KEYMEAI_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "16"}


def daily() -> list[tuple[int, int, int]]:
    """The roll-ups' (requests, total tokens, cost) per key, day and model."""
    with connection():
        return [(r.requests, r.total_tokens, r.cost_units) for r in UsageDaily.select()]


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


@contextmanager
def ledger_locked() -> Iterator[None]:
    """Hold the ledger's write lock (usage records cannot be inserted meanwhile)."""
    with connection():
        if is_sqlite():
            with db.atomic("IMMEDIATE"):
                yield
            return
        with db.atomic():
            db.execute_sql("LOCK TABLE usage_record IN EXCLUSIVE MODE")
            yield


def by_request_id() -> dict[str, UsageRecord]:
    return {record.request_id: record for record in usage_records()}


def answer(client: OpenAI, request_id: str, words: int, stream: bool) -> None:
    """One request answered in full (a stream read to [DONE])."""
    options: dict[str, Any] = {
        "model": MODEL,
        "messages": HI,
        "extra_body": {"fake": {"words": words}},
        "extra_headers": {"X-Request-Id": request_id},
    }
    if stream:
        with client.chat.completions.create(stream=True, **options) as chunks:
            assert [chunk for chunk in chunks]
    else:
        assert client.chat.completions.create(**options).usage is not None


def assert_answered(record: UsageRecord, words: int, stream: bool) -> None:
    assert (record.outcome, record.status, record.stream) == ("ok", 200, stream)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (4, words, False)
    assert record.provider == "deepseek" and record.cost_units > 0


@pytest.fixture(params=["gthread", "gevent"])
def worker_class(request: pytest.FixtureRequest, database_backend: str) -> str:
    """The gunicorn worker class; not gevent on SQLite: a gevent worker waiting for the
    SQLite lock this test holds cannot answer (see the top)."""
    if request.param == "gevent" and database_backend == "sqlite":
        pytest.skip("a gevent worker waiting for SQLite's lock cannot answer (see the top)")
    return str(request.param)


def test_sigkill_loses_no_answered_request_and_records_those_in_flight(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    ledger: None,
    worker_class: str,
) -> None:
    config_data["tiers"]["hobby"]["tokens_per_month"] = 1_000_000
    hobby = create_key("in flight", "hobby")[1]
    standard = create_key("answered", "standard")[1]
    server = start_gunicorn(config_data, env={**GTHREAD, "KEYMEAI_WORKER_CLASS": worker_class})
    assert server.process is not None
    (worker,) = worker_pids(server.process.pid)
    with sdk(server.url, hobby, timeout=30) as slow, sdk(server.url, standard, timeout=30) as fast:
        in_flight = []
        for n in range(2):
            stream = slow.chat.completions.create(
                model=MODEL,
                messages=HI,
                stream=True,
                extra_body={"fake": {"words": 100, "interval": 0.5}},
                extra_headers={"X-Request-Id": f"in-flight-{n}"},
            )
            next(iter(stream))  # under way: its first chunk relayed
            in_flight.append(stream)
        assert reservations() == 2
        with ledger_locked():
            for n in range(2):
                answer(fast, f"answer-{n}", words=5, stream=False)
                answer(fast, f"stream-{n}", words=7, stream=True)
            assert UsageRecord.select().count() == 0  # the answers are in the journal alone
            os.kill(worker, signal.SIGKILL)
            assert wait_until(lambda: worker_pids(server.process.pid) not in ([], [worker]))
        for stream in in_flight:
            stream.close()
    assert wait_until(lambda: len(usage_records()) == 6, timeout=20)  # the new worker replayed
    records = by_request_id()
    for n in range(2):
        assert_answered(records[f"answer-{n}"], words=5, stream=False)
        assert_answered(records[f"stream-{n}"], words=7, stream=True)
        lost = records[f"in-flight-{n}"]
        assert (lost.outcome, lost.status, lost.stream, lost.estimated) == ("lost", 0, True, True)
        assert (lost.prompt_tokens, lost.completion_tokens, lost.total_tokens) == (4, 0, 4)
        assert lost.provider is None and lost.cost_units > 0
    assert reservations() == 0
    rolled = daily()
    assert sum(r[0] for r in rolled) == 6
    assert sum(r[1] for r in rolled) == sum(r.total_tokens for r in records.values())
    assert sum(r[2] for r in rolled) == sum(r.cost_units for r in records.values())
    assert not [
        p
        for p in journal_files(Path(config_data["metering"]["journal_dir"]))
        if p.name.startswith(f"{worker}-")
    ]


def test_sigterm_drains_the_journal_into_the_ledger(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    ledger: None,
    worker_class: str,
) -> None:
    key = create_key("drained", "standard")[1]
    server = start_gunicorn(config_data, env={**GTHREAD, "KEYMEAI_WORKER_CLASS": worker_class})
    assert server.process is not None
    with sdk(server.url, key, timeout=30) as client, ledger_locked():
        answer(client, "answer", words=5, stream=False)
        answer(client, "stream", words=7, stream=True)
        assert UsageRecord.select().count() == 0  # the answers are in the journal alone
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1)  # the worker is draining, waiting for the ledger
    assert server.process.wait(30) == 0
    records = by_request_id()
    assert_answered(records["answer"], words=5, stream=False)
    assert_answered(records["stream"], words=7, stream=True)
    assert journal_files(Path(config_data["metering"]["journal_dir"])) == []


@pytest.fixture
def metered(config_data: dict[str, Any], ledger: None) -> Callable[..., Meter]:
    """Real meters of a key with a token quota, each with a real reservation and noted
    in the given journal, as api.py makes them."""
    config = build_config(config_data)
    row, _ = create_key("journaled", "standard", tokens_per_month=1_000_000)
    key = KeyInfo.from_row(row)
    body = {"model": MODEL, "messages": HI}

    def meter(into: journal.Journal, hold: bool = True) -> Meter:
        chat = parse_chat_request(body, config.models)
        reservation = None
        if hold:  # without: as for a key with neither a token quota nor a spend cap
            reservation, _ = quota.reserve(key, config.tiers["standard"], chat, config.quota)
        meter = Meter(key, chat, "client-id")
        meter.journal_to(into, reservation)
        meter.attempt(chat.model.upstreams[0])
        meter.observe({"usage": USAGE})
        return meter

    return meter


def ledger_records() -> int:
    """The records in the ledger now (no journal applied first)."""
    with connection():
        return int(UsageRecord.select().count())


def test_the_writer_gathers_records_and_hurries_for_a_quota_hold(
    metered: Callable[..., Meter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records wait for the next batch; one that releases a hold is applied at once (its
    key's next request is admitted against the ledger), with those gathered before it."""
    monkeypatch.setattr(journal, "BATCH_SECONDS", 5.0)
    batches: list[int] = []
    apply = replay.apply

    def counted(entries: Iterable[dict[str, Any]]) -> None:
        batch = list(entries)
        batches.append(len(batch))
        apply(batch)

    monkeypatch.setattr(replay, "apply", counted)
    live = journal.Journal(journal.check_directory(tmp_path / "live"))
    for _ in range(4):
        metered(live, hold=False).finish(200, "ok")
    time.sleep(0.5)
    assert ledger_records() == 0 and batches == []
    metered(live).finish(200, "ok")
    assert wait_until(lambda: ledger_records() == 5, timeout=3)
    assert batches == [5] and reservations() == 0
    live.close()


def dead_copy(source: Path, directory: Path, tail: bytes = b"") -> Path:
    """`source` as the file of a process that has died (nobody holds its lock)."""
    directory.mkdir(exist_ok=True)
    copy = directory / f"999999999-dead{len(list(directory.iterdir()))}-000001.jsonl"
    shutil.copyfile(source, copy)
    with copy.open("ab") as fh:
        fh.write(tail)
    return copy


def test_a_journal_replayed_twice_counts_once(
    metered: Callable[[journal.Journal], Meter], tmp_path: Path
) -> None:
    live = journal.Journal(journal.check_directory(tmp_path / "live"))
    for _ in range(3):
        metered(live).finish(200, "ok")
    (source,) = journal_files(tmp_path / "live")
    journal.catch_up(tmp_path / "live")
    journal.catch_up(tmp_path / "live")
    copies = tmp_path / "copies"
    dead_copy(source, copies)
    assert replay.recover(copies) == 1
    dead_copy(source, copies)
    assert replay.recover(copies) == 1
    live.close()
    records = usage_records()
    assert len(records) == 3 and len({r.record_id for r in records}) == 3
    assert [(r.outcome, r.total_tokens, r.estimated) for r in records] == [("ok", 18, False)] * 3
    assert daily() == [(3, 54, records[0].cost_units * 3)]
    assert reservations() == 0
    assert journal_files(tmp_path / "live") == [] and journal_files(copies) == []


def test_a_torn_last_line_is_skipped_and_requests_in_flight_are_lost(
    metered: Callable[[journal.Journal], Meter], tmp_path: Path
) -> None:
    live = journal.Journal(journal.check_directory(tmp_path / "live"))
    metered(live).finish(200, "ok")
    in_flight = metered(live)  # started, never finished: its process "dies"
    assert wait_until(lambda: len(usage_records()) == 1)
    (source,) = journal_files(tmp_path / "live")
    dead = tmp_path / "dead"
    dead_copy(source, dead, tail=b'{"e":"f","id":"' + in_flight.record_id.encode())
    assert replay.recover(dead) == 1
    records = usage_records()
    assert sorted((r.outcome, r.total_tokens) for r in records) == [("lost", 4), ("ok", 18)]
    lost = next(r for r in records if r.outcome == "lost")
    assert lost.record_id == in_flight.record_id and lost.estimated
    assert daily()[0][:2] == (2, 22)
    assert reservations() == 0
    assert journal_files(dead) == []
    in_flight.finish(200, "ok")  # too late: the record is lost, and stays one record
    live.close()
    assert [r.outcome for r in usage_records()] == ["ok", "lost"]
    with connection():
        assert QuotaReservation.select().count() == 0


def test_a_rotated_journal_keeps_the_requests_in_flight(
    metered: Callable[[journal.Journal], Meter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "ROTATE_BYTES", 1)  # a new file after every batch
    live = journal.Journal(journal.check_directory(tmp_path / "live"))
    in_flight = metered(live)
    for _ in range(3):
        metered(live).finish(200, "ok")
        assert wait_until(lambda: reservations() == 1)
    assert wait_until(lambda: journal_files(tmp_path / "live")[0].name.endswith("-000004.jsonl"))
    (current,) = journal_files(tmp_path / "live")  # the applied files are gone
    dead_copy(current, tmp_path / "dead")
    assert replay.recover(tmp_path / "dead") == 1
    assert sorted(r.outcome for r in usage_records()) == ["lost", "ok", "ok", "ok"]
    assert reservations() == 0
    in_flight.finish(200, "ok")
    live.close()
    assert len(usage_records()) == 4 and daily()[0][0] == 4


def test_an_unwritable_journal_directory_is_refused_at_start(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    config_data["metering"]["journal_dir"] = str(tmp_path / "file" / "journal")
    with pytest.raises(ConfigError, match=r"metering.journal_dir .*not writable"):
        create_app(build_config(config_data))


def test_a_journal_that_cannot_be_written_falls_back_to_the_ledger(
    start_gateway: Callable[..., Any], config_data: dict[str, Any]
) -> None:
    gateway = start_gateway(config_data)
    key = gateway.create_key("standard")
    shutil.rmtree(config_data["metering"]["journal_dir"])  # its disk is gone
    with gateway.client(key) as client:
        answer(client, "fallback", words=5, stream=False)
        with connection():  # written at once: nothing is left to apply
            (record,) = UsageRecord.select()
    assert_answered(record, words=5, stream=False)
