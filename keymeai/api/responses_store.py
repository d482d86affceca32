"""Stored responses (`store: true`, OpenAI's default): the Response object and the
conversation that led to it, kept for the key that made it, so that the key can read it
back, delete it, or continue it with `previous_response_id`. Another key's id is
answered 404, as one that never existed. Rows older than `[responses] retention_days`
are pruned as new ones are written (at most once a minute per process) and never read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from typing import Any

from peewee import AutoField, CharField, DateTimeField, IntegerField, Model, TextField

from ..errors import ApiError
from ..ledger.db import connection, db, write_transaction
from ..ledger.models import utcnow
from .responses_input import NAMESPACE_SEPARATOR

log = logging.getLogger(__name__)
PRUNE_EVERY = 60.0  # seconds between prunes in one process
_pruned_at = 0.0
_prune_lock = threading.Lock()


class StoredResponse(Model):
    id = AutoField()
    response_id = CharField(max_length=64, unique=True)
    key_id = IntegerField()
    created_at = DateTimeField(default=utcnow, index=True)
    response = TextField()
    history = TextField()

    class Meta:
        database = db
        table_name = "stored_response"


def not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(
        404,
        f"Response with id '{response_id[:100]}' not found.",
        param=param,
        code="response_not_found" if param is None else "previous_response_not_found",
    )


def _live(key_id: int, response_id: str, retention_days: int) -> StoredResponse | None:
    oldest = utcnow() - dt.timedelta(days=retention_days)
    row: StoredResponse | None = StoredResponse.get_or_none(
        (StoredResponse.response_id == response_id)
        & (StoredResponse.key_id == key_id)
        & (StoredResponse.created_at >= oldest)
    )
    return row


def load(key_id: int, response_id: str, retention_days: int) -> dict[str, Any]:
    """The stored Response object of this key; 404 for any other."""
    with connection():
        row = _live(key_id, response_id, retention_days)
    if row is None:
        raise not_found(response_id)
    stored: dict[str, Any] = json.loads(row.response)
    return stored


def history(key_id: int, response_id: Any, retention_days: int) -> list[dict[str, Any]]:
    """The chat messages a `previous_response_id` continues; 404 for another key's id."""
    if not isinstance(response_id, str):
        raise ApiError(400, "previous_response_id must be a string", param="previous_response_id")
    with connection():
        row = _live(key_id, response_id, retention_days)
    if row is None:
        raise not_found(response_id, "previous_response_id")
    messages: list[dict[str, Any]] = json.loads(row.history)
    return messages


def delete(key_id: int, response_id: str) -> None:
    with connection(), write_transaction():
        gone = (
            StoredResponse.delete()
            .where((StoredResponse.response_id == response_id) & (StoredResponse.key_id == key_id))
            .execute()
        )
    if not gone:
        raise not_found(response_id)


def save(
    key_id: int, response: dict[str, Any], conversation: list[dict[str, Any]], retention_days: int
) -> None:
    """Keep a finished response; `conversation` is the chat messages it answered (the
    instructions left out: OpenAI does not carry them over to the next turn). A failure
    is logged, not raised: the client already has its answer."""
    messages = [*conversation, _assistant_message(response["output"])]
    try:
        with connection(), write_transaction():
            StoredResponse.create(
                response_id=response["id"],
                key_id=key_id,
                response=json.dumps(response, ensure_ascii=False),
                history=json.dumps(messages, ensure_ascii=False),
            )
        _prune(retention_days)
    except Exception:
        log.exception("responses: could not store %s", response["id"])


def _assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer as the chat message a later turn sends back upstream."""
    text = "".join(
        part.get("text", "")
        for item in output
        if item["type"] == "message"
        for part in item["content"]
    )
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    calls = [item for item in output if item["type"] == "function_call"]
    if calls:
        message["tool_calls"] = [
            {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": _flat_name(item), "arguments": item["arguments"]},
            }
            for item in calls
        ]
    elif not text:
        message["content"] = ""
    return message


def _flat_name(item: dict[str, Any]) -> str:
    namespace = item.get("namespace")
    name: str = item["name"]
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def _prune(retention_days: int) -> None:
    global _pruned_at
    now = time.monotonic()
    with _prune_lock:
        if now - _pruned_at < PRUNE_EVERY:
            return
        _pruned_at = now
    oldest = utcnow() - dt.timedelta(days=retention_days)
    with connection(), write_transaction():
        StoredResponse.delete().where(StoredResponse.created_at < oldest).execute()
