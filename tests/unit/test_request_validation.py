"""Request bodies (keymeai.api.validation): what is parsed, what is refused with a 400
naming its `param`, and what passes through to the provider untouched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keymeai.api.validation import MAX_DEPTH, ChatRequest, parse_chat_request, parse_json_body
from keymeai.errors import ApiError
from keymeai.tokens import estimate_prompt_tokens
from tests.unit.build import config

MODELS = config().model_names
HI = [{"role": "user", "content": "hi"}]


def refusal(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value


def body_error(raw: bytes, content_type: str | None = "application/json") -> str:
    error = refusal(parse_json_body, raw, content_type)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", None)
    return error.message


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"],
)
def test_json_content_types_are_read(content_type: str) -> None:
    assert parse_json_body(b' {"a": [1, 2.5, null]} ', content_type) == {"a": [1, 2.5, None]}


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "text/json", "multipart/form-data"]
)
def test_other_content_types_are_refused(content_type: str | None) -> None:
    assert body_error(b"{}", content_type).startswith("Content-Type must be application/json")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b"", "empty"),
        (b" \r\n\t", "empty"),
        (b"\xef\xbb\xbf{}", "BOM"),
        (b"[1]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"a": 1', "could not parse"),
        (b'{"a": 1} {}', "could not parse"),
        (b'{"t": NaN}', "NaN is not valid JSON (numbers must be finite)"),
        (b'{"t": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"t": 1e400}', "the number 1e400 is out of range"),
        # a long number is shown by its first 17 characters
        (b'{"t": -1' + b"0" * 400 + b".0}", "the number -1" + "0" * 15 + "... is out of range"),
        (b'{"n": ' + b"9" * 5000 + b"}", "could not parse"),  # past Python's int limit
    ],
)
def test_malformed_bodies_are_400_saying_what_is_wrong(raw: bytes, words: str) -> None:
    assert words in body_error(raw)


def test_large_but_finite_numbers_are_numbers() -> None:
    body = parse_json_body(b'{"f": 1e308, "i": 123456789012345678901234567890}', "application/json")
    assert body == {"f": 1e308, "i": 123456789012345678901234567890}


def nested(levels: int) -> bytes:
    """An object (one level) holding arrays nested to `levels` levels in all."""
    return b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_nesting_is_bounded_at_max_depth() -> None:
    assert parse_json_body(nested(MAX_DEPTH), "application/json")
    too_deep = f"nested too deeply (at most {MAX_DEPTH} levels)"
    assert too_deep in body_error(nested(MAX_DEPTH + 1))
    assert too_deep in body_error(b"[" * 200_000)  # deeper than the parser's own recursion
    brackets_in_text = b'{"a": "' + b"[{" * 500 + b'"}'
    assert parse_json_body(brackets_in_text, "application/json") == {"a": "[{" * 500}


def test_a_lone_surrogate_escape_is_refused_a_pair_is_not() -> None:
    assert "unpaired surrogate" in body_error(b'{"a": "\\ud800"}')
    assert "unpaired surrogate" in body_error(b'{"a": "x\\uDFFFy"}')
    assert parse_json_body(b'{"a": "\\ud83d\\ude00"}', "application/json") == {"a": "\U0001f600"}
    assert parse_json_body(b'{"a": "\\\\ud800"}', "application/json") == {"a": "\\ud800"}


def chat(**body: Any) -> ChatRequest:
    return parse_chat_request({"model": "chat", "messages": HI, **body}, MODELS)


def chat_error(**body: Any) -> ApiError:
    return refusal(lambda: chat(**body))


# (body fields, the param named, words of the message)
REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "model missing": ({"model": None}, "model", "you must provide a model"),
    "model not a string": ({"model": ["chat"]}, "model", "model must be a string"),
    "messages missing": ({"messages": None}, "messages", "provide a messages"),
    "messages empty": ({"messages": []}, "messages", "at least one message"),
    "message not an object": ({"messages": [*HI, "hi"]}, "messages[1]", "must be an object"),
    "role unknown": (
        {"messages": [{"role": "bot", "content": "x"}]},
        "messages[0].role",
        '(got "bot")',
    ),
    "content missing": ({"messages": [{"role": "tool"}]}, "messages[0].content", "required"),
    "assistant without content or calls": (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
        "messages[0].content",
        "required",
    ),
    "part without a type": (
        {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
        "messages[0].content",
        "array of content parts",
    ),
    "temperature above 2": ({"temperature": 2.01}, "temperature", "between 0 and 2"),
    "temperature huge int": ({"temperature": 2**64}, "temperature", "between 0 and 2"),
    "temperature bool": ({"temperature": False}, "temperature", "between 0 and 2"),
    "max_tokens past 2^31-1": ({"max_tokens": 2**31}, "max_tokens", "from 1 to 2147483647"),
    "stream not a bool": ({"stream": "true"}, "stream", "boolean"),
    "stream_options not an object": ({"stream_options": []}, "stream_options", "object"),
    "include_usage not a bool": (
        {"stream": True, "stream_options": {"include_usage": 1}},
        "stream_options.include_usage",
        "boolean",
    ),
}


@pytest.mark.parametrize(("fields", "param", "words"), REFUSED.values(), ids=REFUSED)
def test_a_bad_parameter_is_a_400_naming_it(fields: dict[str, Any], param: str, words: str) -> None:
    error = chat_error(**fields)
    assert (error.status, error.param) == (400, param)
    assert words in error.message, error.message


def test_unknown_model_is_404_and_a_model_of_the_other_kind_is_400() -> None:
    error = chat_error(model="Chat")
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    error = chat_error(model="embed")
    assert (error.status, error.code, error.param) == (400, "wrong_model_kind", "model")
    assert "/v1/embeddings" in error.message


def test_a_valid_request_and_what_it_implies() -> None:
    request = chat(model="chat-latest", temperature=0, max_tokens=10, frequency_penalty=0.5)
    assert request.model is MODELS["chat"]  # the alias resolved
    assert (request.stream, request.include_usage, request.completion_limit) == (False, False, 10)
    assert request.body["frequency_penalty"] == 0.5  # unknown to the gateway: passed on
    assert request.prompt_estimate == estimate_prompt_tokens(request.body) == 4
    assert chat(temperature=2.0, stream=None).stream is False
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert chat(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": calls}])


def test_usage_in_a_stream_only_when_asked_for() -> None:
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options=None).include_usage
    assert not chat(stream=False, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(
    ("n", "choices"), [(None, 1), (3, 3), (128, 128), (129, 1), (0, 1), (True, 1)]
)
def test_n_counts_choices_only_when_it_is_a_sane_count(n: Any, choices: int) -> None:
    assert chat(n=n).choices == choices


def test_developer_messages_go_upstream_as_system_without_touching_the_clients() -> None:
    messages = [{"role": "developer", "content": "be brief"}, *HI]
    request = chat(messages=messages)
    assert [m["role"] for m in request.body["messages"]] == ["system", "user"]
    assert messages[0]["role"] == "developer"
    assert json.dumps(request.body["messages"][1]) == json.dumps(HI[0])
