"""Stored responses: `store` (default true) keeps a response for its key, which may read
it back, delete it, or continue it with `previous_response_id`; another key gets 404,
`store: false` keeps nothing, and rows past `[responses] retention_days` are gone."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from openai import NotFoundError, OpenAI

from keymeai.api import responses_store as store
from keymeai.api.responses_store import StoredResponse
from keymeai.ledger.db import connection
from keymeai.ledger.models import utcnow
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import wait_for_records
from tests.helpers.servers import Gateway

pytestmark = pytest.mark.both_databases


def stored_ids() -> list[str]:
    with connection():
        return [row.response_id for row in StoredResponse.select()]


def test_retrieve_continue_and_delete(
    gateway: Gateway, client: OpenAI, upstream: FakeUpstream
) -> None:
    first = client.responses.create(model="qwen-max", instructions="Be brief.", input="one")
    assert stored_ids() == [first.id]
    got = client.responses.retrieve(first.id)
    assert (got.id, got.output_text, got.status) == (first.id, "Echo: one", "completed")

    second = client.responses.create(model="qwen-max", input="two", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert upstream.requests[-1].body["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]  # the first turn's instructions are not carried over, as in OpenAI's API

    client.responses.delete(first.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(NotFoundError):
        client.responses.delete(first.id)
    with pytest.raises(NotFoundError) as caught:
        client.responses.create(model="qwen-max", input="x", previous_response_id=first.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert [r.outcome for r in wait_for_records(2)] == ["ok", "ok"]


def test_stream_is_stored_with_its_function_call(client: OpenAI, upstream: FakeUpstream) -> None:
    tools: Any = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with client.responses.stream(
        model="qwen-max",
        input="call f",
        tools=tools,
        extra_body={"fake": {"tool_call": {"name": "f", "arguments": '{"a": 1}'}}},
    ) as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output[0].type == "function_call"
    client.responses.create(
        model="qwen-max",
        tools=tools,
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": "call_fake1", "output": "done"}],
    )
    messages = upstream.requests[-1].body["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_fake1", "content": "done"}


def test_another_keys_response_is_not_found(gateway: Gateway, client: OpenAI) -> None:
    mine = client.responses.create(model="qwen-max", input="secret")
    other = gateway.client(gateway.create_key(name="other"))
    with pytest.raises(NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(NotFoundError):
        other.responses.create(model="qwen-max", input="x", previous_response_id=mine.id)
    assert client.responses.retrieve(mine.id).output_text == "Echo: secret"


def test_store_false_keeps_nothing(client: OpenAI) -> None:
    response = client.responses.create(model="qwen-max", input="private", store=False)
    with client.responses.create(model="qwen-max", input="p", store=False, stream=True) as events:
        list(events)
    assert stored_ids() == []
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)
    assert len(wait_for_records(2)) == 2


def test_expired_responses_are_not_served_and_are_pruned(
    start_gateway: Any, config_data: dict[str, Any]
) -> None:
    config_data["responses"] = {"retention_days": 2}
    gateway = start_gateway()
    client = gateway.client(gateway.create_key())
    old = client.responses.create(model="qwen-max", input="old")
    with connection():
        long_ago = utcnow() - dt.timedelta(days=3)
        StoredResponse.update(created_at=long_ago).execute()
    with pytest.raises(NotFoundError):
        client.responses.retrieve(old.id)
    store._pruned_at = 0.0  # the next write prunes (at most once a minute otherwise)
    new = client.responses.create(model="qwen-max", input="new")
    assert stored_ids() == [new.id]
