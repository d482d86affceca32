"""Providers' `usage` objects as counts (keymeai.ledger.metering.parse_usage), what a
request is billed when they are missing (Meter), and Anthropic's view of the same."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keymeai.api import anthropic, responses_dialect
from keymeai.api.validation import parse_chat_request
from keymeai.ledger.billing import Usage
from keymeai.ledger.metering import Meter, parse_usage
from tests.unit.build import config, meter

# The same request as each provider reports it: 12 prompt tokens (5 from the cache),
# 47 completion tokens of which 7 reasoning.
DEEPSEEK = {
    "prompt_tokens": 12,
    "completion_tokens": 47,
    "total_tokens": 59,
    "prompt_cache_hit_tokens": 5,
    "prompt_cache_miss_tokens": 7,
    "completion_tokens_details": {"reasoning_tokens": 7},
}
OPENAI = {  # DashScope and Ark
    "prompt_tokens": 12,
    "completion_tokens": 47,
    "total_tokens": 59,
    "prompt_tokens_details": {"cached_tokens": 5},
    "completion_tokens_details": {"reasoning_tokens": 7},
}
BOTH = {**OPENAI, "prompt_cache_hit_tokens": 5}  # DeepSeek's newer answers carry both
REPORTED = Usage(prompt=12, completion=47, cached=5, reasoning=7)


@pytest.mark.parametrize("raw", [DEEPSEEK, OPENAI, BOTH], ids=["deepseek", "openai", "both"])
def test_every_provider_shape_gives_the_same_counts(raw: dict[str, Any]) -> None:
    usage = parse_usage(raw)
    assert usage == REPORTED
    assert usage is not None and usage.total == 59 and not usage.estimated


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4}, Usage(3, 4)),
        ({"prompt_tokens": 0, "completion_tokens": 0}, Usage(0, 0)),
        # more cached than prompt tokens: all the prompt was cached, no more
        (
            {"prompt_tokens": 3, "completion_tokens": 4, "prompt_cache_hit_tokens": 9},
            Usage(3, 4, 3),
        ),
        # an embedding's usage has no completion: prompt and total only
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0)),
        # odd details are no details
        ({"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": None}, Usage(3, 4)),
        ({"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": [5]}, Usage(3, 4)),
        (
            {
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": "2"},
            },
            Usage(3, 4),
        ),
        (
            {"prompt_tokens": 3, "completion_tokens": 4, "prompt_cache_hit_tokens": -1},
            Usage(3, 4),
        ),
        (
            {
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "completion_tokens_details": {"reasoning_tokens": True},
            },
            Usage(3, 4),
        ),
    ],
)
def test_missing_or_odd_detail_fields_count_as_zero(raw: dict[str, Any], expected: Usage) -> None:
    assert parse_usage(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "12",
        {},
        {"completion_tokens": 4},
        {"prompt_tokens": 3},
        {"prompt_tokens": 8, "total_tokens": 9},  # not an embedding: completion is missing
        {"prompt_tokens": "3", "completion_tokens": 4},
        {"prompt_tokens": 3.0, "completion_tokens": 4},
        {"prompt_tokens": True, "completion_tokens": 4},
        {"prompt_tokens": -3, "completion_tokens": 4},
        {"prompt_tokens": 3, "completion_tokens": None},
    ],
)
def test_usage_without_both_counts_is_none(raw: Any) -> None:
    """None: the record is then estimated and flagged, never billed from a guess at fields."""
    assert parse_usage(raw) is None


@pytest.mark.parametrize("raw", [DEEPSEEK, OPENAI, BOTH], ids=["deepseek", "openai", "both"])
def test_anthropic_usage_splits_the_prompt_as_the_ledger_does(raw: dict[str, Any]) -> None:
    usage = anthropic.usage_of(raw)
    assert usage["cache_read_input_tokens"] == REPORTED.cached
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == REPORTED.prompt
    assert usage["output_tokens"] == REPORTED.completion


def test_anthropic_usage_of_nothing_is_zeros() -> None:
    zeros = {
        "input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    assert anthropic.usage_of(None) == zeros
    assert anthropic.usage_of({"prompt_tokens": -1, "completion_tokens": "7"}) == zeros


@pytest.mark.parametrize("raw", [DEEPSEEK, OPENAI, BOTH], ids=["deepseek", "openai", "both"])
def test_responses_usage_is_the_ledgers_counts(raw: dict[str, Any]) -> None:
    assert responses_dialect.usage_of(raw) == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 5},
        "output_tokens": 47,
        "output_tokens_details": {"reasoning_tokens": 7},
        "total_tokens": 59,
    }


ODD = {"prompt_tokens": "12", "completion_tokens": 3, "completion_tokens_details": "n/a"}


def test_an_odd_usage_never_breaks_a_responses_answer() -> None:
    """It was read field by field: a string count raised a TypeError (a 500 for an
    answer already billed), a non-object details field an AttributeError."""
    assert responses_dialect.usage_of(ODD) is None
    assert responses_dialect.usage_of({**OPENAI, "prompt_tokens_details": [5]})  # cached 0
    completion = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    answer = responses_dialect.ResponsesDialect({"model": "chat"}, {})
    body = json.loads(answer.answer({**completion, "usage": ODD}, b""))
    assert (body["status"], body["usage"]) == ("completed", None)
    stream = responses_dialect.ResponsesDialect({"model": "chat"}, {})
    stream.event({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, b"")
    stream.event({"choices": [], "usage": OPENAI}, b"")
    stream.event({"choices": [], "usage": ODD}, b"")  # a later odd one keeps the good one
    last = stream.done().decode().split("\n\n")[-2]  # response.completed
    completed = json.loads(last.split("\ndata: ", 1)[1])
    assert completed["response"]["usage"] == responses_dialect.usage_of(OPENAI)


def streaming_meter() -> Meter:
    models = config().model_names
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    return meter(parse_chat_request(body, models))


def chunk(delta: dict[str, Any] | None = None, usage: Any = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta}]
    return {"choices": choices, "usage": usage}


def test_a_meter_takes_the_usage_chunk_whenever_it_comes() -> None:
    m = streaming_meter()
    m.observe(chunk({"content": "hi"}))
    m.observe(chunk(usage=OPENAI))  # DashScope and Ark: a chunk of its own, no choices
    m.observe(chunk(usage={"prompt_tokens": "?"}))  # a broken one later changes nothing
    assert m.billable_usage("ok") == REPORTED


def test_without_usage_the_relayed_text_is_estimated_and_flagged() -> None:
    m = streaming_meter()
    assert m.chat.prompt_estimate == 5  # 3 per message + 5 characters at 0.3, rounded up
    m.observe(chunk({"reasoning_content": "想"}))  # 0.6
    m.observe(chunk({"content": "ok"}))  # 0.6
    call = {"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}}  # 7 characters: 2.1
    m.observe(chunk({"tool_calls": [call]}))
    expected = Usage(prompt=5, completion=4, estimated=True)  # 3.3 rounded up
    for outcome in ("ok", "client_closed", "upstream_failed", "interrupted"):
        assert m.billable_usage(outcome) == expected, outcome


@pytest.mark.parametrize("outcome", ["upstream_error", "unavailable", "rejected", "error"])
def test_nothing_delivered_is_nothing_billed(outcome: str) -> None:
    m = streaming_meter()
    m.observe(chunk({"content": "partial"}, usage=OPENAI))
    assert m.billable_usage(outcome) == Usage()
