"""The Anthropic Messages API, driven by the official anthropic SDK over real HTTP.

Each request is translated to the fake provider's chat completions and back; the
tests check what the provider was sent, what the SDK assembled, and the ledger row.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
import requests

from keymeai.api.anthropic import usage_of
from keymeai.ledger import keys
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.servers import Gateway, Gunicorn

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image bytes").decode()
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def sdk(gateway: Gateway, key: str, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gateway.url, api_key=key, max_retries=0, timeout=30, **options
    )


@pytest.fixture
def claude(gateway: Gateway, key: str) -> anthropic.Anthropic:
    return sdk(gateway, key)


def last_sent(fake: FakeUpstream) -> dict[str, Any]:
    body = fake.requests[-1].body
    assert isinstance(body, dict)
    return body


def test_create_text_and_system(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    message = claude.messages.create(
        model="deepseek-chat",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hello there"}],
        stop_sequences=["###"],
        extra_body={"temperature": 0.5, "top_p": 0.9},  # this SDK no longer has them
        metadata={"user_id": "alice"},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "deepseek-chat"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Echo: hello there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    sent = last_sent(upstream)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    assert (sent["max_tokens"], sent["stop"], sent["user"]) == (100, ["###"], "alice")
    assert (sent["temperature"], sent["top_p"]) == (0.5, 0.9)
    # The fake bills 3 + words per message: (3 + 2) + (3 + 2) prompt, 3 completion.
    assert message.usage.input_tokens == 10
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.output_tokens == 3
    [record] = wait_for_records(1)
    assert (record.model, record.stream, record.status, record.outcome) == (
        "deepseek-chat",
        False,
        200,
        "ok",
    )
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (10, 3, False)


def test_bearer_auth_and_beta_query(gateway: Gateway, key: str) -> None:
    """Claude Code's way in: Authorization: Bearer, ?beta=true, anthropic-beta."""
    client = anthropic.Anthropic(
        base_url=gateway.url,
        auth_token=key,
        max_retries=0,
        timeout=30,
        default_headers={"anthropic-beta": "claude-code-20250219"},
        default_query={"beta": "true"},
    )
    message = client.messages.create(
        model="qwen-plus", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "Echo: hi"  # type: ignore[union-attr]
    assert [r.model for r in wait_for_records(1)] == ["qwen-plus"]


def test_image_blocks(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    claude.messages.create(
        model="qwen-max",
        max_tokens=50,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://e.test/a.png"}},
                ],
            }
        ],
    )
    [message] = last_sent(upstream)["messages"]
    assert message["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://e.test/a.png"}},
    ]


def test_tool_use_and_result_round_trip(
    claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    question = {"role": "user", "content": "weather in Paris"}
    first = claude.messages.create(
        model="deepseek-chat",
        max_tokens=100,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=[question],  # type: ignore[list-item]
    )
    sent = last_sent(upstream)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city.",
            },
        }
    ]
    assert sent["tool_choice"] == "required"
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"echo": "Echo: weather in Paris"}

    second = claude.messages.create(
        model="deepseek-chat",
        max_tokens=100,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"},
                    {"type": "text", "text": "and tomorrow"},
                ],
            },
        ],  # type: ignore[list-item]
    )
    sent = last_sent(upstream)
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"echo": "Echo: weather in Paris"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        {"role": "user", "content": [{"type": "text", "text": "and tomorrow"}]},
    ]
    assert second.content[0].type == "tool_use"
    assert [r.outcome for r in wait_for_records(2)] == ["ok", "ok"]


