"""Metering: one usage record per request that reached an upstream, written once.

A `Meter` follows a request from routing to the last byte relayed. It takes the usage
the upstream reports (DeepSeek on its finish chunk, DashScope and Ark on a separate
chunk, everyone on a non-stream body) and, for a stream cut short or an upstream that
reports nothing, an estimate of what was relayed, flagged as such. `finish()` hands the
record and the release of the quota reservation to the usage journal (keymeai.ledger.journal),
whatever path the request ended by: success, a client that hung up, an upstream that
died, an error; `write_batch` then writes records, roll-ups and releases in one
transaction.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peewee import InterfaceError, OperationalError

from ..catalogue import Upstream
from ..ops import metrics
from ..tokens import delta_text, estimate_tenths, tokens
from .billing import Usage, cost_units
from .db import connection, db, write_transaction
from .keys import KeyInfo
from .models import UsageRecord, utcnow

if TYPE_CHECKING:
    from ..api.validation import ChatRequest
    from .journal import Journal

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 5
# Outcomes after which the client received (part of) an answer: billed, estimated if need be.
DELIVERED = {"ok", "client_closed", "upstream_failed", "interrupted"}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _nested(raw: dict[str, Any], outer: str, inner: str) -> Any:
    details = raw.get(outer)
    return details.get(inner) if isinstance(details, dict) else None


def parse_usage(raw: Any) -> Usage | None:
    """A provider's `usage` object as counts; None if it is missing or malformed."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = _count(raw.get("prompt_tokens")), _count(raw.get("completion_tokens"))
    if completion is None and prompt is not None and _count(raw.get("total_tokens")) == prompt:
        completion = 0  # an embedding's usage: prompt and total only
    if prompt is None or completion is None:
        return None
    cached = _count(raw.get("prompt_cache_hit_tokens"))  # DeepSeek
    if cached is None:
        cached = _count(_nested(raw, "prompt_tokens_details", "cached_tokens")) or 0
    reasoning = _count(_nested(raw, "completion_tokens_details", "reasoning_tokens")) or 0
    return Usage(prompt, completion, min(cached, prompt), reasoning)


