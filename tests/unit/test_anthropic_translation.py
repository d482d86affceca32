"""Anthropic's Messages API both ways: a request body as chat completions
(keymeai.api.messages.to_chat), and chat completions as Anthropic's message and events
(keymeai.api.anthropic.AnthropicMessages)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keymeai.api.anthropic import AnthropicMessages, stop_reason, tool_input
from keymeai.api.messages import to_chat
from keymeai.errors import ApiError

HELLO = [{"role": "user", "content": "hello"}]


def translate(**body: Any) -> dict[str, Any]:
    return to_chat({"model": "chat", "max_tokens": 50, "messages": HELLO, **body})


def test_system_parameters_and_what_is_dropped() -> None:
    chat = translate(
        system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        stop_sequences=["END"],
        temperature=0.5,
        top_k=5,
        thinking={"type": "enabled", "budget_tokens": 1024},
        metadata={"user_id": "u-1"},
        stream=True,
    )
    assert chat == {
        "model": "chat",
        "messages": [{"role": "system", "content": "one\n\ntwo"}, *HELLO],
        "max_tokens": 50,
        "stop": ["END"],
        "temperature": 0.5,
        "stream": True,
        "user": "u-1",
    }


def test_max_tokens_is_required_except_for_counting() -> None:
    with pytest.raises(ApiError) as caught:
        to_chat({"model": "chat", "messages": HELLO})
    assert caught.value.param == "max_tokens"
    assert "max_tokens" not in to_chat({"model": "chat", "messages": HELLO}, False)


def test_tool_results_come_first_then_the_users_other_blocks() -> None:
    content = [
        {"type": "text", "text": "and this:"},
        {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
        {
            "type": "tool_result",
            "tool_use_id": "t2",
            "is_error": True,
            "content": [{"type": "text", "text": "no"}, {"type": "image"}],
        },
    ]
    assert translate(messages=[{"role": "user", "content": content}])["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": 'Error: no\n["image" block]'},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
    ]


def test_an_assistant_turn_keeps_text_and_calls_and_drops_thinking() -> None:
    content = [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "杭州"}},
    ]
    (message,) = translate(messages=[{"role": "assistant", "content": content}])["messages"]
    assert message == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "t1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "杭州"}'},
            }
        ],
    }
    only_thinking = [{"type": "redacted_thinking", "data": "x"}]
    (message,) = translate(messages=[{"role": "assistant", "content": only_thinking}])["messages"]
    assert message == {"role": "assistant", "content": ""}


def test_client_tools_become_functions_server_tools_are_left_out() -> None:
    tools = [
        {"name": "weather", "description": "d", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
    ]
    chat = translate(tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object"}, "description": "d"},
        }
    ]
    assert (chat["tool_choice"], chat["parallel_tool_calls"]) == ("required", False)
    named = translate(tools=tools, tool_choice={"type": "tool", "name": "weather"})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.0.content.0.type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.source",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages.0.content.0.tool_use_id",
        ),
        ({"system": 3}, "system"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"tools": [{"name": "f"}]}, "tools.0"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ],
)
def test_what_cannot_be_translated_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        translate(**fields)
    assert (caught.value.status, caught.value.param) == (400, param)


def events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic's SSE events as (event name, data); the names must match the data's type."""
    out = []
    for block in stream.decode().split("\n\n"):
        if block:
            name_line, data_line = block.split("\n")
            name, data = name_line.removeprefix("event: "), json.loads(data_line[len("data: ") :])
            assert data["type"] == name
            out.append((name, data))
    return out


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": "c1", "choices": [{"index": index, "delta": fields, "finish_reason": finish}]}


