"""How the relay frames one upstream event for the client's dialect."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from build import config, meter

from keymeai.api.dialect import ChatCompletions
from keymeai.api.relay import ChunkRelay, _BrokenChunk
from keymeai.api.responses_dialect import ResponsesDialect
from keymeai.api.validation import parse_chat_request

BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def relay_for(dialect: Any) -> ChunkRelay:
    chat = parse_chat_request(dict(BODY), config().model_names)
    opened = SimpleNamespace(events=SimpleNamespace(), attempt=SimpleNamespace())
    return ChunkRelay(opened, dialect, meter(chat), config().gateway, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event",
    [
        b'{"choices": [{"index": 0, "delta": "not an object"}]}',
        b'{"choices": [{"index": 0, "delta": {"content": ["not", "text"]}}]}',
    ],
)
def test_a_chunk_the_dialect_cannot_carry_is_the_upstreams_fault(event: bytes) -> None:
    stream = relay_for(ResponsesDialect({"model": "chat"}, {}))
    with pytest.raises(_BrokenChunk, match="unexpected shape"):
        stream.frame(event)


def test_chat_completions_pass_a_chunk_as_the_upstream_sent_it() -> None:
    event = b'{"choices": [{"index": 0, "delta": {"content": "hi"}}]}'
    chat = parse_chat_request(dict(BODY), config().model_names)
    framed = relay_for(ChatCompletions(chat)).frame(event)
    assert framed is not None and event in framed
