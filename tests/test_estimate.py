"""The prompt estimate and the hold a request reserves: fast, no server."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymeai.api.validation import MAX_TOKENS, parse_chat_request
from keymeai.catalogue import Model, Price
from keymeai.config import ConfigError, QuotaSettings, parse_config
from keymeai.errors import ApiError
from keymeai.ledger.billing import unit_price
from keymeai.ledger.quota import hold_for
from keymeai.tokens import (
    HIGH_RES_IMAGE_TOKENS,
    IMAGE_TOKENS,
    estimate_prompt_tokens,
    estimate_tenths,
    tokens,
)
from tests.helpers.clients import HI
from tests.helpers.config import PRICES, PROVIDER_ENV, base_config

MODEL = Model(
    id="deepseek-chat",
    owned_by="deepseek",
    created=0,
    upstreams=(),
    price=Price(**{k: Decimal(str(v)) for k, v in PRICES["deepseek-chat"].items()}),
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气 (the weather of a city)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def estimate(**body: Any) -> int:
    return estimate_prompt_tokens({"messages": HI, **body})


def test_message_text_is_unchanged() -> None:
    """0.3 token per character (0.6 for CJK) and 3 per message, rounded up once."""
    assert estimate() == 4  # the fake upstream bills "hi" as 4 too
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    assert estimate_prompt_tokens({"messages": messages}) == tokens(60 + 8 * 3 + 2 * 6)
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": " brief"}]
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": parts}]}) == tokens(
        30 + 8 * 3
    )


@pytest.mark.parametrize(
    "field",
    [
        {"tools": [WEATHER]},
        {"functions": [WEATHER["function"]]},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}},
    ],
    ids=lambda field: next(iter(field)),
)
def test_schemas_count_as_their_compact_json_text(field: dict[str, Any]) -> None:
    (value,) = field.values()
    assert estimate(**field) == tokens(36 + estimate_tenths(compact(value)))


def test_schema_text_is_counted_unescaped() -> None:
    """Chinese in a schema counts 0.6 a character, not as six-character escapes."""
    text = compact([WEATHER])
    assert estimate(tools=[WEATHER]) == tokens(36 + 3 * len(text) + 3 * len("查询城市的天气城市名"))


def test_assistant_tool_calls_and_tool_results_count() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou"}'},
    }
    messages = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    expected = (
        36
        + (30 + estimate_tenths(compact([call])))
        + (30 + estimate_tenths("call_1") + estimate_tenths("sunny, 21 C"))
    )
    assert estimate_prompt_tokens({"messages": messages}) == tokens(expected)


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def with_images(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]


def test_each_image_part_counts_the_fixed_allowance_whatever_its_size() -> None:
    small = image("https://example.com/cat.png")
    inline = image("data:image/png;base64," + "A" * 200_000)  # 150 kB of PNG
    assert estimate_prompt_tokens({"messages": with_images(small)}) == 4 + IMAGE_TOKENS
    assert estimate_prompt_tokens({"messages": with_images(inline)}) == 4 + IMAGE_TOKENS
    body = {"messages": with_images(small, inline)}
    assert estimate_prompt_tokens(body) == 4 + 2 * IMAGE_TOKENS
    assert estimate_prompt_tokens(body, image_tokens=300) == 4 + 2 * 300
    # Qwen-VL's high-resolution switch lets an image use up to 16384 tokens.
    body["vl_high_resolution_images"] = True
    assert estimate_prompt_tokens(body) == 4 + 2 * HIGH_RES_IMAGE_TOKENS


def test_other_parts_count_as_their_json_text() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    body = {"messages": with_images(audio)}
    assert estimate_prompt_tokens(body) == tokens(36 + estimate_tenths(compact(audio)))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.dictionaries(st.text(max_size=12), _json, max_size=4), max_size=3) | _json,
    extra=st.dictionaries(
        st.sampled_from(["tools", "functions", "tool_choice", "response_format", "n"]), _json
    ),
)
def test_any_json_gets_an_estimate_that_only_grows_with_more_fields(
    messages: Any, extra: dict[str, Any]
) -> None:
    base = estimate_prompt_tokens({"messages": messages})
    assert 0 <= base <= estimate_prompt_tokens({"messages": messages, **extra})


def chat(**body: Any) -> Any:
    return parse_chat_request({"model": MODEL.id, "messages": HI, **body}, {MODEL.id: MODEL})


@pytest.mark.parametrize("value", [0, -1, MAX_TOKENS + 1, 1.5, "100", True, [100]])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_completion_limits_are_validated_alike(name: str, value: Any) -> None:
    with pytest.raises(ApiError) as caught:
        chat(**{name: value})
    assert caught.value.status == 400 and caught.value.param == name
    assert caught.value.message == f"{name} must be an integer from 1 to {MAX_TOKENS}"


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 150}, 150),  # what LangChain sends
        ({"max_tokens": 100, "max_completion_tokens": 150}, 150),
        ({"max_tokens": 300, "max_completion_tokens": 150}, 300),
    ],
)
def test_completion_limit_is_the_larger_of_both(body: dict[str, Any], limit: int | None) -> None:
    assert chat(**body).completion_limit == limit


def test_hold_is_the_worst_case_in_tokens_and_exact_cost_units() -> None:
    quota = QuotaSettings(default_completion_tokens=500)
    input_price, output_price = unit_price(MODEL.price.input), unit_price(MODEL.price.output)
    assert (input_price, output_price) == (2700, 11000)  # 1e-10 USD a token

    hold = hold_for(chat(max_completion_tokens=150), quota)
    assert (hold.tokens, hold.cost_units) == (4 + 150, 4 * 2700 + 150 * 11000)
    hold = hold_for(chat(), quota)  # no limit: the configured default
    assert (hold.tokens, hold.cost_units) == (4 + 500, 4 * 2700 + 500 * 11000)
    hold = hold_for(chat(max_tokens=150, n=3), quota)  # each of n choices may use it all
    assert (hold.tokens, hold.cost_units) == (4 + 450, 4 * 2700 + 450 * 11000)
    for n in (0, 129, "3", None):  # not a count: the provider's to refuse
        assert hold_for(chat(max_tokens=150, n=n), quota).tokens == 4 + 150
    # The cached-input price is never assumed: the prompt may miss the cache.
    hold = hold_for(chat(max_tokens=1, tools=[WEATHER]), quota)
    assert hold.cost_units == estimate(tools=[WEATHER]) * 2700 + 11000


@pytest.mark.parametrize("value", [0, 1_000_001])
def test_image_tokens_setting_is_bounded(value: int) -> None:
    data = base_config("http://127.0.0.1:9", "sqlite:///unused.db")
    data["quota"] = {"image_tokens": value}
    with pytest.raises(ConfigError, match=r"quota\.image_tokens: must be at"):
        parse_config(data, PROVIDER_ENV)
    data["quota"] = {"image_tokens": 300}
    assert parse_config(data, PROVIDER_ENV).quota.image_tokens == 300