def test_a_stream_opens_and_closes_one_block_at_a_time() -> None:
    dialect = AnthropicMessages("chat", prompt_estimate=9)
    call = {"index": 0, "id": "t1", "function": {"name": "weather", "arguments": '{"ci'}}
    chunks = [
        delta(role="assistant"),
        delta(reasoning_content="think"),
        delta(content="Hi"),
        delta(content="!"),
        delta(tool_calls=[call]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty":1}'}}]),
        delta(tool_calls=[{"index": 1, "function": {"name": "time"}}]),  # a new index, no id
        delta(index=1, content="another choice: ignored"),
        delta(finish="tool_calls"),
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 5}},
    ]
    out = b"".join(dialect.event(c, b"") or b"" for c in chunks) + dialect.done()
    seen = events(out)
    assert [name for name, _ in seen] == [
        "message_start",
        "content_block_start",  # 0 thinking
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 1 text
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 2 tool_use t1
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # 3 tool_use, the second call
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [d for name, d in seen if name == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2, 3]
    assert [s["content_block"]["type"] for s in starts] == [
        "thinking",
        "text",
        "tool_use",
        "tool_use",
    ]
    assert [s["content_block"].get("id") for s in starts[2:]] == ["t1", "toolu_3"]
    partial = [
        d["delta"]["partial_json"]
        for _, d in seen
        if d.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert "".join(partial) == '{"city":1}'
    start = seen[0][1]["message"]
    assert (start["id"], start["model"], start["usage"]["input_tokens"]) == ("msg_c1", "chat", 9)
    final = seen[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use"
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (20, 5)


def test_a_stream_without_usage_reports_the_estimate_and_pings_come_after_the_start() -> None:
    dialect = AnthropicMessages("chat", prompt_estimate=9)
    seen = events(dialect.ping() + dialect.ping() + dialect.done())
    assert [name for name, _ in seen] == [
        "message_start",
        "ping",
        "ping",
        "message_delta",
        "message_stop",
    ]
    assert seen[3][1]["delta"]["stop_reason"] == "end_turn"
    assert seen[3][1]["usage"]["input_tokens"] == 9


@pytest.mark.parametrize(
    ("code", "kind"),
    [("server_shutting_down", "overloaded_error"), ("upstream_failed", "api_error")],
)
def test_a_stream_cut_short_ends_with_an_error_event(code: str, kind: str) -> None:
    dialect = AnthropicMessages("chat", prompt_estimate=1)
    dialect.event(delta(content="Hi"), b"")
    seen = events(dialect.failed("cut", code))
    assert seen == [("error", {"type": "error", "error": {"type": kind, "message": "cut"}})]


def test_a_whole_answer_as_one_message() -> None:
    completion = {
        "id": "c9",
        "choices": [
            {
                "finish_reason": "length",
                "message": {
                    "reasoning_content": "r",
                    "content": "text",
                    "tool_calls": [
                        {"id": "t1", "function": {"name": "f", "arguments": "not json"}},
                        {"function": {"name": "g", "arguments": "[1]"}},
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_cache_hit_tokens": 4},
    }
    message = json.loads(AnthropicMessages("chat", 1).answer(completion, b""))
    assert message["id"] == "msg_c9" and message["stop_reason"] == "max_tokens"
    assert message["content"] == [
        {"type": "thinking", "thinking": "r", "signature": ""},
        {"type": "text", "text": "text"},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"_raw": "not json"}},
        {"type": "tool_use", "id": "toolu_3", "name": "g", "input": {"_value": [1]}},
    ]
    assert message["usage"] == {
        "input_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "output_tokens": 3,
    }


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        ("insufficient_system_resource", "end_turn"),  # DeepSeek's own
        (None, None),
        ("", None),
        (1, "end_turn"),
    ],
)
def test_stop_reasons(finish: Any, reason: str | None) -> None:
    assert stop_reason(finish) == reason


@pytest.mark.parametrize(
    ("arguments", "value"),
    [('{"a": 1}', {"a": 1}), ("", {}), ("  ", {}), (None, {}), ("3", {"_value": 3})],
)
def test_tool_input_is_always_an_object(arguments: Any, value: Any) -> None:
    assert tool_input(arguments) == value