class Meter:
    """The ledger's view of one request; `finish()` writes it exactly once."""

    def __init__(self, key: KeyInfo, chat: ChatRequest, request_id: str) -> None:
        self.key = key
        self.chat = chat
        self.request_id = request_id  # the client's X-Request-Id (may repeat), or ours
        self.record_id = uuid.uuid4().hex  # the record's own id: a retried write stays one row
        self.started = time.monotonic()
        self.upstream: Upstream | None = None
        self.attempts = 0
        self.usage: Usage | None = None
        self.output_tenths = 0  # estimated tokens relayed so far, in tenths
        self.reservation_id: int | None = None
        self.on_finish: Callable[[], None] | None = None  # e.g. the concurrency slot's release
        self.journal: Journal | None = None  # where `finish` writes; None: to the ledger at once
        self._finished = False
        self._lock = threading.Lock()

    def journal_to(self, journal: Journal, reservation_id: int | None) -> None:
        """Write the record through `journal`, noting the request as in flight there:
        if the process dies before `finish`, it is recorded `lost` (replay.lost_record)."""
        self.reservation_id = reservation_id
        prompt = self.chat.prompt_estimate
        try:
            journal.started(
                {
                    "id": self.record_id,
                    "key": self.key.id,
                    "model": self.chat.model.id,
                    "res": reservation_id,
                    "prompt": prompt,
                    "cost": cost_units(self.chat.model.price, Usage(prompt=prompt)),
                    "stream": self.chat.stream,
                    "rq": self.request_id,
                    "at": utcnow(),
                }
            )
        except OSError as exc:
            log.error("usage journal not writable, writing to the ledger: %s", exc)
            return
        self.journal = journal

    def _journaled(self, fields: dict[str, Any] | None) -> bool:
        """Whether the journal took the record; if its disk fails (full, gone), the
        record is written to the ledger at once instead."""
        if self.journal is None:
            return False
        try:
            self.journal.finished(self.record_id, fields, self.reservation_id)
        except OSError as exc:
            log.error("usage journal not writable, writing to the ledger: %s", exc)
            return False
        return True

    def attempt(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.attempts += 1

    def observe(self, obj: dict[str, Any]) -> None:
        """Take usage and generated text from a completion body or a stream chunk."""
        usage = obj.get("usage")
        if usage:
            self.usage = parse_usage(usage) or self.usage
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                text = delta_text(choice.get("delta") or choice.get("message"))
                self.output_tenths += estimate_tenths(text)

    def billable_usage(self, outcome: str) -> Usage:
        if outcome not in DELIVERED:
            return Usage()  # nothing reached the client: not billed
        if self.usage is not None:
            return self.usage
        return Usage(
            prompt=self.chat.prompt_estimate,
            completion=tokens(self.output_tenths),
            estimated=True,
        )

    def finish(self, status: int, outcome: str) -> None:
        """Write the usage record (if an upstream was reached) and release the quota hold."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        usage = self.billable_usage(outcome)
        latency_ms = int((time.monotonic() - self.started) * 1000)
        fields = None
        if self.upstream is not None:
            fields = {
                "key": self.key.id,
                "created_at": utcnow(),
                "record_id": self.record_id,
                "request_id": self.request_id,
                "model": self.chat.model.id,
                "provider": self.upstream.provider,
                "upstream_model": self.upstream.model,
                "stream": self.chat.stream,
                "status": status,
                "outcome": outcome,
                "attempts": self.attempts,
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.total,
                "cached_tokens": usage.cached,
                "reasoning_tokens": usage.reasoning,
                "estimated": usage.estimated,
                "latency_ms": latency_ms,
                "cost_units": cost_units(self.chat.model.price, usage),
            }
        if not self._journaled(fields) and (fields is not None or self.reservation_id is not None):
            write_usage(fields, self.reservation_id)
        metrics.request_finished(self.chat.model.id, status, outcome, usage)
        log.info(
            "embeddings" if self.chat.model.kind == "embedding" else "chat completion",
            extra={
                "request_id": self.request_id,
                "record_id": self.record_id if fields is not None else None,
                "key_id": self.key.id,
                "model": self.chat.model.id,
                "upstream": f"{self.upstream.provider}/{self.upstream.model}"
                if self.upstream
                else None,
                "status": status,
                "outcome": outcome,
                "latency_ms": latency_ms,
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "estimated": usage.estimated,
                "stream": self.chat.stream,
            },
        )
        if self.on_finish is not None:
            self.on_finish()


RECORD_COLUMNS = tuple(name for name in UsageRecord._meta.sorted_field_names if name != "id")
ROLLED_UP = ("prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "cost_units")


@functools.cache
def _statements(param: str) -> tuple[str, str, str]:
    """The three statements of a usage write, as SQL text built once per placeholder
    style: peewee's query builder cost more per request than SQLite's own work.
    The same text serves SQLite and PostgreSQL (both have ON CONFLICT). The record's
    insert does nothing when its `record_id` is already there: see `write_usage`."""
    columns = ", ".join(UsageRecord._meta.fields[c].column_name for c in RECORD_COLUMNS)
    record = (
        f"INSERT INTO usage_record ({columns}) VALUES ({', '.join([param] * len(RECORD_COLUMNS))}) "
        "ON CONFLICT (record_id) DO NOTHING"
    )
    sums = ", ".join(ROLLED_UP)
    update = ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in ("requests", *ROLLED_UP))
    daily = (
        f"INSERT INTO usage_daily (key_id, day, model, requests, {sums}) "
        f"VALUES ({', '.join([param] * (4 + len(ROLLED_UP)))}) "
        f"ON CONFLICT (key_id, day, model) DO UPDATE SET {update}"
    )
    release = f"DELETE FROM quota_reservation WHERE id = {param}"
    return record, daily, release


def write_usage(fields: dict[str, Any] | None, reservation_id: int | None) -> None:
    """Insert the record, bump the day's roll-up, drop the reservation: all or nothing.

    The synchronous path, for a meter without a journal. Retried on transient errors (a
    locked SQLite file, a dropped PostgreSQL connection); if the ledger stays
    unreachable the record is logged in full so it can be replayed.
    """
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            write_batch(
                [] if fields is None else [fields],
                [] if reservation_id is None else [reservation_id],
            )
            return
        except (OperationalError, InterfaceError) as exc:
            if attempt == WRITE_ATTEMPTS:
                log.error("usage record not written: %s", exc, extra={"usage_record": fields})
                return
            time.sleep(0.05 * 2**attempt)


def write_batch(records: list[dict[str, Any]], reservation_ids: list[int]) -> None:
    """Insert the records, add the inserted ones to their days' roll-ups (summed per key,
    day and model), and drop the reservations, in one transaction.

    Exactly-once: a record whose `record_id` is already there (a retry after a commit
    whose acknowledgement was lost, a journal applied twice) inserts nothing and adds
    nothing to the roll-up; dropping a reservation twice is harmless.

    Roll-ups and reservations are written in one order (sorted) by every writer, so that
    two batches touching the same rows on PostgreSQL wait for each other instead of
    deadlocking (two instances' writers, or a worker's writer and a reader catching up
    on the same journals); records keep their journal's order, which two readers of one
    journal share.
    """
    record, daily, release = _statements(db.param)
    with connection(), write_transaction():
        sums: dict[tuple[Any, ...], list[int]] = {}
        for fields in records:  # in journal order: the ledger's ids follow the requests
            if db.execute_sql(record, _record_values(fields)).rowcount:
                group = (fields["key"], fields["created_at"].date(), fields["model"])
                values = [1, *(fields[c] for c in ROLLED_UP)]
                total = sums.setdefault(group, [0] * len(values))
                total[:] = [a + b for a, b in zip(total, values, strict=True)]
        for group in sorted(sums):
            db.execute_sql(daily, [*group, *sums[group]])
        for reservation_id in sorted(reservation_ids):
            db.execute_sql(release, [reservation_id])


def _record_values(fields: dict[str, Any]) -> list[Any]:
    """The record's values in column order, converted as peewee's fields would."""
    model_fields = UsageRecord._meta.fields
    return [model_fields[c].db_value(fields[c]) for c in RECORD_COLUMNS]
