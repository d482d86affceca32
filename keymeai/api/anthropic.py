"""The provider's chat completion, answered as Anthropic's Messages API.

The relay meters the chat completion as the provider sent it (keymeai.api.relay); this
dialect only translates: a completion into a `message`, and a stream of chunks into
Anthropic's events (message_start, one content block at a time, message_delta with the
stop reason and cumulative usage, message_stop). Claude Code and the anthropic SDK's
stream helper assemble those events strictly: message_start comes first whatever the
upstream sends first, and each block is stopped before the next starts.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import anthropic_error

# chat completions' finish_reason -> Anthropic's stop_reason
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# How a stream cut short is told, by the relay's code (keymeai.api.relay): a gateway that is
# stopping is overloaded for the client's retry logic, anything else an api_error.
FAILED_STATUS = {"server_shutting_down": 503}


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; ASCII-escaped if the provider sent a lone surrogate (a
    `\\ud800` escape), which UTF-8 cannot encode."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def sse(kind: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE event: its type on the `event:` line and in the data."""
    return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **data}) + b"\n\n"


def stop_reason(finish_reason: Any) -> str | None:
    if not finish_reason:
        return None
    return (
        STOP_REASONS.get(finish_reason, "end_turn")
        if isinstance(finish_reason, str)
        else "end_turn"
    )


def usage_of(usage: Any) -> dict[str, int]:
    """Anthropic's usage from the provider's: input_tokens excludes the cache reads, so
    uncached plus cached is the provider's prompt_tokens."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached or _int(usage.get("prompt_cache_hit_tokens")), prompt)
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": _int(usage.get("completion_tokens")),
    }


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tool_input(arguments: Any) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is (a model that wrote
    no or broken JSON gets its text kept under `_raw`, never a 5xx)."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_value": parsed}


def message_id(completion_id: Any) -> str:
    return f"msg_{completion_id}" if isinstance(completion_id, str) and completion_id else "msg_"


class AnthropicMessages:
    """Anthropic's Messages API for one request, on the model id the client asked for."""

    def __init__(self, model_id: str, prompt_estimate: int) -> None:
        self.model_id = model_id
        self.prompt_estimate = prompt_estimate
        self.started = False
        self.block: str | None = None  # the type of the open content block
        self.index = -1  # the open block's index
        self.tool_index: Any = None  # the upstream's index and id of the open tool call
        self.tool_id: Any = None
        self.stop_reason: str | None = None
        self.usage: Any = None

    def _message(self, completion_id: Any, content: list[Any], usage: Any) -> dict[str, Any]:
        return {
            "id": message_id(completion_id),
            "type": "message",
            "role": "assistant",
            "model": self.model_id,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    def answer(self, completion: dict[str, Any], raw: bytes) -> bytes:
        choice = _obj((_list(completion.get("choices")) or [{}])[0])
        message = _obj(choice.get("message"))
        content: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for call in _list(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or f"toolu_{len(content)}",
                    "name": function.get("name") or "",
                    "input": tool_input(function.get("arguments")),
                }
            )
        self.stop_reason = stop_reason(choice.get("finish_reason")) or "end_turn"
        body = self._message(completion.get("id"), content, usage_of(completion.get("usage")))
        return dumps(body)

    # The stream: every method returns the events to write, message_start first.

    def _start(self, completion_id: Any = None) -> bytes:
        if self.started:
            return b""
        self.started = True
        usage = {**usage_of(None), "input_tokens": self.prompt_estimate}
        return sse("message_start", {"message": self._message(completion_id, [], usage)})

    def _open(self, block: str, content_block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.block = block
        return out + sse(
            "content_block_start", {"index": self.index, "content_block": content_block}
        )

    def _close(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        self.tool_index = self.tool_id = None
        return sse("content_block_stop", {"index": self.index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"index": self.index, "delta": delta})

    def event(self, chunk: dict[str, Any], raw: bytes) -> bytes | None:
        out = self._start(chunk.get("id"))
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in _list(chunk.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = _obj(choice.get("delta"))
            out += self._translate(delta)
            self.stop_reason = stop_reason(choice.get("finish_reason")) or self.stop_reason
        return out or None

    def _translate(self, delta: dict[str, Any]) -> bytes:
        out = b""
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            if self.block != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": reasoning})
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.block != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": text})
        for call in _list(delta.get("tool_calls")):
            if isinstance(call, dict):
                out += self._tool_call(call)
        return out

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        """A tool call's fragment: a new call (a new index, or an id) opens a tool_use
        block; its argument fragments stream as input_json_delta."""
        out = b""
        function = _obj(call.get("function"))
        index, call_id = call.get("index"), call.get("id")
        if (
            self.block != "tool_use"
            or index != self.tool_index
            or (call_id and self.tool_id and call_id != self.tool_id)
        ):
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call_id or f"toolu_{self.index + 1}",
                "name": function.get("name") or "",
                "input": {},
            }
            out += self._open("tool_use", block)
            self.tool_index, self.tool_id = index, call_id
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    def ping(self) -> bytes:
        return self._start() + sse("ping", {})

    def done(self) -> bytes:
        usage = usage_of(self.usage)
        if self.usage is None:
            usage["input_tokens"] = self.prompt_estimate
        delta = {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None}
        return (
            self._start()
            + self._close()
            + sse("message_delta", {"delta": delta, "usage": usage})
            + sse("message_stop", {})
        )

    def failed(self, message: str, code: str) -> bytes:
        _, body = anthropic_error(FAILED_STATUS.get(code, 500), message)
        return self._start() + sse("error", {"error": body["error"]})