def test_stream_text(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="deepseek-chat",
        max_tokens=100,
        messages=[{"role": "user", "content": "one two three"}],
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "text" in kinds and "content_block_stop" in kinds
    assert message.content[0].text == "Echo: one two three"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (6, 4)
    [record] = wait_for_records(1)
    assert (record.stream, record.outcome, record.prompt_tokens) == (True, "ok", 6)
    assert (record.completion_tokens, record.estimated) == (4, False)


def test_stream_tool_use(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="qwen-plus",
        max_tokens=100,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "weather in Rome please"}],
    ) as stream:
        deltas = [e for e in stream if e.type == "input_json"]
        message = stream.get_final_message()
    assert len(deltas) > 1  # the arguments came in fragments
    [call] = message.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"echo": "Echo: weather in Rome please"}
    assert message.stop_reason == "tool_use"
    [record] = wait_for_records(1)
    assert (record.model, record.outcome, record.estimated) == ("qwen-plus", "ok", False)


def test_thinking_from_reasoning_content(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": "deepseek-reasoner",
        "max_tokens": 2000,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "think"}],
    }
    message = claude.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Thinking about the question."  # type: ignore[union-attr]
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["thinking", "text"]
    assert streamed.content[0].thinking == "Thinking about the question."  # type: ignore[union-attr]
    assert streamed.content[1].text == "Echo: think"  # type: ignore[union-attr]


def test_count_tokens(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    before = upstream.count()
    counted = claude.messages.count_tokens(
        model="deepseek-chat",
        system="Be brief.",
        messages=[{"role": "user", "content": "hello there " * 50}],
    )
    assert counted.input_tokens > 150  # 600 characters at ~0.3 token each, and framing
    assert upstream.count() == before  # no upstream call
    assert usage_records() == []  # nothing billed


def sse_types(response: requests.Response) -> list[str]:
    """The `event:` of each SSE event, as sent, checked against the data's `type`."""
    kinds = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        event, data = block.split("\n")
        kind = event.removeprefix("event: ")
        assert json.loads(data.removeprefix("data: "))["type"] == kind
        kinds.append(kind)
    return kinds


def test_under_gunicorn(start_gunicorn: Callable[..., Gunicorn], ledger: None) -> None:
    """The SDK's stream helper and the wire order of events, under gunicorn's worker."""
    server = start_gunicorn()
    key = keys.create_key("sdk", "standard")[1]
    claude = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=30)
    with claude.messages.stream(
        model="deepseek-chat",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "under gunicorn"}],
    ) as stream:
        assert "".join(stream.text_stream) == "Echo: under gunicorn"
        message = stream.get_final_message()
    assert message.usage.output_tokens == 3
    counted = claude.messages.count_tokens(
        model="deepseek-chat", messages=[{"role": "user", "content": "under gunicorn"}]
    )
    assert counted.input_tokens > 0

    raw = requests.post(
        f"{server.url}/v1/messages?beta=true",
        headers={"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"},
        json={
            "model": "deepseek-chat",
            "max_tokens": 100,
            "stream": True,
            "messages": [{"role": "user", "content": "a b"}],
        },
        timeout=30,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    kinds = sse_types(raw)
    # DeepSeek's keep-alive comment becomes a ping, after message_start.
    assert kinds[:2] == ["message_start", "ping"]
    body = [k for k in kinds if k != "ping"]
    assert body == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,  # "Echo: ", "a ", "b"
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    records = wait_for_records(2)
    assert [(r.stream, r.outcome, r.estimated) for r in records] == [(True, "ok", False)] * 2


def test_max_tokens_stop_reason(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": "doubao-pro-32k",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "one two three"}],
    }
    message = claude.messages.create(**kwargs)
    assert (message.stop_reason, message.content[0].text) == ("max_tokens", "Echo: one")  # type: ignore[union-attr]
    with claude.messages.stream(**kwargs) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"


@pytest.mark.parametrize(
    "usage",
    [
        # DeepSeek's cache fields, and OpenAI's (DashScope, Ark)
        {"prompt_tokens": 100, "completion_tokens": 7, "prompt_cache_hit_tokens": 60},
        {
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 60},
        },
    ],
)
def test_usage_separates_cache_reads(usage: dict[str, Any]) -> None:
    """Anthropic's input_tokens excludes the cache reads; together they are the prompt."""
    assert usage_of(usage) == {
        "input_tokens": 40,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 60,
        "output_tokens": 7,
    }
