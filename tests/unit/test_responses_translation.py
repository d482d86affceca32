"""A Responses API body as a chat completions body (keymeai.api.responses_input.to_chat)."""

from __future__ import annotations

from typing import Any

import pytest

from keymeai.api.responses_input import to_chat
from keymeai.errors import ApiError


def refused(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        to_chat(body)
    assert caught.value.status == 400
    return caught.value


def test_a_string_input_with_instructions() -> None:
    translated = to_chat(
        {
            "model": "chat",
            "instructions": "be brief",
            "input": "hi",
            "store": True,
            "reasoning": {"effort": "low"},
            "temperature": 0.3,
            "max_output_tokens": 50,
        }
    )
    assert translated.body == {
        "model": "chat",
        "temperature": 0.3,  # not the Responses API's: passed on
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 50,
    }
    assert translated.conversation == [{"role": "user", "content": "hi"}]  # no instructions


def test_items_become_messages_calls_join_the_assistant_turn() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "reasoning", "summary": []},  # the model's own: not sent back
        {"role": "assistant", "content": [{"type": "output_text", "text": "let me see"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "two"}],
        },
    ]
    messages = to_chat({"input": items}).body["messages"]
    assert messages == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": "let me see",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_a_call_with_no_assistant_text_opens_an_assistant_message() -> None:
    items = [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": ""},
    ]
    assert to_chat({"input": items}).body["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
        ],
    }


def test_images_stay_parts_of_a_user_message() -> None:
    content = [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
        {"type": "input_image", "image_url": "https://x.example/a.png", "detail": "huge"},
    ]
    (message,) = to_chat({"input": [{"role": "user", "content": content}]}).body["messages"]
    assert message == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is it?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
            },
            {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
        ],
    }


def test_namespaces_are_flattened_and_built_in_tools_left_out() -> None:
    tools = [
        {"type": "web_search"},
        {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False},
        {
            "type": "namespace",
            "name": "mcp",
            "tools": [{"type": "function", "name": "read", "strict": True}, {"type": "shell"}],
        },
    ]
    items = [
        {"role": "user", "content": "hi"},
        {
            "type": "function_call",
            "namespace": "mcp",
            "name": "read",
            "call_id": "c",
            "arguments": "",
        },
    ]
    translated = to_chat(
        {
            "input": items,
            "tools": tools,
            "tool_choice": {"type": "function", "namespace": "mcp", "name": "read"},
            "parallel_tool_calls": False,
        }
    )
    body = translated.body
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "mcp__read", "strict": True}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "mcp__read"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == "mcp__read"
    assert translated.names == {"mcp__read": ("mcp", "read")}


def test_only_built_in_tools_means_no_tools_and_no_tool_choice() -> None:
    body = to_chat({"input": "hi", "tools": [{"type": "web_search"}], "tool_choice": "required"})
    assert "tools" not in body.body and "tool_choice" not in body.body


@pytest.mark.parametrize(
    ("text", "response_format"),
    [
        (None, None),
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True, "x": 1}},
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": True}},
        ),
    ],
)
def test_text_format_becomes_response_format(text: Any, response_format: Any) -> None:
    assert to_chat({"input": "hi", "text": text}).body.get("response_format") == response_format


def test_history_comes_before_the_new_input() -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    translated = to_chat({"input": "c", "instructions": "i"}, history)
    assert [m["content"] for m in translated.body["messages"]] == ["i", "a", "b", "c"]
    assert [m["content"] for m in translated.conversation] == ["a", "b", "c"]


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "no input": ({}, "input"),
    "input a number": ({"input": 5}, "input"),
    "only reasoning": ({"input": [{"type": "reasoning"}]}, "input"),
    "item not an object": ({"input": ["hi"]}, "input[0]"),
    "item type unknown": ({"input": [{"type": "audio"}]}, "input[0].type"),
    "role unknown": ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    "content a number": ({"input": [{"role": "user", "content": 1}]}, "input[0].content"),
    "part unknown": (
        {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
        "input[0].content[0].type",
    ),
    "image without url": (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
        "input[0].content[0].image_url",
    ),
    "image from the assistant": (
        {"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content",
    ),
    "call without id": (
        {"input": [{"type": "function_call", "name": "f", "arguments": ""}]},
        "input[0].call_id",
    ),
    "output a number": (
        {"input": [{"type": "function_call_output", "call_id": "c", "output": 1}]},
        "input[0].output",
    ),
    "instructions a list": ({"input": "hi", "instructions": ["x"]}, "instructions"),
    "tools an object": ({"input": "hi", "tools": {}}, "tools"),
    "tool without type": ({"input": "hi", "tools": [{"name": "f"}]}, "tools[0]"),
    "function without name": ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    "max_output_tokens zero": ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    "text a string": ({"input": "hi", "text": "json"}, "text"),
    "format unknown": ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    "schema without name": (
        {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
        "text.format",
    ),
}


@pytest.mark.parametrize(("body", "param"), REFUSED.values(), ids=REFUSED)
def test_what_cannot_be_translated_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param
