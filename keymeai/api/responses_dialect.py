"""The provider's chat completion as OpenAI's Responses API.

A non-stream answer becomes one Response object; a stream becomes OpenAI's event
sequence (`response.created`, `response.in_progress`, then per output item
`output_item.added`, its parts and deltas, `output_item.done`, and at last
`response.completed` with the usage, `response.incomplete` when cut by
`max_output_tokens`, or `response.failed`), each event numbered by `sequence_number`.
The relay meters the chat chunks; this module only translates them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..ledger.metering import parse_usage
from .dialect import PING

# Chat finish reasons that leave a response incomplete, and the reason OpenAI gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_of(usage: Any) -> dict[str, Any] | None:
    """Chat completions' usage in the Responses shape, counted as the ledger counts it
    (cache hits as DeepSeek or OpenAI report them); None if it is missing or malformed,
    which a provider's odd field must not turn into an error after the answer came."""
    counts = parse_usage(usage)
    if counts is None:
        return None
    return {
        "input_tokens": counts.prompt,
        "input_tokens_details": {"cached_tokens": counts.cached},
        "output_tokens": counts.completion,
        "output_tokens_details": {"reasoning_tokens": counts.reasoning},
        "total_tokens": counts.total,
    }


def _utf8(text: str) -> bytes:
    """UTF-8, a lone surrogate (which a provider's JSON may escape) written as `?`."""
    return text.encode(errors="replace")


class ResponsesDialect:
    """One Responses request's answer. `shell` is the Response object's echo of the
    request (model, instructions, tools, ...); `names` maps flattened tool names back to
    their namespace; `on_end` gets the final Response object (to store it)."""

    def __init__(
        self,
        shell: dict[str, Any],
        names: dict[str, tuple[str, str]],
        on_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.response: dict[str, Any] = {
            "id": new_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            **shell,
            "output": [],
            "usage": None,
        }
        self.names = names
        self.on_end = on_end
        self.sequence = 0
        self.started = False
        self.open: dict[str, Any] | None = None  # the output item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # tool call index → its item
        self.finish_reason: str | None = None

    # -- non-stream -------------------------------------------------------------

    def answer(self, completion: dict[str, Any], raw: bytes) -> bytes:
        choices = completion.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        output = self.response["output"]
        if message.get("reasoning_content"):
            output.append(self._reasoning(message["reasoning_content"], "completed"))
        content = message.get("content")
        calls = message.get("tool_calls") or []
        if content or not calls:
            output.append(self._message(content or "", "completed"))
        for call in calls:
            function = call.get("function") or {}
            item = self._call(call.get("id"), function.get("name"), "completed")
            item["arguments"] = function.get("arguments") or ""
            output.append(item)
        self.finish_reason = choice.get("finish_reason")
        self.response["usage"] = usage_of(completion.get("usage"))
        return _utf8(json.dumps(self._end(), ensure_ascii=False))

    # -- stream -----------------------------------------------------------------

    def event(self, chunk: dict[str, Any], raw: bytes) -> bytes | None:
        out = self._start()
        if chunk.get("usage"):
            self.response["usage"] = usage_of(chunk["usage"]) or self.response["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                out += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    out += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out or None

    def ping(self) -> bytes:
        return PING

    def done(self) -> bytes:
        out = self._start() + self._close()
        end = self._end()
        kind = "response.incomplete" if end["status"] == "incomplete" else "response.completed"
        return out + self._sse(kind, response=end)

    def failed(self, message: str, code: str) -> bytes:
        out = self._start() + self._close()
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        return out + self._sse("response.failed", response=self.response)

    # -- items ------------------------------------------------------------------

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._sse("response.created", response=self.response) + self._sse(
            "response.in_progress", response=self.response
        )

    def _text(self, kind: str, text: str) -> bytes:
        """A piece of reasoning or answer text, opening its item first if need be."""
        out = b""
        if self.open is None or self.open["type"] != kind:
            out += self._close()
            item = (
                self._reasoning("", "in_progress")
                if kind == "reasoning"
                else self._message("", "in_progress")
            )
            out += self._add(item)
            part = item["content"][0]
            out += self._sse(
                "response.content_part.added", **self._where(item), part=dict(part, text="")
            )
        assert self.open is not None
        item = self.open
        item["content"][0]["text"] += text
        event = (
            "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        )
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        return out + self._sse(event, **self._where(item), delta=text, **extra)

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        item = self.calls.get(index)
        function = call.get("function") or {}
        if item is None:
            out += self._close()
            item = self._call(call.get("id"), function.get("name"), "in_progress")
            self.calls[index] = item
            out += self._add(item)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            out += self._sse(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=item["_index"],
                delta=arguments,
            )
        return out

    def _add(self, item: dict[str, Any]) -> bytes:
        item["_index"] = len(self.response["output"])
        self.response["output"].append(item)
        self.open = item
        shown = {k: v for k, v in item.items() if k != "_index"}
        if "content" in shown:
            shown["content"] = []
        return self._sse("response.output_item.added", output_index=item["_index"], item=shown)

    def _close(self) -> bytes:
        """End the open item: its text or arguments in full, then output_item.done."""
        item, self.open = self.open, None
        if item is None:
            return b""
        item["status"] = "completed"
        where = {"item_id": item["id"], "output_index": item["_index"]}
        out = b""
        if item["type"] == "function_call":
            out += self._sse(
                "response.function_call_arguments.done", **where, arguments=item["arguments"]
            )
        else:
            part = item["content"][0]
            done = (
                "response.output_text.done"
                if item["type"] == "message"
                else "response.reasoning_text.done"
            )
            extra: dict[str, Any] = {"logprobs": []} if item["type"] == "message" else {}
            out += self._sse(done, **where, content_index=0, text=part["text"], **extra)
            out += self._sse("response.content_part.done", **where, content_index=0, part=part)
        del item["_index"]
        return out + self._sse(
            "response.output_item.done", output_index=where["output_index"], item=item
        )

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": item["_index"], "content_index": 0}

    @staticmethod
    def _message(text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [part],
        }

    @staticmethod
    def _reasoning(text: str, status: str) -> dict[str, Any]:
        part = {"type": "reasoning_text", "text": text}
        return {
            "id": new_id("rs"),
            "type": "reasoning",
            "summary": [],
            "content": [part],
            "status": status,
        }

    def _call(self, call_id: Any, name: Any, status: str) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": call_id if isinstance(call_id, str) else new_id("call"),
            "name": name if isinstance(name, str) else "",
            "arguments": "",
            "status": status,
        }
        if item["name"] in self.names:
            item["namespace"], item["name"] = self.names[item["name"]]
        return item

    def _end(self) -> dict[str, Any]:
        """The final Response object (handed to `on_end` once)."""
        reason = INCOMPLETE.get(self.finish_reason or "")
        self.response["status"] = "incomplete" if reason else "completed"
        self.response["incomplete_details"] = {"reason": reason} if reason else None
        if self.on_end is not None:
            self.on_end(self.response)
        return self.response

    def _sse(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return _utf8(f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n")
