"""The Responses API (`POST /v1/responses`) with the openai SDK against the gateway and
the fake provider: the request translated to chat completions, the answer and its
stream in OpenAI's Responses shape, and every request metered in the ledger."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.servers import Gateway

PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk"
    "YAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def sent(upstream: FakeUpstream) -> dict[str, Any]:
    """The chat body the provider got for the last request."""
    body: dict[str, Any] = upstream.requests[-1].body
    return body


def test_text_with_instructions(client: OpenAI, upstream: FakeUpstream) -> None:
    response = client.responses.create(
        model="qwen-max", instructions="Be brief.", input="hello there"
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "Echo: hello there"
    assert response.instructions == "Be brief."
    assert sent(upstream)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    assert "input" not in sent(upstream) and "instructions" not in sent(upstream)
    [record] = wait_for_records(1)
    usage = response.usage
    assert usage is not None
    assert (record.model, record.status, record.outcome) == ("qwen-max", 200, "ok")
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_image_input(client: OpenAI, upstream: FakeUpstream) -> None:
    response = client.responses.create(
        model="qwen-max",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": PIXEL, "detail": "low"},
                ],
            }
        ],
    )
    assert response.output_text == "Echo: what is this"
    assert sent(upstream)["messages"][0]["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
    ]
    assert wait_for_records(1)[0].outcome == "ok"


def test_max_output_tokens_cut(client: OpenAI, upstream: FakeUpstream) -> None:
    response = client.responses.create(
        model="deepseek-chat", input="x", max_output_tokens=3, extra_body={"fake": {"words": 10}}
    )
    assert sent(upstream)["max_tokens"] == 3
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "w1 w2 w3"
    assert wait_for_records(1)[0].completion_tokens == 3


def test_json_schema_output(client: OpenAI, upstream: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    client.responses.create(
        model="qwen-plus",
        input="json please",
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
    )
    assert sent(upstream)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    client.responses.create(
        model="qwen-plus", input="json", text={"format": {"type": "json_object"}}
    )
    assert sent(upstream)["response_format"] == {"type": "json_object"}
    assert len(wait_for_records(2)) == 2


def test_reasoning_from_deepseek(client: OpenAI) -> None:
    response = client.responses.create(
        model="deepseek-reasoner", input="think", reasoning={"effort": "high"}
    )
    reasoning, message = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.content and reasoning.content[0].text
    assert message.type == "message" and response.output_text == "Echo: think"
    usage = response.usage
    assert usage is not None and usage.output_tokens_details.reasoning_tokens > 0
    [record] = wait_for_records(1)
    assert record.reasoning_tokens == usage.output_tokens_details.reasoning_tokens


def test_cached_tokens(client: OpenAI) -> None:
    response = client.responses.create(
        model="deepseek-chat", input="a b c d e", extra_body={"fake": {"cached": 4}}
    )
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert wait_for_records(1)[0].cached_tokens == 4


def test_stream_assembled_by_the_sdk(client: OpenAI) -> None:
    with client.responses.stream(model="deepseek-reasoner", input="stream me") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Echo: stream me"
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0
    [record] = wait_for_records(1)
    assert record.stream and record.outcome == "ok"
    assert record.completion_tokens == final.usage.output_tokens


def test_stream_true_cut_is_incomplete(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="qwen-max",
            input="x",
            stream=True,
            max_output_tokens=2,
            extra_body={"fake": {"words": 9}},
        )
    )
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.usage is not None and last.response.usage.output_tokens == 2
    assert wait_for_records(1)[0].completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_round_trip(client: OpenAI, upstream: FakeUpstream, stream: bool) -> None:
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    args = json.dumps({"city": "Paris"})
    call_knob = {"fake": {"tool_call": {"name": "get_weather", "arguments": args}}}
    ask: Any = {"model": "qwen-max", "input": "weather in Paris?", "tools": tools}
    if stream:
        with client.responses.stream(**ask, extra_body=call_knob) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(**ask, extra_body=call_knob)
    assert sent(upstream)["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": tools[0]["parameters"]},
        }
    ]
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.arguments, call.call_id) == ("get_weather", args, "call_fake1")

    second = client.responses.create(
        model="qwen-max",
        tools=tools,
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": args,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
    )
    assert second.output_text == "Echo: thanks"
    assert sent(upstream)["messages"][1:3] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake1", "content": "sunny"},
    ]
    assert [r.outcome for r in wait_for_records(2)] == ["ok", "ok"]


def codex_request(**extra: Any) -> dict[str, Any]:
    """A request shaped as Codex CLI sends it."""
    function = {"type": "function", "name": "shell", "parameters": {"type": "object"}}
    spawn = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}
    return {
        "model": "deepseek-chat",
        "instructions": "You are Codex.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "rules"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi codex"}],
            },
        ],
        "tools": [
            function,
            {
                "type": "namespace",
                "name": "multi_agent_v1",
                "description": "agents",
                "tools": [spawn],
            },
            {"type": "web_search"},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc",
        "client_metadata": {"x": "y"},
        **extra,
    }


def test_codex_shaped_request(
    client: OpenAI, upstream: FakeUpstream, gateway_logs: pytest.LogCaptureFixture
) -> None:
    gateway_logs.set_level(logging.INFO)  # the left-out tools are an INFO line
    body = codex_request(
        fake={"tool_call": {"name": "multi_agent_v1__spawn_agent", "arguments": "{}"}}
    )
    extra = {name: body.pop(name) for name in ("client_metadata", "fake")}  # not in the SDK
    events = list(client.responses.create(**body, extra_body=extra))
    chat = sent(upstream)
    assert chat["messages"][:2] == [
        {"role": "system", "content": "You are Codex."},
        {"role": "system", "content": "rules"},
    ]
    assert [t["function"]["name"] for t in chat["tools"]] == [
        "shell",
        "multi_agent_v1__spawn_agent",
    ]
    for field in ("store", "include", "prompt_cache_key", "client_metadata", "reasoning", "input"):
        assert field not in chat
    done = [e for e in events if e.type == "response.output_item.done"]
    item = done[-1].item
    assert item.type == "function_call" and item.name == "spawn_agent"
    assert getattr(item, "namespace", None) == "multi_agent_v1"
    assert events[-1].type == "response.completed"
    assert wait_for_records(1)[0].outcome == "ok"
    assert any(
        "left out" in r.getMessage() and "web_search" in r.getMessage()
        for r in gateway_logs.records
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "qwen-max"}, "input"),
        ({"model": "qwen-max", "input": 5}, "input"),
        ({"model": "qwen-max", "input": [{"type": "bogus"}]}, "input[0].type"),
        ({"model": "qwen-max", "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"model": "qwen-max", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "qwen-max", "input": "x", "temperature": 9}, "temperature"),
        ({"model": "qwen-max", "input": "x", "store": "yes"}, "store"),
        ({"model": "qwen-max", "input": "x", "previous_response_id": 7}, "previous_response_id"),
        ({"model": "qwen-max", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        (
            {
                "model": "qwen-max",
                "input": [{"role": "user", "content": [{"type": "input_image"}]}],
            },
            "input[0].content[0].image_url",
        ),
        (
            {"model": "qwen-max", "input": [{"type": "function_call", "name": "f"}]},
            "input[0].call_id",
        ),
        ({"model": "qwen-max", "input": "x", "tools": [{"name": "f"}]}, "tools[0]"),
        (
            {"model": "qwen-max", "input": "x", "text": {"format": {"type": "xml"}}},
            "text.format.type",
        ),
    ],
)
def test_bad_requests_in_openai_shape(
    client: OpenAI, upstream: FakeUpstream, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.post("/responses", body=body, cast_to=object)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param  # type: ignore[index]
    assert upstream.count() == 0


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.responses.create(model="nope", input="x")
    assert caught.value.code == "model_not_found"


def test_bad_key_is_401(gateway: Gateway) -> None:
    bad = gateway.client("km-not-a-key")
    with pytest.raises(Exception) as caught:
        bad.responses.create(model="qwen-max", input="x")
    assert getattr(caught.value, "status_code", None) == 401
    assert usage_records() == []
