"""The character rule of token estimates (keymeai.tokens): what each script counts, and
sums that do not depend on how a stream split its text. The prompt side (messages,
schemas, images) is tests/test_estimate.py's."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymeai.tokens import delta_text, estimate_tenths, tokens


@pytest.mark.parametrize(
    ("text", "tenths"),
    [
        ("", 0),
        ("hello", 15),  # 0.3 a character
        ("  \n", 9),  # whitespace and punctuation too
        ("中文", 12),  # 0.6 a CJK character
        ("ひらがなカタカナ", 48),  # kana
        ("한국어", 18),  # hangul
        ("\uff21\uff22", 12),  # full-width forms
        ("a中b", 12),
    ],
)
def test_each_script_counts_by_the_rule(text: str, tenths: int) -> None:
    assert estimate_tenths(text) == tenths


@pytest.mark.parametrize(("tenths", "whole"), [(0, 0), (1, 1), (10, 1), (11, 2), (45, 5)])
def test_tokens_round_up(tenths: int, whole: int) -> None:
    assert tokens(tenths) == whole


@given(st.text(max_size=60), st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_a_text_counts_the_same_however_it_is_split(text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert sum(estimate_tenths(piece) for piece in pieces) == estimate_tenths(text)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        ({"content": "hi"}, "hi"),
        ({"reasoning_content": "think", "content": "say"}, "saythink"),
        ({"role": "assistant", "content": None}, ""),
        (
            {
                "tool_calls": [
                    {"index": 0, "function": {"name": "get_weather", "arguments": '{"a"'}},
                    {"index": 1, "function": {"arguments": ":1}"}},
                    {"index": 2, "function": None},
                    "junk",
                ]
            },
            'get_weather{"a":1}',
        ),
        ({"content": 5, "reasoning_content": ["x"]}, ""),
        (None, ""),
        ("text", ""),
    ],
)
def test_generated_text_of_a_delta(delta: Any, text: str) -> None:
    """What a stream chunk generated: content, reasoning, tool-call names and arguments."""
    assert delta_text(delta) == text
