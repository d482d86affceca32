"""The API a client speaks, as the relay writes it.

Every provider behind the gateway answers in chat completions' shape, and the relay
meters that shape (keymeai.api.relay). A dialect turns what the provider sent into what the
client's API expects: the answer of a non-stream request, one stream event per upstream
chunk, the stream's end, its failure and its keep-alive. Chat completions pass through
as sent; other APIs (Anthropic's Messages, OpenAI's Responses) translate.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ..errors import ApiError
from .validation import ChatRequest

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


class Dialect(Protocol):
    """What the relay asks of a client's API. A dialect lives for one request, so it may
    keep state across the events of a stream (an open content block, the usage so far)."""

    def answer(self, completion: dict[str, Any], raw: bytes) -> bytes:
        """The body of a non-stream answer, from the provider's completion (parsed and
        as sent)."""
        ...

    def event(self, chunk: dict[str, Any], raw: bytes) -> bytes | None:
        """The bytes to send for one upstream chunk (parsed and as sent), None for
        nothing."""
        ...

    def ping(self) -> bytes:
        """A keep-alive while the upstream is silent."""
        ...

    def done(self) -> bytes:
        """The end of a stream that completed."""
        ...

    def failed(self, message: str, code: str) -> bytes:
        """The end of a stream cut short (the upstream died, the gateway is stopping)."""
        ...


def error_event(message: str, code: str) -> bytes:
    """An SSE `error` event in OpenAI's error shape, which the openai SDK raises as an
    APIError."""
    body = ApiError(500, message, type="server_error", code=code).body()
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


class ChatCompletions:
    """OpenAI's chat completions: the provider's bytes as they came, with the usage the
    client did not ask for (`stream_options.include_usage`) taken out."""

    def __init__(self, chat: ChatRequest) -> None:
        self.include_usage = chat.include_usage

    def answer(self, completion: dict[str, Any], raw: bytes) -> bytes:
        return raw

    def event(self, chunk: dict[str, Any], raw: bytes) -> bytes | None:
        if chunk.get("usage") is not None and not self.include_usage:
            if not chunk.get("choices"):
                return None  # a usage-only chunk the client did not ask for
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
            raw = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()
        return b"data: " + raw + b"\n\n"

    def ping(self) -> bytes:
        return PING

    def done(self) -> bytes:
        return DONE

    def failed(self, message: str, code: str) -> bytes:
        return error_event(message, code)
